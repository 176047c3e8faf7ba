"""`fgq-onnx compare`: output and per-layer drift, streamed, checked against whole-array numpy."""

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fgq_onnx.compare import compare, ternary_nodes
from fgq_onnx.evaluate import open_session


@pytest.fixture
def inputs(tmp_path, cnn_samples) -> Path:
    path = tmp_path / "inputs.npz"
    np.savez(path, x=cnn_samples[:21])
    return path


def test_a_model_against_itself_is_exact(cnn_path, inputs):
    result = compare(cnn_path, cnn_path, inputs)
    (row,) = result.outputs
    assert (row.name, row.top1_agreement, row.max_abs_diff, row.mean_abs_diff, row.kl) == ("y", 1.0, 0.0, 0.0, 0.0)
    assert row.cosine == pytest.approx(1.0) and math.isinf(row.sqnr_db)
    assert result.layers == [] and result.n == 21


def test_streamed_statistics_equal_whole_array_numpy(cnn_path, converted, inputs, cnn_samples):
    marked = ternary_nodes(converted)
    assert {node for _, node, _, _ in marked} == {"conv1", "conv2", "fc1", "fc2"}
    result = compare(cnn_path, converted, inputs, batch_size=4)  # 21 samples: 5 batches of 4 and one of 1
    names = [tensor for tensor, *_ in marked]
    ref = open_session(cnn_path, names).run({"x": cnn_samples[:21]})
    cand = open_session(converted, names).run({"x": cnn_samples[:21]})

    (out,) = result.outputs
    a, b = ref["y"].astype(np.float64), cand["y"].astype(np.float64)
    assert out.top1_agreement == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))
    assert out.max_abs_diff == pytest.approx(np.abs(a - b).max(), rel=1e-5)
    assert out.mean_abs_diff == pytest.approx(np.abs(a - b).mean(), rel=1e-5)
    cosines = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert out.cosine == pytest.approx(cosines.mean(), rel=1e-6)
    p = np.exp(a - a.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(b - b.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    assert out.kl == pytest.approx(np.mean(np.sum(p * np.log(p / q), 1)), rel=1e-4, abs=1e-9)
    assert out.sqnr_db == pytest.approx(10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2)), rel=1e-5)

    assert [layer.sqnr_db for layer in result.layers] == sorted(layer.sqnr_db for layer in result.layers)
    assert {layer.node for layer in result.layers} == {"conv1", "conv2", "fc1", "fc2"}
    for layer in result.layers:
        x, y = ref[layer.name].astype(np.float64), cand[layer.name].astype(np.float64)
        assert layer.sqnr_db == pytest.approx(10 * np.log10(np.sum(x**2) / np.sum((x - y) ** 2)), rel=1e-5)
        assert layer.elements == x.size and layer.setting.startswith("n=1" if layer.node == "conv1" else "n=4")  # 1-channel stem: per tap
    # conv1 was folded with its BatchNorm: its output keeps the BatchNorm's name, which the reference has too
    assert next(layer for layer in result.layers if layer.node == "conv1").name == "bn1"


def test_cli_table_json_and_csv(cli, cnn_path, converted, inputs):
    table = cli("compare", cnn_path, converted, "--data", inputs)
    assert table.exit_code == 0, table.output
    assert "worst SQNR first" in table.stdout and "fc2" in table.stdout
    run = cli("compare", cnn_path, converted, "--data", inputs, "--json")
    assert run.exit_code == 0, run.output
    payload = json.loads(run.stdout)
    assert payload["n"] == 21 and payload["outputs"][0]["name"] == "y" and len(payload["layers"]) == 4
    rows = list(csv.DictReader(io.StringIO(cli("compare", cnn_path, converted, "--data", inputs, "--csv").stdout)))
    assert [row["kind"] for row in rows] == ["output"] + ["layer"] * 4
    assert float(rows[1]["sqnr_db"]) <= float(rows[-1]["sqnr_db"])
    assert cli("compare", cnn_path, converted, "--data", inputs, "--json", "--csv").exit_code == 1


def one_line_error(run, fragment):
    assert run.exit_code == 1, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in run.output, run.stderr


def test_models_with_different_inputs_or_outputs(cli, cnn_path, mlp_path, tmp_path, inputs):
    one_line_error(cli("compare", cnn_path, mlp_path, "--data", inputs), "different inputs")
    renamed = onnx.load(cnn_path)
    renamed.graph.output[0].name = "scores"
    renamed.graph.node[-1].output[0] = "scores"
    onnx.save(renamed, tmp_path / "renamed.onnx")
    one_line_error(cli("compare", cnn_path, tmp_path / "renamed.onnx", "--data", inputs), "share no output")


def test_custom_op_candidate_without_its_library(cli, cnn_path, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("FGQ_OPS_LIBRARY", str(tmp_path / "missing.so"))
    graph = helper.make_graph(
        [helper.make_node("TernaryGemm", ["x"], ["y"], name="custom", domain="com.fgq")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.fgq", 1)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "custom.onnx")
    one_line_error(cli("compare", cnn_path, tmp_path / "custom.onnx", "--data", inputs), "com.fgq")
