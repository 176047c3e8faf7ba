// TernaryConv: 2-D NCHW convolution with ternary weights (groups, depthwise,
// strides, pads, dilations, bias, optional fused ReLU). The activation is
// quantized once per call into an NHWC int8 image, then gathered into
// kernel rows (im2col) one image at a time.
#include <algorithm>
#include <cstring>

#include "ops.h"

namespace fgq {
namespace ort {

namespace {
// A run of kernel positions [dst, dst + len) holding channels [c0, c0 + len)
// of the input pixel at kernel offset (r, s).
struct Run {
  int64_t dst, r, s, c0, len;
};
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
    const int64_t one = 1, zero = 0;
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
    relu_ = attr_int(info, "relu", &zero);
    if (relu_ != 0 && relu_ != 1) fail("relu must be 0 or 1");
    size_t len = 0;
    OrtStatus* st = g_api->KernelInfoGetAttribute_string(info, "auto_pad", nullptr, &len);
    if (!st) {
      std::string v(len, '\0');
      check(g_api->KernelInfoGetAttribute_string(info, "auto_pad", &v[0], &len));
      v.resize(len ? len - 1 : 0);
      if (v != "NOTSET") fail("auto_pad is not supported: give explicit pads");
    } else {
      g_api->ReleaseStatus(st);
    }
    const int64_t rs = checked_mul(r_, s_, "kernel");
    segmented_ = cg_ >= n_;
    const ReductionLayout layout =
        segmented_ ? ReductionLayout{rs, cg_, n_} : ReductionLayout{1, checked_mul(cg_, rs, "filter"), n_};
    init_weights(info, layout, m_);
    // The gather plan depends only on the layout.
    const int64_t np = kernel_group_positions(n_);
    const int64_t gp = kernel_padded_groups(layout.groups());
    positions_ = gp * np;
    const std::vector<int64_t> map = kernel_position_map(layout, np, gp);
    for (int64_t p = 0; p < positions_; ++p) {
      const int64_t idx = map[static_cast<size_t>(p)];
      if (idx < 0) continue;
      int64_t r, s, c;
      if (segmented_) {
        r = idx / cg_ / s_;
        s = idx / cg_ % s_;
        c = idx % cg_;
      } else {
        c = idx / rs;
        r = idx / s_ % r_;
        s = idx % s_;
      }
      if (!runs_.empty()) {
        Run& last = runs_.back();
        if (last.r == r && last.s == s && last.dst + last.len == p && last.c0 + last.len == c) {
          ++last.len;
          continue;
        }
      }
      runs_.push_back(Run{p, r, s, c, 1});
    }
  }

