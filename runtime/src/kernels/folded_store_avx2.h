// The AVX2 epilogue of the folded form, shared by kernels_avx2.cpp and kernels_avxvnni.cpp:
// each includes this inside its own anonymous namespace, compiled with its own flags (both
// have AVX2), like activation_impl.h.

#include "activation_lanes.h"

// quantize_one on 8 floats: the levels' low bytes as int32 (0..255). The float clamp is to the
// integer bounds themselves, so the rounded level needs no second clamp.
struct Quantizer {
  __m256 scale, hi, lo;
  __m256i offset;
  explicit Quantizer(const ActQuant& q)
      : scale(_mm256_set1_ps(q.scale)),
        hi(_mm256_set1_ps(static_cast<float>(q.qmax - q.zero_point))),
        lo(_mm256_set1_ps(static_cast<float>(q.qmin - q.zero_point))),
        offset(_mm256_set1_epi32(q.zero_point - q.shift)) {}
  __m256i operator()(__m256 x) const {
    __m256 v = _mm256_div_ps(x, scale);
    v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));  // NaN -> 0
    v = _mm256_max_ps(_mm256_min_ps(v, hi), lo);
    const __m256i level = _mm256_cvtps_epi32(v);  // round half to even (the default rounding mode)
    return _mm256_and_si256(_mm256_add_epi32(level, offset), _mm256_set1_epi32(0xFF));
  }
};

// A StoreEpilogue's 8-bit levels on the rows [first, last) of 8 (a [B, M] output's column): the residual's
// levels dequantized, the output quantized into its level bytes. Bytes outside the rows are neither read
// nor written.
struct LevelsLanes {
  const int8_t* residual;
  bool residual_signed;
  __m256i residual_zero;
  __m256 residual_scale;
  int8_t* out;
  Quantizer quantize;
  explicit LevelsLanes(const StoreEpilogue& e)
      : residual(e.residual_levels), residual_signed(e.residual_signed), residual_zero(_mm256_set1_epi32(e.residual_zero)),
        residual_scale(_mm256_set1_ps(e.residual_scale)), out(e.out_levels), quantize(e.out_quant) {}
  __m256 residual_at(int64_t at, int64_t first, int64_t last) const {
    __m128i b;
    if (first == 0 && last == 8) {
      b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(residual + at));
    } else {
      uint8_t bytes[8] = {};
      std::memcpy(bytes + first, residual + at + first, static_cast<size_t>(last - first));
      b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
    }
    const __m256i level = residual_signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(level, residual_zero)), residual_scale);
  }
  void store(int64_t at, int64_t first, int64_t last, __m256 v) const {
    const __m256i words = _mm256_packus_epi32(quantize(v), _mm256_setzero_si256());  // levels 0-3 | 4-7, 16 bits
    const __m256i bytes = _mm256_packus_epi16(words, _mm256_setzero_si256());
    const __m128i levels =
        _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1)));
    if (first == 0 && last == 8) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + at), levels);
      return;
    }
    uint8_t lanes[8];
    _mm_storel_epi64(reinterpret_cast<__m128i*>(lanes), levels);
    std::memcpy(out + at + first, lanes + first, static_cast<size_t>(last - first));
  }
};

// The StoreEpilogue in registers (ActivationLanes: the scalar functions of kernels.h operation for
// operation). The bias and residual pointers are copied out: the stores (may_alias types) would make the
// compiler reload them after each.
struct EpilogueLanes {
  const StoreEpilogue* e;
  const float* bias;
  const float* residual;
  ActivationLanes act;
  bool levels;
  LevelsLanes level_lanes;
  explicit EpilogueLanes(const StoreEpilogue* epilogue)
      : e(epilogue), bias(e ? e->bias : nullptr), residual(e ? e->residual : nullptr),
        act(e ? ActivationLanes(*e) : ActivationLanes()), levels(e && e->has_levels()),
        level_lanes(e ? *e : StoreEpilogue()) {}
  // The activation, then the affine map (after the bias).
  __m256 finish(__m256 v) const { return act(v); }
};

