// The AVX2 store of the direct convolution kernel, shared by depthwise_avx2.cpp and
// depthwise_avxvnni.cpp: each includes this inside its own anonymous namespace, compiled with
// its own flags (both have AVX2), like folded_store_avx2.h.

// Output row oh of channel m, `count` pixels (at most 8) from column ow: bias, residual, clamp,
// store. A vector short of 8 pixels goes through a buffer (no masked moves: they are
// microcoded on some CPUs).
[[gnu::always_inline]] inline void store_row8(const DepthwiseArgs& a, int64_t m, int64_t oh, int64_t ow, int64_t count,
                                              __m256 y) {
  constexpr int64_t kWidth = 8;
  const int64_t at = (m * a.out_h + oh) * a.out_w + ow;
  const size_t bytes = static_cast<size_t>(count) * sizeof(float);
  alignas(32) float buffer[kWidth] = {};
  if (a.bias) y = _mm256_add_ps(y, _mm256_set1_ps(a.bias[m]));
  if (a.residual) {
    const float* r = count < kWidth ? static_cast<const float*>(std::memcpy(buffer, a.residual + at, bytes)) : a.residual + at;
    y = _mm256_add_ps(y, _mm256_loadu_ps(r));
  }
  // max and min return their second operand on NaN and equal zeros: the reference's comparisons exactly
  y = _mm256_min_ps(_mm256_set1_ps(a.hi), _mm256_max_ps(_mm256_set1_ps(a.lo), y));
  if (count == kWidth) {
    _mm256_storeu_ps(a.y + at, y);
    return;
  }
  _mm256_store_ps(buffer, y);
  std::memcpy(a.y + at, buffer, bytes);
}
