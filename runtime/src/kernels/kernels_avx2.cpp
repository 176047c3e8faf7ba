// AVX2 kernels (compiled with -mavx2 -mfma -mf16c for this file only; reached
// only through the dispatch table when CPUID/XGETBV report support).
//
// Same layout and arithmetic as kernels_avx512vnni.cpp, in two 256-bit halves
// (rows 0-1 and rows 2-3 of a quad): the 16 code bytes broadcast to both
// 128-bit lanes and masked with (0x03, 0x0c) or (0x30, 0xc0) give u << 2i;
// vpmaddubsw (u8 x s8: a pair lies in [-2 * 128 * 128, 2 * 128 * 127], no
// saturation) and vpmaddwd with ones replace vpdpbusd.
// The folded form (natural unsigned rows) has no such bound: it runs from the folded
// weights' ternary copy (half_sums, chunk_group_block), dense int8 weights from their
// int8 plane widened to int16 (dense_half_sums).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "fgq/depthwise.h"
#include "fgq/kernels.h"

namespace fgq {
namespace {

#include "activation_impl.h"
#include "folded_store_avx2.h"

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
    if (C == 1)  // one activation row streams the weights: keep DRAM's latency covered (see kernels_avx2_gemv.cpp)
      for (int q = 0; q < Q; ++q)
        _mm_prefetch(reinterpret_cast<const char*>(scales[q] + sg * sstride + 1024), _MM_HINT_T0);
    for (int64_t s = 0; s < steps; ++s) {
      __m256i xb[C];
      for (int c = 0; c < C; ++c) xb[c] = bcast16(x[c] + base + 16 * s);
      if (C == 1)
        _mm_prefetch(reinterpret_cast<const char*>(codes[0] + (sg * steps + s) * KernelWeights::kCodeStride + 4096),
                     _MM_HINT_T0);
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

// The folded form from its ternary copy (KernelWeights::ternary), at every N. vpmaddubsw
// on the folded weights would saturate (2 * 255 * 127 > 32767); on t it gives int16 pair sums
// of at most 2 * 255 = 510. A group's pair sums are added in int16 over up to 64 chunks
// (64 * 510 < 32768: exact), then one vpmaddwd against the group's scale lanes gives each
// row's s * (sum over the group) in int32 lanes in row order. Per 4-position chunk and 8 rows:
// vpmaddubsw + vpaddw, and per group vpmaddwd + vpaddd: at N = 16, 9 ops per 128 products
// where int8 (vpmaddubsw, vpmaddwd with ones, vpaddd) takes 12. Against the folded int8 weights
// widened to int16 for vpmaddwd (the form this replaced; exact, but a multiply per 16 products
// plus the widening), measured on AMD EPYC (1 thread, 1024 x 1024 x 64) 1.2x at N = 16, 1.4x at
// N = 64, equal at N = 8; N <= 4 (chunk_group_block): ResNet-50 conv shapes at batch 1 1.4-2x.
constexpr int64_t kPairSumChunks = 64;

// The C natural unsigned activation rows of a block from column b0: contiguous, or in segments
// read in place (GemmArgs::row_offsets), segment_chunks chunks of the weights each, of which the
// first read_chunks are read.
template <int C>
struct NaturalRows {
  const GemmArgs& a;
  int64_t segments, segment_chunks, read_chunks;
  const int8_t* row[C];
  NaturalRows(const GemmArgs& args, int64_t b0, int64_t chunks) : a(args) {
    const bool indirect = a.row_offsets != nullptr;
    segments = indirect ? a.segments : 1;
    segment_chunks = indirect ? a.segment_len / 4 : chunks;
    read_chunks = indirect ? a.segment_read / 4 : chunks;
    for (int c = 0; c < C; ++c) row[c] = a.x + (indirect ? a.row_offsets[b0 + c] : (b0 + c) * a.x_stride);
  }
  // x[c]: column c's first byte of segment k.
  void segment(int64_t k, const int8_t* x[C]) const {
    for (int c = 0; c < C; ++c) x[c] = row[c] + (a.row_offsets ? a.segment_offsets[k] : 0);
  }
};

// Four activation bytes broadcast to every 32-bit lane.
inline __m256i broadcast4(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  return _mm256_set1_epi32(four);
}

// Half h (rows 8h..8h + 7) of a panel x C natural unsigned activation rows (contiguous, or in
// segments: GemmArgs::row_offsets): sums[c] lane i = row 8h + i's exact int32 dot product with
// column b0 + c, fold_bias = 128 * sum(t * s) subtracted. (One half at a time: 4 columns then
// fit the 16 registers, and each weight byte loaded serves 4 columns.)
template <int C>
void half_sums(const GemmArgs& a, int64_t panel, int h, int64_t b0, __m256i sums[C]) {
  const KernelWeights& w = *a.w;
  const int64_t chunks = w.positions() / 4, group_chunks = w.np / 4;
  const int8_t* tp = w.ternary.data() + panel * chunks * 64 + 32 * h;
  const int16_t* sp = w.group_scales.data() + panel * w.padded_groups * 32 + 16 * h;
  const NaturalRows<C> rows(a, b0, chunks);
  const int64_t read_chunks = rows.read_chunks;
  __m256i acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_si256();
  for (int64_t k = 0; k < rows.segments; ++k) {
    const int64_t first = k * rows.segment_chunks;  // the segment's first chunk in the weights
    const int8_t* x[C];
    rows.segment(k, x);
    // (x[c] + 4j) broadcast to every row's lanes, times row i's t at chunk first + j
    const auto pair_sums = [&](int64_t j, int c) {
      return _mm256_maddubs_epi16(broadcast4(x[c] + 4 * j),
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tp + (first + j) * 64)));
    };
    int64_t g = first / group_chunks, group_end = (g + 1) * group_chunks - first;  // chunks, in the segment
    for (int64_t j = 0; j < read_chunks;) {  // one run: chunks of group g, at most kPairSumChunks
      const int64_t end = std::min({group_end, read_chunks, j + kPairSumChunks});
      __m256i pairs[C];
      for (int c = 0; c < C; ++c) pairs[c] = pair_sums(j, c);
#pragma GCC unroll 4  // N = 64: 7% faster, N = 16: equal (measured)
      for (++j; j < end; ++j)
        for (int c = 0; c < C; ++c) pairs[c] = _mm256_add_epi16(pairs[c], pair_sums(j, c));
      const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + g * 32));
      for (int c = 0; c < C; ++c) acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(pairs[c], s));
      if (j == group_end) {
        ++g;
        group_end += group_chunks;
      }
    }
  }
  const __m256i bias = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.fold_bias.data() + 16 * panel + 8 * h));
  for (int c = 0; c < C; ++c) sums[c] = _mm256_sub_epi32(acc[c], bias);
}

