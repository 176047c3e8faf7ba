// AVX-512 VNNI kernels (compiled with -mavx512f -mavx512bw -mavx512vl
// -mavx512vnni -mfma -mf16c for this file only; reached only through the
// dispatch table when CPUID/XGETBV report support).
//
// Layout: include/fgq/kernels.h (KernelWeights). Per quad of rows and step k,
// 16 code bytes broadcast to the four 128-bit lanes and masked with
// 0x03 << 2i give u << 2i (u = t + 1) for row i; the 16 activation bytes of
// the step, broadcast the same way, meet them in vpdpbusd (u8 x s8). Each
// 32-bit lane (row i, group gq) accumulates 4^i * (dot(t, x) + sum(x)) over
// the super-group's steps; subtracting 4^i * gsum leaves 4^i * dot(t, x),
// exact. Then one convert and one FMA with the 16 scales per super-group;
// the 4^i go at the end (a power of two: exact in float).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "fgq/depthwise.h"
#include "fgq/kernels.h"

namespace fgq {
namespace {

#include "activation_impl.h"
#include "activation_lanes.h"

inline __m512i lane_masks() {
  return _mm512_set_epi32(-1061109568, -1061109568, -1061109568, -1061109568,  // 0xc0c0c0c0
                          0x30303030, 0x30303030, 0x30303030, 0x30303030, 0x0c0c0c0c, 0x0c0c0c0c, 0x0c0c0c0c,
                          0x0c0c0c0c, 0x03030303, 0x03030303, 0x03030303, 0x03030303);
}
inline __m512i lane_shifts() { return _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0); }
inline __m512 lane_factors() {
  return _mm512_set_ps(1.f / 64, 1.f / 64, 1.f / 64, 1.f / 64, 1.f / 16, 1.f / 16, 1.f / 16, 1.f / 16, 0.25f, 0.25f,
                       0.25f, 0.25f, 1.f, 1.f, 1.f, 1.f);
}
inline __m512i bcast16(const void* p) {
  return _mm512_broadcast_i32x4(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}

template <ScaleType ST>
inline __m512 load16(const uint8_t* s) {
  if (ST == ScaleType::kF32) return _mm512_loadu_ps(s);
  if (ST == ScaleType::kF16) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))));
}

// Q quads of rows x C activation rows; out[q][c] lane 4i + gq sums row 4q + i's groups gq (mod 4).
template <ScaleType ST, int Q, int C>
void block(const KernelWeights& w, int64_t quad0, const GemmArgs& a, int64_t b0, __m512 out[Q][C]) {
  const __m512i masks = lane_masks(), shifts = lane_shifts();
  const int64_t steps = w.steps(), supers = w.super_groups(), stride = steps * 16;
  const size_t sstride = 16 * scale_size(w.scale_type);
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
  __m512 accf[Q][C];
  for (int q = 0; q < Q; ++q)
    for (int c = 0; c < C; ++c) accf[q][c] = _mm512_setzero_ps();
  for (int64_t sg = 0; sg < supers; ++sg) {
    __m512i acc[Q][C];
    for (int q = 0; q < Q; ++q)
      for (int c = 0; c < C; ++c) acc[q][c] = _mm512_setzero_si512();
    const int64_t base = sg * stride;
    for (int64_t k = 0; k < steps; ++k) {
      __m512i xb[C];
      for (int c = 0; c < C; ++c) xb[c] = bcast16(x[c] + base + 16 * k);
      for (int q = 0; q < Q; ++q) {
        const __m512i u = _mm512_and_si512(bcast16(codes[q] + (sg * steps + k) * KernelWeights::kCodeStride), masks);
        for (int c = 0; c < C; ++c) acc[q][c] = _mm512_dpbusd_epi32(acc[q][c], u, xb[c]);
      }
    }
    __m512i sv[C];
    for (int c = 0; c < C; ++c) sv[c] = _mm512_sllv_epi32(bcast16(gs[c] + 4 * sg), shifts);
    for (int q = 0; q < Q; ++q) {
      const __m512 sc = load16<ST>(scales[q] + sg * sstride);
      for (int c = 0; c < C; ++c)
        accf[q][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[q][c], sv[c])), sc, accf[q][c]);
    }
  }
  const __m512 factors = lane_factors();
  for (int q = 0; q < Q; ++q)
    for (int c = 0; c < C; ++c) out[q][c] = _mm512_mul_ps(accf[q][c], factors);
}

