// Direct kernel for convolutions with few channels a group (depthwise: one): no im2col, no
// GEMM. The activation is a padded planar (CHW) image of unsigned levels; output pixels
// go across the vector lanes, and up to four kernel columns of one kernel row (a "chunk")
// meet each pixel's levels in integer multiply-adds.
//
// Weights are regrouped once from the repacked planes into "accumulators": each sums
// its taps' weight x level exactly in int32, then adds scale * sum to the float output.
// With uint8 scale codes a plane's integer weights t * code make the whole plane one
// accumulator (scale row_scale); with float scales each group is one (weights t, scale
// row_scale * group scale). Any reduction layout of the packed format works:
// the taps of each group come from kernel_position_map.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "fgq/kernels.h"

namespace fgq {

// Four taps (c, r, s0 + e), e < 4, of one output channel's filter: channel c of its
// group's input channels, kernel row r, kernel columns from s0 (taps past S meet 0).
struct DepthwiseChunk {
  int64_t c, r, s0;
};

// The chunks an accumulator reads: chunk index and the accumulator it adds to.
struct DepthwisePiece {
  int64_t chunk, accumulator;
};

struct DepthwiseWeights {
  int64_t channels = 0;            // M, output channels
  int64_t rows_per_group = 1;      // M / group: output channel m reads group m / rows_per_group
  int64_t channels_per_group = 1;  // C / group
  int64_t kernel_h = 1, kernel_w = 1;
  std::vector<DepthwiseChunk> chunks;
  std::vector<DepthwisePiece> pieces;  // sorted by accumulator
  int64_t accumulators = 0;            // per output channel
  std::vector<int64_t> first_piece;    // accumulator a: pieces [first_piece[a], first_piece[a + 1]), never empty
  // Weights of output channel m, piece p: int16 (t * code reaches 255), tap e at element e.
  std::vector<int16_t> weights;      // [M][pieces][4]
  std::vector<int32_t> weight_sums;  // [M][accumulators]: sum of the accumulator's weights
  std::vector<float> scales;         // [M][accumulators]
  const int16_t* piece_weights(int64_t m, int64_t p) const {
    return weights.data() + (m * static_cast<int64_t>(pieces.size()) + p) * 4;
  }
};

// Regroups the repacked planes (`neg` null unless asymmetric) of a convolution with
// weight [M, cg, R, S] whose reduction follows `layout` (segmented: channels innermost,
// else ONNX order c, r, s) into `out`. Returns "" or an error.
std::string build_depthwise_weights(const KernelWeights& pos, const KernelWeights* neg, const ReductionLayout& layout,
                                    bool segmented, int64_t rows_per_group, int64_t cg, int64_t kernel_h,
                                    int64_t kernel_w, DepthwiseWeights* out);

// One call: output channels [m_begin, m_end) of one image.
struct DepthwiseArgs {
  const DepthwiseWeights* w = nullptr;
  // Padded planar image of all C input channels: byte (c, h, x) at image + (c * padded_h + h) * padded_w + x,
  // unsigned levels u (u - zero_level is the level minus the zero point), plus kDepthwiseSlack bytes.
  const uint8_t* image = nullptr;
  int64_t padded_h = 0, padded_w = 0;
  int32_t zero_level = 0;
  int64_t out_h = 0, out_w = 0;
  int64_t stride_h = 1, stride_w = 1, dilation_h = 1, dilation_w = 1;
  float x_scale = 1.f;
  const float* bias = nullptr;      // [M] or null
  const float* residual = nullptr;  // [M, out_h, out_w] or null
  float lo = -std::numeric_limits<float>::infinity();  // the output clamped to [lo, hi] last: ReLU, Clip
  float hi = std::numeric_limits<float>::infinity();
  float* y = nullptr;  // [M, out_h, out_w]
  int64_t m_begin = 0, m_end = 0;
};

// Whether w is a plain depthwise filter: one input channel a group, one accumulator, and chunk
// p (kernel row p / ceil(S / 4), column chunk p % ceil(S / 4)) as piece p. The SIMD paths run
// such filters several output rows at once (when the kernel rows are not dilated).
bool plain_depthwise_filter(const DepthwiseWeights& w);

// Largest filter (cg * R * S taps) the direct kernel takes: keeps every int32 sum exact
// (4096 * 255 * 255 < 2^31).
constexpr int64_t kDepthwiseMaxTaps = 4096;

// Readable bytes the SIMD path needs past the image's last byte.
constexpr int64_t kDepthwiseSlack = 64;

// Whether the direct kernel takes this geometry on every path (the SIMD shuffles pick a lane's
// four pixels x four taps from 16 bytes: 3 * stride + 3 * dilation < 16, stride <= 4).
inline bool depthwise_supports(int64_t stride_w, int64_t dilation_w) {
  return stride_w <= 4 && 3 * stride_w + 3 * dilation_w < 16;
}

// y[m, oh, ow] = clamp(sum_a fma-chain of float(dot_a - zero_level * weight_sum_a) * (x_scale * scale_a)
//                       + bias[m] + residual[m, oh, ow], lo, hi), accumulators in order; the reference.
void depthwise_ref(const DepthwiseArgs& a);
#if defined(FGQ_HAVE_X86_KERNELS)
void depthwise_avx2(const DepthwiseArgs& a);
void depthwise_avxvnni(const DepthwiseArgs& a);  // AVX2 + AVX-VNNI
void depthwise_avx512(const DepthwiseArgs& a);  // AVX-512 F/BW/VNNI
#endif

}  // namespace fgq
