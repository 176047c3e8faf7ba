// TernaryGemm: Y[B, M] = activation(alpha * dequant(A') @ W' + beta * C).
#include "ops.h"

namespace fgq {
namespace ort {

class GemmKernel : public TernaryKernelBase {
 public:
  explicit GemmKernel(const OrtKernelInfo* info) : TernaryKernelBase(info) {
    k_ = attr_int(info, "K", nullptr);
    if (k_ < 1 || k_ > (int64_t{1} << 30)) fail("attribute K must be in [1, 2^30], got " + std::to_string(k_));
    const int64_t zero = 0, one = 1;
    trans_a_ = attr_int(info, "transA", &zero);
    const int64_t trans_b = attr_int(info, "transB", &one);
    if ((trans_a_ != 0 && trans_a_ != 1) || (trans_b != 0 && trans_b != 1)) fail("transA and transB must be 0 or 1");
    const float f_one = 1.f;
    alpha_ = attr_float(info, "alpha", &f_one);
    beta_ = attr_float(info, "beta", &f_one);
    use_dense_weights(info, 1, k_);
    init_weights(info, ReductionLayout{1, k_, n_}, -1);
  }

  void Compute(OrtKernelContext* ctx) const {
    const Tensor x = input(ctx, kX);
    if (x.shape.size() != 2) fail("A must be 2-D, got " + shape_string(x.shape));
    const int64_t B = trans_a_ ? x.shape[1] : x.shape[0];
    const int64_t K = trans_a_ ? x.shape[0] : x.shape[1];
    if (K != k_) fail("A shape " + shape_string(x.shape) + " does not give K = " + std::to_string(k_));
    const ActQuant q = act_quant(ctx, x);
    Planes scratch;
    const Planes& p = planes(ctx, scratch);
    const int64_t M = p.pos.rows;

    const Tensor c = input(ctx, kBias);
    RowEpilogue e;
    e.act = activation_;
    e.beta = beta_;
    if (c.present) {
      if (c.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) fail("C must be float");
      if (c.shape.size() > 2) fail("C must have rank <= 2");
      const int64_t cb = c.shape.size() == 2 ? c.shape[0] : 1;
      const int64_t cm = c.shape.empty() ? 1 : c.shape.back();
      if ((cb != 1 && cb != B) || (cm != 1 && cm != M))
        fail("C shape " + shape_string(c.shape) + " does not broadcast to " + shape_string({B, M}));
      e.c_stride_m = cm == 1 ? 0 : 1;
      e.c_stride_b = cb == 1 ? 0 : cm;
      if (beta_ != 0.f) e.c = c.as<float>();
    }
    float* y = output(ctx, 0, {B, M});
    quantize_rows_and_run(ctx, x, q, p, B, k_, trans_a_ ? 1 : k_, trans_a_ ? B : 1, alpha_, e, y);
  }

 private:
  int64_t k_ = 0, trans_a_ = 0;
  float alpha_ = 1.f, beta_ = 1.f;
};

OrtCustomOp* ternary_gemm_op() {
  static CustomOp<TernaryGemmOp> op;
  return &op;
}

}  // namespace ort
}  // namespace fgq
