// TernaryMatMul: Y[..., M] = activation(dequant(X)[..., K] @ W[K, M] (+ bias)).
#include "ops.h"

namespace fgq {
namespace ort {

class MatMulKernel : public TernaryKernelBase {
 public:
  explicit MatMulKernel(const OrtKernelInfo* info) : TernaryKernelBase(info) {
    k_ = attr_int(info, "K", nullptr);
    if (k_ < 1 || k_ > (int64_t{1} << 30)) fail("attribute K must be in [1, 2^30], got " + std::to_string(k_));
    use_dense_weights(info, 1, k_);
    init_weights(info, ReductionLayout{1, k_, n_}, -1);
    keep_constant_bias(info);
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
    RowEpilogue e;
    e.c = bias(ctx, M);
    e.c_stride_m = 1;
    e.act = activation_;
    std::vector<int64_t> out_shape(x.shape.begin(), x.shape.end() - 1);
    out_shape.push_back(M);
    const int64_t B = x.size / k_;
    float* y = output(ctx, 0, out_shape);
    quantize_rows_and_run(ctx, x, q, p, B, k_, k_, 1, 1.f, e, y);
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
