"""Bias correction: streamed channel statistics, the affine fix, the graph pass and the whole loop."""

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

from fgq_onnx import layerwise, pipeline
from fgq_onnx.correction import ChannelMoments, affine_correction
from fgq_onnx.passes.correct_bias import CorrectBiasPass
from fgq_onnx.passes.ternarize_weights import TernarizeWeightsPass
from ir_models import make_model, run

RNG = np.random.default_rng(5)




# -- numerics ----------------------------------------------------------------------


def test_channel_moments_streamed_equal_the_whole_and_survive_a_large_offset():
    data = 1e4 + RNG.normal(0.0, 1e-2, (37, 3, 5, 4))  # a mean 1e6 times the std: naive sums of squares lose it
    data[:, 1] *= -3.0
    moments = ChannelMoments(axis=1)
    for chunk in np.array_split(data, [1, 9, 30]):
        moments.update(chunk)
    whole = data.transpose(1, 0, 2, 3).reshape(3, -1)
    assert moments.count == whole.shape[1]
    np.testing.assert_allclose(moments.mean, whole.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(moments.std, whole.std(axis=1), rtol=1e-6)
    with pytest.raises(ValueError):
        moments.update(np.zeros((2, 4, 5, 4)))  # another channel count


def _moments(array: np.ndarray, axis: int = -1) -> ChannelMoments:
    moments = ChannelMoments(axis)
    moments.update(array)
    return moments


def test_affine_correction_restores_mean_and_std_per_channel():
    z_fp = RNG.normal([1.0, -2.0, 0.5], [2.0, 0.5, 1.0], (500, 3))
    bias = np.array([0.3, -0.1, 0.0])
    z_q = 0.4 * z_fp + RNG.normal(0, 0.05, z_fp.shape) + np.array([0.2, 0.7, -1.0])  # shrunk and shifted
    fix = affine_correction(_moments(z_fp + bias), _moments(z_q + bias), bias)
    corrected = fix.gain * z_q + bias + fix.shift  # the gain acts on the weight (bias-free) part only
    np.testing.assert_allclose(corrected.mean(axis=0), (z_fp + bias).mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(corrected.std(axis=0), z_fp.std(axis=0), rtol=1e-5)
    plain = affine_correction(_moments(z_fp + bias), _moments(z_q + bias), bias, scale=False)
    assert np.all(plain.gain == 1.0)
    np.testing.assert_allclose(plain.shift, (z_fp - z_q).mean(axis=0), atol=1e-5)


def test_affine_correction_clips_the_gain_and_leaves_constant_channels_alone():
    fp = _moments(np.stack([RNG.normal(0, 10.0, 100), RNG.normal(0, 1.0, 100)], axis=1))
    q = _moments(np.stack([RNG.normal(0, 0.1, 100), np.full(100, 2.0)], axis=1))
    fix = affine_correction(fp, q, max_gain=4.0)
    assert fix.gain[0] == pytest.approx(4.0)
    assert fix.gain[1] == 1.0  # nothing to scale: the converted channel is constant
    assert fix.shift[1] == pytest.approx(fp.mean[1] - 2.0, abs=1e-6)


# -- the graph pass ---------------------------------------------------------------

LINEARS = """
g (float[4,3,6,6] x, float[4,5] a) => (float[4,8,6,6] y, float[4,8,6,6] y2, float[4,2] g1, float[4,2] m1, float[4,2] m2) {
    y = Conv <pads = [1,1,1,1]> (x, w, b)
    y2 = Conv <pads = [1,1,1,1]> (x, w2)
    g1 = Gemm <transB = 1, beta = 2.0> (a, gw, gb)
    h = MatMul (a, mw)
    m1 = Add (h, mb)
    m2 = MatMul (a, mw2)
}
"""


def linears_model():
    return make_model(LINEARS, linears_weights())


def linears_weights():
    return {
        "w": RNG.normal(size=(8, 3, 3, 3)).astype(np.float32), "b": RNG.normal(size=8).astype(np.float32), "w2": RNG.normal(size=(8, 3, 3, 3)).astype(np.float32),
        "gw": RNG.normal(size=(2, 5)).astype(np.float32), "gb": RNG.normal(size=2).astype(np.float32),
        "mw": RNG.normal(size=(5, 2)).astype(np.float32), "mb": RNG.normal(size=2).astype(np.float32),
        "mw2": RNG.normal(size=(5, 2)).astype(np.float32),
    }


def test_correct_bias_pass_adds_the_shift_in_every_form():
    model = linears_model()
    feeds = {"x": RNG.normal(size=(4, 3, 6, 6)).astype(np.float32), "a": RNG.normal(size=(4, 5)).astype(np.float32)}
    before = run(model, feeds)
    shifts = {"y": RNG.normal(size=8), "y2": RNG.normal(size=8), "g1": RNG.normal(size=2), "h": RNG.normal(size=2), "m2": RNG.normal(size=2)}
    result = CorrectBiasPass(shifts)(model)
    assert result.modified
    after = run(result.model, feeds)
    expected = [
        before[0] + shifts["y"].reshape(-1, 1, 1),  # constant bias, shifted
        before[1] + shifts["y2"].reshape(-1, 1, 1),  # no bias: one is created
        before[2] + shifts["g1"],  # Gemm beta=2: the shift is divided by beta in C
        before[3] + shifts["h"],  # MatMul -> Add(constant): folded into that constant
        before[4] + shifts["m2"],  # a bare MatMul that is a graph output: an Add after it
    ]
    for got, want in zip(after, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("Add") == 2  # one folded, one inserted
    assert [v.name for v in result.model.graph.outputs] == ["y", "y2", "g1", "m1", "m2"]
    assert len(result.model.graph.node(0).inputs) == 3


def test_correct_bias_pass_is_honest_about_nothing_and_loud_about_unknown_nodes():
    model = linears_model()
    assert not CorrectBiasPass({"y": np.zeros(8)})(model).modified
    with pytest.raises(ValueError, match="nope"):
        CorrectBiasPass({"nope": np.ones(2)})(model)


def test_gain_scales_the_ternary_output_channels_exactly():
    model = linears_model()
    feeds = {"x": RNG.normal(size=(4, 3, 6, 6)).astype(np.float32), "a": RNG.normal(size=(4, 5)).astype(np.float32)}
    model = TernarizeWeightsPass(4)(model).model
    before = run(model, feeds)
    bias = ir.convenience.get_const_tensor(model.graph.node(next(i for i, n in enumerate(model.graph) if n.op_type == "Conv")).inputs[2]).numpy()
    gain_y, gain_g = RNG.uniform(0.5, 2.0, 8), RNG.uniform(0.5, 2.0, 2)
    CorrectBiasPass({"y": np.zeros(8)}, gains={"y": gain_y, "g1": gain_g})(model)
    after = run(model, feeds)
    np.testing.assert_allclose(after[0], gain_y.reshape(-1, 1, 1) * (before[0] - bias.reshape(-1, 1, 1)) + bias.reshape(-1, 1, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(after[1], before[1], rtol=1e-6)  # no gain for y2
    np.testing.assert_allclose(after[2] - 2.0 * model.graph.initializers["gb"].const_value.numpy(), gain_g * (before[2] - 2.0 * model.graph.initializers["gb"].const_value.numpy()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale_format", ["f32", "f16", "u8"])
def test_gain_reaches_every_scale_format(scale_format):
    model = linears_model()
    feeds = {"x": RNG.normal(size=(4, 3, 6, 6)).astype(np.float32), "a": RNG.normal(size=(4, 5)).astype(np.float32)}
    model = TernarizeWeightsPass(4, scale_format=scale_format)(model).model
    before = run(model, feeds)
    gain = RNG.uniform(0.5, 2.0, 2)
    CorrectBiasPass({}, gains={"m2": gain})(model)  # a bare MatMul: the output is the weight part alone
    np.testing.assert_allclose(run(model, feeds)[4], gain * before[4], rtol=2e-3 if scale_format == "f16" else 1e-5, atol=1e-5)


def test_gain_on_a_shared_or_float_weight_is_refused():
    model = linears_model()
    with pytest.raises(ValueError, match="ternary weight"):
        CorrectBiasPass({}, gains={"m2": np.full(2, 2.0)})(model)  # float weight: nothing to scale
    shared = make_model(LINEARS.replace("(x, w2)", "(x, w)"), {k: v for k, v in linears_weights().items() if k != "w2"})
    shared = TernarizeWeightsPass(4)(shared).model
    with pytest.raises(ValueError, match="ternary weight"):
        CorrectBiasPass({}, gains={"y": np.full(8, 2.0)})(shared)  # y and y2 decode one weight: a gain would hit both


# -- dependency levels and the whole loop -----------------------------------------

BRANCHY = """
g (float[2,4,5,5] x) => (float[2,4,5,5] out) {
    c1 = Conv <pads = [1,1,1,1]> (x, w1)
    r1 = Relu (c1)
    c2 = Conv <pads = [1,1,1,1]> (r1, w2)
    c3 = Conv (r1, w3)
    s = Add (c2, c3)
    r2 = Relu (s)
    out = Conv <pads = [1,1,1,1]> (r2, w4)
}
"""


def test_dependency_levels_group_independent_layers():
    weights = {f"w{i}": RNG.normal(size=(4, 4, k, k)).astype(np.float32) for i, k in ((1, 3), (2, 3), (3, 1), (4, 3))}
    model = make_model(BRANCHY, weights)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    levels = layerwise.dependency_levels(model, convs)
    assert [[n.outputs[0].name for n in level] for level in levels] == [["c1"], ["c2", "c3"], ["out"]]
    assert [len(level) for level in layerwise.dependency_levels(model, convs[1:])] == [2, 1]  # c1 not chosen: c2, c3 start


def _channel_stats(model_or_path, names, feeds):
    model = model_or_path if isinstance(model_or_path, ir.Model) else ir.load(model_or_path)
    values = {v.name: v for node in model.graph for v in node.outputs}
    extra = [values[n] for n in names if not values[n].is_graph_output()]
    model.graph.outputs.extend(extra)
    try:
        outputs = run(model, feeds, as_written=True)  # the stem has int8 weights (see run)
        outputs = dict(zip([v.name for v in model.graph.outputs], outputs))
    finally:
        for value in extra:
            model.graph.outputs.remove(value)
    stats = {}
    for name in names:
        moments = ChannelMoments(1 if outputs[name].ndim == 4 else -1)
        moments.update(outputs[name])
        stats[name] = (moments.mean, moments.std)
    return stats


@pytest.mark.parametrize("act_bits", [0, 8])
def test_converted_layers_get_the_fp32_channel_statistics(kit, tmp_path, calib_npz, cnn_samples, act_bits):
    """After correction each ternarized layer's output has the fp32 per-channel mean and std on the calibration data."""
    source = kit.write_model(kit.build_cnn(n=16), tmp_path / "cnn.onnx")
    fp = pipeline.prepare(ir.load(source))  # BatchNorm folded, as the converter sees it
    names = [n.outputs[0].name for n in fp.graph if n.op_type in ("Conv", "Gemm")]
    calibrated = np.delete(cnn_samples, np.s_[4::5], axis=0)  # one sample in five is held out of calibration
    want = _channel_stats(fp, names, {"x": calibrated})
    results = {}
    for correct in (False, True):
        model, report = pipeline.convert(source, calib=calib_npz, n=16, act_bits=act_bits, bias_correction=correct, format="qdq")
        results[correct] = _channel_stats(model, names, {"x": calibrated})
        assert any("bias correction" in note for note in report.notes) == correct
    for name in names:
        mean, std = results[True][name]
        scale = np.abs(want[name][1]).mean()
        np.testing.assert_allclose(mean, want[name][0], atol=1e-3 * scale)
        np.testing.assert_allclose(std, want[name][1], rtol=1e-3, atol=1e-3 * scale)
    # without the correction the statistics are off (so this test can fail)
    assert max(np.abs(results[False][n][1] / want[n][1] - 1).max() for n in names) > 0.02


def test_bias_correction_replays_a_one_shot_reader(kit, tmp_path, cnn_samples):
    class Reader:
        def __init__(self):
            self.batches = [{"x": cnn_samples[i : i + 8]} for i in range(0, len(cnn_samples), 8)]

        def get_next(self):
            return self.batches.pop(0) if self.batches else None

    source = kit.write_model(kit.build_cnn(), tmp_path / "cnn.onnx")
    model, report = pipeline.convert(source, calib=Reader(), act_bits=8, format="qdq")
    assert report.calibration["samples"] == len(cnn_samples)
    assert any(note.startswith("bias correction: 4 layer(s)") for note in report.notes)


def test_bias_correction_without_data_is_skipped_with_a_note(kit, tmp_path):
    source = kit.write_model(kit.build_cnn(), tmp_path / "cnn.onnx")
    _, report = pipeline.convert(source, act_bits=0)
    assert any("bias correction needs calibration data" in note for note in report.notes)


# -- the piecewise runner -----------------------------------------------------------


def test_segment_runner_matches_the_whole_model_and_sees_transforms_downstream():
    from fgq_onnx.segments import SegmentRunner

    weights = {f"w{i}": RNG.normal(size=(4, 4, k, k)).astype(np.float32) for i, k in ((1, 3), (2, 3), (3, 1), (4, 3))}
    model = make_model(BRANCHY, weights)
    batches = [{"x": RNG.normal(size=(2, 4, 5, 5)).astype(np.float32)} for _ in range(3)]
    values = {v.name: v for n in model.graph for v in n.outputs}
    model.graph.outputs.extend(values[name] for name in ("c1", "c2", "c3"))
    full = [dict(zip(["out", "c1", "c2", "c3"], run(model, b))) for b in batches]
    for name in ("c1", "c2", "c3"):
        model.graph.outputs.remove(values[name])

    runner = SegmentRunner(model, batches)
    got = runner.run([values["c1"]])[id(values["c1"])]
    for batch, array in enumerate(got):
        np.testing.assert_allclose(array, full[batch]["c1"], rtol=1e-5, atol=1e-5)
    runner.transform(values["c1"], lambda y: 2.0 * y)  # as if c1 had been corrected to twice its output
    pair = runner.run([values["c2"], values["c3"]])
    assert not runner.kept(values["c1"])  # everything that needs c1 has run: it is dropped
    assert runner.kept(values["c2"]) and runner.kept(values["c3"])
    reference = make_model(BRANCHY.replace("r1 = Relu (c1)", "c1b = Add (c1, c1)\n    r1 = Relu (c1b)"), weights)
    values_ref = {v.name: v for n in reference.graph for v in n.outputs}
    reference.graph.outputs.extend(values_ref[name] for name in ("c2", "c3"))
    for batch in range(len(batches)):
        _, c2, c3 = run(reference, batches[batch])
        np.testing.assert_allclose(pair[id(values["c2"])][batch], c2, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pair[id(values["c3"])][batch], c3, rtol=1e-5, atol=1e-5)
    out = runner.run([model.graph.outputs[0]])[id(model.graph.outputs[0])]
    np.testing.assert_allclose(out[0], run(reference, batches[0])[0], rtol=1e-5, atol=1e-5)


def test_a_model_with_control_flow_converts_without_correction(tmp_path, calib_npz):
    """The piecewise runner cannot cut through If/Loop: the conversion goes on, with a note."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    then = helper.make_graph([helper.make_node("Identity", ["c"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["c"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("ReduceMean", ["c"], ["m"], keepdims=0),
            helper.make_node("Greater", ["m", "zero"], ["flag"]),
            helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other),
        ],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, 28, 28])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(rng.normal(size=(8, 1, 3, 3)).astype(np.float32), "w"), onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    source = tmp_path / "if.onnx"
    onnx.save(proto, source)
    _, report = pipeline.convert(source, calib=calib_npz, act_bits=8, format="qdq")
    assert any("bias correction skipped: the main graph has If" in note for note in report.notes)
