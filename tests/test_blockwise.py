"""Block-wise fitting (--method block): the block finder, the monotone objective, and a model where it beats --method fit."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest

from fgq_onnx import blockwise, pipeline
from fgq_onnx.errors import FgqError
from fgq_onnx.fitting import PatchGram, damp, fit_rows, objective
from ir_models import make_model

W = {"w1": np.ones((8, 8), np.float32), "w2": np.ones((8, 8), np.float32), "b": np.ones(8, np.float32)}


def _node_of(model: ir.Model, output: str) -> ir.Node:
    return next(n for n in model.graph if n.outputs[0].name == output)


def test_finder_on_a_residual_conv_block():
    w = {"w1": np.ones((4, 4, 3, 3), np.float32), "w2": np.ones((4, 4, 1, 1), np.float32), "b": np.ones(4, np.float32)}
    model = make_model("""g (float[1, 4, 6, 6] x) => (float[1, 4, 6, 6] y) {
        h = Conv <pads = [1, 1, 1, 1]> (x, w1)
        r = Relu (h)
        c = Conv (r, w2, b)
        z = Add (c, x)
        y = Relu (z)
    }""", w)
    join = blockwise.residual_join(_node_of(model, "c"))
    assert join is not None and join.end.name == "z" and [v.name for v in join.others] == ["x"]
    assert blockwise.residual_join(_node_of(model, "h")) is None  # feeds a Relu: inside the branch, not its end


def test_finder_on_a_transformer_layer_with_bias_adds():
    text = """g (float[2, 5, 8] x) => (float[2, 5, 8] y) {
        q = MatMul (x, w1)
        a = Relu (q)
        o = MatMul (a, w2)
        ob = Add (o, b)
        z = Add (x, ob)
        y = LayerNormalization <axis = -1> (z, b, b)
    }"""
    model = make_model(text, W)
    join = blockwise.residual_join(_node_of(model, "o"))
    assert join is not None and join.end.name == "z" and [v.name for v in join.others] == ["b", "x"]
    assert blockwise.residual_join(_node_of(model, "q")) is None


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("o = MatMul (x, w1)\n y = Add (o, b)", "a constant added: no skip path"),
        ("o = MatMul (x, w1)\n r = Relu (o)\n y = Add (r, x)", "a Relu before the join: not an Add chain"),
        ("o = MatMul (x, w1)\n z = Add (o, x)\n y = Add (z, o)", "the output used twice"),
        ("o = MatMul (x, w1)\n y = Add (o, o)", "added to itself"),
    ],
)
def test_finder_refuses_what_is_not_a_residual_join(body, why):
    text = f"g (float[2, 8] x) => (float[2, 8] y) {{\n {body}\n }}"
    model = make_model(text, W)
    node = next(n for n in model.graph if n.op_type == "MatMul")
    assert blockwise.residual_join(node) is None, why


def test_finder_stops_at_a_graph_output():
    model = make_model("""g (float[2, 8] x) => (float[2, 8] o, float[2, 8] y) {
        o = MatMul (x, w1)
        y = Add (o, x)
    }""", W)
    assert blockwise.residual_join(_node_of(model, "o")) is None  # the model's own output: it is what it is


def test_finder_refuses_an_add_that_broadcasts_the_layer_output():
    text = """g (float[1, 8] x, float[4, 8] s) => (float[4, 8] y) {
        o = MatMul (x, w1)
        y = Add (o, s)
    }"""
    model = make_model(text, W)
    assert blockwise.residual_join(_node_of(model, "o")) is not None  # shapes unknown: the data decides (PatchGram.output_shape)
    model = common.ShapeInferencePass()(model).model
    assert blockwise.residual_join(_node_of(model, "o")) is None


def test_depends_on_follows_producers():
    text = """g (float[2, 8] x) => (float[2, 8] y) {
        p = MatMul (x, w1)
        q = Relu (p)
        o = MatMul (x, w2)
        y = Add (o, q)
    }"""
    model = make_model(text, W)
    join = blockwise.residual_join(_node_of(model, "o"))
    assert join is not None
    assert blockwise.depends_on(join.others, {id(_node_of(model, "p"))})
    assert not blockwise.depends_on(join.others, {id(_node_of(model, "o"))})


def test_block_objective_from_the_layer_wise_solution_never_rises():
    """fit_rows toward a block target, started from the layer-wise fit: monotone, and below it on the block objective."""
    rng = np.random.default_rng(0)
    d, m, n = 24, 10, 4
    x = (rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)) @ rng.normal(size=(d, 600))
    w = rng.normal(size=(m, d))
    skip_error = 0.3 * rng.normal(size=(m, d)) @ x  # what the skip path got wrong, in the span of the inputs
    gram = PatchGram()
    gram.update(x.T.astype(np.float32), target=(w @ x - skip_error).T.astype(np.float32))
    h = damp(gram.h[0])
    ridge = h[0, 0] - gram.h[0][0, 0]
    layer_wise = fit_rows(w, h, n)
    block = fit_rows(w, h, n, b=gram.toward[0].T + ridge * w, init=(layer_wise.codes, layer_wise.scales))
    assert all(b <= a for a, b in zip(block.history, block.history[1:])), block.history

    def error(result):
        s = (result.codes * result.scales[..., None]).reshape(m, -1).astype(np.float64)
        return float(np.sum((s @ x - (w @ x - skip_error)) ** 2))

    assert error(block) < error(layer_wise)
    s = (block.codes * block.scales[..., None]).reshape(m, -1).astype(np.float64)
    expected = float(objective(s, gram.h[0], gram.toward[0].T).sum() + gram.target_energy)
    assert expected == pytest.approx(error(block), rel=1e-4)  # the Gram blocks give the block output error


def test_conv_targets_are_sampled_at_the_patch_columns():
    """X t^T from PatchGram equals im2col(x) @ t^T computed directly, with every column kept."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    t = rng.normal(size=(2, 4, 3, 3)).astype(np.float32)  # 3x3 kernel, no padding: 3x3 outputs
    gram = PatchGram((3, 3), per_tap=False)
    gram.update(x, target=t)
    patches = np.stack([x[b, :, i : i + 3, j : j + 3].reshape(-1) for b in range(2) for i in range(3) for j in range(3)], axis=1)
    outputs = np.stack([t[b, :, i, j] for b in range(2) for i in range(3) for j in range(3)], axis=1)
    np.testing.assert_allclose(gram.toward[0], patches @ outputs.T, rtol=1e-5)
    assert gram.output_shape(x, 4) == (2, 4, 3, 3)
    with pytest.raises(ValueError, match="does not match"):
        gram.update(x, target=t[:, :, :2])


