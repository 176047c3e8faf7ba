// Ternary kernels: the kernel weight layout, activation rows, and the one
// dispatch table through which every instruction-set path is reached.
// No onnxruntime header here: kernels are testable alone (runtime/tests).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace fgq {

// Largest group length N: keeps every SIMD int32 accumulator exact
// (|u << 6| <= 128 times |x| <= 128, 4 a lane, N / 4 steps: < 2^31).
constexpr int64_t kMaxGroupSize = 65536;

enum class ScaleType : uint8_t { kF32 = 0, kF16 = 1, kU8 = 2 };

// Bytes of one scale element.
inline size_t scale_size(ScaleType t) { return t == ScaleType::kF32 ? 4 : (t == ScaleType::kF16 ? 2 : 1); }

// IEEE half -> float, portable (all paths decode scales identically).
float half_to_float(uint16_t h);

// Where the groups of one output row's reduction lie (docs/packed-format.md):
// `segments` segments of `length` weights, each cut into ceil(length / n)
// groups of n, the last one zero padded.
struct ReductionLayout {
  int64_t segments = 1;
  int64_t length = 0;
  int64_t n = 1;
  int64_t groups_per_segment() const { return (length + n - 1) / n; }
  int64_t groups() const { return segments * groups_per_segment(); }
};

// The kernel layout of one weight plane, built once from the packed format.
//
// Rows are taken four at a time (a "quad"; M is padded to a multiple of 4 with
// zero rows) and groups four at a time (a "super-group"; G is padded to
// padded_groups, a multiple of 4, with zero groups). A group has np = N
// rounded up to 4 positions (the tail is zero padding). For each quad,
// super-group and step k < np / 4 there are 16 code bytes (see quad_codes for
// where they lie): byte b = 4 * gq + e
// holds, in bits 2i..2i+1, u = t + 1 in {0, 1, 2} of row 4 * quad + i, group
// 4 * sg + gq, position 4 * k + e. A SIMD path broadcasts the 16 bytes to
// its four 128-bit lanes and masks lane i with 0x03 << 2i: lane i then holds
// row i's 16 codes (times 4^i) against the same 16 activation bytes, and each
// 32-bit lane (row i, group gq) accumulates one group over all k; there is no
// horizontal sum and no float work until the super-group ends.
// Scales: per quad and super-group 16 elements, index 4 * i + gq.
struct KernelWeights {
  int64_t rows = 0;           // M
  int64_t groups = 0;         // G, real groups per row
  int64_t n = 0;              // N, the format's group length
  int64_t np = 0;             // positions per group in this layout: N rounded up to 4
  int64_t padded_groups = 0;  // Gp: G rounded up to 4
  int64_t quads = 0;          // ceil(M / 4)
  ScaleType scale_type = ScaleType::kF32;
  std::vector<uint8_t> codes;      // code_bytes(): quads rounded up to 4, * (Gp / 4) * (np / 4) * 16
  std::vector<uint8_t> scales;     // quads * (Gp / 4) * 16 scale elements (+ 64 bytes of slack)
  std::vector<float> row_scale;    // 16 * panels(); the row_scale input, or 1 (0 for padding rows)
  std::vector<float> row_offset;   // 16 * panels(); row_scale * sum_g scale[g] * sum(t in g): the offset term
  // Folded form (uint8 scales, small N; see fold_scales): the integer weights w = t * s
  // (s the group's uint8 scale code) in int8 planes, w = 128 * plane1 + plane0
  // (fold_planes = 2), or w = plane0 when every code is <= 127 (fold_planes = 1);
  // 0: not built. Panels of 16 rows; per panel, 4-position chunk j (natural order,
  // j = position / 4) and plane: 64 bytes, row r at 4r..4r+3. The SIMD path meets
  // them with unsigned natural rows (GemmArgs::natural) in vpdpbusd and subtracts
  // fold_bias[m] = 128 * sum(w): one exact int32 sum a row, no per-group float work.
  int64_t fold_planes = 0;
  std::vector<int8_t> folded;      // panels() * positions() / 4 * fold_planes * 64
  std::vector<int32_t> fold_bias;  // 16 * panels()
  // The folded form kept ternary (the AVX2 path's form, built when the path asks for it, see
  // FoldedForms; empty otherwise): t in int8 in the same
  // panel/chunk order as `folded` (one plane), and per panel and group the scale codes as
  // int16 pair lanes: 32 lanes, row r's s at 2r and 2r + 1. vpmaddubsw meets t with the
  // unsigned rows, a group's int16 pair sums are added, and vpmaddwd with these lanes gives
  // each row's s * (group sum) in int32 (exact: see kernels_avx2.cpp).
  std::vector<int8_t> ternary;         // panels() * positions() / 4 * 64
  std::vector<int16_t> group_scales;   // panels() * padded_groups * 32
  // Dense int8 weights (repack_dense_weights): `folded` (one plane) holds a weight at every position,
  // groups are only 4-position chunks of the activation rows, and there are no codes or scales:
  // every path, the reference too, runs them from natural unsigned rows (use_folded), at any B.
  bool dense = false;
  int64_t panels() const { return (rows + 15) / 16; }
  int64_t steps() const { return np / 4; }
  int64_t super_groups() const { return padded_groups / 4; }
  int64_t positions() const { return padded_groups * np; }
  // Codes of quad q, step j (= super-group * steps() + k) at quad_codes(q) + j * kCodeStride: four
  // quads share a block, interleaved by step, so a block streams one contiguous region.
  static constexpr int64_t kCodeStride = 64;
  int64_t code_bytes() const { return (quads + 3) / 4 * 4 * super_groups() * steps() * 16; }
  const uint8_t* quad_codes(int64_t quad) const {
    return codes.data() + (quad / 4) * super_groups() * steps() * kCodeStride + (quad % 4) * 16;
  }
  const uint8_t* quad_scales(int64_t quad) const {
    return scales.data() + quad * super_groups() * 16 * scale_size(scale_type);
  }
  // The ternary value and the scale of (row m, group g, position i), for the reference and tests.
  int t_at(int64_t m, int64_t g, int64_t i) const;
  double scale_at(int64_t m, int64_t g) const;
};