// The epilogue of one panel's folded blocks (16 rows from m0; rows outside [m_begin, m_end) are
// not written), set up once a panel: per half, its rows' scales, offset term and bias are kept in
// registers (set up per block, they cost about as much as the stores of a short row's block).
// store<C>(b0, sums): sums[h][c] lane i is row m0 + 8h + i, column b0 + c. GemmArgs::epilogue is
// applied in registers when storing all 8 rows of a half without accumulating, else to the
// stored values.
class PanelStore {
 public:
  PanelStore(const GemmArgs& args, int64_t panel_m0) : a_(args), m0_(panel_m0), e_(args.epilogue) {
    const int64_t lo = std::max<int64_t>(a_.m_begin - m0_, 0), hi = std::min<int64_t>(a_.m_end - m0_, 16);
    const __m256 offset = _mm256_set1_ps(a_.offset);
    scale_ = _mm256_set1_ps(a_.scale);
    for (int h = 0; h < 2; ++h) {
      Half& half = half_[h];
      half.first = std::max<int64_t>(lo - 8 * h, 0);
      half.last = std::min<int64_t>(hi - 8 * h, 8);
      if (half.first >= half.last) continue;
      const int64_t m = m0_ + 8 * h;
      half.row_scale = _mm256_loadu_ps(a_.w->row_scale.data() + m);
      half.offset_term = _mm256_mul_ps(offset, _mm256_loadu_ps(a_.w->row_offset.data() + m));
      half.all_rows = half.first == 0 && half.last == 8;
      // Only where all 8 rows exist: bias has M elements.
      half.bias = e_.bias && half.all_rows ? _mm256_loadu_ps(e_.bias + m) : _mm256_setzero_ps();
    }
  }