// One panel of 16 rows (H = 2 halves; H = 1: only rows 0-7, when the rest lie past m_end).
template <int H, int C>
void ternary_block(const GemmArgs& a, int64_t panel, int64_t b0, const PanelStore& out) {
  __m256i sums[2][C] = {};  // with H = 1 the second half is past m_end: not stored
  for (int h = 0; h < H; ++h) half_sums<C>(a, panel, h, b0, sums[h]);
  out.store<C>(b0, sums);
}

// Groups of one chunk (N <= 4) in the ternary form: a group's pair sums are one vpmaddubsw, so
// each chunk is vpmaddubsw then vpmaddwd against its scale lanes, for both halves at once (each
// activation broadcast serves 16 rows; 8 accumulators, 4 broadcasts, t and s: 14 registers).
// Not inlined: inlined into natural_panel (with its PanelStore), its loop spilled (3x3 64 -> 64
// at 56x56 1.25x slower).
template <int H, int C>
[[gnu::noinline]] void chunk_group_block(const GemmArgs& a, int64_t panel, int64_t b0, const PanelStore& out) {
  const KernelWeights& w = *a.w;
  const int64_t chunks = w.positions() / 4;
  const int8_t* tp = w.ternary.data() + panel * chunks * 64;
  const int16_t* sp = w.group_scales.data() + panel * w.padded_groups * 32;
  const NaturalRows<C> rows(a, b0, chunks);
  __m256i acc[2][C];
  for (int h = 0; h < 2; ++h)
    for (int c = 0; c < C; ++c) acc[h][c] = _mm256_setzero_si256();
  for (int64_t k = 0; k < rows.segments; ++k) {
    const int8_t* x[C];
    rows.segment(k, x);
    const int8_t* tk = tp + k * rows.segment_chunks * 64;
    const int16_t* sk = sp + k * rows.segment_chunks * 32;
    for (int64_t j = 0; j < rows.read_chunks; ++j) {
      __m256i xb[C];
      for (int c = 0; c < C; ++c) xb[c] = broadcast4(x[c] + 4 * j);
      for (int h = 0; h < H; ++h) {
        const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tk + j * 64 + 32 * h));
        const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sk + j * 32 + 16 * h));
        for (int c = 0; c < C; ++c) acc[h][c] = _mm256_add_epi32(acc[h][c], _mm256_madd_epi16(_mm256_maddubs_epi16(xb[c], t), s));
      }
    }
  }
  __m256i sums[2][C] = {};  // with H = 1 the second half is past m_end: not stored
  for (int h = 0; h < H; ++h) {
    const __m256i bias = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.fold_bias.data() + 16 * panel + 8 * h));
    for (int c = 0; c < C; ++c) sums[h][c] = _mm256_sub_epi32(acc[h][c], bias);
  }
  out.store<C>(b0, sums);
}

