// TernaryMatMul: Y[..., M] = dequant(X)[..., K] @ W[K, M] (+ bias).
#include <algorithm>

#include "ops.h"

namespace fgq {
namespace ort {

class MatMulKernel : public TernaryKernelBase {
 public:
  explicit MatMulKernel(const OrtKernelInfo* info) : TernaryKernelBase(info) {
    k_ = attr_int(info, "K", nullptr);
    if (k_ < 1 || k_ > (int64_t{1} << 30)) fail("attribute K must be in [1, 2^30], got " + std::to_string(k_));
    init_weights(info, ReductionLayout{1, k_, n_}, -1);
  }

  void Compute(OrtKernelContext* ctx) const {
    const Tensor x = input(ctx, kX);
    if (x.shape.empty()) fail("X must have rank >= 1");
    if (x.shape.back() != k_)
      fail("X shape " + shape_string(x.shape) + " has last dimension != K = " + std::to_string(k_));
    const ActQuant q = act_quant(ctx, x);
    Planes scratch;
    const Planes& p = planes(ctx, scratch);
    const int64_t M = p.pos.rows;
    const float* b = bias(ctx, M);
    std::vector<int64_t> out_shape(x.shape.begin(), x.shape.end() - 1);
    out_shape.push_back(M);
    const int64_t B = x.size / k_;
    float* y = output(ctx, 0, out_shape);
    if (B == 0 || M == 0) return;

    const int64_t Kp = p.pos.positions();
    const std::vector<int64_t> map = kernel_position_map(layout_, p.pos.np, p.pos.padded_groups);
    AlignedBuffer<int8_t> xs(checked_mul(B, Kp, "activation buffer"));
    const int64_t Gp = p.pos.padded_groups;
    AlignedBuffer<int32_t> gsum(checked_mul(B, Gp, "activation buffer"));
    constexpr int64_t kRowsPerTask = 8;
    auto quantize = [&](size_t t) {
      const int64_t r0 = static_cast<int64_t>(t) * kRowsPerTask, r1 = std::min(B, r0 + kRowsPerTask);
      std::vector<int8_t> natural(static_cast<size_t>(Kp));
      for (int64_t r = r0; r < r1; ++r) quantize_row(*dispatch_, x, r * k_, 1, k_, map, q, p.pos, natural.data(), xs.get() + r * Kp, gsum.get() + r * Gp);
    };
    parallel_for(ctx, static_cast<size_t>((B + kRowsPerTask - 1) / kRowsPerTask), quantize);

    GemmArgs a;
    a.x = xs.get();
    a.x_stride = Kp;
    a.gsum = gsum.get();
    a.s_stride = Gp;
    a.y = y;
    a.y_stride_b = M;
    a.y_stride_m = 1;
    a.m_begin = 0;
    a.m_end = M;
    a.b_begin = 0;
    a.b_end = B;
    a.scale = q.scale;
    a.offset = static_cast<float>(q.offset());
    run(ctx, p, a);
    if (b)
      for (int64_t r = 0; r < B; ++r)
        for (int64_t m = 0; m < M; ++m) y[r * M + m] += b[m];
  }

 private:
  int64_t k_ = 0;
};

OrtCustomOp* ternary_matmul_op() {
  static CustomOp<TernaryMatMulOp> op;
  return &op;
}

}  // namespace ort
}  // namespace fgq