  template <int C>
  void store(int64_t b0, const __m256i (*sums)[C]) const {
    const bool by_rows = a_.y_stride_m == 1;  // [B, M]
    for (int h = 0; h < 2; ++h) {
      const Half& half = half_[h];
      if (half.first >= half.last) continue;
      const int64_t m = m0_ + 8 * h;
      __m256 v[C];
      for (int c = 0; c < C; ++c)
        v[c] = _mm256_mul_ps(scale_, _mm256_fmadd_ps(half.row_scale, _mm256_cvtepi32_ps(sums[h][c]), half.offset_term));
      if (e_.levels) {  // [B, M], not accumulated (levels_in_store)
        store_levels(half, m, b0 * a_.y_stride_b + m, v, C);
        continue;
      }
      float* y = a_.y + b0 * a_.y_stride_b + m * a_.y_stride_m;
      const bool in_registers =
          e_.e && half.all_rows && !a_.accumulate && (by_rows || (C == 4 && a_.y_stride_b == 1));
      if (in_registers && e_.bias)
        for (int c = 0; c < C; ++c) v[c] = _mm256_add_ps(v[c], half.bias);
      // The residual and the activation on every vector before any store: the stores (may_alias
      // types) would make the epilogue's fields reload after each.
      if (in_registers && by_rows)
        for (int c = 0; c < C; ++c) {
          if (e_.residual) {
            const float* r = e_.residual + (y - a_.y) + c * a_.y_stride_b;
            v[c] = _mm256_add_ps(v[c], _mm256_loadu_ps(r));
          }
          v[c] = e_.finish(v[c]);
        }
      if (by_rows && half.all_rows) {  // [B, M], all 8 rows: plain moves (masked ones are slow)
        for (int c = 0; c < C; ++c) {
          float* yc = y + c * a_.y_stride_b;
          _mm256_storeu_ps(yc, a_.accumulate ? _mm256_add_ps(v[c], _mm256_loadu_ps(yc)) : v[c]);
        }
      } else if (by_rows) {  // [B, M]: each column's 8 rows contiguous
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i rows =
            _mm256_and_si256(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(static_cast<int>(half.first) - 1)),
                             _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(half.last)), lane));
        for (int c = 0; c < C; ++c) {
          float* yc = y + c * a_.y_stride_b;
          if (a_.accumulate) v[c] = _mm256_add_ps(v[c], _mm256_maskload_ps(yc, rows));
          _mm256_maskstore_ps(yc, rows, v[c]);
        }
      } else if (C == 4 && a_.y_stride_b == 1) {  // a convolution's [M, pixels]: 4 contiguous columns a row
        const __m256 t0 = _mm256_unpacklo_ps(v[0], v[C > 1 ? 1 : 0]), t1 = _mm256_unpackhi_ps(v[0], v[C > 1 ? 1 : 0]);
        const __m256 t2 = _mm256_unpacklo_ps(v[C > 2 ? 2 : 0], v[C > 3 ? 3 : 0]);
        const __m256 t3 = _mm256_unpackhi_ps(v[C > 2 ? 2 : 0], v[C > 3 ? 3 : 0]);
        // u[i]: rows i (low lane) and 4 + i (high lane), columns 0-3
        __m256 u[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                       _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
        if (half.all_rows && !a_.accumulate) {  // the common case, unrolled
          const int64_t stride = a_.y_stride_m;
          if (in_registers)
            for (int i = 0; i < 4; ++i) {
              if (e_.residual) {  // rows i and i + 4, as u[i]
                const float* r = e_.residual + (y - a_.y) + i * stride;
                u[i] = _mm256_add_ps(u[i], _mm256_loadu2_m128(r + 4 * stride, r));
              }
              u[i] = e_.finish(u[i]);
            }
          for (int i = 0; i < 4; ++i) {
            _mm_storeu_ps(y + i * stride, _mm256_castps256_ps128(u[i]));
            _mm_storeu_ps(y + (i + 4) * stride, _mm256_extractf128_ps(u[i], 1));
          }
          continue;
        }
        for (int64_t i = half.first; i < half.last; ++i) {
          float* yi = y + i * a_.y_stride_m;
          __m128 r = i < 4 ? _mm256_castps256_ps128(u[i]) : _mm256_extractf128_ps(u[i - 4], 1);
          if (a_.accumulate) r = _mm_add_ps(r, _mm_loadu_ps(yi));
          _mm_storeu_ps(yi, r);
        }
      } else if (C == 2 && a_.y_stride_b == 1) {  // 2 contiguous columns a row
        // t[0]: rows 0, 1 | 4, 5; t[1]: rows 2, 3 | 6, 7 (two columns each)
        const __m256 t[2] = {_mm256_unpacklo_ps(v[0], v[C - 1]), _mm256_unpackhi_ps(v[0], v[C - 1])};
        for (int64_t i = half.first; i < half.last; ++i) {
          const __m256 pair = t[(i % 4) / 2];
          __m128 r = i < 4 ? _mm256_castps256_ps128(pair) : _mm256_extractf128_ps(pair, 1);
          if (i % 2) r = _mm_movehl_ps(r, r);
          __m64* yi = reinterpret_cast<__m64*>(y + i * a_.y_stride_m);
          if (a_.accumulate) r = _mm_add_ps(r, _mm_loadl_pi(_mm_setzero_ps(), yi));
          _mm_storel_pi(yi, r);
        }
      } else {
        alignas(32) float lanes[8];
        for (int c = 0; c < C; ++c) {
          _mm256_store_ps(lanes, v[c]);
          for (int64_t i = half.first; i < half.last; ++i) {
            float& yi = y[c * a_.y_stride_b + i * a_.y_stride_m];
            yi = a_.accumulate ? yi + lanes[i] : lanes[i];
          }
        }
      }
      if (e_.e && !in_registers)
        for (int c = 0; c < C; ++c)
          for (int64_t i = half.first; i < half.last; ++i) {
            const int64_t offset = c * a_.y_stride_b + i * a_.y_stride_m;
            y[offset] = e_.e->apply(y[offset], m + i, e_.residual ? e_.residual + (y - a_.y) + offset : nullptr);
          }
    }
  }

 private:
  struct Half;
  // The epilogue with 8-bit levels on the columns of one half (rows m.., output offset `at`): bias, residual
  // (float or levels) and activation on the half's rows, then the floats or their levels stored.
  void store_levels(const Half& half, int64_t m, int64_t at, __m256* v, int columns) const {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i rows = _mm256_and_si256(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(static_cast<int>(half.first) - 1)),
                                          _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(half.last)), lane));
    const __m256 bias = e_.bias ? _mm256_maskload_ps(e_.bias + m, rows) : _mm256_setzero_ps();
    const LevelsLanes& levels = e_.level_lanes;
    for (int c = 0; c < columns; ++c) {
      const int64_t column = at + c * a_.y_stride_b;
      __m256 u = v[c];
      if (e_.bias) u = _mm256_add_ps(u, bias);
      if (e_.residual) u = _mm256_add_ps(u, _mm256_maskload_ps(e_.residual + column, rows));
      if (levels.residual) u = _mm256_add_ps(u, levels.residual_at(column, half.first, half.last));
      v[c] = e_.finish(u);
    }
    for (int c = 0; c < columns; ++c) {
      const int64_t column = at + c * a_.y_stride_b;
      if (levels.out) levels.store(column, half.first, half.last, v[c]);
      else _mm256_maskstore_ps(a_.y + column, rows, v[c]);
    }
  }

  struct Half {
    int64_t first = 0, last = 0;  // rows [first, last) of the half are written
    bool all_rows = false;
    __m256 row_scale, offset_term, bias;
  };
  const GemmArgs& a_;
  int64_t m0_;
  EpilogueLanes e_;
  __m256 scale_;
  Half half_[2];
};
