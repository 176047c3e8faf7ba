// AVX2 direct convolution kernel (include/fgq/depthwise.h; compiled with -mavx2 -mfma for
// this file only, reached through the dispatch table). Eight output pixels of one output
// row a vector, one per 32-bit lane. A chunk's 32 source bytes are loaded once and
// rearranged (each 128-bit lane loaded from its own offset, then vpshufb within it) so that lane j
// holds two of pixel j's taps as int16; vpmaddwd with the two int16 weights adds them to
// lane j in exact int32 (no vpmaddubsw: its int16 sums would saturate with weights t * code).
// Common depthwise filters take four output rows at once, so that each image row is loaded
// and rearranged once for all the output rows it serves. The float work is one convert and
// one FMA per accumulator.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fgq/depthwise.h"

namespace fgq {
namespace {

#include "depthwise_store_avx2.h"

constexpr int64_t kLanes = 8;

// Pixel j's tap e lies at byte stride * j + dilation * e of a chunk's source; 128-bit lane L
// (pixels 4L..4L+3) takes its 16 bytes from dword stride * L (depthwise_supports: they fit).
// pair[k] zero-extends taps 2k and 2k + 1 of each pixel to the int16 halves of its lane.
struct ChunkShuffle {
  int64_t lane_offset;  // 4 * stride: where the high 128-bit lane's 16 bytes start
  __m256i pair[2];
  ChunkShuffle(int64_t stride, int64_t dilation) {
    const int s = static_cast<int>(stride), d = static_cast<int>(dilation);
    lane_offset = 4 * stride;
    for (int k = 0; k < 2; ++k) {
      alignas(16) int8_t b[16];
      for (int p = 0; p < 4; ++p)
        for (int half = 0; half < 2; ++half) {
          b[4 * p + 2 * half] = static_cast<int8_t>(s * p + d * (2 * k + half));
          b[4 * p + 2 * half + 1] = -128;  // vpshufb writes 0
        }
      pair[k] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
    }
  }
  // Two 16-byte loads (a vpermd of one 32-byte load took 1.03-1.06x the time of 3x3 and 5x5 layers, Zen 3).
  __m256i load(const uint8_t* src) const {
    return _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(src + lane_offset),
                               reinterpret_cast<const __m128i*>(src));
  }
};

// Exact sum over a chunk's taps of each lane; w[k]: the weights of taps 2k, 2k + 1 (pair 1 is
// skipped when taps 2 and 3 lie past the kernel).
inline __m256i chunk_dot(const ChunkShuffle& shuffle, const uint8_t* src, const __m256i w[2], bool two_pairs) {
  const __m256i x = shuffle.load(src);
  __m256i sum = _mm256_madd_epi16(_mm256_shuffle_epi8(x, shuffle.pair[0]), w[0]);
  if (two_pairs) sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_shuffle_epi8(x, shuffle.pair[1]), w[1]));
  return sum;
}

// One output channel's weights as the vpmaddwd operands: per piece its two tap pairs (int16
// weights 2k, 2k + 1 as an int32; pair 1 is skipped when taps 2 and 3 lie past the kernel), and
// per accumulator the integer correction and the float scale.
struct ChannelWeights {
  std::vector<int32_t> pairs;  // [pieces][2]
  std::vector<int32_t> correction;
  std::vector<float> scale;
};

void load_channel(const DepthwiseArgs& a, int64_t m, ChannelWeights* out) {
  const DepthwiseWeights& w = *a.w;
  const int64_t pieces = static_cast<int64_t>(w.pieces.size()), A = w.accumulators;
  out->pairs.resize(static_cast<size_t>(2 * pieces));
  std::memcpy(out->pairs.data(), w.piece_weights(m, 0), static_cast<size_t>(pieces) * 4 * sizeof(int16_t));
  out->correction.resize(static_cast<size_t>(A));
  out->scale.resize(static_cast<size_t>(A));
  for (int64_t k = 0; k < A; ++k) {
    out->correction[static_cast<size_t>(k)] = a.zero_level * w.weight_sums[static_cast<size_t>(m * A + k)];
    out->scale[static_cast<size_t>(k)] = a.x_scale * w.scales[static_cast<size_t>(m * A + k)];
  }
}

