// AVX2 kernel for calls with one activation row (batch 1: a matrix-vector product),
// compiled with -mavx2 -mfma -mf16c for this file only; find_dispatch("avx2") routes
// such calls here (dispatch.cpp).
//
// With one activation row the 2-bit codes stream from DRAM once, so the kernel must
// keep that stream going and spend little work per weight. Per step (KernelWeights),
// two 32-byte loads take the step's whole 64-byte code line (four quads; lane h of line
// l: quad q + 2l + h), read in order with a software prefetch ahead, against the step's
// 16 activation bytes broadcast to both lanes. Mask 0x03 gives row 0's u = t + 1, mask
// 0x0c row 1's 4u, the same after a 4-bit shift rows 2 and 3; vpmaddubsw sums pairs into
// int16 of at most 2 * 8 * 128 = 2048, so kInt16Steps steps add up exactly with vpaddw
// before one vpmaddwd widens them: one multiply per 32 weights (the batched kernel,
// which broadcasts each quad's 16 bytes, needs two). Each int32 lane (quad, group) then
// holds 4^(i % 2) * (dot(t, x) + sum(x)); the group sums come off per super-group as in
// the other kernels, then one convert and one FMA with the scales.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "fgq/kernels.h"

namespace fgq {
namespace {

#include "activation_impl.h"

// Steps whose int16 pair sums add up exactly: |16 * 2048| = 32768 is reached only at
// -32768 (all activations -128), which int16 holds.
constexpr int64_t kInt16Steps = 16;

inline __m256i bcast16(const void* p) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}

// The scales of two quads for one super-group (16 elements each, index 4 * i + gq),
// turned per row i into floats, lane 4h + gq from quad h.
template <ScaleType ST>
struct PairScales {
  const uint8_t* s[2];
  __m256i bytes;  // kU8: quad h's 16 codes in lane h
  PairScales(const uint8_t* s0, const uint8_t* s1) : s{s0, s1} {
    if (ST == ScaleType::kU8)
      bytes = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s0))),
                                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(s1)), 1);
  }
  __m256 row(int i) const {
    if (ST == ScaleType::kF32)
      return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(reinterpret_cast<const float*>(s[0]) + 4 * i)),
                                  _mm_loadu_ps(reinterpret_cast<const float*>(s[1]) + 4 * i), 1);
    if (ST == ScaleType::kF16)
      return _mm256_cvtph_ps(_mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s[0] + 8 * i)),
                                                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s[1] + 8 * i))));
    // byte 4i + gq to the low byte of int32 lane gq, zeros above (index -1)
    const char b = static_cast<char>(4 * i);
    const __m256i spread = _mm256_setr_epi8(b, -1, -1, -1, b + 1, -1, -1, -1, b + 2, -1, -1, -1, b + 3, -1, -1, -1,
                                            b, -1, -1, -1, b + 1, -1, -1, -1, b + 2, -1, -1, -1, b + 3, -1, -1, -1);
    return _mm256_cvtepi32_ps(_mm256_shuffle_epi8(bytes, spread));
  }
};

// Code bytes read ahead of the current step: the hardware prefetcher alone leaves the
// stream from DRAM short. Enough lines must be in flight to cover DRAM's latency at its
// bandwidth (about 100 ns x 18 GB/s): on Zen 3, 12 layers 4096 x 4096, N = 64, 4096 bytes
// ran 1.2-1.7x faster than 512 (which an earlier, compute-bound version of this loop had
// measured best), 8192 no better; weights from cache are unaffected.
constexpr int64_t kPrefetchAhead = 4096;

// acc[l][i] += the int32 sums over `count` (<= kInt16Steps) steps from `codes` (the
// first step's code line) and x (its activation bytes). Not inlined: the loop then has
// all 16 registers for its int16 sums (inlined, the caller's float sums pushed them out).
template <int L>
__attribute__((noinline)) void add_step_sums(const uint8_t* codes, const int8_t* x, int64_t count, __m256i acc[L][4]) {
  const __m256i mask_even = _mm256_set1_epi8(0x03), mask_odd = _mm256_set1_epi8(0x0c);
  __m256i acc16[L][4];
  for (int l = 0; l < L; ++l)
    for (int i = 0; i < 4; ++i) acc16[l][i] = _mm256_setzero_si256();
  for (int64_t s = 0; s < count; ++s) {
    const uint8_t* step_codes = codes + s * KernelWeights::kCodeStride;
    _mm_prefetch(reinterpret_cast<const char*>(step_codes + kPrefetchAhead), _MM_HINT_T0);
    const __m256i xb = bcast16(x + 16 * s);
    for (int l = 0; l < L; ++l) {
      const __m256i line = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(step_codes + 32 * l));
      const __m256i high = _mm256_srli_epi16(line, 4);  // bits of the neighbouring byte land above the masks
      const __m256i u[4] = {_mm256_and_si256(line, mask_even), _mm256_and_si256(line, mask_odd),
                            _mm256_and_si256(high, mask_even), _mm256_and_si256(high, mask_odd)};
      for (int i = 0; i < 4; ++i) acc16[l][i] = _mm256_add_epi16(acc16[l][i], _mm256_maddubs_epi16(u[i], xb));
    }
  }
  const __m256i ones = _mm256_set1_epi16(1);
  for (int l = 0; l < L; ++l)
    for (int i = 0; i < 4; ++i) acc[l][i] = _mm256_add_epi32(acc[l][i], _mm256_madd_epi16(acc16[l][i], ones));
}