// r[i] lane j <-> r[j] lane i (128-bit lanes).
inline void transpose_lanes(__m512i r[4]) {
  const __m512i t0 = _mm512_shuffle_i32x4(r[0], r[1], 0x44), t1 = _mm512_shuffle_i32x4(r[0], r[1], 0xEE);
  const __m512i t2 = _mm512_shuffle_i32x4(r[2], r[3], 0x44), t3 = _mm512_shuffle_i32x4(r[2], r[3], 0xEE);
  r[0] = _mm512_shuffle_i32x4(t0, t2, 0x88);
  r[1] = _mm512_shuffle_i32x4(t0, t2, 0xDD);
  r[2] = _mm512_shuffle_i32x4(t1, t3, 0x88);
  r[3] = _mm512_shuffle_i32x4(t1, t3, 0xDD);
}

// block<ST, 4, 1> for the four quads of one code block (quad0 % 4 == 0): a step's 64
// code bytes are one plain load, masked per row i (lane q: quad q), so no code bytes
// are broadcast; the sums go back to block's lanes once per super-group.
template <ScaleType ST>
void block_line(const KernelWeights& w, int64_t quad0, const GemmArgs& a, int64_t b0, __m512 out[4][1]) {
  const int64_t steps = w.steps(), supers = w.super_groups(), stride = steps * 16;
  const size_t sstride = 16 * scale_size(w.scale_type);
  const uint8_t* codes = w.quad_codes(quad0);
  const int8_t* x = a.x + b0 * a.x_stride;
  const int32_t* gs = a.gsum + b0 * a.s_stride;
  const __m512i shifts = lane_shifts();
  __m512i row_mask[4];
  for (int i = 0; i < 4; ++i) row_mask[i] = _mm512_set1_epi8(static_cast<char>(3 << (2 * i)));
  __m512 accf[4];
  for (int q = 0; q < 4; ++q) accf[q] = _mm512_setzero_ps();
  for (int64_t sg = 0; sg < supers; ++sg) {
    __m512i acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = _mm512_setzero_si512();
    // One activation row streams the weights from DRAM: prefetch the code and scale streams ahead, as
    // the AVX2 batch-1 kernels do (kernels_avx2_gemv.cpp). The 4096 x 4096 chain (bench_kernels --cases
    // gemv, Zen 5): N=64 155-179 -> 118-125 us a layer, N=4 516-617 -> 390-430 us; codes 4096 bytes ahead
    // gave 135-149 and 340-424 us, 2048 bytes 163 and 428 us.
    for (int q = 0; q < 4; ++q)
      _mm_prefetch(reinterpret_cast<const char*>(w.quad_scales(quad0 + q) + sg * sstride + 1024), _MM_HINT_T0);
    for (int64_t k = 0; k < steps; ++k) {
      const __m512i xb = bcast16(x + sg * stride + 16 * k);
      const uint8_t* step_codes = codes + (sg * steps + k) * KernelWeights::kCodeStride;
      _mm_prefetch(reinterpret_cast<const char*>(step_codes + 8192), _MM_HINT_T0);
      const __m512i line = _mm512_loadu_si512(step_codes);
      for (int i = 0; i < 4; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_and_si512(line, row_mask[i]), xb);
    }
    transpose_lanes(acc);  // acc[q] lane 4i + gq, as in block
    const __m512i sv = _mm512_sllv_epi32(bcast16(gs + 4 * sg), shifts);
    for (int q = 0; q < 4; ++q) {
      const __m512 sc = load16<ST>(w.quad_scales(quad0 + q) + sg * sstride);
      accf[q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[q], sv)), sc, accf[q]);
    }
  }
  const __m512 factors = lane_factors();
  for (int q = 0; q < 4; ++q) out[q][0] = _mm512_mul_ps(accf[q], factors);
}

