"""Data-aware ternary fitting: never worse than exact on its objective, monotone, and the input Gram blocks are right."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fgq_onnx.fitting import PatchGram, damp, fit_rows, objective
from fgq_onnx.ternary import solve_exact, solve_weighted


def correlated_inputs(rng, d, columns=400):
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    return mix @ rng.normal(size=(d, columns))


@pytest.mark.parametrize(("seed", "n", "length"), [(0, 4, 16), (1, 4, 18), (2, 8, 24), (3, 16, 64)])
def test_fit_is_never_worse_than_exact_and_is_monotone(seed, n, length):
    rng = np.random.default_rng(seed)
    x = correlated_inputs(rng, length)
    h = damp(x @ x.T)
    w = rng.normal(size=(12, length))
    result = fit_rows(w, h, n, iterations=5)
    assert all(b <= a + 1e-9 * abs(result.history[0]) for a, b in zip(result.history, result.history[1:])), result.history
    groups = -(-length // n)
    padded = np.zeros((12, groups * n))
    padded[:, :length] = w
    codes, scales = solve_exact(padded.reshape(12, groups, n).astype(np.float32))
    hp = np.zeros((groups * n,) * 2)
    hp[:length, :length] = h
    exact = objective((codes * scales[..., None]).reshape(12, -1).astype(np.float64), hp, padded @ hp)
    fitted = objective((result.codes * result.scales[..., None]).reshape(12, -1).astype(np.float64), hp, padded @ hp)
    assert np.all(fitted <= exact + 1e-9 * np.abs(exact).max())  # row by row
    assert result.history[0] <= exact.sum() + 1e-9 * abs(exact.sum())  # the start is the better of exact and weighted per row
    assert fitted.sum() < exact.sum() * 0.999 or fitted.sum() < exact.sum() - 1e-6  # and it actually helps on correlated inputs
    assert set(np.unique(result.codes)) <= {-1, 0, 1} and np.all(result.scales >= 0)
    assert not result.codes.reshape(12, -1)[:, length:].any()  # padding stays zero


def test_output_error_drops_on_held_out_data_of_the_same_distribution():
    rng = np.random.default_rng(7)
    d, n = 32, 4
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    train, test = mix @ rng.normal(size=(d, 2000)), mix @ rng.normal(size=(d, 2000))
    w = rng.normal(size=(16, d))
    result = fit_rows(w, damp(train @ train.T), n)
    exact_codes, exact_scales = solve_exact(w.reshape(16, -1, n).astype(np.float32))

    def error(codes, scales):
        s = (codes * scales[..., None]).reshape(16, -1)
        return np.linalg.norm((w - s) @ test) / np.linalg.norm(w @ test)

    assert error(result.codes, result.scales) < 0.9 * error(exact_codes, exact_scales)


def test_the_fit_starts_from_the_better_of_exact_and_input_weighted_per_row():
    """Inputs whose scales span decades (a 1x1 Conv after a BatchNorm-folded depthwise one): the
    diag(H)-weighted solution is the better start for most rows, never a worse one."""
    rng = np.random.default_rng(11)
    d, n, rows = 32, 4, 24
    x = np.exp(rng.uniform(-3, 3, d))[:, None] * rng.normal(size=(d, 3000))
    h = damp(x @ x.T)
    w = rng.normal(size=(rows, d)) / np.sqrt(np.diag(h))[None]
    start = fit_rows(w, h, n, iterations=0)
    groups = w.reshape(rows, -1, n).astype(np.float32)

    def per_row(codes, scales):
        return objective((codes * scales[..., None]).reshape(rows, -1).astype(np.float64), h, w @ h)

    exact, weighted = per_row(*solve_exact(groups)), per_row(*solve_weighted(groups, np.diag(h).reshape(1, -1, n)))
    chosen = per_row(start.codes, start.scales)
    np.testing.assert_allclose(chosen, np.minimum(exact, weighted), rtol=1e-6, atol=1e-9 * np.abs(exact).max())
    assert chosen.sum() < exact.sum()


def test_with_white_inputs_the_exact_solution_is_already_optimal():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 16))
    result = fit_rows(w, np.eye(16), 4)
    codes, scales = solve_exact(w.reshape(6, 4, 4).astype(np.float32))
    assert result.history[-1] == pytest.approx(result.history[0], rel=1e-6)
    np.testing.assert_allclose(result.codes * result.scales[..., None], codes * scales[..., None], rtol=1e-5, atol=1e-6)


def _conv_energy(x, w, pads, strides):
    """sum over outputs of (w . patch)^2, computed by onnxruntime's Conv."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=pads, strides=strides)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    return float(np.sum(y.astype(np.float64) ** 2))


