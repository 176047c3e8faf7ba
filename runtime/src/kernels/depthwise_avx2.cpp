// AVX2 direct convolution kernel (include/fgq/depthwise.h; compiled with -mavx2 -mfma for
// this file only, reached through the dispatch table). Eight output pixels of one output
// row a vector, one per 32-bit lane. A chunk's 32 source bytes are loaded once and
// rearranged (vpermd across the two 128-bit lanes, then vpshufb within each) so that lane j
// holds two of pixel j's taps as int16; vpmaddwd with the two int16 weights adds them to
// lane j in exact int32 (no vpmaddubsw: its int16 sums would saturate with weights t * code).
// The float work is one convert and one FMA per accumulator.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fgq/depthwise.h"

namespace fgq {
namespace {

constexpr int64_t kLanes = 8;

// Pixel j's tap e lies at byte stride * j + dilation * e of a chunk's source; 128-bit lane L
// (pixels 4L..4L+3) takes its 16 bytes from dword stride * L (depthwise_supports: they fit).
// pair[k] zero-extends taps 2k and 2k + 1 of each pixel to the int16 halves of its lane.
struct ChunkShuffle {
  __m256i dwords, pair[2];
  ChunkShuffle(int64_t stride, int64_t dilation) {
    const int s = static_cast<int>(stride), d = static_cast<int>(dilation);
    dwords = _mm256_setr_epi32(0, 1, 2, 3, s, s + 1, s + 2, s + 3);
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
  __m256i load(const uint8_t* src) const {
    return _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), dwords);
  }
};

// Both int16 weights of a tap pair in every lane.
inline __m256i broadcast_pair(const int16_t* w) {
  int32_t v;
  std::memcpy(&v, w, 4);
  return _mm256_set1_epi32(v);
}

// Exact sum over a chunk's taps of each lane; w[k]: the weights of taps 2k, 2k + 1 (pair 1 is
// skipped when taps 2 and 3 lie past the kernel).
inline __m256i chunk_dot(const ChunkShuffle& shuffle, const uint8_t* src, const __m256i w[2], bool two_pairs) {
  const __m256i x = shuffle.load(src);
  __m256i sum = _mm256_madd_epi16(_mm256_shuffle_epi8(x, shuffle.pair[0]), w[0]);
  if (two_pairs) sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_shuffle_epi8(x, shuffle.pair[1]), w[1]));
  return sum;
}

// Where each piece reads, relative to a pixel's window corner, and whether its chunk has a second
// tap pair; and the output's vectors: 8 (or fewer, at a row's end) pixels of one row each,
// their first pixel's window corner and output offset. Built per call, kept per thread.
struct Plan {
  std::vector<int64_t> offset;
  std::vector<char> two_pairs;
  std::vector<int64_t> corner, out;
  std::vector<int> count;
};

// One channel's exact integer sums of a few pieces for every output vector v: `sink(v, sum)` gets
// dot[v] (unless `first`: 0) + the sum over pieces [p0, p0 + K) for vector v.
template <int K, class Sink>
void sweep(const uint8_t* image, const int16_t* weights, const ChunkShuffle& shuffle, const Plan& plan, int64_t p0,
           bool first, const int32_t* dot, const Sink& sink) {
  const uint8_t* src[K];
  __m256i w[K][2];
  bool two_pairs[K];
  for (int k = 0; k < K; ++k) {
    src[k] = image + plan.offset[static_cast<size_t>(p0 + k)];
    w[k][0] = broadcast_pair(weights + (p0 + k) * 4);
    w[k][1] = broadcast_pair(weights + (p0 + k) * 4 + 2);
    two_pairs[k] = plan.two_pairs[static_cast<size_t>(p0 + k)];
  }
  const int64_t* corner = plan.corner.data();  // plain locals: the plan may be thread_local (a TLS call an access)
  const size_t vectors = plan.corner.size();
  for (size_t v = 0; v < vectors; ++v) {
    __m256i sum = first ? _mm256_setzero_si256() : _mm256_load_si256(reinterpret_cast<const __m256i*>(dot + v * kLanes));
    for (int k = 0; k < K; ++k) sum = _mm256_add_epi32(sum, chunk_dot(shuffle, src[k] + corner[v], w[k], two_pairs[k]));
    sink(v, sum);
  }
}

// sweep<K> for K = min(3, end - p0).
template <class Sink>
void sweep_up_to_3(const uint8_t* image, const int16_t* weights, const ChunkShuffle& shuffle, const Plan& plan,
                   int64_t p0, int64_t end, bool first, const int32_t* dot, const Sink& sink) {
  if (end - p0 >= 3) sweep<3>(image, weights, shuffle, plan, p0, first, dot, sink);
  else if (end - p0 == 2) sweep<2>(image, weights, shuffle, plan, p0, first, dot, sink);
  else sweep<1>(image, weights, shuffle, plan, p0, first, dot, sink);
}

