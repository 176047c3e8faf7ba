#include "op_common.h"

#include "fgq/packed_format.h"

#include <algorithm>
#include <cmath>
#include <mutex>

namespace fgq {
namespace ort {

const OrtApi* g_api = nullptr;

void fail(const std::string& message) { throw Error(message); }

void check(OrtStatus* status) {
  if (!status) return;
  std::string message = g_api->GetErrorMessage(status);
  g_api->ReleaseStatus(status);
  throw Error(message);
}

OrtStatus* status_from_current_exception() {
  try {
    throw;
  } catch (const Error& e) {
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const std::bad_alloc&) {
    return g_api->CreateStatus(ORT_FAIL, "fgq_ops: out of memory");
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return g_api->CreateStatus(ORT_FAIL, "fgq_ops: unknown error");
  }
}

int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r) || r > kMaxElements)
    fail(std::string(what) + ": size out of range");
  return r;
}

int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r) || r > kMaxElements || r < -kMaxElements)
    fail(std::string(what) + ": size out of range");
  return r;
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "double";
    default: return "an unsupported type";
  }
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

Tensor view(const OrtValue* value) {
  Tensor t;
  if (!value) return t;
  int is_tensor = 0;
  check(g_api->IsTensor(value, &is_tensor));
  if (!is_tensor) fail("expected a tensor input");
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(g_api->GetTensorTypeAndShape(value, &info));
  struct Release {
    OrtTensorTypeAndShapeInfo* p;
    ~Release() { g_api->ReleaseTensorTypeAndShapeInfo(p); }
  } release{info};
  check(g_api->GetTensorElementType(info, &t.type));
  size_t rank = 0;
  check(g_api->GetDimensionsCount(info, &rank));
  t.shape.resize(rank);
  if (rank) check(g_api->GetDimensions(info, t.shape.data(), rank));
  t.size = 1;
  for (int64_t d : t.shape) t.size = checked_mul(t.size, d, "tensor");
  void* data = nullptr;
  check(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  t.data = data;
  t.present = true;
  if (t.size > 0 && !t.data) fail("tensor without data");
  return t;
}

Tensor input(OrtKernelContext* ctx, size_t index) {
  size_t count = 0;
  check(g_api->KernelContext_GetInputCount(ctx, &count));
  if (index >= count) return Tensor();
  const OrtValue* value = nullptr;
  check(g_api->KernelContext_GetInput(ctx, index, &value));
  return view(value);
}

void* output(OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& shape, ONNXTensorElementDataType type) {
  int64_t size = 1;
  for (int64_t d : shape) size = checked_mul(size, d, "output");
  OrtValue* value = nullptr;
  check(g_api->KernelContext_GetOutput(ctx, index, shape.data(), shape.size(), &value));
  const Tensor t = view(value);
  if (t.type != type) fail(std::string("output is ") + type_name(t.type) + ", the node's inputs make it " + type_name(type));
  if (size > 0 && !t.data) fail("output without data");
  return const_cast<void*>(t.data);
}

int64_t attr_int(const OrtKernelInfo* info, const char* name, const int64_t* fallback) {
  int64_t v = 0;
  OrtStatus* s = g_api->KernelInfoGetAttribute_int64(info, name, &v);
  if (!s) return v;
  g_api->ReleaseStatus(s);
  if (!fallback) fail(std::string("missing int attribute '") + name + "'");
  return *fallback;
}

float attr_float(const OrtKernelInfo* info, const char* name, const float* fallback) {
  float v = 0;
  OrtStatus* s = g_api->KernelInfoGetAttribute_float(info, name, &v);
  if (!s) return v;
  g_api->ReleaseStatus(s);
  if (!fallback) fail(std::string("missing float attribute '") + name + "'");
  return *fallback;
}

std::vector<int64_t> attr_ints(const OrtKernelInfo* info, const char* name, const std::vector<int64_t>* fallback) {
  size_t count = 0;
  OrtStatus* s = g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &count);
  if (s) {
    g_api->ReleaseStatus(s);
    if (!fallback) fail(std::string("missing ints attribute '") + name + "'");
    return *fallback;
  }
  if (count > 64) fail(std::string("attribute '") + name + "' has too many values");
  std::vector<int64_t> v(count);
  if (count) check(g_api->KernelInfoGetAttributeArray_int64(info, name, v.data(), &count));
  return v;
}

