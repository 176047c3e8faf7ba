// Activation helpers shared by the kernel files. Each instruction-set file
// includes this inside its own anonymous namespace, so the compiler
// vectorizes the same loops with that file's flags (no ODR clash).
// The loops are written without branches so that they vectorize.

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

inline void to_kernel_order_impl(const int8_t* __restrict natural, int64_t np, int64_t padded_groups,
                                 int8_t* __restrict out, int32_t* __restrict gsum) {
  const int64_t steps = np / 4;
  for (int64_t g = 0; g < padded_groups; ++g) {
    const int8_t* src = natural + g * np;
    int32_t sum = 0;
    for (int64_t i = 0; i < np; ++i) sum += src[i];
    gsum[g] = sum;
    int8_t* dst = out + (g / 4) * np * 4 + (g % 4) * 4;
    for (int64_t k = 0; k < steps; ++k) {
      uint32_t word;
      std::memcpy(&word, src + 4 * k, 4);
      std::memcpy(dst + k * 16, &word, 4);
    }
  }
}