// Per 128-bit lane: [sum(a), sum(b), sum(c), sum(d)] of the lane's four floats.
inline __m512 lane_sums4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_ps(c, d, 0x88), _mm512_shuffle_ps(c, d, 0xDD));
  return _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x88), _mm512_shuffle_ps(ab, cd, 0xDD));
}

template <ScaleType ST, int Q, int C>
inline void block_store(const GemmArgs& a, int64_t quad0, int64_t b0) {
  const KernelWeights& w = *a.w;
  __m512 out[Q][C];
  if constexpr (Q == 4 && C == 1) {
    if (quad0 % 4 == 0) block_line<ST>(w, quad0, a, b0, out);
    else block<ST, Q, C>(w, quad0, a, b0, out);
  } else {
    block<ST, Q, C>(w, quad0, a, b0, out);
  }
  if (C == 4) {  // four activation rows: reduce and finish 4 rows x 4 columns at once
    const __m512i row_of_lane = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    for (int q = 0; q < Q; ++q) {
      const int64_t m0 = 4 * (quad0 + q);
      // lane 4i + c: row m0 + i, column b0 + c
      const __m512 sums = lane_sums4(out[q][0], out[q][C > 1 ? 1 : 0], out[q][C > 2 ? 2 : 0], out[q][C > 3 ? 3 : 0]);
      const __m512 rs = _mm512_permutexvar_ps(row_of_lane, _mm512_castps128_ps512(_mm_loadu_ps(w.row_scale.data() + m0)));
      const __m512 ro = _mm512_permutexvar_ps(row_of_lane, _mm512_castps128_ps512(_mm_loadu_ps(w.row_offset.data() + m0)));
      const __m512 v = _mm512_mul_ps(_mm512_set1_ps(a.scale),
                                     _mm512_fmadd_ps(rs, sums, _mm512_mul_ps(_mm512_set1_ps(a.offset), ro)));
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, v);
      for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + i;
        if (m < a.m_begin || m >= a.m_end) continue;
        float* y = a.y + b0 * a.y_stride_b + m * a.y_stride_m;
        if (a.y_stride_b == 1) {
          const __m128 r = _mm_load_ps(lanes + 4 * i);
          _mm_storeu_ps(y, a.accumulate ? _mm_add_ps(_mm_loadu_ps(y), r) : r);
        } else {
          for (int c = 0; c < 4; ++c) {
            float& yc = y[c * a.y_stride_b];
            yc = a.accumulate ? yc + lanes[4 * i + c] : lanes[4 * i + c];
          }
        }
      }
    }
    return;
  }
  alignas(64) float lanes[16];
  for (int q = 0; q < Q; ++q)
    for (int c = 0; c < C; ++c) {
      // Sum the four lanes of each 128-bit lane: row i's total lands in lane 4i.
      __m512 v = _mm512_add_ps(out[q][c], _mm512_permute_ps(out[q][c], 0xB1));
      v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));
      _mm512_store_ps(lanes, v);
      const float sums[4] = {lanes[0], lanes[4], lanes[8], lanes[12]};
      store_quad_impl(a, quad0 + q, b0 + c, sums);
    }
}

// quantize_one on 16 floats: the levels' low bytes as int32. The float clamp is to the
// integer bounds themselves, so the rounded level needs no second clamp.
struct Quantizer {
  __m512 scale, hi, lo;
  __m512i offset;
  explicit Quantizer(const ActQuant& q)
      : scale(_mm512_set1_ps(q.scale)),
        hi(_mm512_set1_ps(static_cast<float>(q.qmax - q.zero_point))),
        lo(_mm512_set1_ps(static_cast<float>(q.qmin - q.zero_point))),
        offset(_mm512_set1_epi32(q.zero_point - q.shift)) {}
  __m512i operator()(__m512 x) const {
    __m512 v = _mm512_div_ps(x, scale);
    v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);  // NaN -> 0
    v = _mm512_max_ps(_mm512_min_ps(v, hi), lo);
    const __m512i level = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_and_si512(_mm512_add_epi32(level, offset), _mm512_set1_epi32(0xFF));  // the byte, 0..255
  }
};

