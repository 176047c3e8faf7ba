"""`fgq-onnx eval` and fgq_onnx.evaluate: accuracy on labelled data, and bad input."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from fgq_onnx.errors import FgqError
from fgq_onnx.evaluate import evaluate, open_session, top_k_hits


def scores(kit, path: Path, x: np.ndarray) -> np.ndarray:
    return kit.run_ort(path, {"x": x})[0]


@pytest.fixture
def samples():
    return np.random.default_rng(7).uniform(0.0, 1.0, (37, 1, 28, 28)).astype(np.float32)


def expected_hits(logits: np.ndarray, labels: np.ndarray, k: int = 5) -> tuple[int, int]:
    order = np.argsort(-logits, axis=1, kind="stable")
    return int(np.sum(order[:, 0] == labels)), int(np.sum([label in row[:k] for row, label in zip(order, labels)]))


def test_npz_accuracy_matches_numpy_over_uneven_batches(kit, cnn_path, samples, tmp_path):
    logits = scores(kit, cnn_path, samples)
    rng = np.random.default_rng(8)
    labels = np.where(rng.uniform(size=len(samples)) < 0.5, logits.argmax(axis=1), rng.integers(0, 10, len(samples)))
    data = tmp_path / "test.npz"
    np.savez(data, x=samples, y=labels)
    result = evaluate(cnn_path, data, batch_size=8)  # 37 = 4 * 8 + 5: a short last batch
    top1, top5 = expected_hits(logits, labels)
    assert (result.n, result.correct1, result.correct5, result.k, result.classes) == (37, top1, top5, 5, 10)
    assert result.top1 == pytest.approx(top1 / 37) and result.top5 == pytest.approx(top5 / 37)
    assert 0 < top1 < 37  # the labels really test something


def test_predicted_labels_score_one_and_least_likely_score_zero(kit, cnn_path, samples, tmp_path):
    logits = scores(kit, cnn_path, samples)
    right, wrong = tmp_path / "right.npz", tmp_path / "wrong.npz"
    np.savez(right, x=samples, y=logits.argmax(axis=1))
    np.savez(wrong, x=samples, y=logits.argmin(axis=1))
    assert (evaluate(cnn_path, right).top1, evaluate(cnn_path, right).top5) == (1.0, 1.0)
    assert (evaluate(cnn_path, wrong).top1, evaluate(cnn_path, wrong).top5) == (0.0, 0.0)


def write_class_folders(kit, model: Path, root: Path, samples: np.ndarray, classes: int = 10) -> np.ndarray:
    """28x28 PNGs filed under the class the model predicts (so top-1 is 1.0); returns the pixels used."""
    pixels = np.round(samples[:, 0] * 255).astype(np.uint8)
    predicted = scores(kit, model, pixels[:, None].astype(np.float32) / 255).argmax(axis=1)
    for name in range(classes):
        (root / f"class_{name:02d}").mkdir(parents=True)
    for index, (image, label) in enumerate(zip(pixels, predicted)):
        Image.fromarray(image, mode="L").save(root / f"class_{label:02d}" / f"{index:03d}.png")
    return predicted


def test_image_folder_labels_come_from_sorted_class_folders(kit, cnn_path, samples, tmp_path):
    write_class_folders(kit, cnn_path, tmp_path / "data", samples)
    result = evaluate(cnn_path, tmp_path / "data", batch_size=16)
    assert (result.n, result.top1, result.top5, result.skipped) == (len(samples), 1.0, 1.0, 0)


def test_unreadable_images_are_skipped_and_counted(kit, cnn_path, samples, tmp_path, cli):
    write_class_folders(kit, cnn_path, tmp_path / "data", samples)
    (tmp_path / "data" / "class_03" / "broken.png").write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match="unreadable"):
        result = evaluate(cnn_path, tmp_path / "data")
    assert (result.n, result.skipped, result.top1) == (len(samples), 1, 1.0)
    run = cli("eval", cnn_path, "--data", tmp_path / "data", "--json")
    assert run.exit_code == 0, run.output
    payload = json.loads(run.stdout)
    assert payload["skipped"] == 1 and payload["n"] == len(samples)


def test_cli_json_is_one_object_with_top1_top5_n(kit, cnn_path, samples, tmp_path, cli):
    logits = scores(kit, cnn_path, samples)
    np.savez(tmp_path / "t.npz", x=samples, y=logits.argmax(axis=1))
    run = cli("eval", cnn_path, "--data", tmp_path / "t.npz", "--json", "--batch-size", "10")
    assert run.exit_code == 0, run.output
    payload = json.loads(run.stdout)
    assert payload["top1"] == 1.0 and payload["top5"] == 1.0 and payload["n"] == len(samples)
    table = cli("eval", cnn_path, "--data", tmp_path / "t.npz", "--limit", "5")
    assert table.exit_code == 0 and "100.00% (5 of 5)" in table.stdout


def test_top_k_counts_ties_against_the_label_and_never_nan():
    logits = np.array([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [np.nan, 0.0, 0.0]])
    assert top_k_hits(logits, np.array([0, 1, 0]), 2) == (1, 2)
    assert top_k_hits(logits, np.array([2, 2, 1]), 2) == (0, 1)


def test_converted_model_evaluates(kit, cnn_path, calib_npz, samples, tmp_path):
    import fgq_onnx

    model, _ = fgq_onnx.convert(cnn_path, n=4, calib=calib_npz)
    fgq_onnx.save(model, tmp_path / "cnn.fgq.onnx")
    logits = scores(kit, cnn_path, samples)
    np.savez(tmp_path / "t.npz", x=samples, y=logits.argmax(axis=1))
    result = evaluate(tmp_path / "cnn.fgq.onnx", tmp_path / "t.npz")
    assert result.n == len(samples) and 0.0 <= result.top1 <= 1.0


# -- bad input: one line, exit 1, no traceback --------------------------------------


def assert_one_line_error(run, *fragments):
    assert run.exit_code == 1, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), run.stderr
    assert "Traceback" not in run.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_folder_without_class_folders(cli, cnn_path, image_dir):
    assert_one_line_error(cli("eval", cnn_path, "--data", image_dir), "no class sub-folders")


def test_class_count_must_match_the_output(kit, cli, cnn_path, samples, tmp_path):
    for name in ("a", "b", "c"):
        kit.write_images(tmp_path / "data" / name, 2)
    assert_one_line_error(cli("eval", cnn_path, "--data", tmp_path / "data", "--size", "28", "28"), "3 class folders", "10 classes")


def test_labels_out_of_range(cli, cnn_path, samples, tmp_path):
    np.savez(tmp_path / "t.npz", x=samples, y=np.full(len(samples), 12))
    assert_one_line_error(cli("eval", cnn_path, "--data", tmp_path / "t.npz"), "label 12 is out of range")


def test_npz_without_labels(cli, cnn_path, calib_npz):
    assert_one_line_error(cli("eval", cnn_path, "--data", calib_npz), "no labels")


def rank4_model(tmp_path) -> Path:
    weight = numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 28, 28])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "rank4.onnx")
    return tmp_path / "rank4.onnx"


def test_outputs_that_are_not_class_scores(cli, samples, tmp_path):
    np.savez(tmp_path / "t.npz", x=samples, y=np.zeros(len(samples), np.int64))
    assert_one_line_error(cli("eval", rank4_model(tmp_path), "--data", tmp_path / "t.npz"), "class scores")


def custom_op_model(tmp_path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("TernaryConv", ["x"], ["y"], name="custom", domain="com.fgq")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.fgq", 1)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "custom.onnx")
    return tmp_path / "custom.onnx"


def test_custom_op_model_without_its_library(cli, samples, tmp_path, monkeypatch):
    monkeypatch.setenv("FGQ_OPS_LIBRARY", str(tmp_path / "missing" / "libfgq_ops.so"))
    path = custom_op_model(tmp_path)
    with pytest.raises(FgqError, match="com.fgq"):
        open_session(path)
    np.savez(tmp_path / "t.npz", x=samples, y=np.zeros(len(samples), np.int64))
    assert_one_line_error(cli("eval", path, "--data", tmp_path / "t.npz"), "custom ops", "com.fgq")


def test_missing_data_and_model(cli, cnn_path, tmp_path):
    assert_one_line_error(cli("eval", cnn_path, "--data", tmp_path / "nothing"), "does not exist")
    assert_one_line_error(cli("eval", tmp_path / "none.onnx", "--data", tmp_path), "does not exist")


def test_custom_ops_with_function_bodies_run_without_the_library(samples, tmp_path, monkeypatch):
    # The converter's custom-op models carry an ONNX function per com.fgq op; onnxruntime runs it.
    monkeypatch.setenv("FGQ_OPS_LIBRARY", str(tmp_path / "missing.so"))
    const = lambda name, values: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64), name))  # noqa: E731
    body = helper.make_function(
        "com.fgq", "FirstTen", ["X"], ["Y"],
        [helper.make_node("Flatten", ["X"], ["F"]), const("s", [0]), const("e", [10]), const("a", [1]), helper.make_node("Slice", ["F", "s", "e", "a"], ["Y"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("FirstTen", ["x"], ["y"], name="head", domain="com.fgq")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.fgq", 1)], functions=[body])
    model.ir_version = 8
    onnx.save(model, tmp_path / "functions.onnx")
    np.savez(tmp_path / "t.npz", x=samples, y=samples.reshape(len(samples), -1)[:, :10].argmax(axis=1))
    assert evaluate(tmp_path / "functions.onnx", tmp_path / "t.npz").top1 == 1.0
