// TernaryConv: 2-D convolution with ternary weights (groups, depthwise,
// strides, pads, dilations, bias, residual, optional fused activation), NCHW or
// NHWC (x_layout, y_layout), X, Y and residual float or 8-bit levels. Per image, the
// activation is quantized in one pass into a padded NHWC int8 image (the
// border holds the level of 0.0), or an NHWC uint8 X is that image already. The folded form (natural unsigned rows)
// reads its rows from the image in place, one segment (kernel offset r, s)
// at a time, with no im2col, when a segment's groups lie on consecutive
// channels; otherwise (the code path, whole-filter groups, or several groups
// of N not a multiple of 4 a segment) the rows are gathered (im2col) by copying
// runs, in the order the kernel takes (natural, or kernel order with group sums).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "fgq/depthwise.h"
#include "ops.h"

namespace fgq {
namespace ort {

namespace {
// A run of kernel positions [dst, dst + len) that lie next to each other in the image:
// channels [c0, c0 + len) at kernel offset (r, s) (NHWC), or kernel columns
// [s, s + len) of channel c0 at kernel row r (planar); or group padding (r = kPadding).
struct Run {
  int64_t dst, r, s, c0, len;
};
constexpr int64_t kPadding = -1;

// Planar runs join kernel columns only without dilation (column_step 1).
bool extends(const Run& last, const Run& next, bool planar, int64_t column_step) {
  if (last.r != next.r || last.dst + last.len != next.dst) return false;
  if (next.r == kPadding) return true;
  if (planar) return column_step == 1 && last.c0 == next.c0 && last.s + last.len == next.s;
  return last.s == next.s && last.c0 + last.len == next.c0;
}

// Where one image lies in the padded buffer: NHWC, or planar (CHW) when few channels
// make a kernel position's neighbours the next kernel column, not the next channel.
struct Image {
  int8_t* data;
  int64_t height, width, channels;  // padded height and width, all channels
  bool planar;
  int8_t* at(int64_t h, int64_t w, int64_t c) const {
    return planar ? data + (c * height + h) * width + w : data + (h * width + w) * channels + c;
  }
};

// requantize_one over 8-bit levels, as byte arithmetic: u = level in unsigned order (int8 levels ^ 0x80),
// clamped to [qmin, qmax] in that order, minus (unsigned-order offset + shift) mod 256 (the result fits int8).
struct LevelBytes {
  uint8_t flip, lo, hi, sub;
  LevelBytes(bool is_signed, const ActQuant& q) {
    const int bias = is_signed ? 128 : 0;
    flip = static_cast<uint8_t>(bias);
    lo = static_cast<uint8_t>(q.qmin + bias);
    hi = static_cast<uint8_t>(q.qmax + bias);
    sub = static_cast<uint8_t>((bias + q.shift) & 0xff);
  }
  int8_t operator()(uint8_t level) const {
    uint8_t u = level ^ flip;
    u = u < lo ? lo : (u > hi ? hi : u);
    return static_cast<int8_t>(static_cast<uint8_t>(u - sub));
  }
};

// 8-bit levels of a [channels][pixels] block (channel c's at src + c * channel_stride) requantized into
// pixel-major bytes (pixel p's channels at out + p * pixel_stride): NCHW -> NHWC. 16 x 16 tiles are transposed
// with SSE2 byte interleaves, the rest one byte at a time.
void requantize_transposed(const uint8_t* src, int64_t channels, int64_t pixels, int64_t channel_stride,
                           const LevelBytes& f, int8_t* out, int64_t pixel_stride) {
  int64_t c0 = 0;
#if defined(__SSE2__)
  const __m128i flip = _mm_set1_epi8(static_cast<char>(f.flip)), lo = _mm_set1_epi8(static_cast<char>(f.lo)),
                hi = _mm_set1_epi8(static_cast<char>(f.hi)), sub = _mm_set1_epi8(static_cast<char>(f.sub));
  for (; c0 + 16 <= channels; c0 += 16) {
    int64_t p0 = 0;
    for (; p0 + 16 <= pixels; p0 += 16) {
      __m128i r[16];
      for (int c = 0; c < 16; ++c) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (c0 + c) * channel_stride + p0));
        r[c] = _mm_sub_epi8(_mm_min_epu8(_mm_max_epu8(_mm_xor_si128(v, flip), lo), hi), sub);
      }
      // A byte interleave of rows i and i + 8 into rows 2i, 2i + 1 rotates the 8 index bits (row, column) by one:
      // four rounds swap row and column.
      for (int round = 0; round < 4; ++round) {
        __m128i t[16];
        for (int i = 0; i < 8; ++i) {
          t[2 * i] = _mm_unpacklo_epi8(r[i], r[i + 8]);
          t[2 * i + 1] = _mm_unpackhi_epi8(r[i], r[i + 8]);
        }
        for (int i = 0; i < 16; ++i) r[i] = t[i];
      }
      for (int p = 0; p < 16; ++p) _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (p0 + p) * pixel_stride + c0), r[p]);
    }
    for (int64_t c = c0; c < c0 + 16; ++c)
      for (int64_t p = p0; p < pixels; ++p) out[p * pixel_stride + c] = f(src[c * channel_stride + p]);
  }