// Dense int8 weights (KernelWeights::dense, the folded plane): vpmaddubsw on them would saturate
// (2 * 255 * 127 > 32767), so each chunk's weights are widened to int16 (vpmovsxbw of four rows:
// a row's positions 0-1 and 2-3 in two dwords) and met in vpmaddwd by the column's four bytes
// widened likewise: 16 exact products a multiply (N = 4's rate), each row's two dwords added once
// at the end. Half h (rows 8h..8h + 7) of a panel x C columns, as half_sums: 4 columns fit the
// registers, and the store takes them in its fast transposed form.
template <int C>
void dense_half_sums(const GemmArgs& a, int64_t panel, int h, int64_t b0, __m256i sums[C]) {
  const KernelWeights& w = *a.w;
  const int64_t chunks = w.positions() / 4;
  const int8_t* wp = w.folded.data() + panel * chunks * 64 + 32 * h;
  const NaturalRows<C> rows(a, b0, chunks);
  const __m256i zero = _mm256_setzero_si256();
  __m256i acc[2][C];  // rows 0-3 and 4-7 of the half: dwords 2i, 2i + 1 are row i's positions 0-1 and 2-3
  for (int q = 0; q < 2; ++q)
    for (int c = 0; c < C; ++c) acc[q][c] = zero;
  for (int64_t k = 0; k < rows.segments; ++k) {
    const int8_t* x[C];
    rows.segment(k, x);
    const int8_t* wk = wp + k * rows.segment_chunks * 64;
    for (int64_t j = 0; j < rows.read_chunks; ++j) {
      __m256i xv[C];  // int16 x0..x3 twice a lane
      for (int c = 0; c < C; ++c) xv[c] = _mm256_unpacklo_epi8(broadcast4(x[c] + 4 * j), zero);
      for (int q = 0; q < 2; ++q) {
        const __m256i wq = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wk + j * 64 + 16 * q)));
        for (int c = 0; c < C; ++c) acc[q][c] = _mm256_add_epi32(acc[q][c], _mm256_madd_epi16(wq, xv[c]));
      }
    }
  }
  const __m256i bias = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.fold_bias.data() + 16 * panel + 8 * h));
  for (int c = 0; c < C; ++c) {  // hadd: rows 0, 1, 4, 5 | 2, 3, 6, 7; the permute puts them in order
    const __m256i row_sums = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[0][c], acc[1][c]), 0xD8);
    sums[c] = _mm256_sub_epi32(row_sums, bias);
  }
}

// One panel of 16 rows (H = 2 halves; H = 1: only rows 0-7, when the rest lie past m_end).
template <int H, int C>
void dense_block(const GemmArgs& a, int64_t panel, int64_t b0, const PanelStore& out) {
  __m256i sums[2][C] = {};  // with H = 1 the second half is past m_end: not stored
  for (int h = 0; h < H; ++h) dense_half_sums<C>(a, panel, h, b0, sums[h]);
  out.store<C>(b0, sums);
}

// One panel x all columns from natural rows: dense weights, or the ternary copy.
template <int H>
void natural_panel(const GemmArgs& a, int64_t panel) {
  constexpr int kColumns = 4;
  const PanelStore out(a, 16 * panel);
  int64_t b = a.b_begin;
  if (a.w->dense) {
    for (; b + kColumns <= a.b_end; b += kColumns) dense_block<H, kColumns>(a, panel, b, out);
    for (; b < a.b_end; ++b) dense_block<H, 1>(a, panel, b, out);
    return;
  }
  const bool one_chunk_groups = a.w->np == 4;
  for (; b + kColumns <= a.b_end; b += kColumns)
    one_chunk_groups ? chunk_group_block<H, kColumns>(a, panel, b, out) : ternary_block<H, kColumns>(a, panel, b, out);
  for (; b < a.b_end; ++b)
    one_chunk_groups ? chunk_group_block<H, 1>(a, panel, b, out) : ternary_block<H, 1>(a, panel, b, out);
}

