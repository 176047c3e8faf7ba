// C++ tests of the direct (depthwise) convolution kernel: on seeded random layers
// (depthwise, channel multiplier 2, grouped, every reduction layout the packed format
// allows, f32/f16/uint8 scales, asymmetric weights, strides, dilations, widths straddling
// the vector width), every path this CPU runs matches the reference bit for bit, and
// the reference matches a brute-force double convolution over the packed codes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fgq/depthwise.h"
#include "fgq/kernels.h"
#include "expect.h"

namespace {

struct Case {
  int64_t channels_per_group, rows_per_group, groups, kernel_h, kernel_w, n;
  int64_t stride_h, stride_w, dilation_h, dilation_w, out_h, out_w;
  fgq::ScaleType scale_type;
  int max_code;  // uint8 scale codes in [1, max_code]
  bool asymmetric, bias, residual;
  int clamp;  // 0 none, 1 ReLU, 2 Clip to [-1.5, 2]
};

// One random ternary layer in the packed format, its planes and the integer image.
struct Layer {
  Case c;
  fgq::ReductionLayout layout;
  bool segmented;
  int64_t M, G, row_bytes;
  std::vector<int> t;                     // [M, G * N] ternary values (0 in group padding)
  std::vector<double> pos_scale, neg_scale;  // [M, G] effective scales
  std::vector<uint8_t> codes;
  std::vector<uint8_t> scale_bytes[2];
  std::vector<float> row_scale[2];
  fgq::KernelWeights pos, neg;
};

std::string make_layer(const Case& c, std::mt19937& rng, Layer* out) {
  Layer& L = *out;
  L.c = c;
  const int64_t taps = c.channels_per_group * c.kernel_h * c.kernel_w;
  L.segmented = c.channels_per_group >= c.n;
  L.layout = L.segmented ? fgq::ReductionLayout{c.kernel_h * c.kernel_w, c.channels_per_group, c.n}
                         : fgq::ReductionLayout{1, taps, c.n};
  L.M = c.rows_per_group * c.groups;
  L.G = L.layout.groups();
  L.row_bytes = (L.G * c.n + 3) / 4;
  L.t.assign(static_cast<size_t>(L.M * L.G * c.n), 0);
  L.codes.assign(static_cast<size_t>(L.M * L.row_bytes), 0);
  std::uniform_int_distribution<int> tern(-1, 1), code(1, std::max(1, c.max_code));
  std::uniform_real_distribution<float> unit(0.25f, 2.f);
  const int64_t gps = L.layout.groups_per_segment();
  for (int64_t m = 0; m < L.M; ++m)
    for (int64_t g = 0; g < L.G; ++g)
      for (int64_t i = 0; i < c.n; ++i) {
        if ((g % gps) * c.n + i >= L.layout.length) continue;  // group padding
        const int v = tern(rng);
        const int64_t q = g * c.n + i;
        L.t[static_cast<size_t>(m * L.G * c.n + q)] = v;
        L.codes[static_cast<size_t>(m * L.row_bytes + q / 4)] |= static_cast<uint8_t>((v & 3) << (2 * (q % 4)));
      }
  for (int plane = 0; plane < (c.asymmetric ? 2 : 1); ++plane) {
    std::vector<double>& effective = plane ? L.neg_scale : L.pos_scale;
    effective.assign(static_cast<size_t>(L.M * L.G), 0);
    L.row_scale[plane].assign(static_cast<size_t>(L.M), 0.f);
    L.scale_bytes[plane].assign(static_cast<size_t>(L.M * L.G) * fgq::scale_size(c.scale_type), 0);
    for (int64_t m = 0; m < L.M; ++m) {
      const float rs = unit(rng) * 0.01f;
      L.row_scale[plane][static_cast<size_t>(m)] = rs;
      for (int64_t g = 0; g < L.G; ++g) {
        const size_t at = static_cast<size_t>(m * L.G + g);
        if (c.scale_type == fgq::ScaleType::kU8) {
          const int s = code(rng);
          L.scale_bytes[plane][at] = static_cast<uint8_t>(s);
          effective[at] = static_cast<double>(rs) * s;
        } else if (c.scale_type == fgq::ScaleType::kF16) {
          const uint16_t h = static_cast<uint16_t>(0x3000 + (rng() % 0x1000));  // 0.125 .. 0.5
          std::memcpy(&L.scale_bytes[plane][at * 2], &h, 2);
          effective[at] = static_cast<double>(rs) * fgq::half_to_float(h);
        } else {
          const float s = unit(rng);
          std::memcpy(&L.scale_bytes[plane][at * 4], &s, 4);
          effective[at] = static_cast<double>(rs) * s;
        }
      }
    }
  }
  const fgq::Plane first = c.asymmetric ? fgq::Plane::kPositive : fgq::Plane::kAll;
  std::string error = fgq::repack_weights(L.codes.data(), L.M, L.row_bytes, L.scale_bytes[0].data(), c.scale_type,
                                          L.row_scale[0].data(), L.layout, first, &L.pos);
  if (error.empty() && c.asymmetric)
    error = fgq::repack_weights(L.codes.data(), L.M, L.row_bytes, L.scale_bytes[1].data(), c.scale_type,
                                L.row_scale[1].data(), L.layout, fgq::Plane::kNegative, &L.neg);
  return error;
}

// Brute force: y[m, oh, ow] in double from the packed values, before bias/residual/clamp.
double brute(const Layer& L, const fgq::DepthwiseArgs& a, int64_t m, int64_t oh, int64_t ow, double* magnitude) {
  const Case& c = L.c;
  const int64_t gps = L.layout.groups_per_segment();
  double sum = 0;
  *magnitude = 0;
  for (int64_t seg = 0; seg < L.layout.segments; ++seg)
    for (int64_t l = 0; l < L.layout.length; ++l) {
      const int64_t g = seg * gps + l / c.n, i = l % c.n;
      const int t = L.t[static_cast<size_t>(m * L.G * c.n + g * c.n + i)];
      if (t == 0) continue;
      const int64_t idx = seg * L.layout.length + l;  // filter tap in the layout's order
      const int64_t cg = c.channels_per_group, rs = c.kernel_h * c.kernel_w;
      const int64_t ch = L.segmented ? idx % cg : idx / rs;
      const int64_t r = L.segmented ? idx / cg / c.kernel_w : idx / c.kernel_w % c.kernel_h;
      const int64_t s = L.segmented ? idx / cg % c.kernel_w : idx % c.kernel_w;
      const int64_t cin = (m / c.rows_per_group) * cg + ch;
      const int64_t h = oh * c.stride_h + r * c.dilation_h, x = ow * c.stride_w + s * c.dilation_w;
      const int u = a.image[(cin * a.padded_h + h) * a.padded_w + x];
      const std::vector<double>& scales = (c.asymmetric && t < 0) ? L.neg_scale : L.pos_scale;
      const double term = t * scales[static_cast<size_t>(m * L.G + g)] * (u - a.zero_level) * a.x_scale;
      sum += term;
      *magnitude += std::fabs(term);
    }
  return sum;
}

void run_case(const Case& c, std::mt19937& rng, const std::vector<const fgq::KernelDispatch*>& paths) {
  Layer L;
  const std::string error = make_layer(c, rng, &L);
  EXPECT(error.empty(), "repack: %s", error.c_str());
  if (!error.empty()) return;
  fgq::DepthwiseWeights w;
  const std::string built =
      fgq::build_depthwise_weights(L.pos, c.asymmetric ? &L.neg : nullptr, L.layout, L.segmented, c.rows_per_group,
                                   c.channels_per_group, c.kernel_h, c.kernel_w, &w);
  EXPECT(built.empty(), "build: %s", built.c_str());
  if (!built.empty()) return;
  const int64_t C = c.channels_per_group * c.groups;
  const int64_t padded_h = (c.out_h - 1) * c.stride_h + (c.kernel_h - 1) * c.dilation_h + 1 + (rng() % 2);
  const int64_t padded_w = (c.out_w - 1) * c.stride_w + (c.kernel_w - 1) * c.dilation_w + 1 + (rng() % 3);
  std::vector<uint8_t> image(static_cast<size_t>(C * padded_h * padded_w + fgq::kDepthwiseSlack));
  for (auto& v : image) v = static_cast<uint8_t>(rng() % 256);
  const int64_t P = c.out_h * c.out_w;
  std::vector<float> bias(static_cast<size_t>(L.M)), residual(static_cast<size_t>(L.M * P));
  for (auto& v : bias) v = static_cast<float>(static_cast<int>(rng() % 200) - 100) * 0.01f;
  for (auto& v : residual) v = static_cast<float>(static_cast<int>(rng() % 200) - 100) * 0.01f;
  fgq::DepthwiseArgs a;
  a.w = &w;
  a.image = image.data();
  a.padded_h = padded_h;
  a.padded_w = padded_w;
  a.zero_level = static_cast<int32_t>(rng() % 256);
  a.out_h = c.out_h;
  a.out_w = c.out_w;
  a.stride_h = c.stride_h;
  a.stride_w = c.stride_w;
  a.dilation_h = c.dilation_h;
  a.dilation_w = c.dilation_w;
  a.x_scale = 0.05f;
  a.bias = c.bias ? bias.data() : nullptr;
  a.residual = c.residual ? residual.data() : nullptr;
  if (c.clamp) a.lo = c.clamp == 1 ? 0.f : -1.5f;
  if (c.clamp == 2) a.hi = 2.f;
  a.m_begin = 0;
  a.m_end = L.M;
  std::vector<float> want(static_cast<size_t>(L.M * P), NAN);
  a.y = want.data();
  fgq::depthwise_ref(a);
  char what[160];
  std::snprintf(what, sizeof what, "cg=%d rows=%d groups=%d k=%dx%d N=%d stride=%d dil=%d out=%dx%d st=%d asym=%d",
                int(c.channels_per_group), int(c.rows_per_group), int(c.groups), int(c.kernel_h), int(c.kernel_w),
                int(c.n), int(c.stride_w), int(c.dilation_w), int(c.out_h), int(c.out_w), int(c.scale_type),
                int(c.asymmetric));
  int bad = 0;
  for (int64_t m = 0; m < L.M && bad < 3; ++m)
    for (int64_t pix = 0; pix < P && bad < 3; ++pix) {
      double magnitude;
      double v = brute(L, a, m, pix / c.out_w, pix % c.out_w, &magnitude);
      if (c.bias) v += bias[static_cast<size_t>(m)];
      if (c.residual) v += residual[static_cast<size_t>(m * P + pix)];
      v = std::min(std::max(v, static_cast<double>(a.lo)), static_cast<double>(a.hi));
      const double got = want[static_cast<size_t>(m * P + pix)];
      if (std::fabs(got - v) > 1e-5 * (magnitude + 2.0)) {
        ++bad;
        EXPECT(false, "ref vs brute force %s: m=%d pixel=%d got %.7g want %.7g", what, int(m), int(pix), got, v);
      }
    }
  for (const fgq::KernelDispatch* d : paths) {
    std::vector<float> got(static_cast<size_t>(L.M * P), NAN);
    a.y = got.data();
    // Two calls over a split channel range: m_begin/m_end are honoured.
    fgq::DepthwiseArgs first = a, second = a;
    first.m_end = L.M / 2;
    second.m_begin = L.M / 2;
    d->depthwise(first);
    d->depthwise(second);
    EXPECT(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0, "%s != ref: %s", d->name, what);
  }
}

}  // namespace

