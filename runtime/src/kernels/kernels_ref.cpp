// The plain C++ reference kernels: the truth every SIMD path is tested against.
#include <cmath>
#include <vector>

#include "fgq/depthwise.h"
#include "fgq/kernels.h"

namespace fgq {
namespace {

// x in kernel order: group g, position i.
inline int x_at(const int8_t* x, int64_t np, int64_t g, int64_t i) {
  return x[(g / 4) * np * 4 + (i / 4) * 16 + (g % 4) * 4 + i % 4];
}

void ref_group_dots(const KernelWeights& w, int64_t m, const int8_t* x, const int32_t*, int32_t* out) {
  for (int64_t g = 0; g < w.padded_groups; ++g) {
    int32_t acc = 0;
    for (int64_t i = 0; i < w.np; ++i) acc += w.t_at(m, g, i) * x_at(x, w.np, g, i);
    out[g] = acc;
  }
}

// Natural unsigned rows (GemmArgs::natural) against the folded planes, which every path has for dense
// weights: the exact int32 sum, then the SIMD folded stores' float arithmetic, rounding for rounding.
void ref_natural_gemm(const GemmArgs& a) {
  const KernelWeights& w = *a.w;
  const int64_t chunks = w.positions() / 4, planes = w.fold_planes;
  const bool indirect = a.row_offsets != nullptr;
  const int64_t segments = indirect ? a.segments : 1, segment_len = indirect ? a.segment_len : w.positions();
  const int64_t read = indirect ? a.segment_read : w.positions();
  for (int64_t b = a.b_begin; b < a.b_end; ++b)
    for (int64_t m = a.m_begin; m < a.m_end; ++m) {
      const int8_t* row = w.folded.data() + (m / 16) * chunks * planes * 64 + (m % 16) * 4;
      int64_t sum = -w.fold_bias[static_cast<size_t>(m)];
      for (int64_t k = 0; k < segments; ++k) {
        const int64_t start = indirect ? a.row_offsets[b] + a.segment_offsets[k] : b * a.x_stride;
        const uint8_t* x = reinterpret_cast<const uint8_t*>(a.x + start);
        for (int64_t i = 0; i < read; ++i) {
          const int64_t p = k * segment_len + i, at = (p / 4) * planes * 64 + p % 4;
          sum += (row[at] + (planes == 2 ? 128 * row[at + 64] : 0)) * x[i];
        }
      }
      const size_t mi = static_cast<size_t>(m);
      const float v = a.scale * std::fma(w.row_scale[mi], static_cast<float>(static_cast<int32_t>(sum)), a.offset * w.row_offset[mi]);
      float& y = a.y[b * a.y_stride_b + m * a.y_stride_m];
      y = a.accumulate ? y + v : v;
    }
}

void ref_gemm(const GemmArgs& a) {
  if (a.natural) {
    ref_natural_gemm(a);
    return;
  }
  const KernelWeights& w = *a.w;
  std::vector<int32_t> dots(static_cast<size_t>(w.padded_groups));
  for (int64_t b = a.b_begin; b < a.b_end; ++b) {
    const int8_t* x = a.x + b * a.x_stride;
    for (int64_t m = a.m_begin; m < a.m_end; ++m) {
      ref_group_dots(w, m, x, nullptr, dots.data());
      double acc = 0;
      for (int64_t g = 0; g < w.padded_groups; ++g) acc += w.scale_at(m, g) * dots[static_cast<size_t>(g)];
      const double value = static_cast<double>(a.scale) *
                           (static_cast<double>(w.row_scale[static_cast<size_t>(m)]) * acc +
                            static_cast<double>(a.offset) * w.row_offset[static_cast<size_t>(m)]);
      float& y = a.y[b * a.y_stride_b + m * a.y_stride_m];
      y = a.accumulate ? y + static_cast<float>(value) : static_cast<float>(value);
    }
  }
}

}  // namespace

const KernelDispatch kRefDispatch = {"ref", ref_group_dots, ref_gemm, quantize_span, to_kernel_order,
                                     quantize_transposed, kNoFoldedForm, depthwise_ref, false};

}  // namespace fgq
