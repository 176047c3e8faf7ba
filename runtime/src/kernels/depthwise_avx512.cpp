// AVX-512 VNNI direct convolution kernel (include/fgq/depthwise.h; compiled with the AVX-512
// flags for this file only, reached through the avx512vnni dispatch table): the vpdpbusd
// kernel of depthwise_vnni_impl.h with sixteen output pixels a vector.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fgq/depthwise.h"

namespace fgq {
namespace {

struct Simd {
  using VecI = __m512i;
  using VecF = __m512;
  static constexpr int64_t kLanes = 16;
  static VecI zero_i() { return _mm512_setzero_si512(); }
  static VecF zero_f() { return _mm512_setzero_ps(); }
  static VecI set1(int32_t v) { return _mm512_set1_epi32(v); }
  static VecF set1f(float v) { return _mm512_set1_ps(v); }
  static VecI sub(VecI a, VecI b) { return _mm512_sub_epi32(a, b); }
  static VecI bit_xor(VecI a, VecI b) { return _mm512_xor_si512(a, b); }
  static VecI dpbusd(VecI acc, VecI u8, VecI s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }
  static VecF to_float(VecI v) { return _mm512_cvtepi32_ps(v); }
  static VecF fmadd(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }

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

  // Output row oh of channel m, `count` pixels from column ow: bias, residual, clamp, masked store.
  [[gnu::always_inline]] static void store(const DepthwiseArgs& a, int64_t m, int64_t oh, int64_t ow, int64_t count,
                                           VecF y) {
    const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
    const int64_t at = (m * a.out_h + oh) * a.out_w + ow;
    if (a.bias) y = _mm512_add_ps(y, _mm512_set1_ps(a.bias[m]));
    if (a.residual) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, a.residual + at));
    // max and min return their second operand on NaN and equal zeros: the reference's comparisons exactly
    y = _mm512_min_ps(_mm512_set1_ps(a.hi), _mm512_max_ps(_mm512_set1_ps(a.lo), y));
    _mm512_mask_storeu_ps(a.y + at, mask, y);
  }
};

#include "depthwise_vnni_impl.h"

}  // namespace

void depthwise_avx512(const DepthwiseArgs& a) { depthwise_vnni(a); }

}  // namespace fgq