// A StoreEpilogue's 8-bit levels on 16 rows of a [B, M] output, copied out of it (see ActivationLanes): the
// residual's levels dequantized, the output quantized into its level bytes.
struct LevelsLanes {
  const int8_t* residual;
  bool residual_signed;
  __m512i residual_zero;
  __m512 residual_scale;
  int8_t* out;
  Quantizer quantize;
  explicit LevelsLanes(const StoreEpilogue& e)
      : residual(e.residual_levels), residual_signed(e.residual_signed), residual_zero(_mm512_set1_epi32(e.residual_zero)),
        residual_scale(_mm512_set1_ps(e.residual_scale)), out(e.out_levels), quantize(e.out_quant) {}
  __m512 residual_at(int64_t at, __mmask16 rows) const {
    const __m128i bytes = _mm_maskz_loadu_epi8(rows, residual + at);
    const __m512i level = residual_signed ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(level, residual_zero)), residual_scale);
  }
  void store(int64_t at, __mmask16 rows, __m512 v) const {
    _mm_mask_storeu_epi8(out + at, rows, _mm512_cvtepi32_epi8(quantize(v)));
  }
};

// The rest of an epilogue after the bias, on a row of 8 columns: plus the residual's row (laid out as the
// output, `at` elements on), then the activation.
struct RowsResidual {
  const float* residual = nullptr;
  ActivationLanes act;
  __m256 finish(__m256 r, int64_t at, __mmask8 columns) const {
    return act(_mm256_add_ps(r, _mm256_maskz_loadu_ps(columns, residual + at)));
  }
};

// v[c] lane i is row i, column c (c < 8; v[columns..7] are zero): rows lo..hi-1 go to
// y + i * stride, `columns` columns each (`residual`: finished by it). Three shuffle rounds leave
// t[k] = [row k | row 4 + k] and t[4 + k] = [row 8 + k | row 12 + k].
inline void store_rows(const __m512 v[8], int columns, float* y, int64_t stride, int64_t lo, int64_t hi,
                       bool accumulate, const RowsResidual* residual = nullptr) {
  const RowsResidual finish = residual ? *residual : RowsResidual();  // a local: see ActivationLanes
  __m512 u[8], t[8];
  for (int p = 0; p < 4; ++p) {
    u[2 * p] = _mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]);
    u[2 * p + 1] = _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]);
  }
  // lane L of t[k] (k < 4): row 4L + k, columns 0-3; of t[4 + k]: columns 4-7
  for (int h = 0; h < 2; ++h) {
    t[4 * h + 0] = _mm512_shuffle_ps(u[4 * h], u[4 * h + 2], 0x44);
    t[4 * h + 1] = _mm512_shuffle_ps(u[4 * h], u[4 * h + 2], 0xEE);
    t[4 * h + 2] = _mm512_shuffle_ps(u[4 * h + 1], u[4 * h + 3], 0x44);
    t[4 * h + 3] = _mm512_shuffle_ps(u[4 * h + 1], u[4 * h + 3], 0xEE);
  }
  const __m512i low = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i high = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  const __mmask8 row_columns = static_cast<__mmask8>((1u << columns) - 1);
  for (int k = 0; k < 4; ++k) {
    const __m512 pair[2] = {_mm512_permutex2var_ps(t[k], low, t[4 + k]), _mm512_permutex2var_ps(t[k], high, t[4 + k])};
    for (int j = 0; j < 4; ++j) {  // rows k, 4 + k, 8 + k, 12 + k: the low or high half of pair[j / 2]
      const int64_t i = 4 * j + k;
      if (i < lo || i >= hi) continue;
      float* at = y + i * stride;
      __m256 r = j % 2 ? _mm512_extractf32x8_ps(pair[j / 2], 1) : _mm512_castps512_ps256(pair[j / 2]);
      if (accumulate) r = _mm256_add_ps(r, _mm256_maskz_loadu_ps(row_columns, at));
      if (residual) r = finish.finish(r, i * stride, row_columns);
      _mm256_mask_storeu_ps(at, row_columns, r);
    }
  }
}