  void Compute(OrtKernelContext* ctx) const {
    const Tensor x = input(ctx, kX);
    if (x.shape.size() != 4) fail("X must be 4-D NCHW, got " + shape_string(x.shape));
    const int64_t nb = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
    if (C != checked_mul(cg_, group_, "channels"))
      fail("X has " + std::to_string(C) + " channels, weight_shape and group need " + std::to_string(cg_ * group_));
    const ActQuant q = act_quant(ctx, x);
    Planes scratch;
    const Planes& p = planes(ctx, scratch);
    if (p.pos.positions() != positions_) fail("internal: layout mismatch");
    const float* b = bias(ctx, m_);
    const int64_t span_h = checked_add(checked_mul(dilations_[0], r_ - 1, "kernel"), 1, "kernel");
    const int64_t span_w = checked_add(checked_mul(dilations_[1], s_ - 1, "kernel"), 1, "kernel");
    const int64_t eff_h = checked_add(H, pads_[0] + pads_[2], "height") - span_h;
    const int64_t eff_w = checked_add(W, pads_[1] + pads_[3], "width") - span_w;
    if (eff_h < 0 || eff_w < 0) fail("the kernel does not fit the padded input: output would be empty");
    const int64_t OH = eff_h / strides_[0] + 1, OW = eff_w / strides_[1] + 1;
    const int64_t P = checked_mul(OH, OW, "output");
    float* y = output(ctx, 0, {nb, m_, OH, OW});
    if (nb == 0 || P == 0) return;

    const int64_t Kp = positions_;
    const int64_t HW = checked_mul(H, W, "input");
    AlignedBuffer<int8_t> image(checked_mul(HW, C, "input"), false);  // every byte written below
    AlignedBuffer<int8_t> planes_q(checked_mul(HW, C, "input"), false);
    AlignedBuffer<int8_t> cols(checked_mul(checked_mul(group_, P, "im2col"), Kp, "im2col"), false);
    const int64_t Gp = p.pos.padded_groups;
    AlignedBuffer<int32_t> gsum(checked_mul(checked_mul(group_, P, "im2col"), Gp, "im2col"), false);
    const int64_t x_image = checked_mul(C, HW, "input");
    const int8_t zero_level = q.zero_level();
    const int64_t mg = m_ / group_;

    for (int64_t n = 0; n < nb; ++n) {
      // 1. quantize the image once: each channel plane contiguously
      // (vectorizes), then a byte transpose NCHW -> NHWC.
      constexpr int64_t kChannelsPerTask = 8;
      auto quantize = [&](size_t t) {
        const int64_t c0 = static_cast<int64_t>(t) * kChannelsPerTask, c1 = std::min(C, c0 + kChannelsPerTask);
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t src = n * x_image + c * HW;
          int8_t* out = planes_q.get() + c * HW;
          if (x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
            dispatch_->quantize(x.as<float>() + src, HW, q, out);
          } else if (x.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
            const uint8_t* s = x.as<uint8_t>() + src;
            for (int64_t i = 0; i < HW; ++i) out[i] = requantize_one(s[i], q);
          } else {
            const int8_t* s = x.as<int8_t>() + src;
            for (int64_t i = 0; i < HW; ++i) out[i] = requantize_one(s[i], q);
          }
        }
      };
      parallel_for(ctx, static_cast<size_t>((C + kChannelsPerTask - 1) / kChannelsPerTask), quantize);
      auto transpose = [&](size_t t) {
        const int64_t h = static_cast<int64_t>(t);
        int8_t* dst = image.get() + h * W * C;
        for (int64_t c = 0; c < C; ++c) {
          const int8_t* src = planes_q.get() + c * HW + h * W;
          for (int64_t w = 0; w < W; ++w) dst[w * C + c] = src[w];
        }
      };
      parallel_for(ctx, static_cast<size_t>(H), transpose);

      // 2. im2col, all groups.
      constexpr int64_t kPixelsPerTask = 64;
      const int64_t pixel_tasks = (P + kPixelsPerTask - 1) / kPixelsPerTask;
      auto gather = [&](size_t t) {
        const int64_t g = static_cast<int64_t>(t) / pixel_tasks;
        const int64_t p0 = static_cast<int64_t>(t) % pixel_tasks * kPixelsPerTask, p1 = std::min(P, p0 + kPixelsPerTask);
        std::vector<int8_t> natural(static_cast<size_t>(Kp), 0);  // group padding stays 0
        for (int64_t pix = p0; pix < p1; ++pix) {
          const int64_t oh = pix / OW, ow = pix % OW;
          const int64_t ih0 = oh * strides_[0] - pads_[0], iw0 = ow * strides_[1] - pads_[1];
          int8_t* dst = natural.data();
          for (const Run& run : runs_) {
            const int64_t ih = ih0 + run.r * dilations_[0], iw = iw0 + run.s * dilations_[1];
            if (ih < 0 || ih >= H || iw < 0 || iw >= W)
              std::memset(dst + run.dst, zero_level, static_cast<size_t>(run.len));
            else
              std::memcpy(dst + run.dst, image.get() + (ih * W + iw) * C + g * cg_ + run.c0, static_cast<size_t>(run.len));
          }
          dispatch_->kernel_order(dst, p.pos.np, Gp, cols.get() + (g * P + pix) * Kp, gsum.get() + (g * P + pix) * Gp);
        }
      };
      parallel_for(ctx, static_cast<size_t>(group_ * pixel_tasks), gather);

      // 3. the ternary GEMM per group, bias and ReLU per tile.
      const int64_t mb = 64, bb = P <= 8 ? P : 64;
      const int64_t tiles_m = (mg + mb - 1) / mb, tiles_b = (P + bb - 1) / bb;
      float* y_image = y + n * m_ * P;
      auto gemm = [&](size_t t) {
        const int64_t i = static_cast<int64_t>(t);
        const int64_t g = i / (tiles_m * tiles_b), tm = i % tiles_m, tb = i / tiles_m % tiles_b;
        GemmArgs a;
        a.x = cols.get() + g * P * Kp;
        a.x_stride = Kp;
        a.gsum = gsum.get() + g * P * Gp;
        a.s_stride = Gp;
        a.y = y_image;
        a.y_stride_b = 1;
        a.y_stride_m = P;
        a.m_begin = g * mg + tm * mb;
        a.m_end = std::min(g * mg + mg, a.m_begin + mb);
        a.b_begin = tb * bb;
        a.b_end = std::min(P, a.b_begin + bb);
        a.scale = q.scale;
        a.offset = static_cast<float>(q.offset());
        a.w = &p.pos;
        dispatch_->gemm(a);
        if (p.asymmetric) {
          a.w = &p.neg;
          a.accumulate = true;
          dispatch_->gemm(a);
        }
        if (b || relu_)
          for (int64_t m = a.m_begin; m < a.m_end; ++m) {
            float* row = y_image + m * P;
            const float bias_m = b ? b[m] : 0.f;
            for (int64_t pix = a.b_begin; pix < a.b_end; ++pix) {
              const float v = row[pix] + bias_m;
              row[pix] = relu_ && v < 0.f ? 0.f : v;
            }
          }
      };
      parallel_for(ctx, static_cast<size_t>(group_ * tiles_m * tiles_b), gemm);
    }
  }

 private:
  int64_t m_ = 0, cg_ = 0, r_ = 0, s_ = 0, group_ = 1, relu_ = 0, positions_ = 0;
  bool segmented_ = true;
  std::vector<int64_t> strides_, dilations_, pads_;
  std::vector<Run> runs_;
};

OrtCustomOp* ternary_conv_op() {
  static CustomOp<TernaryConvOp> op;
  return &op;
}

}  // namespace ort
}  // namespace fgq
