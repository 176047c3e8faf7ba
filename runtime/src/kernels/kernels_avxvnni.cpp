// AVX-VNNI kernels (256-bit VEX vpdpbusd, as on Alder Lake and later client CPUs without
// AVX-512; compiled with -mavx2 -mfma -mf16c -mavxvnni for this file only, reached only through
// the dispatch table when CPUID/XGETBV report support).
//
// Only the folded form differs from the AVX2 path: the folded int8 GEMM of
// kernels_avx512vnni.cpp at 256 bits. A panel's 16 rows are two halves of 8 (one 32-byte
// line a half per chunk and plane: row i's four int8 weights in dword i), each natural
// unsigned activation row's four bytes are broadcast, and vpdpbusd (u8 x s8, four products a
// dword summed in exact int32) replaces AVX2's vpmaddubsw on the ternary copy and vpmaddwd by the scales. The direct
// convolution is depthwise_avxvnni.cpp; the rest (the kernel-order path for fewer than 4 rows,
// quantization, reordering) is the AVX2 path's, taken from its table.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "fgq/depthwise.h"
#include "fgq/kernels.h"

namespace fgq {
namespace {

#include "folded_store_avx2.h"

// Halves [0, H) (H = 1: rows 0-7 only, when the rest lie past m_end) of one panel x C natural
// unsigned activation rows (contiguous, or in segments: GemmArgs::row_offsets): exact int32 sums
// per row, w = plane0 + 128 * plane1, fold_bias = 128 * sum(w) subtracted.
template <int P, int H, int C>
void folded_block(const GemmArgs& a, int64_t panel, int64_t b0, const PanelStore& out) {
  const KernelWeights& w = *a.w;
  const int64_t chunks = w.positions() / 4;
  const int8_t* wp = w.folded.data() + panel * chunks * P * 64;
  const bool indirect = a.row_offsets != nullptr;
  const int64_t segments = indirect ? a.segments : 1, segment_chunks = indirect ? a.segment_len / 4 : chunks;
  const int64_t read_chunks = indirect ? a.segment_read / 4 : chunks;
  const int8_t* row[C];
  for (int c = 0; c < C; ++c) row[c] = a.x + (indirect ? a.row_offsets[b0 + c] : (b0 + c) * a.x_stride);
  __m256i acc[P][H][C];
  for (int p = 0; p < P; ++p)
    for (int h = 0; h < H; ++h)
      for (int c = 0; c < C; ++c) acc[p][h][c] = _mm256_setzero_si256();
  for (int64_t k = 0; k < segments; ++k) {
    const int64_t offset = indirect ? a.segment_offsets[k] : 0;
    const int8_t* x[C];
    for (int c = 0; c < C; ++c) x[c] = row[c] + offset;
    const int8_t* wk = wp + k * segment_chunks * P * 64;
    for (int64_t j = 0; j < read_chunks; ++j) {
      __m256i xv[C];
      for (int c = 0; c < C; ++c) {
        int32_t four;
        std::memcpy(&four, x[c] + 4 * j, 4);
        xv[c] = _mm256_set1_epi32(four);
      }
      for (int p = 0; p < P; ++p)
        for (int h = 0; h < H; ++h) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + (j * P + p) * 64 + 32 * h));
          for (int c = 0; c < C; ++c) acc[p][h][c] = _mm256_dpbusd_avx_epi32(acc[p][h][c], xv[c], wv);
        }
    }
  }
  const int64_t m0 = 16 * panel;
  __m256i sums[2][C] = {};  // with H = 1 the second half is past m_end: not stored
  for (int h = 0; h < H; ++h) {
    const __m256i bias = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.fold_bias.data() + m0 + 8 * h));
    for (int c = 0; c < C; ++c) {
      __m256i total = acc[0][h][c];
      if (P == 2) total = _mm256_add_epi32(total, _mm256_slli_epi32(acc[P - 1][h][c], 7));
      sums[h][c] = _mm256_sub_epi32(total, bias);
    }
  }
  out.store<C>(b0, sums);
}

// Columns a block: 2 * H * P * C accumulators and C broadcasts stay in the 16 registers.
template <int P, int H>
void folded_panel(const GemmArgs& a, int64_t panel) {
  constexpr int kColumns = P * H == 4 ? 2 : 4;
  const PanelStore out(a, 16 * panel);
  int64_t b = a.b_begin;
  for (; b + kColumns <= a.b_end; b += kColumns) folded_block<P, H, kColumns>(a, panel, b, out);
  for (; b < a.b_end; ++b) folded_block<P, H, 1>(a, panel, b, out);
}

template <int P>
void gemm_folded(const GemmArgs& a) {
  for (int64_t panel = a.m_begin / 16; panel < (a.m_end + 15) / 16; ++panel) {
    if (16 * panel + 8 >= a.m_end) folded_panel<P, 1>(a, panel);  // e.g. M = 24: rows 16-23
    else folded_panel<P, 2>(a, panel);
  }
}

void gemm(const GemmArgs& a) {
  if (!a.natural) {  // kernel-order rows: the AVX2 path
    kAvx2Dispatch.gemm(a);
    return;
  }
  if (a.m_end <= a.m_begin || a.b_end <= a.b_begin) return;
  if (a.w->fold_planes == 1) gemm_folded<1>(a);  // the caller checked use_folded
  else gemm_folded<2>(a);
}

}  // namespace

// The AVX2 table's entries are constant-initialized, so reading them here is safe at start-up.
const KernelDispatch kAvxVnniDispatch = {"avxvnni",
                                         kAvx2Dispatch.group_dots,
                                         gemm,
                                         kAvx2Dispatch.quantize,
                                         kAvx2Dispatch.kernel_order,
                                         kAvx2Dispatch.quantize_transposed,
                                         kFoldedPlanes,
                                         depthwise_avxvnni,
                                         true};

}  // namespace fgq
