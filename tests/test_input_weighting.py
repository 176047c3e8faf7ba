"""Input-weighted ternarization: per-channel input statistics from the fp32 pass weigh each weight's error."""

import numpy as np
import pytest

import fgq_onnx
from fgq_onnx import layerwise
from fgq_onnx.passes.ternarize_weights import TernarizeWeightsPass
from fgq_onnx.ternary import GroupLayout, Method, ternarize
from ir_models import make_model

CONVS = """
convs (float[B, 4, 5, 5] x, float[B, 3] z) => (float[B, 6, 5, 5] y, float[B, 4, 3, 3] g, float[B, 5] e, float[B, 2] m) {
    y = Conv (x, w1)
    g = Conv <group = 2> (x, w2)
    e = Gemm <transB = 1> (z, w3)
    m = MatMul (z, w4)
}
"""


def _weights(rng):
    return {"w1": rng.standard_normal((6, 4, 1, 1)).astype(np.float32), "w2": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
            "w3": rng.standard_normal((5, 3)).astype(np.float32), "w4": rng.standard_normal((3, 2)).astype(np.float32)}


def test_input_importance_is_the_mean_square_of_the_channel_each_weight_multiplies():
    rng = np.random.default_rng(0)
    model = make_model(CONVS, _weights(rng))
    x = (rng.standard_normal((10, 4, 5, 5)) * np.array([1, 10, 0.1, 3]).reshape(1, 4, 1, 1) + 0.5).astype(np.float32)
    z = (rng.standard_normal((10, 3)) * np.array([2, 0.01, 7])).astype(np.float32)
    reference = layerwise.capture(model, [({"x": x[:6], "z": z[:6]}, None), ({"x": x[6:], "z": z[6:]}, None)], input_statistics=True)
    nodes = {node.outputs[0].name: node for node in model.graph}
    energy_x = np.mean(np.square(x.astype(np.float64)), axis=(0, 2, 3))
    energy_z = np.mean(np.square(z.astype(np.float64)), axis=0)

    def damped(energy):
        return energy + 0.01 * energy.mean()

    np.testing.assert_allclose(reference.input_importance(nodes["y"]), np.broadcast_to(damped(energy_x).reshape(1, 4, 1, 1), (6, 4, 1, 1)), rtol=1e-5)
    # group 2: output rows 0-1 read channels 0-1, rows 2-3 read channels 2-3
    grouped = damped(energy_x)
    np.testing.assert_allclose(reference.input_importance(nodes["g"])[..., 0, 0], [grouped[:2], grouped[:2], grouped[2:], grouped[2:]], rtol=1e-5)
    np.testing.assert_allclose(reference.input_importance(nodes["e"]), damped(energy_z)[None, :], rtol=1e-5)  # weight [out, in]
    np.testing.assert_allclose(reference.input_importance(nodes["m"]), damped(energy_z)[:, None], rtol=1e-5)  # weight [in, out]


def test_the_pass_ternarizes_with_the_importance_it_is_given():
    rng = np.random.default_rng(1)
    weights = _weights(rng)
    model = make_model(CONVS, weights)
    importance = np.array([1.0, 100.0, 0.01, 5.0], np.float32).reshape(1, 4, 1, 1)
    TernarizeWeightsPass(4, Method.EXACT, importance=lambda node: importance if node.outputs[0].name == "y" else None)(model)
    decoded = {node.outputs[0].name: node for node in model.graph if node.op_type == "DequantizeLinear" and node.outputs[0].name.startswith("w1")}
    assert decoded, "w1 was ternarized"
    want = ternarize(weights["w1"], GroupLayout((6, 4, 1, 1), axis=1, n=4), Method.EXACT, importance)
    assert not np.array_equal(want.dequantize(), ternarize(weights["w1"], GroupLayout((6, 4, 1, 1), axis=1, n=4), Method.EXACT).dequantize())
    codes = next(v for v in model.graph.initializers.values() if v.name == "w1.ternary_codes").const_value.numpy()
    np.testing.assert_array_equal(codes.reshape(6, 4), want.layout.ungroup(want.codes).reshape(6, 4))


@pytest.fixture
def spread_mlp(tmp_path):
    """A Gemm whose input channels differ by up to 300x in scale and whose weights compensate: after
    BatchNorm folding a 1x1 Conv after a depthwise one looks like this."""
    rng = np.random.default_rng(2)
    spread = np.exp(rng.uniform(-3, 3, 64)).astype(np.float32)
    weight = (rng.standard_normal((32, 64)) / spread).astype(np.float32)
    model = make_model("mlp (float[B, 64] x) => (float[B, 32] y) { y = Gemm <transB = 1> (x, w) }", {"w": weight})
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=(rng.standard_normal((80, 64)) * spread).astype(np.float32))
    return model, calib


def test_input_weighting_lowers_the_output_error_where_input_channels_differ_in_scale(spread_mlp):
    model, calib = spread_mlp
    sqnr = {}
    for weighting in (True, False):
        _, report = fgq_onnx.convert(model, n=4, calib=str(calib), act_bits=0, bias_correction=False, input_weighting=weighting)
        sqnr[weighting] = report.fidelity.main.sqnr_db
        assert report.settings["input_weighting"] is weighting
    assert sqnr[True] > sqnr[False] + 0.5, sqnr