std::vector<float> attr_floats(const OrtKernelInfo* info, const char* name, const std::vector<float>* fallback) {
  size_t count = 0;
  OrtStatus* s = g_api->KernelInfoGetAttributeArray_float(info, name, nullptr, &count);
  if (s) {
    g_api->ReleaseStatus(s);
    if (!fallback) fail(std::string("missing floats attribute '") + name + "'");
    return *fallback;
  }
  if (count > 64) fail(std::string("attribute '") + name + "' has too many values");
  std::vector<float> v(count);
  if (count) check(g_api->KernelInfoGetAttributeArray_float(info, name, v.data(), &count));
  return v;
}

std::string attr_string(const OrtKernelInfo* info, const char* name, const std::string* fallback) {
  size_t len = 0;
  OrtStatus* s = g_api->KernelInfoGetAttribute_string(info, name, nullptr, &len);
  if (s) {
    g_api->ReleaseStatus(s);
    if (!fallback) fail(std::string("missing string attribute '") + name + "'");
    return *fallback;
  }
  std::string v(len, '\0');
  if (len) check(g_api->KernelInfoGetAttribute_string(info, name, &v[0], &len));
  v.resize(len ? len - 1 : 0);  // len counted the terminating NUL
  return v;
}

Activation attr_activation(const OrtKernelInfo* info) {
  const std::string none;
  const std::vector<float> no_params;
  const std::string name = attr_string(info, "activation", &none);
  const std::vector<float> params = attr_floats(info, "activation_params", &no_params);
  struct Known {
    const char* name;
    Activation::Kind kind;
    size_t params;
  };
  static const Known known[] = {{"relu", Activation::kRelu, 0},
                                {"clip", Activation::kClip, 2},
                                {"hardsigmoid", Activation::kHardSigmoid, 2},
                                {"hardswish", Activation::kHardSwish, 0}};
  Activation a;
  const std::vector<float> affine = attr_floats(info, "activation_affine", &no_params);
  if (!affine.empty()) {
    if (affine.size() != 2 || !std::isfinite(affine[0]) || !std::isfinite(affine[1]))
      fail("activation_affine must be two finite values [scale, shift]");
    a.affine = true;
    a.scale = affine[0];
    a.shift = affine[1];
  }
  const int64_t zero = 0, relu = attr_int(info, "relu", &zero);
  if (relu != 0 && relu != 1) fail("relu must be 0 or 1");
  if (relu && !name.empty()) fail("relu=1 and an activation attribute exclude each other");
  if (relu) a.kind = Activation::kRelu;
  if (name.empty()) {
    if (!params.empty()) fail("activation_params given without an activation");
    return a;
  }
  for (const Known& k : known) {
    if (name != k.name) continue;
    if (params.size() != k.params)
      fail("activation '" + name + "' takes " + std::to_string(k.params) + " activation_params, got " +
           std::to_string(params.size()));
    a.kind = k.kind;
    if (k.params) {
      a.p0 = params[0];
      a.p1 = params[1];
    }
    if (a.kind == Activation::kClip && !(a.p0 <= a.p1))  // also rejects NaN
      fail("clip activation_params [min, max] need min <= max, got [" + std::to_string(a.p0) + ", " +
           std::to_string(a.p1) + "]");
    if (a.kind == Activation::kHardSigmoid && !(std::isfinite(a.p0) && std::isfinite(a.p1)))
      fail("hardsigmoid activation_params [alpha, beta] must be finite");
    return a;
  }
  fail("activation must be relu, clip, hardsigmoid or hardswish, got '" + name + "'");
}