// The folded form's epilogue for one panel: sums[c] lane i is row m0 + i, column b0 + c
// (c < columns <= 8), the exact sum over w * (x + 128); fold_bias removes the 128. GemmArgs::epilogue
// is applied in registers; when accumulating (asymmetric weights' second plane) or in neither of the ops'
// layouts, after the stores.
void folded_store(const GemmArgs& a, int64_t m0, int64_t b0, const __m512i sums[8], int columns) {
  const KernelWeights& w = *a.w;
  const __m512i bias = _mm512_loadu_si512(w.fold_bias.data() + m0);
  const __m512 rs = _mm512_loadu_ps(w.row_scale.data() + m0), ro = _mm512_loadu_ps(w.row_offset.data() + m0);
  const __m512 offset_term = _mm512_mul_ps(_mm512_set1_ps(a.offset), ro), scale = _mm512_set1_ps(a.scale);
  const int64_t lo = std::max<int64_t>(a.m_begin - m0, 0), hi = std::min<int64_t>(a.m_end - m0, 16);
  __m512 v[8];
  for (int c = 0; c < 8; ++c)
    v[c] = c < columns ? _mm512_mul_ps(scale, _mm512_fmadd_ps(rs, _mm512_cvtepi32_ps(_mm512_sub_epi32(sums[c], bias)),
                                                              offset_term))
                       : _mm512_setzero_ps();
  const int64_t at = b0 * a.y_stride_b + m0 * a.y_stride_m;  // the output's offset of (m0, b0)
  const StoreEpilogue* e = a.epilogue;
  const bool by_rows = a.y_stride_m == 1, by_columns = a.y_stride_b == 1;  // [B, M]; a convolution's [M, pixels]
  if (e && !a.accumulate && (by_rows || by_columns)) {
    // The epilogue in registers: the bias and, without a residual, the activation on the columns' vectors
    // (before the transposition); a residual and then the activation on the rows. 8-bit levels only [B, M].
    const __mmask16 rows = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
    if (e->bias) {
      const __m512 row_bias = _mm512_maskz_loadu_ps(rows, e->bias + m0);
      for (int c = 0; c < columns; ++c) v[c] = _mm512_add_ps(v[c], row_bias);
    }
    if (e->residual && !by_rows) {
      const RowsResidual residual{e->residual + at, ActivationLanes(*e)};
      store_rows(v, columns, a.y + at, a.y_stride_m, lo, hi, false, &residual);
      return;
    }
    const ActivationLanes act(*e);
    const float* residual = e->residual;
    if (e->has_levels()) {
      const LevelsLanes levels(*e);
      for (int c = 0; c < columns; ++c) {
        const int64_t column = at + c * a.y_stride_b;
        if (residual) v[c] = _mm512_add_ps(v[c], _mm512_maskz_loadu_ps(rows, residual + column));
        if (levels.residual) v[c] = _mm512_add_ps(v[c], levels.residual_at(column, rows));
        v[c] = act(v[c]);
      }
      for (int c = 0; c < columns; ++c) {
        if (levels.out) levels.store(at + c * a.y_stride_b, rows, v[c]);
        else _mm512_mask_storeu_ps(a.y + at + c * a.y_stride_b, rows, v[c]);
      }
      return;
    }
    for (int c = 0; c < columns; ++c) {
      if (residual) v[c] = _mm512_add_ps(v[c], _mm512_maskz_loadu_ps(rows, residual + at + c * a.y_stride_b));
      v[c] = act(v[c]);
    }
    if (by_rows)
      for (int c = 0; c < columns; ++c) _mm512_mask_storeu_ps(a.y + at + c * a.y_stride_b, rows, v[c]);
    else
      store_rows(v, columns, a.y + at, a.y_stride_m, lo, hi, false);
    return;
  }
  float* y = a.y + at;
  if (by_rows) {  // [B, M]: each column's 16 rows contiguous
    const __mmask16 rows = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
    for (int c = 0; c < columns; ++c) {
      float* yc = y + c * a.y_stride_b;
      _mm512_mask_storeu_ps(yc, rows, a.accumulate ? _mm512_add_ps(v[c], _mm512_maskz_loadu_ps(rows, yc)) : v[c]);
    }
  } else if (by_columns) {  // [M, pixels] (a convolution's NCHW output): each row's columns contiguous
    store_rows(v, columns, y, a.y_stride_m, lo, hi, a.accumulate);
  } else {
    alignas(64) float lanes[16];
    for (int c = 0; c < columns; ++c) {
      _mm512_store_ps(lanes, v[c]);
      for (int64_t i = lo; i < hi; ++i) {
        float& yi = y[c * a.y_stride_b + i * a.y_stride_m];
        yi = a.accumulate ? yi + lanes[i] : lanes[i];
      }
    }
  }
  if (e)  // accumulating, or neither layout: after the stores, as the ops' finish pass would
    for (int c = 0; c < columns; ++c)
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t offset = c * a.y_stride_b + i * a.y_stride_m;
        y[offset] = e->apply(y[offset], m0 + i, e->residual ? e->residual + at + offset : nullptr);
      }
}

