// Activation and output helpers shared by the kernel files. Each instruction-set file
// includes this inside its own anonymous namespace, so the compiler
// vectorizes the same loops with that file's flags (no ODR clash).
// The loops are written without branches so that they vectorize; the
// reordering uses SSE2 (every x86-64 CPU), with a plain fallback.

inline void quantize_span_impl(const float* __restrict src, int64_t count, const ActQuant& q, int8_t* __restrict out) {
  const float scale = q.scale;
  const float lo = static_cast<float>(q.qmin - q.zero_point) - 1.f, hi = static_cast<float>(q.qmax - q.zero_point) + 1.f;
  const int zero = q.zero_point, qmin = q.qmin, qmax = q.qmax, shift = q.shift;
  constexpr float kMagic = 12582912.f;  // 1.5 * 2^23: (v + m) - m rounds half to even for |v| < 2^22
  for (int64_t i = 0; i < count; ++i) {
    float v = src[i] / scale;
    v = v != v ? 0.f : v;
    v = v < hi ? v : hi;
    v = v > lo ? v : lo;
    const float r = (v + kMagic) - kMagic;
    int level = static_cast<int>(r) + zero;
    level = level < qmin ? qmin : level;
    level = level > qmax ? qmax : level;
    out[i] = static_cast<int8_t>(level - shift);
  }
}

// NCHW -> NHWC quantization in tiles of 64 pixels: each channel's span quantized
// contiguously (vectorizes), then scattered to its pixels.
inline void quantize_transposed_impl(const float* src, int64_t channels, int64_t pixels, int64_t channel_stride,
                                     const ActQuant& q, int8_t* out, int64_t pixel_stride) {
  constexpr int64_t kTile = 64;
  int8_t levels[kTile];
  for (int64_t p0 = 0; p0 < pixels; p0 += kTile) {
    const int64_t count = pixels - p0 < kTile ? pixels - p0 : kTile;
    for (int64_t c = 0; c < channels; ++c) {
      quantize_span_impl(src + c * channel_stride + p0, count, q, levels);
      for (int64_t p = 0; p < count; ++p) out[(p0 + p) * pixel_stride + c] = levels[p];
    }
  }
}

inline void to_kernel_order_impl(const int8_t* __restrict natural, int64_t np, int64_t padded_groups,
                                 int8_t* __restrict out, int32_t* __restrict gsum) {
  const int64_t steps = np / 4;
  for (int64_t sg = 0; sg < padded_groups / 4; ++sg) {
    const int8_t* src[4];
    for (int gq = 0; gq < 4; ++gq) src[gq] = natural + (4 * sg + gq) * np;
    int8_t* dst = out + sg * np * 4;
    int32_t sums[4] = {0, 0, 0, 0};
    int64_t k = 0;
#if defined(__SSE2__)
    // Four steps at a time: a 4 x 4 transpose of 32-bit words; sums with psadbw on x ^ 0x80.
    const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80)), zero = _mm_setzero_si128();
    __m128i acc[4] = {zero, zero, zero, zero};
    for (; k + 4 <= steps; k += 4) {
      __m128i a[4];
      for (int gq = 0; gq < 4; ++gq) {
        a[gq] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[gq] + 4 * k));
        acc[gq] = _mm_add_epi64(acc[gq], _mm_sad_epu8(_mm_xor_si128(a[gq], flip), zero));
      }
      const __m128i t0 = _mm_unpacklo_epi32(a[0], a[1]), t1 = _mm_unpacklo_epi32(a[2], a[3]);
      const __m128i t2 = _mm_unpackhi_epi32(a[0], a[1]), t3 = _mm_unpackhi_epi32(a[2], a[3]);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (k + 0) * 16), _mm_unpacklo_epi64(t0, t1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (k + 1) * 16), _mm_unpackhi_epi64(t0, t1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (k + 2) * 16), _mm_unpacklo_epi64(t2, t3));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (k + 3) * 16), _mm_unpackhi_epi64(t2, t3));
    }
    for (int gq = 0; gq < 4; ++gq) {
      const int64_t biased = _mm_cvtsi128_si64(acc[gq]) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(acc[gq], acc[gq]));
      sums[gq] = static_cast<int32_t>(biased - 128 * 4 * k);
    }
#endif
    for (; k < steps; ++k)
      for (int gq = 0; gq < 4; ++gq) {
        const int8_t* s = src[gq] + 4 * k;
        sums[gq] += s[0] + s[1] + s[2] + s[3];
        std::memcpy(dst + k * 16 + gq * 4, s, 4);
      }
    for (int gq = 0; gq < 4; ++gq) gsum[4 * sg + gq] = sums[gq];
  }
}

// The epilogue of one quad of rows for batch row b: y[b, m] = scale * (row_scale[m] *
// sums[i] + offset * row_offset[m]) for the rows m = 4 * quad + i inside [m_begin, m_end),
// stored or accumulated.
inline void store_quad_impl(const GemmArgs& a, int64_t quad, int64_t b, const float sums[4]) {
  const KernelWeights& w = *a.w;
  for (int i = 0; i < 4; ++i) {
    const int64_t m = 4 * quad + i;
    if (m < a.m_begin || m >= a.m_end) continue;
    const float v = a.scale * (w.row_scale[static_cast<size_t>(m)] * sums[i] +
                               a.offset * w.row_offset[static_cast<size_t>(m)]);
    float& y = a.y[b * a.y_stride_b + m * a.y_stride_m];
    y = a.accumulate ? y + v : v;
  }
}