// Output channel m: each accumulator's pieces swept three at a time (partial sums in `dot`); the
// last sweep of accumulator k adds scale * (sum - correction) to the float sums `acc`, or for the
// last accumulator finishes the output: bias, residual, ReLU, store.
void channel(const DepthwiseArgs& a, int64_t m, const ChunkShuffle& shuffle, const Plan& plan, int32_t* dot,
             float* acc) {
  const DepthwiseWeights& w = *a.w;
  const int64_t P = a.out_h * a.out_w, A = w.accumulators;
  const int64_t* outs = plan.out.data();
  const int* counts = plan.count.data();
  const uint8_t* image = a.image + (m / w.rows_per_group) * w.channels_per_group * a.padded_h * a.padded_w;
  const int16_t* weights = w.piece_weights(m, 0);
  const float* residual = a.residual ? a.residual + m * P : nullptr;
  float* y = a.y + m * P;
  const __m256 zero = _mm256_setzero_ps();
  const __m256 bias = _mm256_set1_ps(a.bias ? a.bias[m] : 0.f);
  const bool relu = a.relu;
  for (int64_t k = 0; k < A; ++k) {
    const int64_t begin = w.first_piece[static_cast<size_t>(k)], end = w.first_piece[static_cast<size_t>(k + 1)];
    const __m256i correction = _mm256_set1_epi32(a.zero_level * w.weight_sums[static_cast<size_t>(m * A + k)]);
    const __m256 scale = _mm256_set1_ps(a.x_scale * w.scales[static_cast<size_t>(m * A + k)]);
    auto partial = [&](size_t v, __m256i sum) { _mm256_store_si256(reinterpret_cast<__m256i*>(dot + v * kLanes), sum); };
    auto finish = [&](size_t v, __m256i sum) {
      const __m256 before = k == 0 ? zero : _mm256_load_ps(acc + v * kLanes);
      __m256 out = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sum, correction)), scale, before);
      if (k < A - 1) {
        _mm256_store_ps(acc + v * kLanes, out);
        return;
      }
      // A vector short of 8 pixels (a row's end) spills into the next rows, written later, unless the
      // spill would leave the channel's plane: then it goes through a buffer (no masked moves: they are
      // microcoded on some CPUs).
      const bool exact = counts[v] < kLanes && outs[v] + kLanes > P;
      alignas(32) float buffer[kLanes] = {};
      const size_t bytes = static_cast<size_t>(counts[v]) * sizeof(float);
      if (a.bias) out = _mm256_add_ps(out, bias);
      if (residual) {
        const float* r = exact ? static_cast<const float*>(std::memcpy(buffer, residual + outs[v], bytes)) : residual + outs[v];
        out = _mm256_add_ps(out, _mm256_loadu_ps(r));
      }
      if (relu) out = _mm256_blendv_ps(out, zero, _mm256_cmp_ps(out, zero, _CMP_LT_OQ));
      if (!exact) {
        _mm256_storeu_ps(y + outs[v], out);
        return;
      }
      _mm256_store_ps(buffer, out);
      std::memcpy(y + outs[v], buffer, bytes);
    };
    for (int64_t p = begin; p < end; p += 3) {
      if (p + 3 < end) sweep_up_to_3(image, weights, shuffle, plan, p, end, p == begin, dot, partial);
      else sweep_up_to_3(image, weights, shuffle, plan, p, end, p == begin, dot, finish);
    }
  }
}

}  // namespace

void depthwise_avx2(const DepthwiseArgs& a) {
  const DepthwiseWeights& w = *a.w;
  const ChunkShuffle shuffle(a.stride_w, a.dilation_w);
  thread_local Plan kept;  // its vectors keep their memory between calls
  Plan& plan = kept;
  for (auto* v : {&plan.offset, &plan.corner, &plan.out}) v->clear();
  plan.two_pairs.clear();
  plan.count.clear();
  for (const DepthwisePiece& piece : w.pieces) {
    const DepthwiseChunk& c = w.chunks[static_cast<size_t>(piece.chunk)];
    plan.offset.push_back((c.c * a.padded_h + c.r * a.dilation_h) * a.padded_w + c.s0 * a.dilation_w);
    plan.two_pairs.push_back(c.s0 + 2 < w.kernel_w);
  }
  for (int64_t oh = 0; oh < a.out_h; ++oh)
    for (int64_t ow = 0; ow < a.out_w; ow += kLanes) {
      plan.corner.push_back(oh * a.stride_h * a.padded_w + ow * a.stride_w);
      plan.out.push_back(oh * a.out_w + ow);
      plan.count.push_back(static_cast<int>(std::min(kLanes, a.out_w - ow)));
    }
  // Integer and float sums of one channel, 8 lanes a vector, 32-byte aligned (kept per thread).
  const size_t lanes = plan.corner.size() * kLanes;
  thread_local std::vector<float> buffer;
  if (buffer.size() < 2 * lanes + kLanes) buffer.resize(2 * lanes + kLanes);
  const uintptr_t misaligned = reinterpret_cast<uintptr_t>(buffer.data()) / sizeof(float) % kLanes;
  float* aligned = buffer.data() + (kLanes - misaligned) % kLanes;
  for (int64_t m = a.m_begin; m < a.m_end; ++m)
    channel(a, m, shuffle, plan, reinterpret_cast<int32_t*>(aligned), aligned + lanes);
}

}  // namespace fgq