// The folded form (KernelWeights::folded), one register tile: NP panels of 16 rows (PL planes
// each) x C natural unsigned activation rows (contiguous, or in segments: GemmArgs::row_offsets).
// Per 4-position chunk, NP * PL weight vectors are loaded once and met by each row's 4 bytes,
// broadcast once: NP * PL * C vpdpbusd for NP * PL + C loads. Exact int32 sums per row, then
// the epilogue.
template <int PL, int NP, int C>
void folded_block(const GemmArgs& a, int64_t panel0, int64_t b0) {
  const KernelWeights& w = *a.w;
  const int64_t chunks = w.positions() / 4, panel_bytes = chunks * PL * 64;
  const int8_t* wp = w.folded.data() + panel0 * panel_bytes;
  const bool indirect = a.row_offsets != nullptr;
  const int64_t segments = indirect ? a.segments : 1, segment_chunks = indirect ? a.segment_len / 4 : chunks;
  const int64_t read_chunks = indirect ? a.segment_read / 4 : chunks;
  const int8_t* row[C];
  for (int c = 0; c < C; ++c) row[c] = a.x + (indirect ? a.row_offsets[b0 + c] : (b0 + c) * a.x_stride);
  __m512i acc[NP][PL][C];
  for (int p = 0; p < NP; ++p)
    for (int l = 0; l < PL; ++l)
      for (int c = 0; c < C; ++c) acc[p][l][c] = _mm512_setzero_si512();
  for (int64_t k = 0; k < segments; ++k) {
    const int64_t offset = indirect ? a.segment_offsets[k] : 0;
    const int8_t* x[C];
    for (int c = 0; c < C; ++c) x[c] = row[c] + offset;
    const int8_t* wk = wp + k * segment_chunks * PL * 64;
    for (int64_t j = 0; j < read_chunks; ++j) {
      __m512i wv[NP][PL];
      for (int p = 0; p < NP; ++p)
        for (int l = 0; l < PL; ++l) wv[p][l] = _mm512_loadu_si512(wk + p * panel_bytes + (j * PL + l) * 64);
      for (int c = 0; c < C; ++c) {
        int32_t four;
        std::memcpy(&four, x[c] + 4 * j, 4);
        const __m512i xv = _mm512_set1_epi32(four);
        for (int p = 0; p < NP; ++p)
          for (int l = 0; l < PL; ++l) acc[p][l][c] = _mm512_dpbusd_epi32(acc[p][l][c], xv, wv[p][l]);
      }
    }
  }
  for (int p = 0; p < NP; ++p) {
    __m512i sums[8];
    for (int c = 0; c < C; ++c)
      sums[c] = PL == 1 ? acc[p][0][c] : _mm512_add_epi32(acc[p][0][c], _mm512_slli_epi32(acc[p][PL - 1][c], 7));
    folded_store(a, 16 * (panel0 + p), b0, sums, C);
  }
}