// The folded form is built for uint8 scales when every code is <= 127 (one plane:
// int8 GEMM speed at any N), else for N up to this (two planes, twice the vpdpbusd;
// they pay only where the code path's per-group float work dominates: measured
// 2x faster at N = 4, 1.15x at N = 8, slower at N = 16).
constexpr int64_t kFoldMaxGroupSize = 8;
// Positions up to this keep the folded int32 sum exact: |w| <= 255, |x| <= 128.
constexpr int64_t kFoldMaxPositions = 65536;

// The folded forms of KernelWeights a path runs from natural rows (KernelDispatch::folded):
// the int8 planes (`folded`, the vpdpbusd paths) and the ternary copy (`ternary` and
// `group_scales`, the AVX2 path). A kernel builds only its path's; tests build both.
enum FoldedForms : unsigned { kNoFoldedForm = 0, kFoldedPlanes = 1, kFoldedTernary = 2, kAllFoldedForms = 3 };

// Builds fold_bias / fold_planes and the requested `forms` from w's codes and uint8 scales
// when the rule above says so (repack_weights calls it for uint8 scales).
void fold_scales(KernelWeights* w, unsigned forms);

// np for a group length n (see KernelWeights).
inline int64_t kernel_group_positions(int64_t n) { return (n + 3) / 4 * 4; }
// Gp for G groups.
inline int64_t kernel_padded_groups(int64_t groups) { return (groups + 3) / 4 * 4; }

// Which codes of the packed format go into a plane.
enum class Plane { kAll, kPositive, kNegative };

// Builds `out` from packed codes uint8[rows, row_bytes] and scales [rows, G]
// times row_scale [rows] (required for kU8, optional otherwise: null means 1). Returns "" or an
// error message (sizes, invalid code 0b10, non-zero padding codes).
// kPositive keeps only t = +1, kNegative only t = -1 (asymmetric weights).
std::string repack_weights(const uint8_t* codes, int64_t rows, int64_t row_bytes, const void* scales,
                           ScaleType scale_type, const float* row_scale, const ReductionLayout& layout,
                           Plane plane, KernelWeights* out, unsigned folded_forms = kAllFoldedForms);

// Builds `out` from int8 weights int8[rows, G] in [-127, 127] under row_scale [rows] (required), for
// N = 1 (docs/custom-ops.md, "int8 weights"): they are the N = 1 ternary form t = sign(w) with uint8
// scale codes |w|, repacked as such (the folded form then holds the int8 rows themselves). Returns ""
// or an error message (layout not N = 1, a weight of -128).
std::string repack_int8_weights(const int8_t* weights, int64_t rows, const float* row_scale,
                                const ReductionLayout& layout, KernelWeights* out,
                                unsigned folded_forms = kAllFoldedForms);