#endif
  for (int64_t c = c0; c < channels; ++c)
    for (int64_t p = 0; p < pixels; ++p) out[p * pixel_stride + c] = f(src[c * channel_stride + p]);
}
// An 8-bit tensor's quantization (y_scale/y_zero_point, residual_scale/residual_zero_point): `quant`
// makes quantize write its level bytes (QuantizeLinear over the type's whole range).
struct Levels {
  ActQuant quant;
  bool is_signed = false;
  ONNXTensorElementDataType type() const {
    return is_signed ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
};

// The quantization a scale and zero point input pair gives (`what`: their name's prefix), or none when
// both are absent.
std::optional<Levels> levels_of(const Tensor& scale, const Tensor& zero_point, const std::string& what) {
  if (!scale.present && !zero_point.present) return std::nullopt;
  if (!scale.present || scale.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || scale.size != 1 ||
      !(*scale.as<float>() > 0.f) || !std::isfinite(*scale.as<float>()))
    fail(what + "_scale must be a finite float scalar > 0, given with " + what + "_zero_point");
  if (!zero_point.present || zero_point.size != 1 ||
      (zero_point.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 && zero_point.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8))
    fail(what + "_zero_point must be a uint8 or int8 scalar, given with " + what + "_scale");
  Levels l;
  l.is_signed = zero_point.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  const int zero = l.is_signed ? *zero_point.as<int8_t>() : *zero_point.as<uint8_t>();
  const std::string error = make_act_quant(*scale.as<float>(), zero, l.is_signed ? -128 : 0, l.is_signed ? 127 : 255,
                                           l.is_signed, &l.quant);
  if (!error.empty()) fail(what + ": " + error);
  if (!l.is_signed) l.quant = unsigned_levels(l.quant);  // shift 0: the bytes are the uint8 levels
  return l;
}

// DequantizeLinear of `count` 8-bit levels `step` apart: (level - zero_point) * scale.
void dequantize_levels(const void* src, int64_t count, int64_t step, const Levels& l, float* out) {
  const float scale = l.quant.scale;
  const int zero = l.quant.zero_point;
  if (l.is_signed) {
    const int8_t* in = static_cast<const int8_t*>(src);
    for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(in[i * step] - zero) * scale;
  } else {
    const uint8_t* in = static_cast<const uint8_t*>(src);
    for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(in[i * step] - zero) * scale;
  }
}

// "NCHW" (the default) or "NHWC" for a layout attribute: whether it is channels-last.
bool channels_last(const OrtKernelInfo* info, const char* name) {
  const std::string nchw = "NCHW", layout = attr_string(info, name, &nchw);
  if (layout != "NCHW" && layout != "NHWC") fail(std::string(name) + " must be NCHW or NHWC, got " + layout);
  return layout == "NHWC";
}
}  // namespace

class ConvKernel : public TernaryKernelBase {
 public:
  explicit ConvKernel(const OrtKernelInfo* info) : TernaryKernelBase(info) {
    const std::vector<int64_t> ws = attr_ints(info, "weight_shape", nullptr);
    if (ws.size() != 4) fail("weight_shape must be [M, C/group, R, S] (2-D convolution only)");
    for (int64_t d : ws)
      if (d < 1 || d > (int64_t{1} << 30)) fail("weight_shape values must be in [1, 2^30]");
    m_ = ws[0];
    cg_ = ws[1];
    r_ = ws[2];
    s_ = ws[3];
    const int64_t one = 1;
    group_ = attr_int(info, "group", &one);
    if (group_ < 1 || m_ % group_ != 0) fail("group must be >= 1 and divide M = " + std::to_string(m_));
    const std::vector<int64_t> ones2 = {1, 1}, zeros4 = {0, 0, 0, 0};
    strides_ = attr_ints(info, "strides", &ones2);
    dilations_ = attr_ints(info, "dilations", &ones2);
    pads_ = attr_ints(info, "pads", &zeros4);
    if (strides_.size() != 2 || dilations_.size() != 2 || pads_.size() != 4)
      fail("strides and dilations need 2 values, pads 4 (2-D convolution)");
    for (int64_t v : strides_)
      if (v < 1 || v > (int64_t{1} << 20)) fail("strides must be >= 1");
    for (int64_t v : dilations_)
      if (v < 1 || v > (int64_t{1} << 20)) fail("dilations must be >= 1");
    for (int64_t v : pads_)
      if (v < 0 || v > (int64_t{1} << 20)) fail("pads must be >= 0");
    const std::vector<int64_t> none;
    const std::vector<int64_t> ks = attr_ints(info, "kernel_shape", &none);
    if (!ks.empty() && (ks.size() != 2 || ks[0] != r_ || ks[1] != s_)) fail("kernel_shape disagrees with weight_shape");
    x_nhwc_ = channels_last(info, "x_layout");
    y_nhwc_ = channels_last(info, "y_layout");
    const std::string notset = "NOTSET";
    if (attr_string(info, "auto_pad", &notset) != "NOTSET") fail("auto_pad is not supported: give explicit pads");
    const int64_t rs = checked_mul(r_, s_, "kernel");
    // Depthwise and grouped convolutions with few output rows a group: the GEMM's quads of rows would be
    // mostly empty, and a group's few channels make short rows. On AVX2 the direct kernel measured (3x3,
    // as many channels as rows a group) 15-36x faster than the GEMM at 2-4 rows a group, 1.7-8.7x at 16,
    // 1.3-3.6x at 32.
    constexpr int64_t kDirectMaxRowsPerGroup = 16;
    direct_ = (group_ > 1 || cg_ == 1) && m_ / group_ <= kDirectMaxRowsPerGroup &&
              depthwise_supports(strides_[1], dilations_[1]) &&
              checked_mul(cg_, rs, "filter") <= kDepthwiseMaxTaps;
    if (!direct_) use_dense_weights(info, rs, cg_);  // the direct kernel reads int8 weights in the N = 1 form
    segmented_ = cg_ >= n_;
    // A segment's positions are its channels, read in place from the NHWC image: groups without
    // position padding, or one group a segment (a narrow conv's per-tap group: the padding
    // positions read the next channels, which meet zero weights).
    channel_rows_ = segmented_ && (n_ % 4 == 0 || cg_ == n_);
    // Without groups or dilated columns a kernel row's offsets can be one segment: its pixels lie
    // next to each other, each a kernel offset's positions wide when the channels fill whole groups,
    // or when the image pads each pixel's channels to the positions of its one group (a 3-channel
    // stem's per-tap groups: 4 bytes a pixel, the fourth meeting zero weights).
    const bool row_pixels = channel_rows_ && group_ == 1 && dilations_[1] == 1;
    pad_channels_ = row_pixels && n_ % 4 != 0;
    row_segments_ = row_pixels && (pad_channels_ || cg_ % n_ == 0);
    const ReductionLayout layout =
        segmented_ ? ReductionLayout{rs, cg_, n_} : ReductionLayout{1, checked_mul(cg_, rs, "filter"), n_};
    init_weights(info, layout, m_);
    keep_constant_bias(info);
    constant_levels(info, kYScale, "y", &constant_y_levels_);
    constant_levels(info, kResidualScale, "residual", &constant_residual_levels_);
    if (direct_ && constant_planes_) {  // the direct route keeps only its regrouped weights
      direct_weights_ = std::make_shared<const DepthwiseWeights>(direct_weights(*constant_planes_));
      constant_planes_.reset();
    }
    positions_ = kernel_padded_groups(layout.groups()) * kernel_group_positions(n_);
    if (!direct_) plan_gather(layout);
  }