// Output rows oh..oh + V - 1 of channel m at columns ow.. (count of them in the row, at most 8).
template <int V>
[[gnu::always_inline]] inline void store(const DepthwiseArgs& a, int64_t m, int64_t oh, int64_t ow, int64_t count,
                                         const __m256 out[V]) {
  for (int v = 0; v < V; ++v) store_row8(a, m, oh + v, ow, count, out[v]);
}

// V output rows of channel m at columns ow..: each accumulator's exact sums over its pieces,
// then the float chain.
template <int V>
void vectors(const DepthwiseArgs& a, int64_t m, const uint8_t* image, const int64_t* offsets, const char* two_pairs,
             const ChannelWeights& cw, const ChunkShuffle& shuffle, int64_t oh, int64_t ow, int64_t count) {
  const DepthwiseWeights& w = *a.w;
  const int64_t* first_piece = w.first_piece.data();
  const int32_t* pairs = cw.pairs.data();
  const uint8_t* corner[V];
  for (int v = 0; v < V; ++v) corner[v] = image + (oh + v) * a.stride_h * a.padded_w + ow * a.stride_w;
  __m256 out[V];
  for (int v = 0; v < V; ++v) out[v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < w.accumulators; ++k) {
    __m256i sum[V];
    for (int v = 0; v < V; ++v) sum[v] = _mm256_setzero_si256();
    for (int64_t p = first_piece[k]; p < first_piece[k + 1]; ++p) {
      const __m256i wp[2] = {_mm256_set1_epi32(pairs[2 * p]), _mm256_set1_epi32(pairs[2 * p + 1])};
      for (int v = 0; v < V; ++v)
        sum[v] = _mm256_add_epi32(sum[v], chunk_dot(shuffle, corner[v] + offsets[p], wp, two_pairs[p]));
    }
    const __m256i correction = _mm256_set1_epi32(cw.correction[static_cast<size_t>(k)]);
    const __m256 scale = _mm256_set1_ps(cw.scale[static_cast<size_t>(k)]);
    for (int v = 0; v < V; ++v)
      out[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sum[v], correction)), scale, out[v]);
  }
  store<V>(a, m, oh, ow, count, out);
}

// A plain depthwise filter (plain_depthwise_filter; kernel rows not dilated) of R x S taps
// (chunks of 4 columns; the second tap pair only where a chunk has columns past 2): output rows
// oh..oh + V - 1, the whole row width 8 pixels at a time, each image row's chunk loaded and
// shuffled once for every output row it serves (R / SH of them). The same exact sums as
// vectors(); the weights are broadcast once a call, not once a block of pixels.
using RowsBlock = void (*)(const DepthwiseArgs&, int64_t, const uint8_t*, const ChannelWeights&, const ChunkShuffle&,
                           int64_t);

template <int R, int S, int SH, int V>
void rows_block(const DepthwiseArgs& a, int64_t m, const uint8_t* image, const ChannelWeights& cw,
                const ChunkShuffle& shuffle, int64_t oh) {
  constexpr int CC = (S + 3) / 4;
  __m256i pairs[R * CC][2];  // kernel row r, chunk j: its two tap pairs' weights in every lane
  for (int p = 0; p < R * CC; ++p)
    for (int k = 0; k < 2; ++k) pairs[p][k] = _mm256_set1_epi32(cw.pairs[static_cast<size_t>(2 * p + k)]);
  const __m256i correction = _mm256_set1_epi32(cw.correction[0]);
  const __m256 scale = _mm256_set1_ps(cw.scale[0]), zero = _mm256_setzero_ps();
  // A local, not a parameter: passed by reference from channel(), its fields were reloaded after every
  // store (5x5 240 channels at 28x28 1.13x slower).
  const ChannelStore out_channel(a, m);
  const uint8_t* corner = image + oh * SH * a.padded_w;
  for (int64_t ow = 0; ow < a.out_w; ow += kLanes, corner += kLanes * a.stride_w) {
    __m256i acc[V];
    for (int v = 0; v < V; ++v) acc[v] = _mm256_setzero_si256();
    for (int j = 0; j < CC; ++j) {
      const bool two_pairs = 4 * j + 2 < S;
#pragma GCC unroll 16  // fully: acc[] then stays in registers
      for (int i = 0; i < SH * (V - 1) + R; ++i) {  // image rows from the block's first window row
        const __m256i x = shuffle.load(corner + i * a.padded_w + 4 * j * a.dilation_w);
        const __m256i x0 = _mm256_shuffle_epi8(x, shuffle.pair[0]);
        const __m256i x1 = two_pairs ? _mm256_shuffle_epi8(x, shuffle.pair[1]) : _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) {
          const int r = i - SH * v;  // kernel row of output row v that reads image row i
          if (r < 0 || r >= R) continue;
          acc[v] = _mm256_add_epi32(acc[v], _mm256_madd_epi16(x0, pairs[r * CC + j][0]));
          if (two_pairs) acc[v] = _mm256_add_epi32(acc[v], _mm256_madd_epi16(x1, pairs[r * CC + j][1]));
        }
      }
    }
    __m256 out[V];
    for (int v = 0; v < V; ++v)
      out[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[v], correction)), scale, zero);
    for (int v = 0; v < V; ++v) out_channel.row8(oh + v, ow, std::min(kLanes, a.out_w - ow), out[v]);
  }
}

