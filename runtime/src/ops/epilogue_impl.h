// The output epilogue of the com.fgq ops: one output row of a tile, y[i] = act(y[i] + addends),
// in one pass while the tile is in cache. Included by epilogue.cpp (baseline instruction set) and
// epilogue_avx2.cpp (-mavx2) inside their own anonymous namespace, so the compiler vectorizes the
// same loops with each file's flags (no ODR clash). The loops have no branches: every `?:` becomes
// a select (checked with -fopt-info-vec), and there is no FMA to contract (-ffp-contract=off), so
// every build gives the same bits.

template <class Act>
void finish_with(float* __restrict y, int64_t count, const RowAddends& r, Act act) {
  const float b = r.bias ? *r.bias : 0.f, s = r.add_scale;
  const float* __restrict add = r.add;
  if (add && s != 1.f) {
    for (int64_t i = 0; i < count; ++i) y[i] = act(y[i] + s * add[i]);
  } else if (add && r.bias) {
    for (int64_t i = 0; i < count; ++i) y[i] = act(y[i] + b + add[i]);  // the bias first, as the function body adds them
  } else if (add) {
    for (int64_t i = 0; i < count; ++i) y[i] = act(y[i] + add[i]);
  } else if (r.bias) {
    for (int64_t i = 0; i < count; ++i) y[i] = act(y[i] + b);
  } else {
    for (int64_t i = 0; i < count; ++i) y[i] = act(y[i]);
  }
}

// f, then the affine map f * scale + shift when there is one.
template <class F>
void finish_affine(float* y, int64_t count, const RowAddends& r, const Activation& act, F f) {
  if (!act.affine) return finish_with(y, count, r, f);
  const float scale = act.scale, shift = act.shift;
  finish_with(y, count, r, [f, scale, shift](float v) { return f(v) * scale + shift; });
}

inline void finish_row_impl(float* y, int64_t count, const RowAddends& r, const Activation& act) {
  const float a = act.p0, b = act.p1;
  switch (act.kind) {
    case Activation::kNone:
      return finish_affine(y, count, r, act, [](float v) { return v; });
    case Activation::kRelu:
      return finish_affine(y, count, r, act, [](float v) { return v < 0.f ? 0.f : v; });
    case Activation::kClip:
      return finish_affine(y, count, r, act, [a, b](float v) { return clamp_to(v, a, b); });
    case Activation::kHardSigmoid:
      return finish_affine(y, count, r, act, [a, b](float v) { return hard_sigmoid(v, a, b); });
    case Activation::kHardSwish:
      return finish_affine(y, count, r, act, [](float v) { return hard_swish(v); });
  }
}
