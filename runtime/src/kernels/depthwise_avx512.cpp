// AVX-512 VNNI direct convolution kernel (include/fgq/depthwise.h; compiled with the
// AVX-512 flags for this file only, reached through the avx512vnni dispatch table). Sixteen
// output pixels of one output row a vector, one per 32-bit lane. A chunk's 64 source bytes
// are loaded once and rearranged (vpermd moves pixels 4L..4L+3's window into 128-bit lane L,
// then vpshufb) so that lane j holds pixel j's four taps as bytes; one vpdpbusd with the
// chunk's four weights as int8 adds their products to lane j in exact int32.
//
// Weights t * code fit int8 when the codes are at most 127 (the converter's default) and
// always with float scales (t alone). Wider weights (codes up to 255) go the other way round:
// the weights' positive and negative parts as unsigned bytes meet the levels shifted to
// signed (u - 128) in two vpdpbusd; their difference is sum w * u - 128 * sum w, exact.
// The float work is one convert and one FMA per accumulator, as in the reference.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fgq/depthwise.h"

namespace fgq {
namespace {

constexpr int64_t kLanes = 16;

// Pixel j's tap e lies at byte stride * j + dilation * e of a chunk's source; 128-bit lane L
// (pixels 4L..4L+3) takes its 16 bytes from dword stride * L (depthwise_supports: they fit in
// the 64 bytes loaded, 12 * stride + 16 <= 64).
struct ChunkShuffle {
  __m512i dwords, taps;
  ChunkShuffle(int64_t stride, int64_t dilation) {
    const int s = static_cast<int>(stride), d = static_cast<int>(dilation);
    alignas(64) int32_t idx[16];
    alignas(16) int8_t b[16];
    for (int lane = 0; lane < 4; ++lane)
      for (int i = 0; i < 4; ++i) idx[4 * lane + i] = s * lane + i;
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 4; ++e) b[4 * j + e] = static_cast<int8_t>(s * j + d * e);
    dwords = _mm512_load_si512(idx);
    taps = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
  }
  // Lane j: the four tap bytes of pixel j, for the chunk whose pixel-0 window starts at src.
  __m512i operator()(const uint8_t* src) const {
    return _mm512_shuffle_epi8(_mm512_permutexvar_epi32(dwords, _mm512_loadu_si512(src)), taps);
  }
};

// One output channel's weights as the vpdpbusd operands: per piece four bytes as an int32
// (narrow: int8 w; wide: unsigned max(w, 0) and max(-w, 0)), and per accumulator the integer
// correction and the float scale.
struct ChannelWeights {
  std::vector<int32_t> narrow, positive, negative, correction;
  std::vector<float> scale;
  bool wide = false;
};

// Per channel (a few pieces: this runs once per channel, so it is vectorized too): 8 pieces
// int16 weights a vector, packed to bytes by vpmovwb.
void load_channel(const DepthwiseArgs& a, int64_t m, ChannelWeights* out) {
  const DepthwiseWeights& w = *a.w;
  const int64_t pieces = static_cast<int64_t>(w.pieces.size()), A = w.accumulators;
  const int16_t* weights = w.piece_weights(m, 0);
  for (auto* v : {&out->narrow, &out->positive, &out->negative}) v->resize(static_cast<size_t>(pieces));
  const __m512i lo = _mm512_set1_epi16(-128), hi = _mm512_set1_epi16(127), zero = _mm512_setzero_si512();
  __mmask32 wide = 0;
  for (int64_t p = 0; p < pieces; p += 8) {
    const int64_t n = std::min<int64_t>(8, pieces - p);
    const __mmask32 mask = static_cast<__mmask32>(n == 8 ? ~0u : (1u << (4 * n)) - 1);
    const __m512i v = _mm512_maskz_loadu_epi16(mask, weights + 4 * p);
    wide |= _mm512_cmpgt_epi16_mask(v, hi) | _mm512_cmplt_epi16_mask(v, lo);
    _mm512_mask_cvtepi16_storeu_epi8(out->narrow.data() + p, mask, v);
    _mm512_mask_cvtepi16_storeu_epi8(out->positive.data() + p, mask, _mm512_max_epi16(v, zero));
    _mm512_mask_cvtepi16_storeu_epi8(out->negative.data() + p, mask, _mm512_max_epi16(_mm512_sub_epi16(zero, v), zero));
  }
  out->wide = wide != 0;
  // Narrow: dot = sum w * u; wide: sum w * (u - 128). Either less the correction is sum w * (u - zero_level).
  const int32_t zero_point = out->wide ? a.zero_level - 128 : a.zero_level;
  out->correction.resize(static_cast<size_t>(A));
  out->scale.resize(static_cast<size_t>(A));
  for (int64_t k = 0; k < A; ++k) {
    out->correction[static_cast<size_t>(k)] = zero_point * w.weight_sums[static_cast<size_t>(m * A + k)];
    out->scale[static_cast<size_t>(k)] = a.x_scale * w.scales[static_cast<size_t>(m * A + k)];
  }
}

// Output rows oh..oh + V - 1 of channel m at columns ow.. (`mask`: the lanes in the row):
// bias, residual, ReLU, store.
template <int V>
void store(const DepthwiseArgs& a, int64_t m, int64_t oh, int64_t ow, __mmask16 mask, const __m512 out[V]) {
  const int64_t P = a.out_h * a.out_w;
  const __m512 zero = _mm512_setzero_ps();
  for (int v = 0; v < V; ++v) {
    const int64_t at = m * P + (oh + v) * a.out_w + ow;
    __m512 y = out[v];
    if (a.bias) y = _mm512_add_ps(y, _mm512_set1_ps(a.bias[m]));
    if (a.residual) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, a.residual + at));
    if (a.relu) y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(y, zero, _CMP_LT_OQ), zero);  // keeps -0.0, as the reference
    _mm512_mask_storeu_ps(a.y + at, mask, y);
  }
}

