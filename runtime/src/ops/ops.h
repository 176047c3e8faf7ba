// The com.fgq ops (docs/custom-ops.md), registered by register_ops.cpp.
#pragma once

#include <array>

#include "op_common.h"

namespace fgq {
namespace ort {

constexpr ONNXTensorElementDataType kAny = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ONNXTensorElementDataType kU8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
constexpr ONNXTensorElementDataType kI8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;

// TernaryMatMul and TernaryGemm: X, x_scale, x_zero_point, codes, scales, row_scale, neg_scales, neg_row_scale, bias
constexpr ONNXTensorElementDataType kInputTypes[kMaxInputs] = {kAny, kF32, kAny, kU8, kAny, kF32, kAny, kF32, kF32};
// The first five required; the rest (TernaryConv's too) optional.
constexpr bool kOptional[kMaxInputs] = {false, false, false, false, false, true, true,
                                        true,  true,  true,  true,  true,  true, true};

class MatMulKernel;
class GemmKernel;
class ConvKernel;

struct TernaryMatMulOp {
  static constexpr const char* kName = "TernaryMatMul";
  static constexpr size_t kInputs = kBias + 1;
  static constexpr const ONNXTensorElementDataType* kInputTypes = ort::kInputTypes;
  static constexpr ONNXTensorElementDataType kOutputType = kF32;
  static constexpr const bool* kOptional = ort::kOptional;
  using Kernel = MatMulKernel;
};
struct TernaryGemmOp {
  static constexpr const char* kName = "TernaryGemm";
  static constexpr size_t kInputs = kBias + 1;
  static constexpr const ONNXTensorElementDataType* kInputTypes = ort::kInputTypes;
  static constexpr ONNXTensorElementDataType kOutputType = kF32;
  static constexpr const bool* kOptional = ort::kOptional;
  using Kernel = GemmKernel;
};
// TernaryConv is registered once per output type: float, or the 8-bit levels of y_zero_point's type.
// onnxruntime takes the registration whose input types match the node; the float one declares
// y_zero_point float, which no valid node gives it, so it matches only nodes without one.
template <ONNXTensorElementDataType kOutput>
struct TernaryConvOp {
  static constexpr const char* kName = "TernaryConv";
  static constexpr size_t kInputs = kMaxInputs;
  static constexpr ONNXTensorElementDataType kInputTypes[kMaxInputs] = {
      kAny, kF32, kAny, kU8, kAny, kF32, kAny, kF32, kF32, kAny, kF32, kOutput, kF32, kAny};
  static constexpr ONNXTensorElementDataType kOutputType = kOutput;
  static constexpr const bool* kOptional = ort::kOptional;
  using Kernel = ConvKernel;
};

OrtCustomOp* ternary_matmul_op();
OrtCustomOp* ternary_gemm_op();
// The float, uint8 and int8 output registrations, in that order.
std::array<OrtCustomOp*, 3> ternary_conv_ops();

}  // namespace ort
}  // namespace fgq