void parallel_for(OrtKernelContext* ctx, size_t total, void (*fn)(void*, size_t), void* data) {
  if (total == 0) return;
  if (total == 1 || !ctx) {
    for (size_t i = 0; i < total; ++i) fn(data, i);
    return;
  }
  check(g_api->KernelContext_ParallelFor(ctx, fn, total, 0, data));
}

// ---------------------------------------------------------------------------

static bool input_exists(const OrtKernelInfo* info, size_t index) {
  size_t count = 0;
  check(g_api->KernelInfo_GetInputCount(info, &count));
  if (index >= count) return false;
  size_t size = 0;
  check(g_api->KernelInfo_GetInputName(info, index, nullptr, &size));
  return size > 1;  // size counts the terminating NUL; an omitted input has the empty name
}

bool constant_input(const OrtKernelInfo* info, size_t index, const OrtValue** value) {
  *value = nullptr;
  if (!input_exists(info, index)) return true;
  int is_constant = 0;
  const OrtValue* v = nullptr;
  OrtStatus* s = g_api->KernelInfoGetConstantInput_tensor(info, index, &is_constant, &v);
  if (s) {
    g_api->ReleaseStatus(s);
    return false;
  }
  if (!is_constant || !v) return false;
  *value = v;
  return true;
}

TernaryKernelBase::TernaryKernelBase(const OrtKernelInfo* info) {
  std::string error;
  dispatch_ = active_dispatch(&error);
  if (!dispatch_) fail(error);
  n_ = attr_int(info, "N", nullptr);
  if (n_ < 1 || n_ > kMaxGroupSize)
    fail("attribute N (group size) must be in [1, " + std::to_string(kMaxGroupSize) + "], got " + std::to_string(n_));
  const int64_t unset = INT64_MIN;
  qmin_attr_ = attr_int(info, "act_qmin", &unset);
  qmax_attr_ = attr_int(info, "act_qmax", &unset);
  activation_ = attr_activation(info);
  finish_row_ = finish_row_for(*dispatch_);
  // Constant x_scale and x_zero_point (the converter writes them so): checked and built once, not per call.
  const OrtValue *scale = nullptr, *zero_point = nullptr;
  if (constant_input(info, kXScale, &scale) && constant_input(info, kXZeroPoint, &zero_point) && scale && zero_point)
    constant_quant_ = quant_of(view(scale), view(zero_point));
}

