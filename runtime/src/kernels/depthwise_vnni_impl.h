// The direct convolution kernel on vpdpbusd, shared by depthwise_avx512.cpp (16 pixels a
// vector) and depthwise_avxvnni.cpp (8): each includes this inside its own anonymous
// namespace after defining `Simd` (vector types, arithmetic, ChunkShuffle, store), and
// compiles it with its own flags, like activation_impl.h.
//
// Output pixels of one output row go across the 32-bit lanes. A chunk's source bytes are loaded
// once and rearranged (Simd::ChunkShuffle) so that lane j holds pixel j's four taps as bytes;
// one vpdpbusd with the chunk's four weights as int8 adds their products to lane j in exact
// int32. Weights t * code fit int8 when the codes are at most 127 (the converter's default) and
// always with float scales (t alone). Wider weights (codes up to 255) go the other way round:
// their positive and negative parts as unsigned bytes meet the levels shifted to signed
// (u - 128) in two vpdpbusd; the difference is sum w * u - 128 * sum w, exact. The float work
// is one convert and one FMA per accumulator, as in the reference.

using VecI = Simd::VecI;
using VecF = Simd::VecF;
constexpr int64_t kLanes = Simd::kLanes;

// One output channel's weights as the vpdpbusd operands: per piece four bytes as an int32
// (narrow: int8 w; wide: unsigned max(w, 0) and max(-w, 0)), and per accumulator the integer
// correction and the float scale.
struct ChannelWeights {
  std::vector<int32_t> narrow, positive, negative, correction;
  std::vector<float> scale;
  bool wide = false;
};

// Once per channel (plain loops the compiler vectorizes: a channel of a small map has little
// work, so this must be cheap).
void load_channel(const DepthwiseArgs& a, int64_t m, ChannelWeights* out) {
  const DepthwiseWeights& w = *a.w;
  const int64_t taps = 4 * static_cast<int64_t>(w.pieces.size()), A = w.accumulators;
  const int16_t* __restrict weights = w.piece_weights(m, 0);
  for (auto* v : {&out->narrow, &out->positive, &out->negative}) v->resize(static_cast<size_t>(taps / 4));
  uint8_t* __restrict narrow = reinterpret_cast<uint8_t*>(out->narrow.data());
  uint8_t* __restrict positive = reinterpret_cast<uint8_t*>(out->positive.data());
  uint8_t* __restrict negative = reinterpret_cast<uint8_t*>(out->negative.data());
  int outside = 0;
  for (int64_t i = 0; i < taps; ++i) {
    const int v = weights[i];
    narrow[i] = static_cast<uint8_t>(v);
    positive[i] = static_cast<uint8_t>(v > 0 ? v : 0);
    negative[i] = static_cast<uint8_t>(v < 0 ? -v : 0);
    outside |= (v < -128) | (v > 127);
  }
  out->wide = outside != 0;
  // Narrow: dot = sum w * u; wide: sum w * (u - 128). Either less the correction is sum w * (u - zero_level).
  const int32_t zero_point = out->wide ? a.zero_level - 128 : a.zero_level;
  out->correction.resize(static_cast<size_t>(A));
  out->scale.resize(static_cast<size_t>(A));
  for (int64_t k = 0; k < A; ++k) {
    out->correction[static_cast<size_t>(k)] = zero_point * w.weight_sums[static_cast<size_t>(m * A + k)];
    out->scale[static_cast<size_t>(k)] = a.x_scale * w.scales[static_cast<size_t>(m * A + k)];
  }
}

// V output rows of channel m at columns ow.. (count of them in the row): each accumulator's
// exact sums over its pieces, then the float chain.
template <bool Wide, int V>
void vectors(const DepthwiseArgs& a, int64_t m, const uint8_t* image, const int64_t* offsets, const ChannelWeights& cw,
             const Simd::ChunkShuffle& shuffle, int64_t oh, int64_t ow, int64_t count) {
  const DepthwiseWeights& w = *a.w;
  const int64_t* first_piece = w.first_piece.data();
  const int32_t* narrow = cw.narrow.data();
  const int32_t* positive = cw.positive.data();
  const int32_t* negative = cw.negative.data();
  const uint8_t* corner[V];
  for (int v = 0; v < V; ++v) corner[v] = image + (oh + v) * a.stride_h * a.padded_w + ow * a.stride_w;
  const VecI flip = Simd::set1(static_cast<int32_t>(0x80808080u));
  VecF out[V];
  for (int v = 0; v < V; ++v) out[v] = Simd::zero_f();
  for (int64_t k = 0; k < w.accumulators; ++k) {
    VecI sum[V], neg[V];
    for (int v = 0; v < V; ++v) sum[v] = neg[v] = Simd::zero_i();
    for (int64_t p = first_piece[k]; p < first_piece[k + 1]; ++p) {
      for (int v = 0; v < V; ++v) {
        const VecI x = shuffle(corner[v] + offsets[p]);
        if (Wide) {
          const VecI xs = Simd::bit_xor(x, flip);  // u - 128 as int8
          sum[v] = Simd::dpbusd(sum[v], Simd::set1(positive[p]), xs);
          neg[v] = Simd::dpbusd(neg[v], Simd::set1(negative[p]), xs);
        } else {
          sum[v] = Simd::dpbusd(sum[v], x, Simd::set1(narrow[p]));
        }
      }
    }
    const VecI correction = Simd::set1(cw.correction[static_cast<size_t>(k)]);
    const VecF scale = Simd::set1f(cw.scale[static_cast<size_t>(k)]);
    for (int v = 0; v < V; ++v) {
      const VecI dot = Simd::sub(Wide ? Simd::sub(sum[v], neg[v]) : sum[v], correction);
      out[v] = Simd::fmadd(Simd::to_float(dot), scale, out[v]);
    }
  }
  for (int v = 0; v < V; ++v) Simd::store(a, m, oh + v, ow, count, out[v]);
}