// V output rows of channel m at columns ow..: each accumulator's exact sums over its pieces,
// then the float chain.
template <bool Wide, int V>
void vectors(const DepthwiseArgs& a, int64_t m, const uint8_t* image, const int64_t* offsets, const ChannelWeights& cw,
             const ChunkShuffle& shuffle, int64_t oh, int64_t ow, __mmask16 mask) {
  const DepthwiseWeights& w = *a.w;
  const int64_t* first_piece = w.first_piece.data();
  const int32_t* narrow = cw.narrow.data();
  const int32_t* positive = cw.positive.data();
  const int32_t* negative = cw.negative.data();
  const uint8_t* corner[V];
  for (int v = 0; v < V; ++v) corner[v] = image + (oh + v) * a.stride_h * a.padded_w + ow * a.stride_w;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 out[V];
  for (int v = 0; v < V; ++v) out[v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < w.accumulators; ++k) {
    __m512i sum[V], neg[V];
    for (int v = 0; v < V; ++v) sum[v] = neg[v] = _mm512_setzero_si512();
    for (int64_t p = first_piece[k]; p < first_piece[k + 1]; ++p) {
      for (int v = 0; v < V; ++v) {
        const __m512i x = shuffle(corner[v] + offsets[p]);
        if (Wide) {
          const __m512i xs = _mm512_xor_si512(x, flip);  // u - 128 as int8
          sum[v] = _mm512_dpbusd_epi32(sum[v], _mm512_set1_epi32(positive[p]), xs);
          neg[v] = _mm512_dpbusd_epi32(neg[v], _mm512_set1_epi32(negative[p]), xs);
        } else {
          sum[v] = _mm512_dpbusd_epi32(sum[v], x, _mm512_set1_epi32(narrow[p]));
        }
      }
    }
    const __m512i correction = _mm512_set1_epi32(cw.correction[static_cast<size_t>(k)]);
    const __m512 scale = _mm512_set1_ps(cw.scale[static_cast<size_t>(k)]);
    for (int v = 0; v < V; ++v) {
      __m512i dot = Wide ? _mm512_sub_epi32(sum[v], neg[v]) : sum[v];
      dot = _mm512_sub_epi32(dot, correction);
      out[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, out[v]);
    }
  }
  store<V>(a, m, oh, ow, mask, out);
}

// The common depthwise filter (one input channel, one accumulator, kernel rows not dilated,
// R rows of CC chunks, piece p = chunk p), narrow weights: output rows oh..oh + kRows - 1 at
// once, each image row's chunk shuffled once and met by every output row it serves (R / SH of
// them; the shuffles, not vpdpbusd, bound vectors()). The same exact sums as vectors().
constexpr int kRows = 4;
using RowsBlock = void (*)(const DepthwiseArgs&, int64_t, const uint8_t*, const ChannelWeights&, const ChunkShuffle&,
                           int64_t, int64_t, __mmask16);