// The element type of input `index` as the graph declares it (UNDEFINED if unknown).
static ONNXTensorElementDataType declared_type(const OrtKernelInfo* info, size_t index) {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  OrtTypeInfo* type_info = nullptr;
  const OrtTensorTypeAndShapeInfo* tensor = nullptr;
  OrtStatus* s = g_api->KernelInfo_GetInputTypeInfo(info, index, &type_info);
  if (!s) s = g_api->CastTypeInfoToTensorInfo(type_info, &tensor);
  if (!s && tensor) s = g_api->GetTensorElementType(tensor, &type);
  const bool known = s == nullptr;
  if (s) g_api->ReleaseStatus(s);
  if (type_info) g_api->ReleaseTypeInfo(type_info);
  return known ? type : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

void TernaryKernelBase::use_dense_weights(const OrtKernelInfo* info, int64_t segments, int64_t length) {
  if (n_ != 1 || length < 1 || segments < 1 || declared_type(info, kScales) != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) return;
  if (dense_positions(segments, length) > kFoldMaxPositions) return;  // int32 sums: such rows keep the N = 1 form
  dense_ = true;
  n_ = dense_group_size(length);
}

void TernaryKernelBase::init_weights(const OrtKernelInfo* info, const ReductionLayout& layout, int64_t rows) {
  if (layout.n < 1 || layout.length < 1 || layout.segments < 1) fail("invalid reduction layout");
  checked_mul(checked_mul(layout.segments, layout.groups_per_segment(), "groups"), kernel_group_positions(layout.n),
              "reduction length");
  if (layout.segments * layout.groups_per_segment() * kernel_group_positions(layout.n) > (int64_t{1} << 31))
    fail("reduction too long");
  layout_ = layout;
  rows_ = rows;
  const OrtValue* values[5] = {};
  const size_t indices[5] = {kCodes, kScales, kRowScale, kNegScales, kNegRowScale};
  for (int i = 0; i < 5; ++i)
    if (!constant_input(info, indices[i], &values[i])) return;  // not constant: repack per call
  if (!values[0] || !values[1]) return;
  auto p = std::make_shared<Planes>();
  repack(view(values[0]), view(values[1]), view(values[2]), view(values[3]), view(values[4]), p.get());
  constant_planes_ = std::move(p);
}

const Planes& TernaryKernelBase::planes(OrtKernelContext* ctx, Planes& scratch) const {
  if (constant_planes_) return *constant_planes_;
  repack(input(ctx, kCodes), input(ctx, kScales), input(ctx, kRowScale), input(ctx, kNegScales),
         input(ctx, kNegRowScale), &scratch);
  return scratch;
}

static ScaleType scale_type_of(const Tensor& t, const char* what) {
  switch (t.type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return ScaleType::kF32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return ScaleType::kF16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return ScaleType::kU8;
    default: fail(std::string(what) + " must be float, float16 or uint8, got " + type_name(t.type));
  }
}

void TernaryKernelBase::repack(const Tensor& codes, const Tensor& scales, const Tensor& row_scale,
                               const Tensor& neg_scales, const Tensor& neg_row_scale, Planes* out) const {
  const int64_t G = layout_.groups();
  if (!codes.present || !scales.present) fail("codes and scales are required inputs");
  if (scales.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) return repack_int8(codes, scales, row_scale, neg_scales, neg_row_scale, out);
  if (codes.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) fail("codes must be uint8");
  if (codes.shape.size() != 2) fail("codes must be 2-D [M, row_bytes], got " + shape_string(codes.shape));
  const int64_t rows_ = this->rows_ >= 0 ? this->rows_ : codes.shape[0];
  const int64_t row_bytes = checked_mul(G, layout_.n, "codes") / 4 + (G * layout_.n % 4 != 0);
  if (codes.shape.size() != 2 || codes.shape[0] != rows_ || codes.shape[1] != row_bytes)
    fail("codes shape " + shape_string(codes.shape) + " does not match [M, ceil(G*N/4)] = " +
         shape_string({rows_, row_bytes}) + " (G=" + std::to_string(G) + ", N=" + std::to_string(layout_.n) + ")");
  auto check_scales = [&](const Tensor& s, const Tensor& rs, const char* what, const char* rs_what) {
    const ScaleType st = scale_type_of(s, what);
    if (s.shape.size() != 2 || s.shape[0] != rows_ || s.shape[1] != G)
      fail(std::string(what) + " shape " + shape_string(s.shape) + " does not match [M, G] = " +
           shape_string({rows_, G}));
    if (st == ScaleType::kU8 && !rs.present) fail(std::string("uint8 ") + what + " need the " + rs_what + " input");
    if (rs.present) {
      if (rs.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) fail(std::string(rs_what) + " must be float");
      if (rs.shape.size() != 1 || rs.shape[0] != rows_)
        fail(std::string(rs_what) + " shape " + shape_string(rs.shape) + " must be [M] = [" + std::to_string(rows_) + "]");
    }
    return st;
  };
  const ScaleType st = check_scales(scales, row_scale, "scales", "row_scale");
  out->asymmetric = neg_scales.present;
  if (out->asymmetric) {
    if (neg_scales.type != scales.type) fail("neg_scales must have the type of scales");
    const Tensor& nrs = neg_row_scale.present ? neg_row_scale : row_scale;
    check_scales(neg_scales, nrs, "neg_scales", "neg_row_scale");
  } else if (neg_row_scale.present) {
    fail("neg_row_scale given without neg_scales");
  }
  auto apply = [&](const void* s, const Tensor& rs, Plane plane, KernelWeights* w) {
    const std::string error = repack_weights(codes.as<uint8_t>(), rows_, row_bytes, s, st,
                                             rs.present ? rs.as<float>() : nullptr, layout_, plane, w, dispatch_->folded);
    if (!error.empty()) fail(error);
  };
  if (!out->asymmetric) {
    apply(scales.data, row_scale, Plane::kAll, &out->pos);
    out->neg = KernelWeights();
  } else {
    apply(scales.data, row_scale, Plane::kPositive, &out->pos);
    apply(neg_scales.data, neg_row_scale.present ? neg_row_scale : row_scale, Plane::kNegative, &out->neg);
  }
}

// int8 weights (docs/custom-ops.md, "int8 weights"): N = 1, `scales` int8 [M, G] holding the signed weights
// under row_scale [M], `codes` one row [1, ceil(G/4)] of +1 codes that every row shares.
void TernaryKernelBase::repack_int8(const Tensor& codes, const Tensor& weights, const Tensor& row_scale,
                                    const Tensor& neg_scales, const Tensor& neg_row_scale, Planes* out) const {
  if (neg_scales.present || neg_row_scale.present) fail("int8 weights (int8 scales) take no neg_scales or neg_row_scale");
  if (layout_.n != 1 && !dense_) fail("int8 weights (int8 scales) need N = 1, got N = " + std::to_string(layout_.n));
  const int64_t G = layout_.segments * layout_.length, row_bytes = (G + 3) / 4;  // a group a weight
  if (codes.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || codes.shape.size() != 2 || codes.shape[0] != 1 ||
      codes.shape[1] != row_bytes)
    fail("int8 weights take codes of one row, uint8 [1, ceil(G/4)] = [1, " + std::to_string(row_bytes) + "], got " +
         shape_string(codes.shape));
  const uint8_t* shared = codes.as<uint8_t>();
  for (int64_t g = 0; g < row_bytes * 4; ++g)
    if (packed::code_at(shared, static_cast<uint64_t>(g)) != (g < G ? packed::kCodePlus : packed::kCodeZero))
      fail("int8 weights take codes that are all +1 (and zero after the row's end)");
  const int64_t rows = rows_ >= 0 ? rows_ : (weights.shape.size() == 2 ? weights.shape[0] : -1);
  if (weights.shape.size() != 2 || weights.shape[0] != rows || weights.shape[1] != G)
    fail("int8 weights (scales) shape " + shape_string(weights.shape) + " does not match [M, G] = " +
         shape_string({rows, G}));
  if (!row_scale.present) fail("int8 weights need the row_scale input");
  if (row_scale.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) fail("row_scale must be float");
  if (row_scale.shape.size() != 1 || row_scale.shape[0] != rows)
    fail("row_scale shape " + shape_string(row_scale.shape) + " must be [M] = [" + std::to_string(rows) + "]");
  const std::string error = dense_ ? repack_dense_weights(weights.as<int8_t>(), rows, row_scale.as<float>(), layout_, &out->pos)
                                   : repack_int8_weights(weights.as<int8_t>(), rows, row_scale.as<float>(), layout_,
                                                         &out->pos, dispatch_->folded);
  if (!error.empty()) fail(error);
  out->neg = KernelWeights();
  out->asymmetric = false;
}

ActQuant TernaryKernelBase::act_quant(OrtKernelContext* ctx, const Tensor& x) const {
  const LevelQuant q = constant_quant_ ? *constant_quant_ : quant_of(input(ctx, kXScale), input(ctx, kXZeroPoint));
  if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && x.type != q.type)
    fail(std::string("X must be float or of x_zero_point's type (") + type_name(q.type) + "), got " + type_name(x.type));
  return q.quant;
}