// `rows` (1..C) activation rows from b0, one block of NP panels.
template <int PL, int NP, int C>
void folded_block_sized(const GemmArgs& a, int64_t panel0, int64_t b0, int64_t rows) {
  if constexpr (C > 1)
    if (rows < C) return folded_block_sized<PL, NP, C - 1>(a, panel0, b0, rows);
  folded_block<PL, NP, C>(a, panel0, b0);
}

// Panels [panel0, panel0 + count) (count <= NP) x all activation rows, in as few blocks as the
// registers allow (24 accumulators at most: 4 weight vectors x 6 rows, else 8 rows), of sizes
// that differ by at most one (no short last block).
template <int PL, int NP>
void folded_panels(const GemmArgs& a, int64_t panel0, int64_t count) {
  if constexpr (NP > 1)
    if (count < NP) return folded_panels<PL, NP - 1>(a, panel0, count);
  constexpr int kMaxRows = NP * PL == 4 ? 6 : 8;
  const int64_t rows = a.b_end - a.b_begin, blocks = (rows + kMaxRows - 1) / kMaxRows;
  for (int64_t i = 0, b = a.b_begin; i < blocks; ++i) {
    const int64_t n = (rows + i) / blocks;
    folded_block_sized<PL, NP, kMaxRows>(a, panel0, b, n);
    b += n;
  }
}

// Panels in groups of 4 / PL: 4 weight vectors a chunk.
template <int PL>
void gemm_folded(const GemmArgs& a) {
  constexpr int kPanels = 4 / PL;
  const int64_t end = (a.m_end + 15) / 16;
  for (int64_t panel = a.m_begin / 16; panel < end; panel += kPanels)
    folded_panels<PL, kPanels>(a, panel, std::min<int64_t>(kPanels, end - panel));
}

template <ScaleType ST>
void gemm_t(const GemmArgs& a) {
  const int64_t q0 = a.m_begin / 4, q1 = (a.m_end + 3) / 4;
  if (a.b_end - a.b_begin < 4) {
    for (int64_t b = a.b_begin; b < a.b_end; ++b) {
      int64_t q = q0;
      for (; q + 4 <= q1; q += 4) block_store<ST, 4, 1>(a, q, b);
      for (; q < q1; ++q) block_store<ST, 1, 1>(a, q, b);
    }
    return;
  }
  int64_t q = q0;
  for (; q + 2 <= q1; q += 2) {
    int64_t b = a.b_begin;
    for (; b + 4 <= a.b_end; b += 4) block_store<ST, 2, 4>(a, q, b);
    for (; b < a.b_end; ++b) block_store<ST, 2, 1>(a, q, b);
  }
  for (; q < q1; ++q) {
    int64_t b = a.b_begin;
    for (; b + 4 <= a.b_end; b += 4) block_store<ST, 1, 4>(a, q, b);
    for (; b < a.b_end; ++b) block_store<ST, 1, 1>(a, q, b);
  }
}

void gemm(const GemmArgs& a) {
  if (a.m_end <= a.m_begin || a.b_end <= a.b_begin) return;
  if (a.natural) {  // the caller checked use_folded
    if (a.w->fold_planes == 1) gemm_folded<1>(a);
    else gemm_folded<2>(a);
    return;
  }
  switch (a.w->scale_type) {
    case ScaleType::kF32: gemm_t<ScaleType::kF32>(a); break;
    case ScaleType::kF16: gemm_t<ScaleType::kF16>(a); break;
    default: gemm_t<ScaleType::kU8>(a); break;
  }
}

void group_dots(const KernelWeights& w, int64_t m, const int8_t* x, const int32_t* gsum, int32_t* out) {
  const __m512i masks = lane_masks(), shifts = lane_shifts();
  const int64_t steps = w.steps(), stride = steps * 16, ri = m % 4;
  const uint8_t* codes = w.quad_codes(m / 4);
  alignas(64) int32_t lanes[16];
  for (int64_t sg = 0; sg < w.super_groups(); ++sg) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t k = 0; k < steps; ++k) {
      const __m512i u = _mm512_and_si512(bcast16(codes + (sg * steps + k) * KernelWeights::kCodeStride), masks);
      acc = _mm512_dpbusd_epi32(acc, u, bcast16(x + sg * stride + 16 * k));
    }
    acc = _mm512_sub_epi32(acc, _mm512_sllv_epi32(bcast16(gsum + 4 * sg), shifts));
    _mm512_store_si512(lanes, acc);
    for (int gq = 0; gq < 4; ++gq) out[4 * sg + gq] = lanes[4 * ri + gq] / (1 << (2 * ri));
  }
}

