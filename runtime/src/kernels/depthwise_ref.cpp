// The direct (depthwise) convolution: weights regrouped from the repacked planes, and the
// plain C++ reference kernel the SIMD paths are tested against (include/fgq/depthwise.h).
#include <algorithm>
#include <cmath>
#include <map>
#include <utility>

#include "fgq/depthwise.h"

namespace fgq {

namespace {

// Channel (of the group's), kernel row and column of one filter tap.
struct TapPosition {
  int64_t c, r, s;
};

// Where tap `idx` of the reduction (layout order) lies in the filter.
TapPosition tap_of(int64_t idx, bool segmented, int64_t cg, int64_t kernel_h, int64_t kernel_w) {
  if (segmented) return {idx % cg, idx / cg / kernel_w, idx / cg % kernel_w};  // [R, S, cg]
  return {idx / (kernel_h * kernel_w), idx / kernel_w % kernel_h, idx % kernel_w};  // [cg, R, S]
}

// One tap's contribution: plane, group, chunk, byte within the chunk.
struct Tap {
  int64_t plane, group, chunk;
  int e;
  int64_t natural;  // its position in the plane's natural row (group * np + i)
};

}  // namespace

std::string build_depthwise_weights(const KernelWeights& pos, const KernelWeights* neg, const ReductionLayout& layout,
                                    bool segmented, int64_t rows_per_group, int64_t cg, int64_t kernel_h,
                                    int64_t kernel_w, DepthwiseWeights* out) {
  for (int64_t extent : {cg, kernel_h, kernel_w})
    if (extent < 1 || extent > kDepthwiseMaxTaps) return "depthwise: filter too large";
  const int64_t taps = cg * kernel_h * kernel_w;  // no overflow: each factor <= 2^12
  if (taps > kDepthwiseMaxTaps) return "depthwise: filter too large";
  if (layout.segments * layout.length != taps || pos.groups != layout.groups() || rows_per_group < 1)
    return "depthwise: layout does not match the filter";
  if (neg && (neg->rows != pos.rows || neg->groups != pos.groups || neg->np != pos.np))
    return "depthwise: the negative plane does not match the positive one";
  const KernelWeights* planes[2] = {&pos, neg};
  const int64_t plane_count = neg ? 2 : 1;
  DepthwiseWeights& w = *out;
  w = DepthwiseWeights();
  w.channels = pos.rows;
  w.rows_per_group = rows_per_group;
  w.channels_per_group = cg;
  w.kernel_h = kernel_h;
  w.kernel_w = kernel_w;
  const int64_t column_chunks = (kernel_w + 3) / 4;
  for (int64_t c = 0; c < cg; ++c)
    for (int64_t r = 0; r < kernel_h; ++r)
      for (int64_t s0 = 0; s0 < kernel_w; s0 += 4) w.chunks.push_back({c, r, s0});

  // Accumulators: per plane one (folded) or one per group.
  bool folded[2] = {false, false};
  int64_t first_accumulator[2] = {0, 0};
  for (int64_t pl = 0; pl < plane_count; ++pl) {
    folded[pl] = planes[pl]->scale_type == ScaleType::kU8;  // weights t * code
    first_accumulator[pl] = w.accumulators;
    w.accumulators += folded[pl] ? 1 : planes[pl]->groups;
  }
  const std::vector<int64_t> map = kernel_position_map(layout, pos.np, pos.padded_groups);
  std::vector<Tap> tap_list;
  std::map<std::pair<int64_t, int64_t>, int64_t> piece_index;  // (accumulator, chunk) -> piece
  for (int64_t pl = 0; pl < plane_count; ++pl)
    for (int64_t p = 0; p < static_cast<int64_t>(map.size()); ++p) {
      if (map[static_cast<size_t>(p)] < 0) continue;
      const TapPosition t = tap_of(map[static_cast<size_t>(p)], segmented, cg, kernel_h, kernel_w);
      const int64_t chunk = (t.c * kernel_h + t.r) * column_chunks + t.s / 4;
      const int64_t group = p / pos.np;
      tap_list.push_back({pl, group, chunk, static_cast<int>(t.s % 4), p});
      piece_index[{first_accumulator[pl] + (folded[pl] ? 0 : group), chunk}] = 0;
    }
  for (auto& entry : piece_index) {  // the map's order: by accumulator, then chunk
    entry.second = static_cast<int64_t>(w.pieces.size());
    w.pieces.push_back({entry.first.second, entry.first.first});
  }
  w.first_piece.assign(static_cast<size_t>(w.accumulators + 1), 0);  // counts, then running sums
  for (const DepthwisePiece& piece : w.pieces) ++w.first_piece[static_cast<size_t>(piece.accumulator + 1)];
  for (size_t a = 1; a < w.first_piece.size(); ++a) w.first_piece[a] += w.first_piece[a - 1];

  const int64_t M = w.channels, pieces = static_cast<int64_t>(w.pieces.size());
  w.weights.assign(static_cast<size_t>(M * pieces * 4), 0);
  w.weight_sums.assign(static_cast<size_t>(M * w.accumulators), 0);
  w.scales.assign(static_cast<size_t>(M * w.accumulators), 0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (const Tap& tap : tap_list) {
      const KernelWeights& plane = *planes[tap.plane];
      const int64_t group = tap.natural / plane.np, i = tap.natural % plane.np;
      const int t = plane.t_at(m, group, i);
      const int64_t accumulator = first_accumulator[tap.plane] + (folded[tap.plane] ? 0 : group);
      const int value = folded[tap.plane] ? t * static_cast<int>(plane.scale_at(m, group)) : t;
      const int64_t piece = piece_index[{accumulator, tap.chunk}];
      w.weights[static_cast<size_t>((m * pieces + piece) * 4 + tap.e)] = static_cast<int16_t>(value);
      w.weight_sums[static_cast<size_t>(m * w.accumulators + accumulator)] += value;
    }
    for (int64_t pl = 0; pl < plane_count; ++pl) {
      const KernelWeights& plane = *planes[pl];
      const float row_scale = plane.row_scale[static_cast<size_t>(m)];
      const int64_t count = folded[pl] ? 1 : plane.groups;
      for (int64_t g = 0; g < count; ++g)
        w.scales[static_cast<size_t>(m * w.accumulators + first_accumulator[pl] + g)] =
            folded[pl] ? row_scale : row_scale * static_cast<float>(plane.scale_at(m, g));
    }
  }
  return "";
}

bool plain_depthwise_filter(const DepthwiseWeights& w) {
  if (w.channels_per_group != 1 || w.accumulators != 1 ||
      static_cast<int64_t>(w.pieces.size()) != w.kernel_h * ((w.kernel_w + 3) / 4))
    return false;
  for (size_t p = 0; p < w.pieces.size(); ++p)
    if (w.pieces[p].chunk != static_cast<int64_t>(p)) return false;
  return true;
}

void depthwise_ref(const DepthwiseArgs& a) {
  const DepthwiseWeights& w = *a.w;
  const int64_t plane = a.padded_h * a.padded_w, P = a.out_h * a.out_w;
  for (int64_t m = a.m_begin; m < a.m_end; ++m) {
    const uint8_t* image = a.image + (m / w.rows_per_group) * w.channels_per_group * plane;
    for (int64_t oh = 0; oh < a.out_h; ++oh)
      for (int64_t ow = 0; ow < a.out_w; ++ow) {
        float v = 0.f;
        for (int64_t acc = 0; acc < w.accumulators; ++acc) {
          int32_t dot = 0;
          const int64_t end = w.first_piece[static_cast<size_t>(acc + 1)];
          for (int64_t p = w.first_piece[static_cast<size_t>(acc)]; p < end; ++p) {
            const DepthwiseChunk& chunk = w.chunks[static_cast<size_t>(w.pieces[static_cast<size_t>(p)].chunk)];
            for (int e = 0; e < 4 && chunk.s0 + e < w.kernel_w; ++e) {
              const int64_t h = oh * a.stride_h + chunk.r * a.dilation_h;
              const int64_t x = ow * a.stride_w + (chunk.s0 + e) * a.dilation_w;
              dot += w.piece_weights(m, p)[e] * image[chunk.c * plane + h * a.padded_w + x];
            }
          }
          dot -= a.zero_level * w.weight_sums[static_cast<size_t>(m * w.accumulators + acc)];
          v = std::fma(static_cast<float>(dot), a.x_scale * w.scales[static_cast<size_t>(m * w.accumulators + acc)], v);
        }
        const int64_t at = m * P + oh * a.out_w + ow;
        if (a.bias) v = v + a.bias[m];
        if (a.residual) v = v + a.residual[at];
        a.y[at] = clamp_to(v, a.lo, a.hi);
      }
  }
}

}  // namespace fgq