// Builds the dense form of int8 weights int8[rows, E] in [-127, 127] (E = layout.segments *
// layout.length, element e = segment * length + l, the order of the N = 1 int8 weights) under
// row_scale [rows] (required): natural positions as for group length dense_group_size(layout.length),
// `folded` = the weights (one plane, zero at padding positions), fold_bias and row_offset from their sums,
// `dense` set. Returns "" or an error message (a weight of -128, more than kFoldMaxPositions positions).
// The GEMM then does the int8 GEMM's work (vpdpbusd on the VNNI paths, AVX2 16 products a vpmaddwd);
// repack_int8_weights' N = 1 ternary form takes four positions a weight (the direct convolution kernel
// still reads that form).
std::string repack_dense_weights(const int8_t* weights, int64_t rows, const float* row_scale, ReductionLayout layout,
                                 KernelWeights* out);
// The activation rows' group length for dense weights with segments of `length` elements: chunks of
// 4, or one padded group a segment when it is shorter (a 3-channel stem's per-tap groups).
inline int64_t dense_group_size(int64_t length) { return length < 4 ? length : 4; }
// A dense row's positions (KernelWeights::positions() of repack_dense_weights' result).
inline int64_t dense_positions(int64_t segments, int64_t length) {
  const ReductionLayout layout{segments, length, dense_group_size(length)};
  return kernel_padded_groups(layout.groups()) * 4;
}

// Activation rows come in two orders. Natural: group g's np positions at
// g * np (what im2col and quantization write). Kernel: per super-group sg
// and step k, the 16 bytes (group 4 * sg + gq, positions 4k..4k+3) at
// (sg * np / 4 + k) * 16 + 4 * gq (what the SIMD paths broadcast).
//
// For each natural position p < Gp * np: segment * length + l of the weight
// it meets, or -1 for group padding.
std::vector<int64_t> kernel_position_map(const ReductionLayout& layout, int64_t np, int64_t padded_groups);

// Natural -> kernel order for one activation row, and its group sums
// gsum[g] = sum of the row's np values of group g (for Gp groups).
void to_kernel_order(const int8_t* natural, int64_t np, int64_t padded_groups, int8_t* out, int32_t* gsum);

// How float or 8-bit activations become the kernel's int8 rows:
// level q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax) (or the
// given 8-bit level, clamped), stored as xs = q - shift (fits int8); the dot
// product over (q - zero_point) is then dot(t, xs) + offset * sum(t) with
// offset = shift - zero_point.
struct ActQuant {
  float scale = 1.f;
  int zero_point = 0;
  int qmin = 0, qmax = 255;
  int shift = 0;
  int offset() const { return shift - zero_point; }
  int8_t zero_level() const { return static_cast<int8_t>(zero_point - shift); }  // x = 0.0
};

// The same levels as unsigned bytes xs + 128 (the folded form's rows, GemmArgs::natural):
// quantize_one with this writes the bit pattern of xs + 128; offset() is not meaningful.
inline ActQuant unsigned_levels(ActQuant q) {
  q.shift -= 128;
  return q;
}

// Picks shift for an 8-bit type (is_signed) and level range; "" or an error.
std::string make_act_quant(float scale, int zero_point, int qmin, int qmax, bool is_signed, ActQuant* out);

// round_half_even(x / scale) + zero_point, clamped, minus shift. NaN counts as 0.
// Rounds with the 1.5 * 2^23 trick (exact round-half-even for |v| < 2^22,
// and v is clamped first) so the loops vectorize without SSE4.1.
inline int8_t quantize_one(float x, const ActQuant& q) {
  const float lo = static_cast<float>(q.qmin - q.zero_point) - 1.f, hi = static_cast<float>(q.qmax - q.zero_point) + 1.f;
  float v = x / q.scale;
  v = v != v ? 0.f : v;
  v = v < hi ? v : hi;
  v = v > lo ? v : lo;
  constexpr float kMagic = 12582912.f;  // 1.5 * 2^23; (v + m) - m is not folded without -ffast-math
  const float r = (v + kMagic) - kMagic;
  int level = static_cast<int>(r) + q.zero_point;
  level = level < q.qmin ? q.qmin : (level > q.qmax ? q.qmax : level);
  return static_cast<int8_t>(level - q.shift);
}
// quantize_one over a contiguous span (vectorizable).
void quantize_span(const float* __restrict src, int64_t count, const ActQuant& q, int8_t* __restrict out);
// quantize_one of a [channels][pixels] block into pixel-major bytes (KernelDispatch::quantize_transposed).
void quantize_transposed(const float* src, int64_t channels, int64_t pixels, int64_t channel_stride, const ActQuant& q,
                         int8_t* out, int64_t pixel_stride);

inline int8_t requantize_one(int level, const ActQuant& q) {
  level = level < q.qmin ? q.qmin : (level > q.qmax ? q.qmax : level);
  return static_cast<int8_t>(level - q.shift);
}