def _skip_model(seed: int = 0) -> onnx.ModelProto:
    """y1 = x W1 (ternary); z = y1 + relu(y1) W2 + b: W2 closes the branch, its skip y1 carries W1's error."""
    rng = np.random.default_rng(seed)
    d = 16
    weights = {"w1": (rng.normal(size=(d, d)) / np.sqrt(d)).astype(np.float32), "w2": (rng.normal(size=(d, d)) / np.sqrt(d)).astype(np.float32),
               "b": rng.normal(size=d).astype(np.float32) * 0.1}
    model = make_model(f"""g (float[N, {d}] x) => (float[N, {d}] z) {{
        y1 = MatMul (x, w1)
        r = Relu (y1)
        y2 = MatMul (r, w2)
        yb = Add (y2, b)
        z = Add (y1, yb)
    }}""", weights)
    return ir.serde.serialize_model(model)


def test_block_beats_layer_wise_fit_where_the_skip_carries_error(tmp_path):
    """Layer-wise fitting gives W2 the fp32 y2 as its target and leaves W1's error on the skip path;
    the block fit targets z_fp - y1_q - b and removes part of it, on samples it never saw."""
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(16, 16)) / 4 + np.eye(16)
    calib, test = (rng.normal(size=(count, 16)) @ mix for count in (512, 256))
    np.savez(tmp_path / "calib.npz", x=calib.astype(np.float32))
    source = tmp_path / "skip.onnx"
    onnx.save(_skip_model(), source)
    reference = test @ _weights(source, "w1")
    reference = reference + np.maximum(reference, 0) @ _weights(source, "w2") + _weights(source, "b")
    errors, notes = {}, {}
    for method in ("fit", "block"):
        model, report = pipeline.convert(source, calib=tmp_path / "calib.npz", n=4, method=method, act_bits=0, format="qdq")
        (out,) = _run(model, test.astype(np.float32))
        errors[method] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        notes[method] = report.notes
    line = next(note for note in notes["block"] if note.startswith("block fit: 1 layer(s)"))
    layer_wise, block = (float(v) for v in line.split("error ")[1].replace(" (layer-wise fit)", "").split(" -> "))
    assert block < layer_wise  # on the calibration samples
    assert not any(note.startswith("block fit") for note in notes["fit"])
    assert errors["block"] < 0.95 * errors["fit"], errors


def _weights(path, name: str) -> np.ndarray:
    proto = onnx.load(str(path))
    return onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name)).astype(np.float64)


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_block_needs_calibration_data(tmp_path):
    source = tmp_path / "skip.onnx"
    onnx.save(_skip_model(), source)
    with pytest.raises(FgqError, match="--method block fits weights to calibration data"):
        pipeline.convert(source, n=4, method="block", act_bits=0)


def test_cli_takes_method_block(cli, tmp_path):
    source = tmp_path / "skip.onnx"
    onnx.save(_skip_model(), source)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32))
    result = cli("convert", source, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "out.onnx", "--method", "block", "--act-bits", "0")
    assert result.exit_code == 0, result.output
    assert "block fit: 1 layer(s)" in result.output
    bad = cli("convert", source, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "bad.onnx", "--method", "blocks")
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_a_join_that_broadcasts_the_layer_output_is_not_block_fitted(tmp_path):
    """x [B, 1, 8] W1 + s [B, 4, 8]: the Add widens the layer's output; the layer keeps its layer-wise fit."""
    rng = np.random.default_rng(3)
    model = make_model("""g (float[N, 1, 8] x, float[N, 4, 8] s) => (float[N, 4, 8] y) {
        o = MatMul (x, w1)
        y = Add (o, s)
    }""", {"w1": rng.normal(size=(8, 8)).astype(np.float32)})
    source = tmp_path / "wide.onnx"
    onnx.save(ir.serde.serialize_model(model), source)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(32, 1, 8)).astype(np.float32), s=rng.normal(size=(32, 4, 8)).astype(np.float32))
    _, report = pipeline.convert(source, calib=tmp_path / "calib.npz", n=4, method="block", act_bits=0, format="qdq")
    assert any(note.startswith("fit: 1 layer(s)") for note in report.notes)
    assert not any(note.startswith("block fit") for note in report.notes)