template <int R, int CC, int SH>
void rows_block(const DepthwiseArgs& a, int64_t m, const uint8_t* image, const ChannelWeights& cw,
                const ChunkShuffle& shuffle, int64_t oh, int64_t ow, __mmask16 mask) {
  constexpr int V = kRows;
  __m512i weight[R * CC], acc[V];
  for (int p = 0; p < R * CC; ++p) weight[p] = _mm512_set1_epi32(cw.narrow[static_cast<size_t>(p)]);
  for (int v = 0; v < V; ++v) acc[v] = _mm512_setzero_si512();
  const uint8_t* corner = image + oh * SH * a.padded_w + ow * a.stride_w;
  for (int j = 0; j < CC; ++j)
#pragma GCC unroll 16  // fully: acc[] then stays in registers
    for (int i = 0; i < SH * (V - 1) + R; ++i) {  // image rows from the block's first window row
      const __m512i x = shuffle(corner + i * a.padded_w + 4 * j * a.dilation_w);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const int r = i - SH * v;  // kernel row of output row v that reads image row i
        if (r >= 0 && r < R) acc[v] = _mm512_dpbusd_epi32(acc[v], x, weight[r * CC + j]);
      }
    }
  const __m512i correction = _mm512_set1_epi32(cw.correction[0]);
  const __m512 scale = _mm512_set1_ps(cw.scale[0]), zero = _mm512_setzero_ps();
  __m512 out[V];
  for (int v = 0; v < V; ++v)
    out[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[v], correction)), scale, zero);
  store<V>(a, m, oh, ow, mask, out);
}

// rows_block for this call's filter, or null when it is not one of the common ones.
RowsBlock rows_block_for(const DepthwiseArgs& a) {
  const DepthwiseWeights& w = *a.w;
  const int64_t CC = (w.kernel_w + 3) / 4;
  if (w.channels_per_group != 1 || w.accumulators != 1 || a.dilation_h != 1 ||
      static_cast<int64_t>(w.pieces.size()) != w.kernel_h * CC)
    return nullptr;
  for (size_t p = 0; p < w.pieces.size(); ++p)
    if (w.pieces[p].chunk != static_cast<int64_t>(p)) return nullptr;
  const int64_t shape = w.kernel_h * 100 + CC * 10 + a.stride_h;
  switch (shape) {
    case 311: return rows_block<3, 1, 1>;
    case 312: return rows_block<3, 1, 2>;
    case 521: return rows_block<5, 2, 1>;
    case 522: return rows_block<5, 2, 2>;
    case 721: return rows_block<7, 2, 1>;
    case 722: return rows_block<7, 2, 2>;
    default: return nullptr;
  }
}

template <bool Wide>
void channel(const DepthwiseArgs& a, int64_t m, const int64_t* offsets, const ChannelWeights& cw,
             const ChunkShuffle& shuffle, RowsBlock rows) {
  const DepthwiseWeights& w = *a.w;
  const uint8_t* image = a.image + (m / w.rows_per_group) * w.channels_per_group * a.padded_h * a.padded_w;
  auto mask_at = [&](int64_t ow) {
    return static_cast<__mmask16>((1u << std::min(kLanes, a.out_w - ow)) - 1);
  };
  int64_t oh = 0;
  if (!Wide && rows)
    for (; oh + kRows <= a.out_h; oh += kRows)
      for (int64_t ow = 0; ow < a.out_w; ow += kLanes) rows(a, m, image, cw, shuffle, oh, ow, mask_at(ow));
  for (; oh + 2 <= a.out_h; oh += 2)  // two rows at a time: independent chains, shared weight loads
    for (int64_t ow = 0; ow < a.out_w; ow += kLanes) vectors<Wide, 2>(a, m, image, offsets, cw, shuffle, oh, ow, mask_at(ow));
  if (oh < a.out_h)
    for (int64_t ow = 0; ow < a.out_w; ow += kLanes) vectors<Wide, 1>(a, m, image, offsets, cw, shuffle, oh, ow, mask_at(ow));
}

}  // namespace

void depthwise_avx512(const DepthwiseArgs& a) {
  // Rows of at most 8 pixels fill at most half a vector here, all of one in the AVX2 kernel
  // (measured on Zen 5, 960 channels 5x5 at 7x7: 73 us there against 105 here).
  if (a.out_w <= 8) {
    depthwise_avx2(a);
    return;
  }
  const DepthwiseWeights& w = *a.w;
  const ChunkShuffle shuffle(a.stride_w, a.dilation_w);
  std::vector<int64_t> offsets;  // each piece's source, relative to a pixel's window corner
  for (const DepthwisePiece& piece : w.pieces) {
    const DepthwiseChunk& c = w.chunks[static_cast<size_t>(piece.chunk)];
    offsets.push_back((c.c * a.padded_h + c.r * a.dilation_h) * a.padded_w + c.s0 * a.dilation_w);
  }
  const RowsBlock rows = rows_block_for(a);
  ChannelWeights cw;
  for (int64_t m = a.m_begin; m < a.m_end; ++m) {
    load_channel(a, m, &cw);
    if (cw.wide) channel<true>(a, m, offsets.data(), cw, shuffle, rows);
    else channel<false>(a, m, offsets.data(), cw, shuffle, rows);
  }
}

}  // namespace fgq