// The activations of the com.fgq ops, one value at a time: the ops' finish pass (ops/epilogue_impl.h)
// and the folded store (StoreEpilogue) are written from these, so both give the same bits (the
// files that use them compile with -ffp-contract=off: a multiply and an add stay two roundings).
// NaN passes through clamp_to.
inline float clamp_to(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}
inline float hard_sigmoid(float v, float alpha, float beta) { return clamp_to(alpha * v + beta, 0.f, 1.f); }
// ONNX HardSwish up to rounding, in the form exporters decompose it into: x * clamp(x / 6 + 0.5, 0, 1)
// left a branch in the finish pass's loop (the product distributed over the clamp's ends): 2-3x slower.
inline float hard_swish(float v) { return v * clamp_to(v + 3.f, 0.f, 6.f) * (1.f / 6.f); }

// What a folded store applies to an output before storing it, where the path has it
// (KernelDispatch::folded_epilogue): the bias, the residual, the activation, then the affine map
// f * scale + shift: the ops' finish pass, operation for operation.
struct StoreEpilogue {
  enum Kind { kClamp, kHardSigmoid, kHardSwish };  // no activation and ReLU are clamps too
  const float* bias = nullptr;  // per output row m
  const float* residual = nullptr;  // laid out as the output (GemmArgs::y and its strides)
  Kind kind = kClamp;
  float lo = -std::numeric_limits<float>::infinity(), hi = std::numeric_limits<float>::infinity();  // kClamp
  float alpha = 0.f, beta = 0.f;  // kHardSigmoid
  bool affine = false;
  float scale = 1.f, shift = 0.f;
  // 8-bit levels (TernaryConv's 8-bit residual and output), only where levels_in_store() allows: the residual
  // as levels at residual_levels (the float residual's offsets), worth (level - residual_zero) * residual_scale;
  // the output quantized (quantize_one with out_quant: its level bytes) into out_levels at the float output's
  // offsets; y is then not written.
  const int8_t* residual_levels = nullptr;
  bool residual_signed = false;
  int residual_zero = 0;
  float residual_scale = 1.f;
  int8_t* out_levels = nullptr;
  ActQuant out_quant;
  bool has_levels() const { return residual_levels || out_levels; }
  // The residual's value at `offset` (float or levels); has_residual() when there is one.
  bool has_residual() const { return residual || residual_levels; }
  float residual_at(int64_t offset) const {
    if (residual) return residual[offset];
    const int level = residual_signed ? residual_levels[offset] : static_cast<uint8_t>(residual_levels[offset]);
    return static_cast<float>(level - residual_zero) * residual_scale;
  }
  // v is output row m; r its residual (null without one).
  float apply(float v, int64_t m, const float* r) const {
    if (bias) v = v + bias[m];
    if (r) v = v + *r;
    if (kind == kClamp) v = clamp_to(v, lo, hi);
    else if (kind == kHardSigmoid) v = hard_sigmoid(v, alpha, beta);
    else v = hard_swish(v);
    return affine ? v * scale + shift : v;
  }
};

// One call of the fused kernel: rows [m_begin, m_end) x activation rows
// [b_begin, b_end) of y[b * y_stride_b + m * y_stride_m] =
//   scale * (row_scale[m] * sum_g s[m,g] * P[b,m,g] + offset * row_offset[m]),
// stored, or added when `accumulate`. P = dot(t, xs) over group g, exact int32.
struct GemmArgs {
  const KernelWeights* w = nullptr;
  // Activation row b at x + b * x_stride, positions() bytes: kernel order (xs) with its
  // group sums at gsum + b * s_stride, or when `natural` (only if use_folded says so)
  // natural order as unsigned bytes xs + 128 (unsigned_levels), no group sums.
  const int8_t* x = nullptr;
  int64_t x_stride = 0;
  bool natural = false;
  // Natural rows read in place (a convolution without im2col), when row_offsets is set:
  // row b's positions [k * segment_len, k * segment_len + segment_read) lie at
  // x + row_offsets[b] + segment_offsets[k] for k < segments; the other positions
  // (segment_read, a multiple of 4, up to segment_len) must meet zero weights: they are not read.
  const int64_t* row_offsets = nullptr;
  const int64_t* segment_offsets = nullptr;
  int64_t segments = 0, segment_len = 0, segment_read = 0;
  const int32_t* gsum = nullptr;
  int64_t s_stride = 0;
  float* y = nullptr;
  int64_t y_stride_b = 0, y_stride_m = 1;
  int64_t m_begin = 0, m_end = 0, b_begin = 0, b_end = 0;
  float scale = 1.f;
  float offset = 0.f;
  bool accumulate = false;
  // Applied to each output as it is stored (after accumulating); only with `natural` on a path
  // whose folded_epilogue is set.
  const StoreEpilogue* epilogue = nullptr;
};

