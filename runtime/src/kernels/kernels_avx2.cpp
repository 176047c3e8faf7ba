// AVX2 kernels (compiled with -mavx2 -mfma -mf16c for this file only; reached
// only through the dispatch table when CPUID/XGETBV report support).
//
// Same layout and arithmetic as kernels_avx512vnni.cpp, in two 256-bit halves
// (rows 0-1 and rows 2-3 of a quad): the 16 code bytes broadcast to both
// 128-bit lanes and masked with (0x03, 0x0c) or (0x30, 0xc0) give u << 2i;
// vpmaddubsw (u8 x s8: a pair lies in [-2 * 128 * 128, 2 * 128 * 127], no
// saturation) and vpmaddwd with ones replace vpdpbusd.
#include <immintrin.h>

#include <cstring>

#include "fgq/depthwise.h"
#include "fgq/kernels.h"

namespace fgq {
namespace {

#include "activation_impl.h"

struct Consts {
  __m256i mask[2] = {_mm256_set_epi32(0x0c0c0c0c, 0x0c0c0c0c, 0x0c0c0c0c, 0x0c0c0c0c, 0x03030303, 0x03030303,
                                      0x03030303, 0x03030303),
                     _mm256_set_epi32(-1061109568, -1061109568, -1061109568, -1061109568, 0x30303030, 0x30303030,
                                      0x30303030, 0x30303030)};  // 0xc0c0c0c0, 0x30303030
  __m256i shift[2] = {_mm256_set_epi32(2, 2, 2, 2, 0, 0, 0, 0), _mm256_set_epi32(6, 6, 6, 6, 4, 4, 4, 4)};
  __m256 factor[2] = {_mm256_set_ps(0.25f, 0.25f, 0.25f, 0.25f, 1.f, 1.f, 1.f, 1.f),
                      _mm256_set_ps(1.f / 64, 1.f / 64, 1.f / 64, 1.f / 64, 1.f / 16, 1.f / 16, 1.f / 16, 1.f / 16)};
  __m256i ones = _mm256_set1_epi16(1);
};

inline __m256i bcast16(const void* p) { return _mm256_broadcastsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(p))); }

inline __m256i dot4(__m256i u, __m256i x, __m256i ones) { return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones); }

template <ScaleType ST>
inline __m256 load8(const uint8_t* s) {
  if (ST == ScaleType::kF32) return _mm256_loadu_ps(reinterpret_cast<const float*>(s));
  if (ST == ScaleType::kF16) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s))));
}

// out[q][c][h]: half h (rows 2h, 2h + 1 of quad q) lane 4i' + gq, already scaled back.
template <ScaleType ST, int Q, int C>
void block(const KernelWeights& w, int64_t quad0, const GemmArgs& a, int64_t b0, __m256 out[Q][C][2]) {
  const Consts k;
  const int64_t steps = w.steps(), supers = w.super_groups(), stride = steps * 16;
  const size_t esize = scale_size(w.scale_type), sstride = 16 * esize;
  const uint8_t* codes[Q];
  const uint8_t* scales[Q];
  const int8_t* x[C];
  const int32_t* gs[C];
  for (int q = 0; q < Q; ++q) {
    codes[q] = w.quad_codes(quad0 + q);
    scales[q] = w.quad_scales(quad0 + q);
  }
  for (int c = 0; c < C; ++c) {
    x[c] = a.x + (b0 + c) * a.x_stride;
    gs[c] = a.gsum + (b0 + c) * a.s_stride;
  }
  __m256 accf[Q][C][2];
  for (int q = 0; q < Q; ++q)
    for (int c = 0; c < C; ++c) accf[q][c][0] = accf[q][c][1] = _mm256_setzero_ps();
  for (int64_t sg = 0; sg < supers; ++sg) {
    __m256i acc[Q][C][2];
    for (int q = 0; q < Q; ++q)
      for (int c = 0; c < C; ++c) acc[q][c][0] = acc[q][c][1] = _mm256_setzero_si256();
    const int64_t base = sg * stride;
    for (int64_t s = 0; s < steps; ++s) {
      __m256i xb[C];
      for (int c = 0; c < C; ++c) xb[c] = bcast16(x[c] + base + 16 * s);
      for (int q = 0; q < Q; ++q) {
        const __m256i v = bcast16(codes[q] + (sg * steps + s) * KernelWeights::kCodeStride);
        for (int h = 0; h < 2; ++h) {
          const __m256i u = _mm256_and_si256(v, k.mask[h]);
          for (int c = 0; c < C; ++c) acc[q][c][h] = _mm256_add_epi32(acc[q][c][h], dot4(u, xb[c], k.ones));
        }
      }
    }
    for (int c = 0; c < C; ++c) {
      const __m256i g4 = bcast16(gs[c] + 4 * sg);
      for (int q = 0; q < Q; ++q)
        for (int h = 0; h < 2; ++h) acc[q][c][h] = _mm256_sub_epi32(acc[q][c][h], _mm256_sllv_epi32(g4, k.shift[h]));
    }
    for (int q = 0; q < Q; ++q)
      for (int h = 0; h < 2; ++h) {
        const __m256 sc = load8<ST>(scales[q] + sg * sstride + 8 * h * esize);
        for (int c = 0; c < C; ++c)
          accf[q][c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[q][c][h]), sc, accf[q][c][h]);
      }
  }
  for (int q = 0; q < Q; ++q)
    for (int c = 0; c < C; ++c)
      for (int h = 0; h < 2; ++h) out[q][c][h] = _mm256_mul_ps(accf[q][c][h], k.factor[h]);
}