  void Compute(OrtKernelContext* ctx) const {
    const Tensor x = input(ctx, kX);
    if (x.shape.size() != 4) fail(std::string("X must be 4-D ") + (x_nhwc_ ? "NHWC" : "NCHW") + ", got " + shape_string(x.shape));
    const int64_t nb = x.shape[0], C = x.shape[x_nhwc_ ? 3 : 1], H = x.shape[x_nhwc_ ? 1 : 2], W = x.shape[x_nhwc_ ? 2 : 3];
    if (C != checked_mul(cg_, group_, "channels"))
      fail("X has " + std::to_string(C) + " channels, weight_shape and group need " + std::to_string(cg_ * group_));
    const ActQuant q = act_quant(ctx, x);
    Planes scratch;  // stays empty on the direct route with constant weights (already regrouped)
    const Planes& p = direct_weights_ ? scratch : planes(ctx, scratch);
    if (!direct_weights_ && p.pos.positions() != positions_) fail("internal: layout mismatch");
    const float* b = bias(ctx, m_);
    const int64_t span_h = checked_add(checked_mul(dilations_[0], r_ - 1, "kernel"), 1, "kernel");
    const int64_t span_w = checked_add(checked_mul(dilations_[1], s_ - 1, "kernel"), 1, "kernel");
    const int64_t eff_h = checked_add(H, pads_[0] + pads_[2], "height") - span_h;
    const int64_t eff_w = checked_add(W, pads_[1] + pads_[3], "width") - span_w;
    if (eff_h < 0 || eff_w < 0) fail("the kernel does not fit the padded input: output would be empty");
    const int64_t OH = eff_h / strides_[0] + 1, OW = eff_w / strides_[1] + 1;
    const int64_t P = checked_mul(OH, OW, "output");
    const std::optional<Levels> y_levels = levels(ctx, kYScale, "y", constant_y_levels_);
    const std::optional<Levels> r_levels = levels(ctx, kResidualScale, "residual", constant_residual_levels_);
    const std::vector<int64_t> y_shape = y_nhwc_ ? std::vector<int64_t>{nb, OH, OW, m_} : std::vector<int64_t>{nb, m_, OH, OW};
    void* y = output(ctx, 0, y_shape, y_levels ? y_levels->type() : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    const void* r = residual(ctx, y_shape, r_levels);
    if (nb == 0 || P == 0) return;

    const bool natural = folded_rows(p, P);
    const bool in_place = natural && channel_rows_;
    const int64_t slots = in_place && pad_channels_ ? kernel_group_positions(n_) : C;
    const Geometry geo{C, H, W, OH, OW, H + pads_[0] + pads_[2], W + pads_[1] + pads_[3], slots};
    const ActQuant qi = natural ? unsigned_levels(q) : q;
    thread_local ScratchBuffer<int64_t> offsets_buffer;
    GemmArgs a;
    a.natural = natural;
    a.s_stride = p.pos.padded_groups;
    a.y_stride_b = y_nhwc_ ? m_ : 1;
    a.y_stride_m = y_nhwc_ ? 1 : P;
    a.scale = q.scale;
    a.offset = static_cast<float>(q.offset());
    if (in_place) {
      int64_t* offsets = offsets_buffer.get(checked_add(P, r_ * s_, "output"));
      set_offsets(geo, offsets, offsets + P);
      const int64_t offset_positions = kernel_group_positions(n_) * ((cg_ + n_ - 1) / n_);
      a.row_offsets = offsets;
      a.segment_offsets = offsets + P;
      a.segments = row_segments_ ? r_ : r_ * s_;
      a.segment_len = row_segments_ ? s_ * offset_positions : offset_positions;
      // A kernel offset's channels, rounded up to 4 (the rest meets zero weights), or a whole kernel row.
      a.segment_read = row_segments_ ? s_ * offset_positions : kernel_group_positions(cg_);
    }
    DepthwiseWeights direct_scratch;
    const DepthwiseWeights* direct = direct_weights_.get();
    if (direct_ && !direct) direct = &(direct_scratch = direct_weights(p));
    // Several images: one task each, on its own thread's buffers; one image: parallel inside.
    auto image_task = [&](size_t n, OrtKernelContext* inner) {
      const int64_t offset = static_cast<int64_t>(n) * m_ * P;
      const Epilogue e{b,
                       r ? static_cast<const char*>(r) + offset * (r_levels ? 1 : 4) : nullptr,
                       r_levels ? &*r_levels : nullptr,
                       static_cast<char*>(y) + offset * (y_levels ? 1 : 4),
                       y_levels ? &*y_levels : nullptr,
                       m_,
                       P,
                       y_nhwc_};
      if (direct) run_direct(inner, x, static_cast<int64_t>(n), q, geo, *direct, e);
      else run_image(inner, x, static_cast<int64_t>(n), qi, geo, p, in_place, a, e);
    };
    if (nb == 1) {
      image_task(0, ctx);
      return;
    }
    std::mutex mutex;
    std::exception_ptr error;  // rethrown here: an exception must not cross onnxruntime's thread pool
    parallel_for(ctx, static_cast<size_t>(nb), [&](size_t n) {
      try {
        image_task(n, nullptr);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!error) error = std::current_exception();
      }
    });
    if (error) std::rethrow_exception(error);
  }