// quantize_one over a span, 16 floats a step with a masked tail (short spans, e.g. one
// channel of a 7x7 map, spent most of their time in the compiler's scalar remainder loop).
void quantize_span16(const float* src, int64_t count, const ActQuant& q, int8_t* out) {
  const Quantizer quantize16(q);
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 mask = static_cast<__mmask16>(count - i >= 16 ? 0xFFFF : (1u << (count - i)) - 1);
    _mm_mask_storeu_epi8(out + i, mask, _mm512_cvtepi32_epi8(quantize16(_mm512_maskz_loadu_ps(mask, src + i))));
  }
}

// Four channels' 16 levels each (int32, 0..255) -> lane L holds pixels 4L..4L+3, each
// as the four channels' bytes: two unsigned packs, then a 4 x 4 byte transpose per lane.
inline __m512i pack_pixels4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(a, b), _mm512_packus_epi32(c, d));
  const __m512i by_pixel = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  return _mm512_shuffle_epi8(bytes, by_pixel);
}

// Tiles of 16 channels x 16 pixels: quantized per channel, turned pixel-major in registers.
void quantize_transposed_tiles(const float* src, int64_t channels, int64_t pixels, int64_t channel_stride, const ActQuant& q,
                         int8_t* out, int64_t pixel_stride) {
  constexpr int64_t kAhead = 64;  // floats: one stream per channel is more than the hardware prefetcher follows
  const Quantizer quantize16(q);
  for (int64_t c0 = 0; c0 < channels; c0 += 16) {
    const int64_t nc = std::min<int64_t>(16, channels - c0);
    for (int64_t p0 = 0; p0 < pixels; p0 += 16) {
      const int64_t np = std::min<int64_t>(16, pixels - p0);
      const __mmask16 pmask = static_cast<__mmask16>((1u << np) - 1);
      __m512i z[4];  // z[g] dword (lane L, i): pixel 4L + i, channels 4g..4g+3
      for (int g = 0; g < 4; ++g) {
        __m512i lv[4];
        for (int j = 0; j < 4; ++j) {
          const int64_t c = 4 * g + j;
          if (c >= nc) {
            lv[j] = _mm512_setzero_si512();
            continue;
          }
          const float* at = src + (c0 + c) * channel_stride + p0;
          if (p0 + kAhead < pixels) _mm_prefetch(reinterpret_cast<const char*>(at + kAhead), _MM_HINT_T0);
          lv[j] = quantize16(_mm512_maskz_loadu_ps(pmask, at));
        }
        z[g] = pack_pixels4(lv[0], lv[1], lv[2], lv[3]);
      }
      // 4 x 4 dword transpose per lane: w[i] lane L = pixel 4L + i, channels 0..15
      const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
      const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
      const __m512i w[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                            _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
      const __mmask16 cmask = static_cast<__mmask16>((1u << nc) - 1);
      int8_t* at = out + p0 * pixel_stride + c0;
      for (int i = 0; i < 4; ++i) {
        const __m128i lanes[4] = {_mm512_castsi512_si128(w[i]), _mm512_extracti32x4_epi32(w[i], 1),
                                  _mm512_extracti32x4_epi32(w[i], 2), _mm512_extracti32x4_epi32(w[i], 3)};
        for (int L = 0; L < 4; ++L)
          if (4 * L + i < np) _mm_mask_storeu_epi8(at + (4 * L + i) * pixel_stride, cmask, lanes[L]);
      }
    }
  }
}

}  // namespace

const KernelDispatch kAvx512VnniDispatch = {"avx512vnni",        group_dots,          gemm, quantize_span16,
                                            to_kernel_order_impl, quantize_transposed_tiles, kFoldedPlanes,
                                            depthwise_avx512,
                                            true};

}  // namespace fgq