// A plain depthwise filter (plain_depthwise_filter; kernel rows not dilated) of R rows of CC
// chunks, narrow weights: output rows oh..oh + V - 1 at once, each image row's chunk shuffled
// once and met by every output row it serves (R / SH of them; the shuffles, not vpdpbusd, bound
// vectors()). The same exact sums as vectors().
using RowsBlock = void (*)(const DepthwiseArgs&, int64_t, const uint8_t*, const ChannelWeights&,
                           const Simd::ChunkShuffle&, int64_t, int64_t, int64_t);

template <int R, int CC, int SH, int V>
void rows_block(const DepthwiseArgs& a, int64_t m, const uint8_t* image, const ChannelWeights& cw,
                const Simd::ChunkShuffle& shuffle, int64_t oh, int64_t ow, int64_t count) {
  VecI weight[R * CC], acc[V];
  for (int p = 0; p < R * CC; ++p) weight[p] = Simd::set1(cw.narrow[static_cast<size_t>(p)]);
  for (int v = 0; v < V; ++v) acc[v] = Simd::zero_i();
  const uint8_t* corner = image + oh * SH * a.padded_w + ow * a.stride_w;
  for (int j = 0; j < CC; ++j)
#pragma GCC unroll 16  // fully: acc[] then stays in registers
    for (int i = 0; i < SH * (V - 1) + R; ++i) {  // image rows from the block's first window row
      const VecI x = shuffle(corner + i * a.padded_w + 4 * j * a.dilation_w);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const int r = i - SH * v;  // kernel row of output row v that reads image row i
        if (r >= 0 && r < R) acc[v] = Simd::dpbusd(acc[v], x, weight[r * CC + j]);
      }
    }
  const VecI correction = Simd::set1(cw.correction[0]);
  const VecF scale = Simd::set1f(cw.scale[0]);
  for (int v = 0; v < V; ++v)
    Simd::store(a, m, oh + v, ow, count, Simd::fmadd(Simd::to_float(Simd::sub(acc[v], correction)), scale, Simd::zero_f()));
}

// rows_block for 4, 2 and 1 rows of this call's filter, or nulls when it is not one of the common ones.
struct RowsBlocks {
  RowsBlock four = nullptr, two = nullptr, one = nullptr;
};

template <int R, int CC, int SH>
RowsBlocks blocks() {
  return {rows_block<R, CC, SH, 4>, rows_block<R, CC, SH, 2>, rows_block<R, CC, SH, 1>};
}

RowsBlocks rows_blocks_for(const DepthwiseArgs& a) {
  const DepthwiseWeights& w = *a.w;
  if (!plain_depthwise_filter(w) || a.dilation_h != 1) return {};
  switch (w.kernel_h * 100 + (w.kernel_w + 3) / 4 * 10 + a.stride_h) {
    case 311: return blocks<3, 1, 1>();
    case 312: return blocks<3, 1, 2>();
    case 521: return blocks<5, 2, 1>();
    case 522: return blocks<5, 2, 2>();
    case 721: return blocks<7, 2, 1>();
    case 722: return blocks<7, 2, 2>();
    default: return {};
  }
}

template <bool Wide>
void channel(const DepthwiseArgs& a, int64_t m, const int64_t* offsets, const ChannelWeights& cw,
             const Simd::ChunkShuffle& shuffle, const RowsBlocks& rows) {
  const DepthwiseWeights& w = *a.w;
  const uint8_t* image = a.image + (m / w.rows_per_group) * w.channels_per_group * a.padded_h * a.padded_w;
  // Blocks of V output rows, as many as fit from row oh on (wide weights: the general loop).
  auto block = [&](int64_t& oh, int V, RowsBlock fixed) {
    for (; oh + V <= a.out_h; oh += V)
      for (int64_t ow = 0; ow < a.out_w; ow += kLanes) {
        const int64_t count = std::min(kLanes, a.out_w - ow);
        if (fixed && !Wide) fixed(a, m, image, cw, shuffle, oh, ow, count);
        else if (V == 2) vectors<Wide, 2>(a, m, image, offsets, cw, shuffle, oh, ow, count);
        else vectors<Wide, 1>(a, m, image, offsets, cw, shuffle, oh, ow, count);
      }
  };
  int64_t oh = 0;
  if (rows.four && !Wide) block(oh, 4, rows.four);
  block(oh, 2, rows.two);  // two rows at a time: independent chains, shared weight loads
  block(oh, 1, rows.one);
}

// Output channels [m_begin, m_end).
void depthwise_vnni(const DepthwiseArgs& a) {
  const DepthwiseWeights& w = *a.w;
  const Simd::ChunkShuffle shuffle(a.stride_w, a.dilation_w);
  std::vector<int64_t> offsets;  // each piece's source, relative to a pixel's window corner
  for (const DepthwisePiece& piece : w.pieces) {
    const DepthwiseChunk& c = w.chunks[static_cast<size_t>(piece.chunk)];
    offsets.push_back((c.c * a.padded_h + c.r * a.dilation_h) * a.padded_w + c.s0 * a.dilation_w);
  }
  const RowsBlocks rows = rows_blocks_for(a);
  ChannelWeights cw;
  for (int64_t m = a.m_begin; m < a.m_end; ++m) {
    load_channel(a, m, &cw);
    if (cw.wide) channel<true>(a, m, offsets.data(), cw, shuffle, rows);
    else channel<false>(a, m, offsets.data(), cw, shuffle, rows);
  }
}