TernaryKernelBase::LevelQuant TernaryKernelBase::quant_of(const Tensor& scale, const Tensor& zp) const {
  if (!scale.present || scale.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || scale.size != 1)
    fail("x_scale must be a float scalar");
  if (!zp.present || zp.size != 1 ||
      (zp.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 && zp.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8))
    fail("x_zero_point must be a uint8 or int8 scalar");
  const bool is_signed = zp.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  const int zero = is_signed ? *zp.as<int8_t>() : *zp.as<uint8_t>();
  const int64_t lo = is_signed ? -128 : 0, hi = is_signed ? 127 : 255;
  const int64_t qmin = qmin_attr_ == INT64_MIN ? lo : qmin_attr_;
  const int64_t qmax = qmax_attr_ == INT64_MIN ? hi : qmax_attr_;
  if (qmin < lo || qmax > hi || qmin > qmax)
    fail("act_qmin/act_qmax = " + std::to_string(qmin) + "/" + std::to_string(qmax) + " outside the " +
         type_name(zp.type) + " range or reversed");
  LevelQuant q{ActQuant(), zp.type};
  const std::string error = make_act_quant(*scale.as<float>(), zero, static_cast<int>(qmin), static_cast<int>(qmax),
                                           is_signed, &q.quant);
  if (!error.empty()) fail(error);
  return q;
}

