// The com.fgq ops (docs/custom-ops.md), registered by register_ops.cpp.
#pragma once

#include "op_common.h"

namespace fgq {
namespace ort {

constexpr ONNXTensorElementDataType kAny = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ONNXTensorElementDataType kU8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;

// X, x_scale, x_zero_point, codes, scales, row_scale, neg_scales, neg_row_scale, bias
constexpr ONNXTensorElementDataType kInputTypes[kInputCount] = {kAny, kF32, kAny, kU8, kAny, kF32, kAny, kF32, kF32};
constexpr bool kOptional[kInputCount] = {false, false, false, false, false, true, true, true, true};

class MatMulKernel;
class GemmKernel;
class ConvKernel;

struct TernaryMatMulOp {
  static constexpr const char* kName = "TernaryMatMul";
  static constexpr const ONNXTensorElementDataType* kInputTypes = ort::kInputTypes;
  static constexpr const bool* kOptional = ort::kOptional;
  using Kernel = MatMulKernel;
};
struct TernaryGemmOp {
  static constexpr const char* kName = "TernaryGemm";
  static constexpr const ONNXTensorElementDataType* kInputTypes = ort::kInputTypes;
  static constexpr const bool* kOptional = ort::kOptional;
  using Kernel = GemmKernel;
};
struct TernaryConvOp {
  static constexpr const char* kName = "TernaryConv";
  static constexpr const ONNXTensorElementDataType* kInputTypes = ort::kInputTypes;
  static constexpr const bool* kOptional = ort::kOptional;
  using Kernel = ConvKernel;
};

OrtCustomOp* ternary_matmul_op();
OrtCustomOp* ternary_gemm_op();
OrtCustomOp* ternary_conv_op();

}  // namespace ort
}  // namespace fgq
