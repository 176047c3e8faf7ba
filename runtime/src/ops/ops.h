// The com.fgq ops (docs/custom-ops.md), registered by register_ops.cpp.
#pragma once

#include "op_common.h"

namespace fgq {
namespace ort {

constexpr ONNXTensorElementDataType kAny = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ONNXTensorElementDataType kU8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;

// X, x_scale, x_zero_point, codes, scales, row_scale, neg_scales, neg_row_scale, bias, residual
constexpr ONNXTensorElementDataType kInputTypes[kMaxInputs] = {kAny, kF32, kAny, kU8, kAny, kF32, kAny, kF32, kF32, kF32};
constexpr bool kOptional[kMaxInputs] = {false, false, false, false, false, true, true, true, true, true};

class MatMulKernel;
class GemmKernel;
class ConvKernel;

struct TernaryMatMulOp {
  static constexpr const char* kName = "TernaryMatMul";
  static constexpr size_t kInputs = kBias + 1;
  static constexpr const ONNXTensorElementDataType* kInputTypes = ort::kInputTypes;
  static constexpr const bool* kOptional = ort::kOptional;
  using Kernel = MatMulKernel;
};
struct TernaryGemmOp {
  static constexpr const char* kName = "TernaryGemm";
  static constexpr size_t kInputs = kBias + 1;
  static constexpr const ONNXTensorElementDataType* kInputTypes = ort::kInputTypes;
  static constexpr const bool* kOptional = ort::kOptional;
  using Kernel = GemmKernel;
};
struct TernaryConvOp {
  static constexpr const char* kName = "TernaryConv";
  static constexpr size_t kInputs = kResidual + 1;
  static constexpr const ONNXTensorElementDataType* kInputTypes = ort::kInputTypes;
  static constexpr const bool* kOptional = ort::kOptional;
  using Kernel = ConvKernel;
};

OrtCustomOp* ternary_matmul_op();
OrtCustomOp* ternary_gemm_op();
OrtCustomOp* ternary_conv_op();

}  // namespace ort
}  // namespace fgq
