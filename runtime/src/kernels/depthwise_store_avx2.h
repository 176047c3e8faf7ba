// The AVX2 store of the direct convolution kernel, shared by depthwise_avx2.cpp and
// depthwise_avxvnni.cpp: each includes this inside its own anonymous namespace, compiled with
// its own flags (both have AVX2), like folded_store_avx2.h.

// The store of output channel m: bias, residual, clamp. Set up once a channel (a kernel that
// stores row after row keeps it in registers: read from DepthwiseArgs at each store, the values
// were reloaded after every float store, which may alias them). A vector short of 8 pixels goes
// through a buffer (no masked moves: they are microcoded on some CPUs).
struct ChannelStore {
  float* y;
  const float* residual;
  int64_t out_w;
  bool has_bias;
  __m256 bias, lo, hi;
  ChannelStore(const DepthwiseArgs& a, int64_t m)
      : y(a.y + m * a.out_h * a.out_w), residual(a.residual ? a.residual + m * a.out_h * a.out_w : nullptr),
        out_w(a.out_w), has_bias(a.bias != nullptr), bias(_mm256_set1_ps(a.bias ? a.bias[m] : 0.f)),
        lo(_mm256_set1_ps(a.lo)), hi(_mm256_set1_ps(a.hi)) {}
  // Output row oh, `count` pixels (at most 8) from column ow.
  [[gnu::always_inline]] void row8(int64_t oh, int64_t ow, int64_t count, __m256 v) const {
    constexpr int64_t kWidth = 8;
    const int64_t at = oh * out_w + ow;
    const size_t bytes = static_cast<size_t>(count) * sizeof(float);
    alignas(32) float buffer[kWidth] = {};
    if (has_bias) v = _mm256_add_ps(v, bias);
    if (residual) {
      const float* r = count < kWidth ? static_cast<const float*>(std::memcpy(buffer, residual + at, bytes)) : residual + at;
      v = _mm256_add_ps(v, _mm256_loadu_ps(r));
    }
    // max and min return their second operand on NaN and equal zeros: the reference's comparisons exactly
    v = _mm256_min_ps(hi, _mm256_max_ps(lo, v));
    if (count == kWidth) {
      _mm256_storeu_ps(y + at, v);
      return;
    }
    _mm256_store_ps(buffer, v);
    std::memcpy(y + at, buffer, bytes);
  }
};

// Output row oh of channel m, `count` pixels (at most 8) from column ow, for kernels that store
// one vector at a time.
[[gnu::always_inline]] inline void store_row8(const DepthwiseArgs& a, int64_t m, int64_t oh, int64_t ow, int64_t count,
                                              __m256 y) {
  ChannelStore(a, m).row8(oh, ow, count, y);
}