const float* TernaryKernelBase::bias(OrtKernelContext* ctx, int64_t rows) const {
  if (constant_bias_ && static_cast<int64_t>(constant_bias_->size()) == rows) return constant_bias_->data();
  const Tensor b = input(ctx, kBias);
  if (!b.present) return nullptr;
  if (b.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) fail("bias must be float");
  if (b.shape.size() != 1 || b.shape[0] != rows)
    fail("bias shape " + shape_string(b.shape) + " must be [M] = [" + std::to_string(rows) + "]");
  return b.as<float>();
}

void TernaryKernelBase::keep_constant_bias(const OrtKernelInfo* info) {
  const OrtValue* value = nullptr;
  if (!constant_input(info, kBias, &value) || !value) return;
  const Tensor b = view(value);
  if (b.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && b.shape.size() == 1)  // else bias() refuses it per call
    constant_bias_.emplace(b.as<float>(), b.as<float>() + b.size);
}

bool TernaryKernelBase::folded_rows(const Planes& p, int64_t rows) const {
  return use_folded(*dispatch_, p.pos, rows) && (!p.asymmetric || use_folded(*dispatch_, p.neg, rows));
}

void TernaryKernelBase::quantize_rows_and_run(OrtKernelContext* ctx, const Tensor& x, const ActQuant& q, const Planes& p,
                                              int64_t B, int64_t K, int64_t row_step, int64_t elem_step, float alpha,
                                              const RowEpilogue& e, float* y) const {
  const int64_t M = p.pos.rows, Kp = p.pos.positions(), Gp = p.pos.padded_groups;
  if (B == 0 || M == 0) return;
  const bool natural = folded_rows(p, B);
  const std::vector<int64_t> map = kernel_position_map(layout_, p.pos.np, p.pos.padded_groups);
  const bool identity = is_identity_map(map, K);
  AlignedBuffer<int8_t> xs(checked_mul(B, Kp, "activation buffer"));
  AlignedBuffer<int32_t> gsum(natural ? 0 : checked_mul(B, Gp, "activation buffer"));
  constexpr int64_t kRowsPerTask = 8;
  auto quantize = [&](size_t t) {
    const int64_t r0 = static_cast<int64_t>(t) * kRowsPerTask, r1 = std::min(B, r0 + kRowsPerTask);
    std::vector<int8_t> row(static_cast<size_t>(Kp));
    for (int64_t r = r0; r < r1; ++r) {
      if (natural) {
        quantize_row(*dispatch_, x, r * row_step, elem_step, K, map, identity, unsigned_levels(q), xs.get() + r * Kp);
      } else {
        quantize_row(*dispatch_, x, r * row_step, elem_step, K, map, identity, q, row.data());
        dispatch_->kernel_order(row.data(), p.pos.np, Gp, xs.get() + r * Kp, gsum.get() + r * Gp);
      }
    }
  };
  parallel_for(ctx, static_cast<size_t>((B + kRowsPerTask - 1) / kRowsPerTask), quantize);

  GemmArgs a;
  a.x = xs.get();
  a.x_stride = Kp;
  a.natural = natural;
  a.gsum = gsum.get();
  a.s_stride = Gp;
  a.y = y;
  a.y_stride_b = M;
  a.y_stride_m = 1;
  a.m_begin = 0;
  a.m_end = M;
  a.b_begin = 0;
  a.b_end = B;
  a.scale = alpha * q.scale;
  a.offset = static_cast<float>(q.offset());
  run(ctx, p, a, e);
}

