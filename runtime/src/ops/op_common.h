// Shared pieces of the com.fgq ops: the OrtCustomOp boilerplate (kept here
// once), tensor and attribute access, the weight inputs and the activation
// quantization common to TernaryMatMul, TernaryGemm and TernaryConv.
// Everything here may throw fgq::ort::Error; the adapter turns exceptions
// into an OrtStatus at the C boundary (CreateKernelV2 / KernelComputeV2).
#pragma once

#include <climits>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "fgq/kernels.h"
#include "onnxruntime/core/session/onnxruntime_c_api.h"

namespace fgq {
namespace ort {

constexpr int kApiVersion = 17;
static_assert(ORT_API_VERSION >= kApiVersion, "needs the onnxruntime 1.17 C API headers or newer");

extern const OrtApi* g_api;

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
[[noreturn]] void fail(const std::string& message);
void check(OrtStatus* status);  // throws Error with the status's message

// Checked arithmetic on sizes a model file can claim.
int64_t checked_mul(int64_t a, int64_t b, const char* what);
int64_t checked_add(int64_t a, int64_t b, const char* what);
constexpr int64_t kMaxElements = int64_t{1} << 40;  // refuse absurd sizes before allocating

struct Tensor {
  bool present = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  int64_t size = 0;
  const void* data = nullptr;
  template <class T> const T* as() const { return static_cast<const T*>(data); }
};
Tensor view(const OrtValue* value);
Tensor input(OrtKernelContext* ctx, size_t index);  // present = false for an empty (omitted) input
// True when input `index` is absent or a constant initializer (then *value is
// its value, or null when absent).
bool constant_input(const OrtKernelInfo* info, size_t index, const OrtValue** value);
// Output `index` allocated with `shape`; fails unless onnxruntime gave it element type `type`.
void* output(OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& shape, ONNXTensorElementDataType type);
inline float* output(OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& shape) {
  return static_cast<float*>(output(ctx, index, shape, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
}

const char* type_name(ONNXTensorElementDataType t);
std::string shape_string(const std::vector<int64_t>& shape);

int64_t attr_int(const OrtKernelInfo* info, const char* name, const int64_t* fallback);
float attr_float(const OrtKernelInfo* info, const char* name, const float* fallback);
std::vector<int64_t> attr_ints(const OrtKernelInfo* info, const char* name, const std::vector<int64_t>* fallback);
std::vector<float> attr_floats(const OrtKernelInfo* info, const char* name, const std::vector<float>* fallback);
std::string attr_string(const OrtKernelInfo* info, const char* name, const std::string* fallback);

// The activation fused after bias and residual (attributes `activation`, `activation_params`;
// docs/custom-ops.md), applied by the op layer to each output tile while it is in cache.
struct Activation {
  enum Kind { kNone, kRelu, kClip, kHardSigmoid, kHardSwish };
  Kind kind = kNone;
  float p0 = 0.f, p1 = 0.f;  // clip: min, max; hardsigmoid: alpha, beta
  bool affine = false;       // then f(v) * scale + shift (`activation_affine`)
  float scale = 1.f, shift = 0.f;
  bool active() const { return kind != kNone || affine; }
};
// The node's activation (`relu`=1 is relu); a bad name or parameter list fails (at session creation).
Activation attr_activation(const OrtKernelInfo* info);
// No activation, ReLU or Clip (without the affine map) as the clamp to [lo, hi] (StoreEpilogue,
// DepthwiseArgs); false for the others, which the direct kernel leaves to the op layer's pass.
bool as_clamp(const Activation& act, float* lo, float* hi);

// What one output row gets before its activation: y[i] + *bias + add_scale * add[i] (bias, add optional;
// TernaryConv: bias and residual; MatMul: bias; Gemm: beta and C).
struct RowAddends {
  const float* bias = nullptr;
  const float* add = nullptr;
  float add_scale = 1.f;
};
// The output epilogue: y[i] = act(y[i] + addends) for i < count, one pass (epilogue_impl.h).
using FinishRow = void (*)(float* y, int64_t count, const RowAddends& r, const Activation& act);
void finish_row_plain(float* y, int64_t count, const RowAddends& r, const Activation& act);  // baseline build
#if defined(FGQ_HAVE_X86_KERNELS)
void finish_row_avx2(float* y, int64_t count, const RowAddends& r, const Activation& act);  // -mavx2 build
#endif
// The build for a kernel path: plain for ref, AVX2 for the others (the same bits either way).
FinishRow finish_row_for(const KernelDispatch& d);

// MatMul and Gemm: y[b, m] = act(y[b, m] + beta * c[b * c_stride_b + m * c_stride_m]) (c may be null).
struct RowEpilogue {
  const float* c = nullptr;
  int64_t c_stride_b = 0, c_stride_m = 0;
  float beta = 1.f;
  Activation act;
};

// Runs fn(i) for i < total on onnxruntime's intra-op thread pool (ctx null: serially, here).
void parallel_for(OrtKernelContext* ctx, size_t total, void (*fn)(void*, size_t), void* data);
template <class F>
void parallel_for(OrtKernelContext* ctx, size_t total, const F& f) {
  parallel_for(ctx, total, [](void* d, size_t i) { (*static_cast<const F*>(d))(i); }, const_cast<F*>(&f));
}

// Inputs shared by the three ops (docs/custom-ops.md).
enum InputIndex : size_t {
  kX = 0,
  kXScale,
  kXZeroPoint,
  kCodes,
  kScales,
  kRowScale,
  kNegScales,
  kNegRowScale,
  kBias,
  kResidual,  // TernaryConv only, as the rest
  kYScale,  // with kYZeroPoint: Y as 8-bit levels
  kYZeroPoint,
  kResidualScale,  // with kResidualZeroPoint: the residual as 8-bit levels
  kResidualZeroPoint,
  kMaxInputs
};

// The repacked weight planes: `pos` holds all codes (or only +1 when
// asymmetric), `neg` the -1 codes with the negative scales.
struct Planes {
  KernelWeights pos, neg;
  bool asymmetric = false;
};

// State common to the three kernels: attributes, the kernel path, and the
// weights repacked once at creation when they are constant initializers.
class TernaryKernelBase {
 public:
  explicit TernaryKernelBase(const OrtKernelInfo* info);

 protected:
  // Called by the derived constructor before the layout is made, for a GEMM (not the direct kernel) whose
  // reduction is `segments` of `length` elements: int8 weights (N = 1 and int8 scales, docs/custom-ops.md)
  // then run in the dense form (repack_dense_weights), and n_ becomes the activation rows' group length for it.
  void use_dense_weights(const OrtKernelInfo* info, int64_t segments, int64_t length);
  // Called by the derived constructor once the reduction layout is known;
  // rows < 0: M is taken from the codes input.
  void init_weights(const OrtKernelInfo* info, const ReductionLayout& layout, int64_t rows);
  // The planes to use in this call (the constant ones, or `scratch` repacked now).
  const Planes& planes(OrtKernelContext* ctx, Planes& scratch) const;
  // x_scale / x_zero_point / act_qmin / act_qmax for this call (checked against X's type).
  ActQuant act_quant(OrtKernelContext* ctx, const Tensor& x) const;
  // The activation quantization and x_zero_point's 8-bit type (X may hold levels of it).
  struct LevelQuant {
    ActQuant quant;
    ONNXTensorElementDataType type;
  };
  // x_scale and x_zero_point (with act_qmin / act_qmax), checked.
  LevelQuant quant_of(const Tensor& scale, const Tensor& zero_point) const;
  // Bias [rows] or absent.
  const float* bias(OrtKernelContext* ctx, int64_t rows) const;
  // For ops whose input 8 is a bias [M]: a constant float one is copied once, so bias() reads no input per call.
  void keep_constant_bias(const OrtKernelInfo* info);
  // Runs the fused kernel over rows [m0, m0 + rows) x b < cols in parallel tiles, each tile finished
  // by `e` (y_stride_m must be 1).
  void run(OrtKernelContext* ctx, const Planes& p, GemmArgs args, const RowEpilogue& e) const;
  // The bias and the activation for the folded stores of paths that apply them as they store
  // (KernelDispatch::folded_epilogue, StoreEpilogue), or nothing: then a pass over each tile does it.
  std::optional<StoreEpilogue> store_epilogue(const GemmArgs& args, const float* bias, const Activation& act) const;
  // The kernel over the positive plane, then the negative one accumulated (asymmetric layers), the store
  // epilogue (or null) with the last call.
  void gemm_planes(GemmArgs a, const Planes& p, const StoreEpilogue* epilogue) const;
  // Whether a call over `rows` activation rows takes natural unsigned rows (use_folded, both planes).
  bool folded_rows(const Planes& p, int64_t rows) const;
  // MatMul and Gemm: quantizes the B activation rows of length K (row r starts at element
  // r * row_step, its elements elem_step apart: a transposed A has row_step 1 and elem_step B)
  // into the order the kernel takes (folded_rows), then runs the kernel into y [B, M], scaled by alpha and
  // finished by `e`.
  void quantize_rows_and_run(OrtKernelContext* ctx, const Tensor& x, const ActQuant& q, const Planes& p, int64_t B,
                             int64_t K, int64_t row_step, int64_t elem_step, float alpha, const RowEpilogue& e,
                             float* y) const;

  const KernelDispatch* dispatch_ = nullptr;
  int64_t n_ = 0;
  bool dense_ = false;  // use_dense_weights
  int64_t qmin_attr_ = INT64_MIN, qmax_attr_ = INT64_MIN;
  Activation activation_;
  FinishRow finish_row_ = nullptr;
  ReductionLayout layout_;
  int64_t rows_ = -1;
  std::shared_ptr<const Planes> constant_planes_;
  std::optional<LevelQuant> constant_quant_;  // from constant x_scale and x_zero_point
  std::optional<std::vector<float>> constant_bias_;  // keep_constant_bias

 private:
  void repack(const Tensor& codes, const Tensor& scales, const Tensor& row_scale, const Tensor& neg_scales,
              const Tensor& neg_row_scale, Planes* out) const;
  void repack_int8(const Tensor& codes, const Tensor& weights, const Tensor& row_scale, const Tensor& neg_scales,
                   const Tensor& neg_row_scale, Planes* out) const;
};

// Whether `map` is position p -> element p for p < length and padding after (one segment, N % 4 == 0).
bool is_identity_map(const std::vector<int64_t>& map, int64_t length);
// Quantizes activation values gathered through `map` into the natural-order row
// `natural` (map[p] < 0 is group padding: 0); `identity` (is_identity_map) skips the gather.
void quantize_row(const KernelDispatch& d, const Tensor& x, int64_t base, int64_t stride, int64_t length,
                  const std::vector<int64_t>& map, bool identity, const ActQuant& q, int8_t* natural);

// 64-byte aligned scratch buffers.
template <class T>
struct AlignedBuffer {
  // `zero`: false when every element will be written before it is read.
  explicit AlignedBuffer(int64_t count, bool zero = true) {
    if (count < 0 || count > kMaxElements) fail("buffer size out of range");
    bytes_ = (static_cast<size_t>(count) * sizeof(T) + 63) / 64 * 64 + 64;
    ptr_ = static_cast<T*>(::operator new(bytes_, std::align_val_t(64)));
    if (zero) std::memset(static_cast<void*>(ptr_), 0, bytes_);
  }
  ~AlignedBuffer() { ::operator delete(ptr_, std::align_val_t(64)); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// A buffer that keeps its memory between calls, for per-call scratch: declare it
// thread_local at the call site (onnxruntime may run Compute concurrently).
// Zeroed when it grows, so the 64 bytes of slack past `count` are defined.
template <class T>
class ScratchBuffer {
 public:
  T* get(int64_t count) {
    if (!buffer_ || count > capacity_) {
      buffer_.reset();  // free first: only one copy alive
      buffer_ = std::make_unique<AlignedBuffer<T>>(count);
      capacity_ = count;
    }
    return buffer_->get();
  }

 private:
  std::unique_ptr<AlignedBuffer<T>> buffer_;
  int64_t capacity_ = 0;
};

// The OrtCustomOp adapter: Op provides kName, kInputs, kInputTypes[kMaxInputs], kOutputType and
// kOptional[kMaxInputs] (the first kInputs used), and a Kernel with Kernel(const OrtKernelInfo*) and
// void Compute(OrtKernelContext*). Exceptions become an OrtStatus.
OrtStatus* status_from_current_exception();

template <class Op>
struct CustomOp : OrtCustomOp {
  CustomOp() {
    std::memset(static_cast<OrtCustomOp*>(this), 0, sizeof(OrtCustomOp));
    version = kApiVersion;
    GetName = [](const OrtCustomOp*) { return Op::kName; };
    GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return "CPUExecutionProvider"; };
    GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return Op::kInputs; };
    GetInputType = [](const OrtCustomOp*, size_t i) { return Op::kInputTypes[i]; };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
      return Op::kOptional[i] ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
    GetOutputType = [](const OrtCustomOp*, size_t) { return Op::kOutputType; };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
    CreateKernel = nullptr;
    KernelCompute = nullptr;  // version > 15 and no KernelCompute: onnxruntime uses the V2 entry points
    CreateKernelV2 = [](const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) -> OrtStatus* {
      try {
        *kernel = new typename Op::Kernel(info);
        return nullptr;
      } catch (...) {
        return status_from_current_exception();
      }
    };
    KernelComputeV2 = [](void* kernel, OrtKernelContext* ctx) -> OrtStatus* {
      try {
        static_cast<typename Op::Kernel*>(kernel)->Compute(ctx);
        return nullptr;
      } catch (...) {
        return status_from_current_exception();
      }
    };
    KernelDestroy = [](void* kernel) { delete static_cast<typename Op::Kernel*>(kernel); };
    InferOutputShapeFn = nullptr;
    GetStartVersion = [](const OrtCustomOp*) { return 1; };
    GetEndVersion = [](const OrtCustomOp*) { return 1; };
  }
};

}  // namespace ort
}  // namespace fgq