 private:
  struct Geometry {
    int64_t C, H, W, OH, OW, padded_h, padded_w;
    int64_t slots;  // bytes a pixel of the NHWC image: C, or the channels padded (pad_channels_)
  };
  // One image's output ([M, OH, OW], or [OH, OW, M] with y_layout NHWC) and what is added to it before the
  // activation: bias [M] and the residual (laid out as the output), each optional. The residual and the output
  // are float, or 8-bit levels of their Levels. Unless the folded store takes them (gemm), 8-bit or NHWC
  // outputs go tile by tile through a float tile in cache, [channels][pixels] (tiled()).
  struct Epilogue {
    const float* bias;
    const void* residual;
    const Levels* residual_levels;
    void* y;
    const Levels* y_levels;
    int64_t M, P;
    bool nhwc;
    bool tiled() const { return residual_levels || y_levels || nhwc; }
    float* float_y() const { return tiled() ? nullptr : static_cast<float*>(y); }
    // Where element (channel m, pixel) lies, and the step from one pixel to the next.
    int64_t at(int64_t m, int64_t pixel) const { return nhwc ? pixel * M + m : m * P + pixel; }
    int64_t pixel_step() const { return nhwc ? M : 1; }
    // count pixels of channel m from pixel p0 of the residual as floats into out.
    void load_residual(int64_t m, int64_t p0, int64_t count, float* out) const {
      const int64_t from = at(m, p0), step = pixel_step();
      if (residual_levels) {
        dequantize_levels(static_cast<const uint8_t*>(residual) + from, count, step, *residual_levels, out);
        return;
      }
      const float* r = static_cast<const float*>(residual) + from;
      for (int64_t i = 0; i < count; ++i) out[i] = r[i * step];
    }
    // A float tile [rows channels from m0][cols pixels from p0] stored: NHWC levels quantized at once and
    // transposed in 16 x 16 byte tiles, else row by row (NCHW levels quantized, floats copied).
    void store_tile(const KernelDispatch& d, int64_t m0, int64_t rows, int64_t p0, int64_t cols, const float* tile) const {
      if (nhwc && y_levels) {
        thread_local ScratchBuffer<int8_t> bytes_buffer;
        int8_t* bytes = bytes_buffer.get(rows * cols);
        d.quantize(tile, rows * cols, y_levels->quant, bytes);
        requantize_transposed(reinterpret_cast<const uint8_t*>(bytes), rows, cols, cols, LevelBytes(false, ActQuant()),
                              static_cast<int8_t*>(y) + at(m0, p0), M);
        return;
      }
      const int64_t step = pixel_step();
      for (int64_t r = 0; r < rows; ++r) {
        const float* src = tile + r * cols;
        if (y_levels) {
          d.quantize(src, cols, y_levels->quant, static_cast<int8_t*>(y) + at(m0 + r, p0));
          continue;
        }
        float* out = static_cast<float*>(y) + at(m0 + r, p0);
        for (int64_t i = 0; i < cols; ++i) out[i * step] = src[i];
      }
    }
  };

  // y_scale/y_zero_point or residual_scale/residual_zero_point, parsed once when constant.
  static void constant_levels(const OrtKernelInfo* info, size_t scale_index, const char* what,
                              std::optional<Levels>* out) {
    const OrtValue *scale = nullptr, *zero_point = nullptr;
    if (constant_input(info, scale_index, &scale) && constant_input(info, scale_index + 1, &zero_point) &&
        (scale || zero_point))
      *out = levels_of(view(scale), view(zero_point), what);
  }
  static std::optional<Levels> levels(OrtKernelContext* ctx, size_t scale_index, const char* what,
                                      const std::optional<Levels>& constant) {
    if (constant) return constant;
    return levels_of(input(ctx, scale_index), input(ctx, scale_index + 1), what);
  }

  // The residual input (exactly the output's shape and layout: float, or levels of residual_zero_point's type)
  // or null.
  static const void* residual(OrtKernelContext* ctx, const std::vector<int64_t>& shape,
                              const std::optional<Levels>& levels) {
    const Tensor r = input(ctx, kResidual);
    if (!r.present) {
      if (levels) fail("residual_scale and residual_zero_point are given without a residual");
      return nullptr;
    }
    const ONNXTensorElementDataType type = levels ? levels->type() : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (r.type != type)
      fail(std::string("residual must be ") + type_name(type) + (levels ? " (residual_zero_point's type)" : "") +
           ", got " + type_name(r.type));
    if (r.shape != shape) fail("residual shape " + shape_string(r.shape) + " must be the output's " + shape_string(shape));
    return r.data;
  }

  // Image n: quantize, gather unless in place, GEMM into y_image (ctx null: serially).
  void run_image(OrtKernelContext* ctx, const Tensor& x, int64_t n, const ActQuant& qi, const Geometry& geo,
                 const Planes& p, bool in_place, GemmArgs a, const Epilogue& e) const {
    thread_local ScratchBuffer<int8_t> image_buffer, rows_buffer;
    thread_local ScratchBuffer<int32_t> gsum_buffer;
    const int64_t P = geo.OH * geo.OW;
    // Slack: in-place segments read up to 3 bytes past the last pixel's channels, gather's
    // short runs up to 15.
    const int64_t image_bytes = checked_mul(checked_mul(geo.padded_h, geo.padded_w, "input"), geo.slots, "input");
    const bool x_in_place = in_place && x_is_image(x, qi, geo);
    const Image image{image_buffer.get(checked_add(x_in_place ? 0 : image_bytes, positions_ + 16, "input")),
                      geo.padded_h, geo.padded_w, geo.slots, planar()};
    if (!x_in_place) quantize_image(ctx, x, n, qi, geo, image);
    int64_t group_step;  // x advance from one group's rows to the next
    if (in_place) {
      a.x = x_in_place ? static_cast<const int8_t*>(x.data) + n * image_bytes : image.data;
      group_step = cg_;
    } else {
      const int64_t row_count = checked_mul(group_, P, "im2col");
      int8_t* rows = rows_buffer.get(checked_mul(row_count, positions_, "im2col"));
      int32_t* gsum = a.natural ? nullptr : gsum_buffer.get(checked_mul(row_count, p.pos.padded_groups, "im2col"));
      gather(ctx, geo, image, a.natural, p.pos, rows, gsum);
      a.x = rows;
      a.x_stride = positions_;
      a.gsum = gsum;
      group_step = P * positions_;
    }
    a.y = e.float_y();
    gemm(ctx, p, P, group_step, a, e);
  }

  // Whether the kernel can read NHWC uint8 X in place as the image: no padding to add, no channel slots, the
  // levels unchanged by the quantization (LevelBytes is the identity), and channels a multiple of 4 (in-place
  // segments read up to 3 bytes past a pixel's channels).
  bool x_is_image(const Tensor& x, const ActQuant& qi, const Geometry& geo) const {
    const LevelBytes f(false, qi);
    return x_nhwc_ && x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 && f.flip == 0 && f.lo == 0 && f.hi == 255 &&
           f.sub == 0 && geo.padded_h == geo.H && geo.padded_w == geo.W && geo.slots == geo.C && geo.C % 4 == 0;
  }

  DepthwiseWeights direct_weights(const Planes& p) const {
    DepthwiseWeights w;
    const std::string error = build_depthwise_weights(p.pos, p.asymmetric ? &p.neg : nullptr, layout_, segmented_,
                                                      m_ / group_, cg_, r_, s_, &w);
    if (!error.empty()) fail(error);
    return w;
  }