void gemm_natural(const GemmArgs& a) {
  for (int64_t panel = a.m_begin / 16; panel < (a.m_end + 15) / 16; ++panel) {
    if (16 * panel + 8 >= a.m_end) natural_panel<1>(a, panel);  // e.g. M = 24: rows 16-23
    else natural_panel<2>(a, panel);
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
  if (a.natural) {  // the caller checked use_folded
    gemm_natural(a);
    return;
  }
  if (a.b_end - a.b_begin == 1 && a.w->steps() >= kAvx2GemvMinSteps) {  // one row, long groups
    avx2_gemv(a);
    return;
  }
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

// quantize_one over a span, 32 floats a step: four vectors of levels packed to bytes (packs work
// within 128-bit lanes, so a dword permute restores the order); the tail one value at a time.
// The compiler's vectorization of quantize_span_impl took 1.5x the time (Zen 3).
void quantize_span32(const float* src, int64_t count, const ActQuant& q, int8_t* out) {
  const Quantizer quantize8(q);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    const __m256i a = quantize8(_mm256_loadu_ps(src + i)), b = quantize8(_mm256_loadu_ps(src + i + 8));
    const __m256i c = quantize8(_mm256_loadu_ps(src + i + 16)), d = quantize8(_mm256_loadu_ps(src + i + 24));
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permutevar8x32_epi32(bytes, order));
  }
  for (; i < count; ++i) out[i] = quantize_one(src[i], q);
}

// Four channels' 8 levels each (int32, 0..255) -> dword p = pixel p's four channel bytes.
inline __m256i pack_pixels4(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
  const __m256i by_pixel = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9,
                                            13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm256_shuffle_epi8(bytes, by_pixel);
}

// Tiles of 16 channels x 8 pixels: quantized per channel, turned pixel-major in registers
// (the generic version scatters single bytes).
void quantize_transposed_tiles(const float* src, int64_t channels, int64_t pixels, int64_t channel_stride,
                               const ActQuant& q, int8_t* out, int64_t pixel_stride) {
  constexpr int64_t kAhead = 64;  // floats: one stream per channel is more than the hardware prefetcher follows
  const Quantizer quantize8(q);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t c0 = 0; c0 < channels; c0 += 16) {
    const int64_t nc = std::min<int64_t>(16, channels - c0);
    for (int64_t p0 = 0; p0 < pixels; p0 += 8) {
      const int64_t np = std::min<int64_t>(8, pixels - p0);
      const __m256i pmask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(np)), lane);
      __m256i z[4];  // z[g] dword p: pixel p, channels 4g..4g+3
      for (int g = 0; g < 4; ++g) {
        __m256i lv[4];
        for (int j = 0; j < 4; ++j) {
          const int64_t c = 4 * g + j;
          if (c >= nc) {
            lv[j] = _mm256_setzero_si256();
            continue;
          }
          const float* at = src + (c0 + c) * channel_stride + p0;
          if (p0 + kAhead < pixels) _mm_prefetch(reinterpret_cast<const char*>(at + kAhead), _MM_HINT_T0);
          lv[j] = quantize8(np == 8 ? _mm256_loadu_ps(at) : _mm256_maskload_ps(at, pmask));
        }
        z[g] = pack_pixels4(lv[0], lv[1], lv[2], lv[3]);
      }
      // 4 x 4 dword transpose per lane: w[i] = pixel i (low lane) and pixel 4 + i (high lane), channels 0..15
      const __m256i t0 = _mm256_unpacklo_epi32(z[0], z[1]), t1 = _mm256_unpackhi_epi32(z[0], z[1]);
      const __m256i t2 = _mm256_unpacklo_epi32(z[2], z[3]), t3 = _mm256_unpackhi_epi32(z[2], z[3]);
      const __m256i w[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2), _mm256_unpacklo_epi64(t1, t3),
                            _mm256_unpackhi_epi64(t1, t3)};
      for (int64_t p = 0; p < np; ++p) {
        const __m128i bytes = p < 4 ? _mm256_castsi256_si128(w[p]) : _mm256_extracti128_si256(w[p - 4], 1);
        int8_t* at = out + (p0 + p) * pixel_stride + c0;
        if (nc == 16) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(at), bytes);
        } else {
          alignas(16) int8_t tile[16];
          _mm_store_si128(reinterpret_cast<__m128i*>(tile), bytes);
          std::memcpy(at, tile, static_cast<size_t>(nc));
        }
      }
    }
  }
}

}  // namespace

const KernelDispatch kAvx2Dispatch = {"avx2",          group_dots, gemm, quantize_span32, to_kernel_order_impl,
                                      quantize_transposed_tiles, kFoldedTernary, depthwise_avx2, true};

}  // namespace fgq