// rows_block for 4, 2 and 1 rows of this call's filter, or nulls when it is not one of the common ones.
struct RowsBlocks {
  RowsBlock four = nullptr, two = nullptr, one = nullptr;
};

template <int R, int S, int SH>
RowsBlocks blocks() {
  return {rows_block<R, S, SH, 4>, rows_block<R, S, SH, 2>, rows_block<R, S, SH, 1>};
}

RowsBlocks rows_blocks_for(const DepthwiseArgs& a) {
  const DepthwiseWeights& w = *a.w;
  if (!plain_depthwise_filter(w) || a.dilation_h != 1) return {};
  switch (w.kernel_h * 100 + w.kernel_w * 10 + a.stride_h) {
    case 331: return blocks<3, 3, 1>();
    case 332: return blocks<3, 3, 2>();
    case 551: return blocks<5, 5, 1>();
    case 552: return blocks<5, 5, 2>();
    case 771: return blocks<7, 7, 1>();
    case 772: return blocks<7, 7, 2>();
    default: return {};
  }
}

void channel(const DepthwiseArgs& a, int64_t m, const int64_t* offsets, const char* two_pairs, const ChannelWeights& cw,
             const ChunkShuffle& shuffle, const RowsBlocks& rows) {
  const DepthwiseWeights& w = *a.w;
  const uint8_t* image = a.image + (m / w.rows_per_group) * w.channels_per_group * a.padded_h * a.padded_w;
  // Blocks of V output rows, as many as fit from row oh on.
  auto block = [&](int64_t& oh, int V, RowsBlock fixed) {
    for (; oh + V <= a.out_h; oh += V) {
      if (fixed) {
        fixed(a, m, image, cw, shuffle, oh);
        continue;
      }
      for (int64_t ow = 0; ow < a.out_w; ow += kLanes) {
        const int64_t count = std::min(kLanes, a.out_w - ow);
        if (V == 2) vectors<2>(a, m, image, offsets, two_pairs, cw, shuffle, oh, ow, count);
        else vectors<1>(a, m, image, offsets, two_pairs, cw, shuffle, oh, ow, count);
      }
    }
  };
  int64_t oh = 0;
  if (rows.four) block(oh, 4, rows.four);
  block(oh, 2, rows.two);  // two rows at a time: independent chains, shared weight loads
  block(oh, 1, rows.one);
}

}  // namespace

void depthwise_avx2(const DepthwiseArgs& a) {
  const DepthwiseWeights& w = *a.w;
  const ChunkShuffle shuffle(a.stride_w, a.dilation_w);
  std::vector<int64_t> offsets;  // each piece's source, relative to a pixel's window corner
  std::vector<char> two_pairs;
  for (const DepthwisePiece& piece : w.pieces) {
    const DepthwiseChunk& c = w.chunks[static_cast<size_t>(piece.chunk)];
    offsets.push_back((c.c * a.padded_h + c.r * a.dilation_h) * a.padded_w + c.s0 * a.dilation_w);
    two_pairs.push_back(c.s0 + 2 < w.kernel_w);
  }
  const RowsBlocks rows = rows_blocks_for(a);
  ChannelWeights cw;
  for (int64_t m = a.m_begin; m < a.m_end; ++m) {
    load_channel(a, m, &cw);
    channel(a, m, offsets.data(), two_pairs.data(), cw, shuffle, rows);
  }
}

}  // namespace fgq