// The bounds of a clamp activation (no activation, ReLU, Clip; the affine map aside); false for the others.
static bool clamp_bounds(const Activation& act, float* lo, float* hi) {
  if (act.kind != Activation::kNone && act.kind != Activation::kRelu && act.kind != Activation::kClip) return false;
  if (act.kind != Activation::kNone) *lo = act.kind == Activation::kRelu ? 0.f : act.p0;
  if (act.kind == Activation::kClip) *hi = act.p1;
  return true;
}

bool as_clamp(const Activation& act, float* lo, float* hi) { return !act.affine && clamp_bounds(act, lo, hi); }

std::optional<StoreEpilogue> TernaryKernelBase::store_epilogue(const GemmArgs& args, const float* bias,
                                                               const Activation& act) const {
  if (!args.natural || !dispatch_->folded_epilogue) return std::nullopt;
  StoreEpilogue s;
  s.bias = bias;
  if (act.kind == Activation::kHardSigmoid) s.kind = StoreEpilogue::kHardSigmoid, s.alpha = act.p0, s.beta = act.p1;
  else if (act.kind == Activation::kHardSwish) s.kind = StoreEpilogue::kHardSwish;
  else clamp_bounds(act, &s.lo, &s.hi);
  s.affine = act.affine;
  s.scale = act.scale;
  s.shift = act.shift;
  return s;
}

void TernaryKernelBase::gemm_planes(GemmArgs a, const Planes& p, const StoreEpilogue* epilogue) const {
  a.w = &p.pos;
  a.epilogue = p.asymmetric ? nullptr : epilogue;
  dispatch_->gemm(a);
  if (!p.asymmetric) return;
  a.w = &p.neg;
  a.accumulate = true;
  a.epilogue = epilogue;
  dispatch_->gemm(a);
}

