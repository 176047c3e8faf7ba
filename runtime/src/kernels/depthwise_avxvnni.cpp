// AVX-VNNI direct convolution kernel (include/fgq/depthwise.h; compiled with -mavx2 -mfma
// -mavxvnni for this file only, reached through the avxvnni dispatch table): the vpdpbusd
// kernel of depthwise_vnni_impl.h with eight output pixels a vector (256-bit VEX vpdpbusd).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fgq/depthwise.h"

namespace fgq {
namespace {

#include "depthwise_store_avx2.h"

struct Simd {
  using VecI = __m256i;
  using VecF = __m256;
  static constexpr int64_t kLanes = 8;
  static VecI zero_i() { return _mm256_setzero_si256(); }
  static VecF zero_f() { return _mm256_setzero_ps(); }
  static VecI set1(int32_t v) { return _mm256_set1_epi32(v); }
  static VecF set1f(float v) { return _mm256_set1_ps(v); }
  static VecI sub(VecI a, VecI b) { return _mm256_sub_epi32(a, b); }
  static VecI bit_xor(VecI a, VecI b) { return _mm256_xor_si256(a, b); }
  static VecI dpbusd(VecI acc, VecI u8, VecI s8) { return _mm256_dpbusd_avx_epi32(acc, u8, s8); }
  static VecF to_float(VecI v) { return _mm256_cvtepi32_ps(v); }
  static VecF fmadd(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }

  // Pixel j's tap e lies at byte stride * j + dilation * e of a chunk's source; 128-bit lane L
  // (pixels 4L..4L+3) takes its 16 bytes from dword stride * L (depthwise_supports: they fit in
  // the 32 bytes loaded, 4 * stride + 16 <= 32).
  struct ChunkShuffle {
    __m256i dwords, taps;
    ChunkShuffle(int64_t stride, int64_t dilation) {
      const int s = static_cast<int>(stride), d = static_cast<int>(dilation);
      alignas(16) int8_t b[16];
      for (int j = 0; j < 4; ++j)
        for (int e = 0; e < 4; ++e) b[4 * j + e] = static_cast<int8_t>(s * j + d * e);
      dwords = _mm256_setr_epi32(0, 1, 2, 3, s, s + 1, s + 2, s + 3);
      taps = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
    }
    // Lane j: the four tap bytes of pixel j, for the chunk whose pixel-0 window starts at src.
    __m256i operator()(const uint8_t* src) const {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      return _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(x, dwords), taps);
    }
  };

  // Output row oh of channel m, `count` pixels from column ow: bias, residual, clamp, store.
  [[gnu::always_inline]] static void store(const DepthwiseArgs& a, int64_t m, int64_t oh, int64_t ow, int64_t count,
                                           VecF y) {
    store_row8(a, m, oh, ow, count, y);
  }
};

#include "depthwise_vnni_impl.h"

}  // namespace

void depthwise_avxvnni(const DepthwiseArgs& a) { depthwise_vnni(a); }

}  // namespace fgq