// Quads q .. q + 2L - 1 (q even; q % 4 == 0 when L == 2) x activation row b: line l is
// the 32 code bytes of quads q + 2l, q + 2l + 1. sums[l] lane 4h + i: row 4 * (q + 2l + h)
// + i, already scaled back. Quads past the weights' quads have padding codes; their
// scales are not read and their lanes are not meaningful.
template <ScaleType ST, int L>
void quad_lines(const GemmArgs& a, int64_t q, int64_t b, __m256 sums[L]) {
  const KernelWeights& w = *a.w;
  const int64_t steps = w.steps(), supers = w.super_groups(), x_stride = steps * 16;
  const size_t esize = scale_size(w.scale_type);
  const uint8_t* codes = w.quad_codes(q);
  const uint8_t* scales[L][2];
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < 2; ++h) scales[l][h] = w.quad_scales(std::min(q + 2 * l + h, w.quads - 1));
  const int8_t* x = a.x + b * a.x_stride;
  const int32_t* gs = a.gsum + b * a.s_stride;
  __m256 accf[L][4];  // [l][i] lane 4h + gq: row i of quad q + 2l + h, group gq
  for (int l = 0; l < L; ++l)
    for (int i = 0; i < 4; ++i) accf[l][i] = _mm256_setzero_ps();
  for (int64_t sg = 0; sg < supers; ++sg) {
    __m256i acc[L][4];
    for (int l = 0; l < L; ++l)
      for (int i = 0; i < 4; ++i) acc[l][i] = _mm256_setzero_si256();
    for (int64_t s0 = 0; s0 < steps; s0 += kInt16Steps)
      add_step_sums<L>(codes + (sg * steps + s0) * KernelWeights::kCodeStride, x + sg * x_stride + 16 * s0,
                       std::min(steps - s0, kInt16Steps), acc);
    const __m256i g = bcast16(gs + 4 * sg), g4 = _mm256_slli_epi32(g, 2);
    for (int l = 0; l < L; ++l) {
      const size_t at = static_cast<size_t>(sg) * 16 * esize;
      const PairScales<ST> sc(scales[l][0] + at, scales[l][1] + at);
      for (int i = 0; i < 4; ++i) {
        const __m256i dots = _mm256_sub_epi32(acc[l][i], i % 2 ? g4 : g);
        accf[l][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), sc.row(i), accf[l][i]);
      }
    }
  }
  const __m256 factor = _mm256_setr_ps(1.f, 0.25f, 1.f, 0.25f, 1.f, 0.25f, 1.f, 0.25f);
  for (int l = 0; l < L; ++l) {
    // (g0 + g1) + (g2 + g3) per row, as the other kernels add them
    const __m256 rows01 = _mm256_hadd_ps(accf[l][0], accf[l][1]), rows23 = _mm256_hadd_ps(accf[l][2], accf[l][3]);
    sums[l] = _mm256_mul_ps(_mm256_hadd_ps(rows01, rows23), factor);
  }
}

template <ScaleType ST, int L>
void quad_lines_store(const GemmArgs& a, int64_t q, int64_t q_end) {
  for (int64_t b = a.b_begin; b < a.b_end; ++b) {
    __m256 sums[L];
    quad_lines<ST, L>(a, q, b, sums);
    alignas(32) float lanes[8];
    for (int l = 0; l < L; ++l) {
      _mm256_store_ps(lanes, sums[l]);
      for (int h = 0; h < 2 && q + 2 * l + h < q_end; ++h) store_quad_impl(a, q + 2 * l + h, b, lanes + 4 * h);
    }
  }
}

template <ScaleType ST>
void gemv_t(const GemmArgs& a) {
  const int64_t q_end = (a.m_end + 3) / 4;
  int64_t q = a.m_begin / 4 / 2 * 2;
  while (q < q_end) {
    if (q % 4 == 0 && q + 2 < q_end) {  // a whole 64-byte code line a step
      quad_lines_store<ST, 2>(a, q, q_end);
      q += 4;
    } else {
      quad_lines_store<ST, 1>(a, q, q_end);
      q += 2;
    }
  }
}

}  // namespace

void avx2_gemv(const GemmArgs& a) {
  if (a.m_end <= a.m_begin || a.b_end <= a.b_begin) return;
  switch (a.w->scale_type) {
    case ScaleType::kF32: gemv_t<ScaleType::kF32>(a); break;
    case ScaleType::kF16: gemv_t<ScaleType::kF16>(a); break;
    default: gemv_t<ScaleType::kU8>(a); break;
  }
}

}  // namespace fgq