def test_patch_gram_blocks_match_the_convolution():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5, 7, 6)).astype(np.float32)
    pads, strides = [1, 0, 1, 2], [2, 1]
    per_tap = PatchGram((3, 3), strides, None, pads, per_tap=True)
    whole = PatchGram((3, 3), strides, None, pads, per_tap=False)
    for part in (x[:1], x[1:]):  # streamed over two batches
        per_tap.update(part)
        whole.update(part)
    assert per_tap.h.shape == (9, 5, 5) and whole.h.shape == (1, 45, 45)
    w = rng.normal(size=(1, 5, 3, 3))
    assert w.reshape(-1) @ whole.h[0] @ w.reshape(-1) == pytest.approx(_conv_energy(x, w, pads, strides), rel=1e-5)
    one_tap = np.zeros_like(w)
    one_tap[0, :, 1, 2] = w[0, :, 1, 2]
    assert w[0, :, 1, 2] @ per_tap.h[1 * 3 + 2] @ w[0, :, 1, 2] == pytest.approx(_conv_energy(x, one_tap, pads, strides), rel=1e-5)
    joint = PatchGram((3, 3), strides, None, pads, joint=True)  # every tap together, a filter in (r, s, c) order
    joint.update(x)
    assert joint.h.shape == (1, 45, 45)
    tap_major = w[0].transpose(1, 2, 0).reshape(-1)
    assert tap_major @ joint.h[0] @ tap_major == pytest.approx(_conv_energy(x, w, pads, strides), rel=1e-5)
    rows = PatchGram()
    a = rng.normal(size=(2, 4, 6)).astype(np.float32)
    rows.update(a)
    np.testing.assert_allclose(rows.h[0], a.reshape(-1, 6).T.astype(np.float64) @ a.reshape(-1, 6), rtol=1e-5)


# -- in the converter ---------------------------------------------------------------


@pytest.mark.parametrize("scale_format", ["f32", "u8"])
def test_replace_ternary_weights_pass_decodes_the_new_codes(scale_format):
    import onnx_ir as ir

    from fgq_onnx.passes.replace_ternary_weights import ReplaceTernaryWeightsPass
    from fgq_onnx.passes.ternarize_weights import TernarizeWeightsPass
    from fgq_onnx.ternary import GroupLayout, TernaryWeight

    rng = np.random.default_rng(4)
    w = rng.normal(size=(8, 3)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["a", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [8, 8])], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8, 3])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 25)])
    proto.ir_version = 13
    model = ir.serde.deserialize_model(proto)
    original = model.graph.initializers["w"]
    model = TernarizeWeightsPass(4, scale_format=scale_format)(model).model
    layout = GroupLayout((8, 3), axis=0, n=4)
    codes = rng.choice(np.array([-1, 0, 1], np.int8), size=(3, 2, 4))
    scales = np.array([[0.5, 0.25], [1.0, 2.0], [0.125, 4.0]], np.float32)
    new = TernaryWeight(layout, codes, scales)
    result = ReplaceTernaryWeightsPass({"y": (original, new)}, "int2", scale_format)(model)
    assert result.modified
    assert sum(n.op_type == "MatMul" for n in model.graph) == 1
    assert len([n for n in model.graph if n.op_type == "DequantizeLinear"]) == (2 if scale_format == "u8" else 1)  # the old chain is gone
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    (decoded,) = session.run(None, {"a": np.eye(8, dtype=np.float32)})
    np.testing.assert_allclose(decoded, new.dequantize(), rtol=1e-2 if scale_format == "u8" else 1e-6, atol=1e-6)


def test_method_fit_in_the_converter(kit, tmp_path, calib_npz, cnn_samples):
    """fit lowers each layer's output error against exact, and the whole model's error against fp32."""
    from fgq_onnx import pipeline
    from fgq_onnx.errors import FgqError

    source = kit.write_model(kit.build_cnn(n=8), tmp_path / "cnn.onnx")
    (reference,) = kit.run_ort(source, {"x": cnn_samples})
    errors = {}
    for method in ("exact", "fit"):
        model, report = pipeline.convert(source, calib=calib_npz, n=8, method=method, act_bits=0, bias_correction=False)
        path = tmp_path / f"{method}.onnx"
        pipeline.save(model, path)
        (out,) = kit.run_ort(path, {"x": cnn_samples})
        errors[method] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        if method == "fit":
            line = next(note for note in report.notes if note.startswith("fit: 4 layer(s)"))
            exact, fitted = (float(v) for v in line.split("error ")[1].replace(" (exact)", "").split(" -> "))
            assert fitted < exact
    assert errors["fit"] < errors["exact"], errors
    with pytest.raises(FgqError, match="--calib"):
        pipeline.convert(source, n=8, method="fit", act_bits=0)