void TernaryKernelBase::run(OrtKernelContext* ctx, const Planes& p, GemmArgs args, const RowEpilogue& e) const {
  const int64_t M = args.m_end - args.m_begin, B = args.b_end - args.b_begin;
  if (M <= 0 || B <= 0) return;
  // In the store when `c` is absent or a bias [M] with beta 1 (MatMul's bias, Gemm's C [M]).
  const bool finish = e.c || e.act.active();
  const bool bias = e.c && e.c_stride_b == 0 && e.c_stride_m == 1 && e.beta == 1.f;
  const std::optional<StoreEpilogue> stored =
      finish && (!e.c || bias) ? store_epilogue(args, e.c, e.act) : std::nullopt;
  int64_t mb, bb;
  if (B <= 8) {
    bb = B;
    mb = std::max<int64_t>(16, (M / 32 + 15) / 16 * 16);
  } else {
    bb = 64;
    mb = 64;
  }
  const int64_t tiles_m = (M + mb - 1) / mb, tiles_b = (B + bb - 1) / bb;
  auto task = [&](size_t i) {
    const int64_t tm = static_cast<int64_t>(i) % tiles_m, tb = static_cast<int64_t>(i) / tiles_m;
    GemmArgs a = args;
    a.m_begin = args.m_begin + tm * mb;
    a.m_end = std::min(args.m_end, a.m_begin + mb);
    a.b_begin = args.b_begin + tb * bb;
    a.b_end = std::min(args.b_end, a.b_begin + bb);
    gemm_planes(a, p, stored ? &*stored : nullptr);
    if (!finish || stored) return;
    for (int64_t b = a.b_begin; b < a.b_end; ++b) {
      RowAddends r;
      float c_scalar = 0.f;
      if (e.c && e.c_stride_m) {
        r.add = e.c + b * e.c_stride_b + a.m_begin;
        r.add_scale = e.beta;
      } else if (e.c) {
        c_scalar = e.beta * e.c[b * e.c_stride_b];
        r.bias = &c_scalar;
      }
      finish_row_(a.y + b * a.y_stride_b + a.m_begin, a.m_end - a.m_begin, r, e.act);
    }
  };
  parallel_for(ctx, static_cast<size_t>(tiles_m * tiles_b), task);
}

bool is_identity_map(const std::vector<int64_t>& map, int64_t length) {
  for (int64_t p = 0; p < static_cast<int64_t>(map.size()); ++p)
    if (map[static_cast<size_t>(p)] != (p < length ? p : -1)) return false;
  return true;
}

template <class Level>
static void requantize_row(const Level* src, int64_t stride, int64_t length, const std::vector<int64_t>& map,
                           bool identity, const ActQuant& q, int8_t* natural) {
  const int64_t positions = static_cast<int64_t>(map.size());
  if (identity && stride == 1) {  // no gather: vectorizes
    for (int64_t p = 0; p < length; ++p) natural[p] = requantize_one(src[p], q);
    std::memset(natural + length, 0, static_cast<size_t>(positions - length));
    return;
  }
  for (int64_t p = 0; p < positions; ++p) {
    const int64_t k = map[static_cast<size_t>(p)];
    natural[p] = k < 0 ? 0 : requantize_one(src[k * stride], q);
  }
}

void quantize_row(const KernelDispatch& d, const Tensor& x, int64_t base, int64_t stride, int64_t length,
                  const std::vector<int64_t>& map, bool identity, const ActQuant& q, int8_t* natural) {
  // Group padding (map[p] < 0) gets 0: it meets zero weights only.
  const int64_t positions = static_cast<int64_t>(map.size());
  if (x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && stride == 1 && identity) {  // straight into the row
    d.quantize(x.as<float>() + base, length, q, natural);
    std::memset(natural + length, 0, static_cast<size_t>(positions - length));
  } else if (x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && stride == 1) {  // quantize contiguously, then gather
    std::vector<int8_t> levels(static_cast<size_t>(length));
    d.quantize(x.as<float>() + base, length, q, levels.data());
    for (int64_t p = 0; p < positions; ++p) {
      const int64_t k = map[static_cast<size_t>(p)];
      natural[p] = k < 0 ? 0 : levels[static_cast<size_t>(k)];
    }
  } else if (x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    const float* src = x.as<float>() + base;
    for (int64_t p = 0; p < positions; ++p) {
      const int64_t k = map[static_cast<size_t>(p)];
      natural[p] = k < 0 ? 0 : quantize_one(src[k * stride], q);
    }
  } else if (x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
    requantize_row(x.as<uint8_t>() + base, stride, length, map, identity, q, natural);
  } else {
    requantize_row(x.as<int8_t>() + base, stride, length, map, identity, q, natural);
  }
}

}  // namespace ort
}  // namespace fgq