  // Image n by the direct kernel: quantized to unsigned levels in a planar padded image, then
  // output channels in parallel tasks.
  void run_direct(OrtKernelContext* ctx, const Tensor& x, int64_t n, const ActQuant& q, const Geometry& geo,
                  const DepthwiseWeights& w, const Epilogue& e) const {
    thread_local ScratchBuffer<int8_t> image_buffer;
    const ActQuant qu = unsigned_levels(q);
    const int64_t image_bytes = checked_mul(checked_mul(geo.padded_h, geo.padded_w, "input"), geo.C, "input");
    const Image image{image_buffer.get(checked_add(image_bytes, kDepthwiseSlack, "input")), geo.padded_h, geo.padded_w,
                      geo.C, true};
    quantize_image(ctx, x, n, qu, geo, image);
    DepthwiseArgs a;
    a.w = &w;
    a.image = reinterpret_cast<const uint8_t*>(image.data);
    a.padded_h = geo.padded_h;
    a.padded_w = geo.padded_w;
    a.zero_level = static_cast<uint8_t>(qu.zero_level());
    a.out_h = geo.OH;
    a.out_w = geo.OW;
    a.stride_h = strides_[0];
    a.stride_w = strides_[1];
    a.dilation_h = dilations_[0];
    a.dilation_w = dilations_[1];
    a.x_scale = q.scale;
    a.bias = e.bias;
    a.residual = e.tiled() ? nullptr : static_cast<const float*>(e.residual);
    a.y = e.float_y();
    const Activation rest = as_clamp(activation_, &a.lo, &a.hi) ? Activation() : activation_;  // left to the pass
    // Tasks of whole channels; or, tiled, of 32 channels x output rows, each through a float tile in cache
    // ([channels][the rows' pixels]: a call over fewer output rows starts its image that many rows on).
    constexpr int64_t kTileChannels = 32, kTilePixels = 1024;
    const int64_t channels = e.tiled() ? kTileChannels : channels_per_task(geo.OH * geo.OW);
    const int64_t rows = e.tiled() ? std::max<int64_t>(1, kTilePixels / geo.OW) : geo.OH;
    const int64_t channel_tasks = (m_ + channels - 1) / channels, row_tasks = (geo.OH + rows - 1) / rows;
    auto task = [&](size_t t) {
      DepthwiseArgs part = a;
      part.m_begin = static_cast<int64_t>(t) % channel_tasks * channels;
      part.m_end = std::min(m_, part.m_begin + channels);
      const int64_t oh0 = static_cast<int64_t>(t) / channel_tasks * rows;
      part.out_h = std::min(geo.OH, oh0 + rows) - oh0;
      part.image += oh0 * strides_[0] * geo.padded_w;
      const int64_t pixels = part.out_h * geo.OW, first = part.m_begin * pixels, count = (part.m_end - part.m_begin) * pixels;
      thread_local ScratchBuffer<float> tile_buffer, residual_buffer;
      if (e.tiled()) {  // y and residual addressed from the tile's first element
        float* tile = tile_buffer.get(count);
        part.y = tile - first;
        if (e.residual) {
          float* residual = residual_buffer.get(count);
          for (int64_t m = part.m_begin; m < part.m_end; ++m)
            e.load_residual(m, oh0 * geo.OW, pixels, residual + (m - part.m_begin) * pixels);
          part.residual = residual - first;
        }
      }
      dispatch_->depthwise(part);
      if (rest.active()) finish_row_(part.y + first, count, RowAddends(), rest);
      if (e.tiled()) e.store_tile(*dispatch_, part.m_begin, part.m_end - part.m_begin, oh0 * geo.OW, pixels, part.y + first);
    };
    parallel_for(ctx, static_cast<size_t>(channel_tasks * row_tasks), task);
  }

  // Channels of `pixels` each in one task: enough work to pay for a task's setup (the kernel plans
  // its output vectors per call), and still many tasks on large images.
  static int64_t channels_per_task(int64_t pixels) {
    constexpr int64_t kPixelsPerTask = 8192;
    return std::max<int64_t>(1, kPixelsPerTask / std::max<int64_t>(1, pixels));
  }

  // In-place rows: pixel (oh, ow) at its top-left input pixel, segment (r, s) at its kernel offset
  // (row segments: segment r at kernel offset (r, 0)).
  void set_offsets(const Geometry& geo, int64_t* row_offsets, int64_t* segment_offsets) const {
    for (int64_t pix = 0; pix < geo.OH * geo.OW; ++pix)
      row_offsets[pix] = ((pix / geo.OW) * strides_[0] * geo.padded_w + (pix % geo.OW) * strides_[1]) * geo.slots;
    const int64_t offsets_a_segment = row_segments_ ? s_ : 1;
    for (int64_t k = 0; k < r_ * s_; k += offsets_a_segment)
      segment_offsets[k / offsets_a_segment] =
          ((k / s_) * dilations_[0] * geo.padded_w + (k % s_) * dilations_[1]) * geo.slots;
  }

  // The runs of the gather: natural row positions that lie next to each other in the image.
  void plan_gather(const ReductionLayout& layout) {
    const std::vector<int64_t> map =
        kernel_position_map(layout, kernel_group_positions(n_), kernel_padded_groups(layout.groups()));
    for (int64_t p = 0; p < positions_; ++p) {
      const int64_t idx = map[static_cast<size_t>(p)];
      Run next{p, kPadding, 0, 0, 1};
      if (idx >= 0 && segmented_) next = Run{p, idx / cg_ / s_, idx / cg_ % s_, idx % cg_, 1};
      if (idx >= 0 && !segmented_) next = Run{p, idx / s_ % r_, idx % s_, idx / (r_ * s_), 1};
      if (!runs_.empty() && extends(runs_.back(), next, planar(), dilations_[1]))
        ++runs_.back().len;
      else
        runs_.push_back(next);
    }
  }

  // `count` values of x from element `src` quantized into dst.
  void quantize_values(const Tensor& x, int64_t src, int64_t count, const ActQuant& q, int8_t* dst) const {
    if (x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      dispatch_->quantize(x.as<float>() + src, count, q, dst);
      return;
    }
    const LevelBytes f(x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, q);
    const uint8_t* levels = x.as<uint8_t>() + src;  // int8 levels as their bytes: LevelBytes flips them
    for (int64_t i = 0; i < count; ++i) dst[i] = f(levels[i]);
  }