int main() {
  std::vector<const fgq::KernelDispatch*> paths;
  for (const char* name : {"ref", "avx2", "avxvnni", "avx512vnni"}) {
    if (const fgq::KernelDispatch* d = fgq::find_dispatch(name)) paths.push_back(d);
    else std::printf("skipped %s: this CPU (or build) does not support it\n", name);
  }
  std::mt19937 rng(12);
  using fgq::ScaleType;
  int cases = 0;
  // Depthwise shapes: channels, kernels, strides, dilations, widths around the vector width.
  for (int64_t channels : {1, 3, 15, 17, 33})
    for (int64_t k : {3, 5})
      for (int64_t stride : {1, 2})
        for (int64_t n : {1, 4, 9, 16}) {
          const int64_t out_w = std::vector<int64_t>{7, 8, 9, 16, 17, 31, 33, 63, 65}[rng() % 9];
          const ScaleType st = std::vector<ScaleType>{ScaleType::kU8, ScaleType::kF32, ScaleType::kF16}[rng() % 3];
          const int64_t dilation_h = 1 + rng() % 2, out_h = 1 + rng() % 5;  // stride: both axes
          const int max_code = rng() % 2 ? 127 : 255;
          const bool asymmetric = rng() % 4 == 0, bias = rng() % 2, residual = rng() % 2;
          const int clamp = static_cast<int>(rng() % 3);
          const Case c{1, 1, channels, k, k, n, stride, stride, dilation_h,
                       1, out_h, out_w, st, max_code, asymmetric, bias, residual, clamp};
          run_case(c, rng, paths);
          ++cases;
        }
  // Dilated columns, non-square kernels, multiplier 2, grouped (both layouts), every width 1..40.
  const std::vector<Case> extra = {
      {1, 1, 4, 3, 3, 4, 1, 1, 2, 2, 5, 20, ScaleType::kU8, 127, false, true, false, true},
      {1, 1, 4, 3, 3, 4, 2, 2, 1, 2, 5, 20, ScaleType::kU8, 255, true, true, true, true},
      {1, 1, 5, 1, 7, 3, 1, 1, 1, 1, 3, 33, ScaleType::kF32, 0, false, false, false, false},
      {1, 1, 5, 7, 1, 3, 1, 1, 1, 1, 3, 33, ScaleType::kU8, 127, false, false, false, false},
      {1, 2, 6, 3, 3, 4, 1, 1, 1, 1, 6, 18, ScaleType::kU8, 127, false, true, false, true},
      {2, 2, 4, 3, 3, 4, 1, 1, 1, 1, 6, 18, ScaleType::kU8, 127, false, true, true, false},
      {3, 1, 3, 3, 3, 2, 2, 2, 1, 1, 6, 18, ScaleType::kF16, 0, true, false, false, true},
      {8, 3, 2, 3, 3, 4, 1, 1, 1, 1, 4, 12, ScaleType::kU8, 127, false, true, false, false},
      {8, 1, 2, 3, 3, 8, 1, 1, 1, 1, 4, 12, ScaleType::kF32, 0, true, true, false, false},
      {2, 1, 8, 5, 5, 64, 1, 1, 1, 1, 4, 12, ScaleType::kU8, 255, false, false, false, false},
  };
  for (const Case& c : extra) {
    run_case(c, rng, paths);
    ++cases;
  }
  // Every column stride and dilation the kernel takes, widths straddling 16 lanes, both weight
  // widths (codes up to 127 fit int8, up to 255 do not).
  for (int64_t stride = 1; stride <= 4; ++stride)
    for (int64_t dilation = 1; fgq::depthwise_supports(stride, dilation); ++dilation)
      for (int64_t out_w : {15, 16, 17, 33}) {
        const int max_code = out_w % 2 ? 255 : 127;
        const Case c{1, 1, 3, 3, 5, 4, 1 + out_w % 2, stride, 1, dilation, 3, out_w, ScaleType::kU8, max_code,
                     false, true, false, true};
        run_case(c, rng, paths);
        ++cases;
      }
  // The common depthwise filters (one accumulator: codes up to 127, symmetric), several blocks of
  // output rows and a tail; asymmetric and wide-weight channels of the same shapes take the general loop.
  for (int64_t k : {3, 5, 7})
    for (int64_t stride : {1, 2})
      for (int64_t out_h : {4, 9, 11}) {
        const int max_code = out_h == 11 ? 255 : 127;
        const bool asymmetric = out_h == 9 && k == 5;
        const Case c{1, 1, 5, k, k, 4, stride, stride, 1, 1, out_h, 17 + 16 * (k / 5), ScaleType::kU8, max_code,
                     asymmetric, k != 5, stride == 2, k != 7};
        run_case(c, rng, paths);
        ++cases;
      }
  for (int64_t out_w = 1; out_w <= 40; ++out_w) {
    const Case c{1, 1, 2, 3, 3, 4, 1, 1 + out_w % 2, 1, 1, 2, out_w, ScaleType::kU8, 127, false, true, true, true};
    run_case(c, rng, paths);
    ++cases;
  }
  // Malformed requests are refused with a message.
  Layer L;
  const Case c{1, 1, 2, 3, 3, 4, 1, 1, 1, 1, 2, 2, ScaleType::kU8, 127, false, false, false, false};
  EXPECT(make_layer(c, rng, &L).empty(), "repack");
  fgq::DepthwiseWeights w;
  EXPECT(!fgq::build_depthwise_weights(L.pos, nullptr, L.layout, false, 1, 1, 3, 4, &w).empty(), "wrong kernel");
  fgq::KernelWeights fewer_rows = L.pos;
  fewer_rows.rows -= 1;
  EXPECT(!fgq::build_depthwise_weights(L.pos, &fewer_rows, L.layout, false, 1, 1, 3, 3, &w).empty(), "mismatched planes");
  EXPECT(!fgq::build_depthwise_weights(L.pos, nullptr, L.layout, false, 1, 1 << 20, 1 << 20, 1 << 20, &w).empty(),
         "huge filter accepted");
  // Which filters the SIMD paths run several output rows at once.
  auto plain = [&](const Case& k) {
    Layer layer;
    fgq::DepthwiseWeights built;
    EXPECT(make_layer(k, rng, &layer).empty(), "repack");
    EXPECT(fgq::build_depthwise_weights(layer.pos, k.asymmetric ? &layer.neg : nullptr, layer.layout, layer.segmented,
                                        k.rows_per_group, k.channels_per_group, k.kernel_h, k.kernel_w, &built)
               .empty(),
           "build");
    return fgq::plain_depthwise_filter(built);
  };
  Case dw{1, 1, 4, 5, 5, 4, 1, 1, 1, 1, 2, 2, ScaleType::kU8, 127, false, false, false, false};
  EXPECT(plain(dw), "a 5x5 depthwise filter with uint8 scales is plain");
  dw.asymmetric = true;
  EXPECT(!plain(dw), "asymmetric: two accumulators");
  dw.asymmetric = false;
  dw.scale_type = ScaleType::kF32;
  EXPECT(!plain(dw), "float scales, N = 4: one accumulator a group");
  dw.scale_type = ScaleType::kU8;
  dw.channels_per_group = 2;
  EXPECT(!plain(dw), "two channels a group");
  EXPECT(!fgq::depthwise_supports(5, 1) && !fgq::depthwise_supports(3, 3) && fgq::depthwise_supports(2, 3), "supports");
  std::printf("%d depthwise cases on %zu paths\n", cases, paths.size());
  if (g_failures) {
    std::printf("%d failures\n", g_failures);
    return 1;
  }
  std::printf("all passed\n");
  return 0;
}