template <ScaleType ST, int Q, int C>
inline void block_store(const GemmArgs& a, int64_t quad0, int64_t b0) {
  const KernelWeights& w = *a.w;
  __m256 out[Q][C][2];
  block<ST, Q, C>(w, quad0, a, b0, out);
  alignas(32) float lanes[16];
  for (int q = 0; q < Q; ++q)
    for (int c = 0; c < C; ++c) {
      _mm256_store_ps(lanes, out[q][c][0]);
      _mm256_store_ps(lanes + 8, out[q][c][1]);
      float sums[4];
      for (int i = 0; i < 4; ++i) sums[i] = (lanes[4 * i] + lanes[4 * i + 1]) + (lanes[4 * i + 2] + lanes[4 * i + 3]);
      store_quad_impl(a, quad0 + q, b0 + c, sums);
    }
}

template <ScaleType ST>
void gemm_t(const GemmArgs& a) {
  const int64_t q0 = a.m_begin / 4, q1 = (a.m_end + 3) / 4;
  if (a.b_end - a.b_begin < 2) {
    for (int64_t b = a.b_begin; b < a.b_end; ++b) {
      int64_t q = q0;
      for (; q + 2 <= q1; q += 2) block_store<ST, 2, 1>(a, q, b);
      for (; q < q1; ++q) block_store<ST, 1, 1>(a, q, b);
    }
    return;
  }
  for (int64_t q = q0; q < q1; ++q) {
    int64_t b = a.b_begin;
    for (; b + 2 <= a.b_end; b += 2) block_store<ST, 1, 2>(a, q, b);
    for (; b < a.b_end; ++b) block_store<ST, 1, 1>(a, q, b);
  }
}

void gemm(const GemmArgs& a) {
  if (a.m_end <= a.m_begin || a.b_end <= a.b_begin) return;
  switch (a.w->scale_type) {
    case ScaleType::kF32: gemm_t<ScaleType::kF32>(a); break;
    case ScaleType::kF16: gemm_t<ScaleType::kF16>(a); break;
    default: gemm_t<ScaleType::kU8>(a); break;
  }
}

void group_dots(const KernelWeights& w, int64_t m, const int8_t* x, const int32_t* gsum, int32_t* out) {
  const Consts k;
  const int64_t steps = w.steps(), stride = steps * 16, ri = m % 4, h = ri / 2;
  const uint8_t* codes = w.quad_codes(m / 4);
  alignas(32) int32_t lanes[8];
  for (int64_t sg = 0; sg < w.super_groups(); ++sg) {
    __m256i acc = _mm256_setzero_si256();
    for (int64_t s = 0; s < steps; ++s) {
      const __m256i u = _mm256_and_si256(bcast16(codes + (sg * steps + s) * KernelWeights::kCodeStride), k.mask[h]);
      acc = _mm256_add_epi32(acc, dot4(u, bcast16(x + sg * stride + 16 * s), k.ones));
    }
    acc = _mm256_sub_epi32(acc, _mm256_sllv_epi32(bcast16(gsum + 4 * sg), k.shift[h]));
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
    for (int gq = 0; gq < 4; ++gq) out[4 * sg + gq] = lanes[4 * (ri % 2) + gq] / (1 << (2 * ri));
  }
}

}  // namespace

const KernelDispatch kAvx2Dispatch = {"avx2",          group_dots, gemm, quantize_span_impl, to_kernel_order_impl,
                                      quantize_transposed_impl, false, depthwise_avx2};

}  // namespace fgq