  // Rows [i, i + count) of image n (x from element src) quantized into dst, one after another: planar, rows of
  // W values (row c * H + h: channel c, input row h); NHWC, input rows of W pixels of geo.slots bytes.
  void quantize_rows(const Tensor& x, int64_t src, int64_t i, int64_t count, const ActQuant& q, const Geometry& geo,
                     bool planar, int8_t* dst) const {
    const int64_t C = geo.C, H = geo.H, W = geo.W;
    if (planar) {  // NCHW (an NHWC X is made so by planar_levels)
      quantize_values(x, src + i * W, count * W, q, dst);
    } else if (x_nhwc_ && geo.slots == C) {  // NHWC rows as they are
      quantize_values(x, src + i * W * C, count * W * C, q, dst);
    } else if (x_nhwc_) {
      for (int64_t pixel = 0; pixel < count * W; ++pixel)
        quantize_values(x, src + (i * W + pixel) * C, C, q, dst + pixel * geo.slots);
    } else if (x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      dispatch_->quantize_transposed(x.as<float>() + src + i * W, C, count * W, H * W, q, dst, geo.slots);
    } else {
      requantize_transposed(x.as<uint8_t>() + src + i * W, C, count * W, H * W,
                            LevelBytes(x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, q), dst, geo.slots);
    }
  }

  // Image n of x quantized into the padded image, its border the level of 0.0 (written once). The image is a
  // sequence of interior rows (planar: C * H of W bytes, channel-major, as x's rows; NHWC: H of W pixels) with
  // border bytes between them: a task takes a block of rows, each with the border before it (the last also the
  // border after). Planar rows are quantized in one call a task (rows without left/right padding straight into
  // the image), then placed with 16-byte copies; NHWC rows go through quantize_transposed. Short borders and
  // row copies are 16-byte stores wherever their spill stays in the task's rows, which rewrite it in order.
  void quantize_image(OrtKernelContext* ctx, const Tensor& x, int64_t n, const ActQuant& q, const Geometry& geo,
                      const Image& image) const {
    if (image.planar && x_nhwc_) {
      thread_local ScratchBuffer<int8_t> dense_buffer;
      ActQuant identity;
      const Tensor levels = planar_levels(ctx, x, n, q, geo, dense_buffer.get(geo.C * geo.H * geo.W), &identity);
      return fill_image(ctx, levels, 0, identity, geo, image);
    }
    fill_image(ctx, x, n, q, geo, image);
  }

  // quantize_image of an NCHW X (planar image) or any X (NHWC image).
  void fill_image(OrtKernelContext* ctx, const Tensor& x, int64_t n, const ActQuant& q, const Geometry& geo,
                  const Image& image) const {
    const int64_t C = geo.C, H = geo.H, W = geo.W, HW = H * W, src = n * C * HW;
    const bool contiguous = geo.padded_w == W, planar = image.planar;
    const int64_t rows = planar ? C * H : H, row_bytes = planar ? W : W * geo.slots;
    // Values a task: planar, a block of x's rows; NHWC, all channels of 256 pixels.
    constexpr int64_t kPlanarValuesPerTask = 8192, kPixelsPerTask = 256;
    const int64_t rows_per_task = std::max<int64_t>(1, (planar ? kPlanarValuesPerTask : kPixelsPerTask) / std::max<int64_t>(1, W));
    const auto row_start = [&](int64_t i) {
      return planar ? image.at(i % H + pads_[0], pads_[1], i / H) : image.at(i + pads_[0], pads_[1], 0);
    };
    int8_t* const end = image.at(geo.padded_h, 0, planar ? C - 1 : 0);
    int8_t zeros[16];
    std::memset(zeros, q.zero_level(), sizeof zeros);
    // From one row's start to the next: a row pitch, and past the bottom and top border rows from a plane's last row.
    const int64_t pitch = planar ? geo.padded_w : geo.padded_w * geo.slots, wrap = (pads_[0] + pads_[2]) * pitch;
    auto task = [&](size_t t) {
      thread_local ScratchBuffer<int8_t> levels_buffer;
      // Locals, not captures: the byte stores below may alias anything read through a reference.
      const int64_t i0 = static_cast<int64_t>(t) * rows_per_task, i1 = std::min(rows, i0 + rows_per_task);
      const int64_t height = H, width = W, bytes = row_bytes, step = pitch, skip = wrap;
      const int8_t* levels = nullptr;  // planar rows i0.. quantized, when they need placing
      if (planar && !contiguous && i1 > i0 && width > 0) {
        int8_t* buffer = levels_buffer.get((i1 - i0) * width);
        quantize_rows(x, src, i0, i1 - i0, q, geo, true, buffer);
        levels = buffer;
      }
      int8_t* from = i0 == 0 ? image.data : row_start(i0 - 1) + bytes;  // the border before row i0
      int8_t* dst = i0 < i1 ? row_start(i0) : nullptr;
      // Writes may spill 16-byte steps up to `limit`: the rows and borders after them in the task rewrite the spill.
      int8_t* const limit = i0 < i1 ? row_start(i1 - 1) + bytes : nullptr;
      const auto fill = [&zeros](int8_t* begin, int8_t* stop) {
        if (stop - begin > 16) std::memset(begin, zeros[0], static_cast<size_t>(stop - begin));
        else if (stop > begin) copy_bytes(begin, zeros, stop - begin);
      };
      int64_t h = planar && i0 < i1 ? i0 % height : i0;
      for (const int8_t* row = levels; levels && row < levels + (i1 - i0) * width; row += width) {
        if (dst + width + 16 <= limit && dst - from <= 16) {  // the spill stays in the task's later rows
          std::memcpy(from, zeros, 16);
          for (int64_t j = 0; j < width; j += 16) std::memcpy(dst + j, row + j, 16);
        } else {
          fill(from, dst);
          copy_bytes(dst, row, width);
        }
        from = dst + width;
        dst += step;
        if (++h == height) h = 0, dst += skip;
      }
      for (int64_t i = i0, count = 1; !levels && i < i1; i += count) {
        count = contiguous ? std::min(i1 - i, height - h) : 1;
        fill(from, dst);
        from = dst + count * bytes;
        quantize_rows(x, src, i, count, q, geo, planar, dst);
        dst += count * step;
        h += count;
        if (h == height) h = 0, dst += skip;
      }
      if (i1 == rows) std::memset(from, zeros[0], static_cast<size_t>(end - from));
    };
    parallel_for(ctx, static_cast<size_t>(std::max<int64_t>(1, (rows + rows_per_task - 1) / rows_per_task)), task);
  }