struct DepthwiseArgs;  // include/fgq/depthwise.h

// The dispatch table. Each instruction-set file fills one; the reference
// (kernels_ref.cpp) is the truth the others are tested against.
struct KernelDispatch {
  const char* name;
  // P[g] = sum over group g of row m of t * x, exact int32, for g < padded_groups;
  // x in kernel order with its group sums `gsum` (SIMD paths use them; the reference does not).
  void (*group_dots)(const KernelWeights& w, int64_t m, const int8_t* x, const int32_t* gsum, int32_t* out);
  // The fused kernel described at GemmArgs.
  void (*gemm)(const GemmArgs& args);
  // quantize_one over count contiguous floats.
  void (*quantize)(const float* src, int64_t count, const ActQuant& q, int8_t* out);
  // to_kernel_order (same result, vectorized).
  void (*kernel_order)(const int8_t* natural, int64_t np, int64_t padded_groups, int8_t* out, int32_t* gsum);
  // quantize_one of a [channels][pixels] block (channel c's pixels at src + c * channel_stride,
  // contiguous) into pixel-major bytes: pixel p's channels at out + p * pixel_stride (NCHW -> NHWC).
  void (*quantize_transposed)(const float* src, int64_t channels, int64_t pixels, int64_t channel_stride,
                              const ActQuant& q, int8_t* out, int64_t pixel_stride);
  // The folded form this path runs from natural rows: kFoldedPlanes, kFoldedTernary or none.
  unsigned folded;
  // The direct convolution kernel for few channels a group (include/fgq/depthwise.h).
  void (*depthwise)(const DepthwiseArgs& args);
  // Whether the folded form's stores apply GemmArgs::epilogue (else the caller finishes the rows).
  bool folded_epilogue;
};

// Whether a call can hand the folded store an epilogue with 8-bit levels (StoreEpilogue::has_levels): the
// path applies the epilogue in its folded store, the output is [B, M] (y_stride_m 1) and not accumulated.
inline bool levels_in_store(const KernelDispatch& d, const GemmArgs& a) {
  return d.folded_epilogue && a.natural && a.y_stride_m == 1 && !a.accumulate;
}

// Whether a call over `rows` activation rows takes natural unsigned rows (GemmArgs::natural):
// dense weights always; else the folded form, when this path has it and it was built. Below 4 rows
// the kernel streams weights, and the 2-bit codes are 4-8x fewer bytes than the folded planes.
inline bool use_folded(const KernelDispatch& d, const KernelWeights& w, int64_t rows) {
  if (w.dense) return true;  // no codes to run otherwise
  const bool built = d.folded == kFoldedPlanes ? !w.folded.empty() : !w.ternary.empty();
  return d.folded != kNoFoldedForm && w.fold_planes > 0 && built && rows >= 4;
}

extern const KernelDispatch kRefDispatch;
#if defined(FGQ_HAVE_X86_KERNELS)
extern const KernelDispatch kAvx2Dispatch;  // kernels_avx2.cpp; its gemm sends one-row calls to avx2_gemv
extern const KernelDispatch kAvxVnniDispatch;  // kernels_avxvnni.cpp: the AVX2 table with a vpdpbusd folded GEMM
extern const KernelDispatch kAvx512VnniDispatch;
// The fused kernel (KernelDispatch::gemm) for kernel-order rows on AVX2, made for one
// activation row (kernels_avx2_gemv.cpp): the AVX2 path's one-row calls with groups of at
// least kAvx2GemvMinSteps steps (np / 4). Measured on Zen 3 against the batched kernel,
// 4096 x 4096: N = 32-128 1.1-1.3x from DRAM, 1.0x from L2; N = 4 0.7x and two rows 0.8x
// from L2, so those stay on kernels_avx2.cpp.
void avx2_gemv(const GemmArgs& args);
constexpr int64_t kAvx2GemvMinSteps = 8;
#endif

// CPU support of each path: "ref", "avx2", "avxvnni", "avx512vnni".
bool cpu_supports(const std::string& name);
// The table for a name, or null when unknown or unsupported by this CPU.
const KernelDispatch* find_dispatch(const std::string& name);
// FGQ_KERNEL's table if that variable is set (read at each call; the ops call
// this once per kernel creation), else the best path for this CPU (detected
// once). Null with *error set when FGQ_KERNEL names an unknown or unsupported path.
const KernelDispatch* active_dispatch(std::string* error);

}  // namespace fgq
