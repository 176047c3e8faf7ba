// A StoreEpilogue's activation and affine map on vectors of 8 floats (AVX2) or 16 (AVX-512), shared by
// the folded stores of kernels_avx2.cpp, kernels_avxvnni.cpp (through folded_store_avx2.h) and
// kernels_avx512vnni.cpp: each includes this inside its own anonymous namespace, compiled with its own
// flags, like activation_impl.h.

inline __m256 vadd(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m256 vmul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 vclamp(__m256 v, float lo, float hi) {
  return _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), v));
}
#if defined(__AVX512F__)
inline __m512 vadd(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
inline __m512 vmul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
inline __m512 vclamp(__m512 v, float lo, float hi) {
  return _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), v));
}
#endif
inline __m256 splat(float x, __m256) { return _mm256_set1_ps(x); }
#if defined(__AVX512F__)
inline __m512 splat(float x, __m512) { return _mm512_set1_ps(x); }
#endif
template <class V>
V splat(float x) {
  return splat(x, V());
}

// A StoreEpilogue's activation and affine map (after the bias and the residual) on 8 or 16 lanes,
// StoreEpilogue::apply operation for operation: max and min return their second operand on NaN and on
// equal zeros, so max(lo, v) is `v < lo ? lo : v` and min(hi, v) is `v > hi ? hi : v` exactly. Held by
// value: the stores would make fields read through a pointer reload.
struct ActivationLanes {
  StoreEpilogue::Kind kind = StoreEpilogue::kClamp;
  bool affine = false;
  float lo = 0.f, hi = 0.f, alpha = 0.f, beta = 0.f, scale = 1.f, shift = 0.f;
  ActivationLanes() = default;
  explicit ActivationLanes(const StoreEpilogue& e)
      : kind(e.kind), affine(e.affine), lo(e.lo), hi(e.hi), alpha(e.alpha), beta(e.beta), scale(e.scale), shift(e.shift) {}
  template <class V>
  V operator()(V v) const {
    if (kind == StoreEpilogue::kClamp) v = vclamp(v, lo, hi);
    else if (kind == StoreEpilogue::kHardSigmoid) v = vclamp(vadd(vmul(splat<V>(alpha), v), splat<V>(beta)), 0.f, 1.f);
    else v = vmul(vmul(v, vclamp(vadd(v, splat<V>(3.f)), 0.f, 6.f)), splat<V>(1.f / 6.f));
    return affine ? vadd(vmul(v, splat<V>(scale)), splat<V>(shift)) : v;
  }
};