  // Image n of an NHWC X quantized into dense planar levels [C][H][W] (pixels x channels transposed in 16 x 16
  // tiles, 256 pixels a task), viewed as an 8-bit NCHW tensor of one image: its rows then go into the planar
  // image as an NCHW X's do, under `identity` (the levels as they are, the border the level of 0.0).
  Tensor planar_levels(OrtKernelContext* ctx, const Tensor& x, int64_t n, const ActQuant& q, const Geometry& geo,
                       int8_t* dense, ActQuant* identity) const {
    const int64_t C = geo.C, HW = geo.H * geo.W;
    constexpr int64_t kPixelsPerTask = 256;
    parallel_for(ctx, static_cast<size_t>((HW + kPixelsPerTask - 1) / kPixelsPerTask), [&](size_t t) {
      const int64_t p0 = static_cast<int64_t>(t) * kPixelsPerTask, count = std::min(kPixelsPerTask, HW - p0);
      const int64_t src = (n * HW + p0) * C;
      if (x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        dispatch_->quantize_transposed(x.as<float>() + src, count, C, C, q, dense + p0, HW);
      else
        requantize_transposed(x.as<uint8_t>() + src, count, C, C, LevelBytes(x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, q),
                              dense + p0, HW);
    });
    *identity = ActQuant();  // levels 0..255 unchanged (LevelBytes: the identity)
    identity->scale = q.scale;
    identity->zero_point = static_cast<uint8_t>(q.zero_level());
    Tensor levels;
    levels.present = true;
    levels.type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    levels.shape = {1, C, geo.H, geo.W};
    levels.size = C * HW;
    levels.data = dense;
    return levels;
  }

  // im2col, all groups: row (g, pixel) of positions_ bytes, natural order, or kernel
  // order with group sums. A task takes a block of pixels, one run at a time over them.
  void gather(OrtKernelContext* ctx, const Geometry& geo, const Image& image, bool natural, const KernelWeights& w,
              int8_t* rows, int32_t* gsum) const {
    const int64_t P = geo.OH * geo.OW, Kp = positions_, Gp = w.padded_groups;
    constexpr int64_t kPixelsPerTask = 64;
    const int64_t pixel_tasks = (P + kPixelsPerTask - 1) / kPixelsPerTask;
    // The image address is linear in (h, w, c): each run's source is a fixed offset from its
    // pixel's window corner. Group padding is not written: it meets zero weights (on the code
    // path the group sums cancel it too). A short run is copied as 4, 8 or 16 bytes where that
    // stays in the row: the runs ascend, so the next one rewrites the excess (the image has
    // slack for the excess read).
    struct Copy {
      int64_t to, from, len, width;
    };
    std::vector<Copy> copies;
    for (const Run& run : runs_) {
      if (run.r == kPadding) continue;
      const int64_t width = run.len <= 4 ? 4 : run.len <= 8 ? 8 : 16;
      copies.push_back({run.dst, image.at(run.r * dilations_[0], run.s * dilations_[1], run.c0) - image.data, run.len,
                        run.len <= 16 && run.dst + width <= Kp ? width : 0});
    }
    const int64_t step_h = image.at(strides_[0], 0, 0) - image.data, step_w = image.at(0, strides_[1], 0) - image.data;
    // Sizes by value: the byte stores below may alias anything read through a reference.
    auto task = [&, P, Kp, step_h, step_w, OW = geo.OW](size_t t) {
      const int64_t g = static_cast<int64_t>(t) / pixel_tasks;
      const int64_t p0 = static_cast<int64_t>(t) % pixel_tasks * kPixelsPerTask, p1 = std::min(P, p0 + kPixelsPerTask);
      std::vector<int8_t> block(natural ? 0 : static_cast<size_t>((p1 - p0) * Kp));
      int8_t* const first = natural ? rows + (g * P + p0) * Kp : block.data();
      const int8_t* const origin = image.at(0, 0, g * cg_);
      int64_t corners[kPixelsPerTask];  // each pixel's window corner from `origin`
      const int64_t count = p1 - p0;
      for (int64_t i = 0, oh = p0 / OW, ow = p0 % OW; i < count; ++i) {
        corners[i] = oh * step_h + ow * step_w;
        if (++ow == OW) ow = 0, ++oh;
      }
      for (const Copy& c : copies) {
        const int8_t* const from = origin + c.from;
        int8_t* const to = first + c.to;
        switch (c.width) {
          case 4: copy_each<4>(to, Kp, from, corners, count); break;
          case 8: copy_each<8>(to, Kp, from, corners, count); break;
          case 16: copy_each<16>(to, Kp, from, corners, count); break;
          default:
            for (int64_t i = 0; i < count; ++i) copy_bytes(to + i * Kp, from + corners[i], c.len);
        }
      }
      for (int64_t pix = p0; !natural && pix < p1; ++pix)
        dispatch_->kernel_order(first + (pix - p0) * Kp, w.np, Gp, rows + (g * P + pix) * Kp, gsum + (g * P + pix) * Gp);
    };
    parallel_for(ctx, static_cast<size_t>(group_ * pixel_tasks), task);
  }

  // kWidth bytes from from + corners[i] to to + i * row, for i < count.
  template <int kWidth>
  static void copy_each(int8_t* to, int64_t row, const int8_t* from, const int64_t* corners, int64_t count) {
    for (int64_t i = 0; i < count; ++i, to += row) std::memcpy(to, from + corners[i], kWidth);
  }

  // memcpy of len >= 1 bytes (the stem's few channels, kernel columns, planar image rows) as fixed-size copies
  // that may overlap, without a call: 16 bytes a step, the last step ending at len.
  static void copy_bytes(int8_t* to, const int8_t* from, int64_t len) {
    if (len > 16) {
      for (int64_t i = 0; i < len - 16; i += 16) std::memcpy(to + i, from + i, 16);
      std::memcpy(to + len - 16, from + len - 16, 16);
    } else if (len >= 8) {
      std::memcpy(to, from, 8);
      std::memcpy(to + len - 8, from + len - 8, 8);
    } else if (len >= 4) {
      std::memcpy(to, from, 4);
      std::memcpy(to + len - 4, from + len - 4, 4);
    } else if (len >= 2) {
      std::memcpy(to, from, 2);
      std::memcpy(to + len - 2, from + len - 2, 2);
    } else if (len == 1) {
      *to = *from;
    }
  }

  // The ternary GEMM per group over the P pixels of one image, then bias, residual and activation per tile.
  void gemm(OrtKernelContext* ctx, const Planes& p, int64_t P, int64_t group_step, const GemmArgs& args,
            const Epilogue& e) const {
    const int64_t mg = m_ / group_;
    const int64_t mb = 64, bb = P <= 8 ? P : 64;
    const int64_t tiles_m = (mg + mb - 1) / mb, tiles_b = (P + bb - 1) / bb;
    const bool finish = e.bias || e.residual || activation_.active();
    std::optional<StoreEpilogue> stored = finish || e.tiled() ? store_epilogue(args, e.bias, activation_) : std::nullopt;
    // An NHWC output is [pixels, M]: the folded store takes the whole epilogue, levels too, where the path has it.
    const bool in_store = stored && e.nhwc && !p.asymmetric && levels_in_store(*dispatch_, args);
    GemmArgs task_args = args;
    if (in_store) {
      set_levels(e, &*stored);
      task_args.y = e.y_levels ? nullptr : static_cast<float*>(e.y);
    } else if (stored && !e.tiled()) {
      stored->residual = static_cast<const float*>(e.residual);  // laid out as y_image
    }
    const bool tiled = e.tiled() && !in_store;
    auto task = [&](size_t t) {
      const int64_t i = static_cast<int64_t>(t);
      const int64_t g = i / (tiles_m * tiles_b), tm = i % tiles_m, tb = i / tiles_m % tiles_b;
      GemmArgs a = task_args;
      a.x += g * group_step;
      if (a.gsum) a.gsum += g * P * a.s_stride;
      a.m_begin = g * mg + tm * mb;
      a.m_end = std::min(g * mg + mg, a.m_begin + mb);
      a.b_begin = tb * bb;
      a.b_end = std::min(P, a.b_begin + bb);
      if (tiled) {
        gemm_tile(a, p, stored ? &*stored : nullptr, finish, e);
        return;
      }
      gemm_planes(a, p, stored ? &*stored : nullptr);
      if (finish && !stored)
        for (int64_t m = a.m_begin; m < a.m_end; ++m)
          finish_row_(a.y + m * P + a.b_begin, a.b_end - a.b_begin,
                      RowAddends{e.bias ? e.bias + m : nullptr,
                                 e.residual ? static_cast<const float*>(e.residual) + m * P + a.b_begin : nullptr},
                      activation_);
    };
    parallel_for(ctx, static_cast<size_t>(group_ * tiles_m * tiles_b), task);
  }

  // The folded store's residual and output as the Epilogue has them (floats or levels, NHWC).
  static void set_levels(const Epilogue& e, StoreEpilogue* s) {
    if (e.residual_levels) {
      s->residual_levels = static_cast<const int8_t*>(e.residual);
      s->residual_signed = e.residual_levels->is_signed;
      s->residual_zero = e.residual_levels->quant.zero_point;
      s->residual_scale = e.residual_levels->quant.scale;
    } else {
      s->residual = static_cast<const float*>(e.residual);
    }
    if (e.y_levels) {
      s->out_levels = static_cast<int8_t*>(e.y);
      s->out_quant = e.y_levels->quant;
    }
  }

  // One GEMM tile of an 8-bit or NHWC output or an 8-bit residual, through a float tile in cache (rows of the tile's
  // pixels): the residual loaded into one first, the tile stored (quantized) last. The kernel addresses
  // y (and the store epilogue the residual) at m * y_stride_m + b, so both tiles' bases are offset by
  // the tile's first (m, b).
  void gemm_tile(GemmArgs a, const Planes& p, const StoreEpilogue* stored, bool finish, const Epilogue& e) const {
    thread_local ScratchBuffer<float> tile_buffer, residual_buffer;
    const int64_t rows = a.m_end - a.m_begin, cols = a.b_end - a.b_begin, first = a.m_begin * cols + a.b_begin;
    float* tile = tile_buffer.get(rows * cols);
    float* residual = e.residual ? residual_buffer.get(rows * cols) : nullptr;
    for (int64_t m = 0; residual && m < rows; ++m) e.load_residual(a.m_begin + m, a.b_begin, cols, residual + m * cols);
    a.y = tile - first;
    a.y_stride_b = 1;
    a.y_stride_m = cols;
    StoreEpilogue local;
    if (stored) {
      local = *stored;
      local.residual = residual ? residual - first : nullptr;
    }
    gemm_planes(a, p, stored ? &local : nullptr);
    for (int64_t m = 0; finish && !stored && m < rows; ++m)
      finish_row_(tile + m * cols, cols,
                  RowAddends{e.bias ? e.bias + a.m_begin + m : nullptr, residual ? residual + m * cols : nullptr},
                  activation_);
    e.store_tile(*dispatch_, a.m_begin, rows, a.b_begin, cols, tile);
  }

 private:
  int64_t m_ = 0, cg_ = 0, r_ = 0, s_ = 0, group_ = 1, positions_ = 0;
  bool segmented_ = true;
  bool channel_rows_ = true;  // folded rows may be read in place from the NHWC image
  bool pad_channels_ = false;  // in place, the image pads each pixel's channels to N rounded up to 4
  bool row_segments_ = false;  // in place, a kernel row's offsets are one segment
  bool direct_ = false;  // the direct kernel (include/fgq/depthwise.h) instead of the GEMM
  bool x_nhwc_ = false, y_nhwc_ = false;  // x_layout, y_layout NHWC
  std::shared_ptr<const DepthwiseWeights> direct_weights_;  // from constant weights, built once
  std::optional<Levels> constant_y_levels_, constant_residual_levels_;  // from constant inputs
  // Fewer channels a group than N: groups run along kernel rows, so the image is planar.
  bool planar() const { return !segmented_; }
  std::vector<int64_t> strides_, dilations_, pads_;
  std::vector<Run> runs_;
};

std::array<OrtCustomOp*, 3> ternary_conv_ops() {
  static CustomOp<TernaryConvOp<kF32>> to_float;
  static CustomOp<TernaryConvOp<kU8>> to_uint8;
  static CustomOp<TernaryConvOp<kI8>> to_int8;
  return {&to_float, &to_uint8, &to_int8};
}

}  // namespace ort
}  // namespace fgq
