// AVX2 direct convolution kernel (include/fgq/depthwise.h; compiled with -mavx2 -mfma for
// this file only, reached through the dispatch table). Eight output pixels of one output
// row a vector, one per 32-bit lane. A chunk's 32 source bytes are loaded once and
// rearranged (vpermd across the two 128-bit lanes, then vpshufb within each) so that lane j
// holds pixel j's four taps; vpmaddubsw + vpmaddwd then add weight x level for the four taps
// to lane j in exact int32. The float work is one convert and one FMA per accumulator.
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "fgq/depthwise.h"

namespace fgq {
namespace {

constexpr int64_t kLanes = 8;

// Pixel j's tap e lies at byte stride * j + dilation * e of a chunk's source; 128-bit lane L
// (pixels 4L..4L+3) takes its 16 bytes from dword stride * L (depthwise_supports: they fit).
struct ChunkShuffle {
  __m256i dwords, bytes;
  ChunkShuffle(int64_t stride, int64_t dilation) {
    const int s = static_cast<int>(stride), d = static_cast<int>(dilation);
    dwords = _mm256_setr_epi32(0, 1, 2, 3, s, s + 1, s + 2, s + 3);
    alignas(16) int8_t b[16];
    for (int p = 0; p < 4; ++p)
      for (int e = 0; e < 4; ++e) b[4 * p + e] = static_cast<int8_t>(s * p + d * e);
    bytes = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
  }
  __m256i operator()(const uint8_t* src) const {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    return _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(raw, dwords), bytes);
  }
};

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Exact sum over the four taps of each lane: one weight plane, or w = 2 * hi + lo in two
// (each pair of u8 x s8 products then stays inside vpmaddubsw's int16).
template <int Planes>
inline __m256i chunk_dot(__m256i x, const int8_t* w) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (Planes == 1) return _mm256_madd_epi16(_mm256_maddubs_epi16(x, broadcast4(w)), ones);
  const __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(x, broadcast4(w)), _mm256_set1_epi16(2));
  return _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_maddubs_epi16(x, broadcast4(w + 4)), ones));
}

// Output channel m, all rows: `offsets[p]`: piece p's source relative to the pixel's window corner.
template <int Planes>
void channel(const DepthwiseArgs& a, int64_t m, const ChunkShuffle& shuffle, const std::vector<int64_t>& offsets) {
  const DepthwiseWeights& w = *a.w;
  const int64_t P = a.out_h * a.out_w, A = w.accumulators;
  const uint8_t* image = a.image + (m / w.rows_per_group) * w.channels_per_group * a.padded_h * a.padded_w;
  const int8_t* weights = w.piece_weights(m, 0);
  const int32_t* sums = w.weight_sums.data() + m * A;
  const float* scales = w.scales.data() + m * A;
  const __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t oh = 0; oh < a.out_h; ++oh) {
    const uint8_t* row = image + oh * a.stride_h * a.padded_w;
    const int64_t at = m * P + oh * a.out_w;
    for (int64_t ow = 0; ow < a.out_w; ow += kLanes) {
      const uint8_t* corner = row + ow * a.stride_w;
      __m256 v = zero;
      for (int64_t acc = 0; acc < A; ++acc) {
        __m256i dot = _mm256_setzero_si256();
        for (int64_t p = w.first_piece[static_cast<size_t>(acc)]; p < w.first_piece[static_cast<size_t>(acc + 1)]; ++p)
          dot = _mm256_add_epi32(dot, chunk_dot<Planes>(shuffle(corner + offsets[static_cast<size_t>(p)]),
                                                        weights + p * Planes * 4));
        dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(a.zero_level * sums[acc]));
        v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(a.x_scale * scales[acc]), v);
      }
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(a.out_w - ow)), lane_index);
      if (a.bias) v = _mm256_add_ps(v, _mm256_set1_ps(a.bias[m]));
      if (a.residual) v = _mm256_add_ps(v, _mm256_maskload_ps(a.residual + at + ow, mask));
      if (a.relu) v = _mm256_blendv_ps(v, zero, _mm256_cmp_ps(v, zero, _CMP_LT_OQ));
      if (ow + kLanes <= a.out_w) _mm256_storeu_ps(a.y + at + ow, v);
      else _mm256_maskstore_ps(a.y + at + ow, mask, v);
    }
  }
}

}  // namespace

void depthwise_avx2(const DepthwiseArgs& a) {
  const DepthwiseWeights& w = *a.w;
  const ChunkShuffle shuffle(a.stride_w, a.dilation_w);
  std::vector<int64_t> offsets(w.pieces.size());
  for (size_t p = 0; p < w.pieces.size(); ++p) {
    const DepthwiseChunk& c = w.chunks[static_cast<size_t>(w.pieces[p].chunk)];
    offsets[p] = (c.c * a.padded_h + c.r * a.dilation_h) * a.padded_w + c.s0 * a.dilation_w;
  }
  for (int64_t m = a.m_begin; m < a.m_end; ++m) {
    if (w.planes == 1) channel<1>(a, m, shuffle, offsets);
    else channel<2>(a, m, shuffle, offsets);
  }
}

}  // namespace fgq
