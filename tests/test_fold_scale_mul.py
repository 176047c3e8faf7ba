"""FoldScaleMulPass: a constant per-tensor or per-channel Mul after Conv/Gemm/MatMul goes into the weight."""

from __future__ import annotations

import numpy as np
import pytest

from fgq_onnx.passes.fold_scale_mul import FoldScaleMulPass
from ir_models import make_model, run

RNG = np.random.default_rng(5)


def _conv(scale: np.ndarray, order=("c", "s")):
    text = f"g (float[2, 3, 6, 6] x) => (float y) {{ c = Conv(x, w, b)\n y = Mul({order[0]}, {order[1]}) }}"
    return make_model(text, {"w": RNG.normal(size=(4, 3, 3, 3)).astype(np.float32), "b": RNG.normal(size=4).astype(np.float32), "s": scale.astype(np.float32)})


@pytest.mark.parametrize("scale", [np.array(0.7), np.array([0.7]), RNG.uniform(0.5, 2, (4, 1, 1)), RNG.uniform(0.5, 2, (1, 4, 1, 1)), -RNG.uniform(0.5, 2, (4, 1, 1))])
@pytest.mark.parametrize("order", [("c", "s"), ("s", "c")])
def test_folds_conv_scales_with_the_bias(scale, order):
    model = _conv(scale, order)
    x = RNG.normal(size=(2, 3, 6, 6)).astype(np.float32)
    want = run(model, {"x": x})[0]
    assert FoldScaleMulPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Conv"] and model.graph.outputs[0].name == "y"
    np.testing.assert_allclose(run(model, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [RNG.uniform(0.5, 2, (4, 1, 1, 1)), RNG.uniform(0.5, 2, (1, 1, 4, 4)), RNG.uniform(0.5, 2, (3, 1, 1)), RNG.uniform(0.5, 2, (1, 1, 4, 1, 1))])
def test_leaves_scales_that_are_not_per_channel(scale):
    model = _conv(scale)
    assert not FoldScaleMulPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Conv", "Mul"]


def test_leaves_a_conv_whose_output_is_also_used_elsewhere():
    text = "g (float[2, 3, 6, 6] x) => (float y, float c) { c = Conv(x, w)\n y = Mul(c, s) }"
    model = make_model(text, {"w": RNG.normal(size=(4, 3, 3, 3)).astype(np.float32), "s": np.float32(2.0)})
    assert not FoldScaleMulPass()(model).modified


def test_leaves_a_mul_by_an_activation():
    text = "g (float[2, 3, 6, 6] x, float[1, 4, 1, 1] s) => (float y) { c = Conv(x, w)\n y = Mul(c, s) }"
    model = make_model(text, {"w": RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)})
    assert not FoldScaleMulPass()(model).modified


@pytest.mark.parametrize("text, weight, scale", [
    ("g (float[5, 8] x) => (float y) { c = MatMul(x, w)\n y = Mul(c, s) }", (8, 6), (6,)),
    ("g (float[5, 8] x) => (float y) { c = MatMul(x, w)\n y = Mul(c, s) }", (8, 6), (1, 6)),
    ("g (float[5, 8] x) => (float y) { c = Gemm(x, w, b)\n y = Mul(c, s) }", (8, 6), (6,)),
    ("g (float[5, 8] x) => (float y) { c = Gemm <transB: int = 1, alpha: float = 0.5, beta: float = 2.0> (x, w, b)\n y = Mul(s, c) }", (6, 8), (1, 6)),
])
def test_folds_matmul_and_gemm(text, weight, scale):
    model = make_model(text, {"w": RNG.normal(size=weight).astype(np.float32), "b": RNG.normal(size=6).astype(np.float32), "s": RNG.uniform(0.5, 2, scale).astype(np.float32)})
    x = RNG.normal(size=(5, 8)).astype(np.float32)
    want = run(model, {"x": x})[0]
    assert FoldScaleMulPass()(model).modified
    assert len(model.graph) == 1
    np.testing.assert_allclose(run(model, {"x": x})[0], want, rtol=1e-5, atol=1e-5)
