"""Bad input to `fgq-onnx convert`: one clear line, exit code 1, nothing touched, nothing left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def refused(cli, kit, folders, *args, says: tuple[str, ...]):
    """Run convert expecting a clean refusal; `folders` must come out byte-for-byte as they went in."""
    folders = [Path(f) for f in folders]
    before = [kit.listing(f) for f in folders]
    result = cli("convert", *args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    context = f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.exit_code == 1, context
    assert "Traceback" not in result.output and "Traceback" not in result.stderr, context
    assert len(lines) == 1, context
    assert lines[0].startswith("error: "), context
    for word in says:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
    for folder, listed in zip(folders, before):
        assert kit.listing(folder) == listed, f"{folder} changed: inputs modified or output/temp files left behind"
    return lines[0]


# -- the model file --------------------------------------------------------------


def test_random_bytes(cli, kit, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    refused(cli, kit, [tmp_path], path, "--act-bits", "0", says=("model.onnx",))


def test_text_file(cli, kit, tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 20)
    refused(cli, kit, [tmp_path], path, "--act-bits", "0", says=("not", "onnx"))


def test_missing_model_file(cli, kit, tmp_path):
    refused(cli, kit, [tmp_path], tmp_path / "absent.onnx", "--act-bits", "0", says=("absent.onnx", "does not exist"))


def test_model_path_is_a_folder(cli, kit, tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    refused(cli, kit, [tmp_path], tmp_path / "dir.onnx", "--act-bits", "0", says=("dir.onnx", "folder"))


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_model(cli, kit, tmp_path, cnn_path, keep):
    data = cnn_path.read_bytes()
    cnn_path.write_bytes(data[: int(len(data) * keep)])
    refused(cli, kit, [tmp_path], cnn_path, "--act-bits", "0", says=("cnn.onnx",))


def test_tensor_bytes_disagree_with_dims(cli, kit, tmp_path):
    model = kit.build_mlp()
    tensor = next(t for t in model.graph.initializer if t.name == "w1")
    tensor.raw_data = tensor.raw_data[:-8]
    path = kit.write_model(model, tmp_path / "short.onnx")
    refused(cli, kit, [tmp_path], path, "--act-bits", "0", says=("w1",))


def test_opset_too_old(cli, kit, tmp_path):
    path = kit.write_model(kit.build_mlp(opset=6), tmp_path / "old.onnx")
    refused(cli, kit, [tmp_path], path, "--act-bits", "0", says=("opset 6",))


def test_ir_version_too_old(cli, kit, tmp_path):
    model = kit.build_mlp()
    model.ir_version = 2
    path = kit.write_model(model, tmp_path / "old_ir.onnx")
    refused(cli, kit, [tmp_path], path, "--act-bits", "0", says=("ir version 2",))


# -- external data ---------------------------------------------------------------


def externalize(model: onnx.ModelProto, folder: Path, location: str, *, data_file: Path | None = None, extra_length: int = 0, extra_offset: int = 0) -> onnx.ModelProto:
    """Move every initializer into one data file and point the model at `location` for it.

    `extra_offset` shifts every tensor, `extra_length` lengthens the last one.
    """
    blob = bytearray()
    last = len(model.graph.initializer) - 1
    for index, tensor in enumerate(model.graph.initializer):
        raw = numpy_helper.to_array(tensor).tobytes()
        offset = len(blob)
        blob += raw
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        length = len(raw) + (extra_length if index == last else 0)
        for key, value in (("location", location), ("offset", str(offset + extra_offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    if data_file is not None:
        data_file.write_bytes(bytes(blob))
    return model


def test_valid_external_data_input_converts(cli, kit, tmp_path, mlp_samples):
    """The control for the tests below: the same construction, done right, converts."""
    folder = tmp_path / "m"
    folder.mkdir()
    source = kit.write_model(externalize(kit.build_mlp(), folder, "w.bin", data_file=folder / "w.bin"), folder / "mlp.onnx")
    result = cli("convert", source, "--act-bits", "0", "-q")
    assert result.exit_code == 0, result.stderr
    (expected,) = kit.run_ort(source, {"x": mlp_samples})
    (actual,) = kit.run_ort(folder / "mlp.fgq.onnx", {"x": mlp_samples})
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 1.0


def test_external_data_missing(cli, kit, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    source = kit.write_model(externalize(kit.build_mlp(), folder, "w.bin"), folder / "mlp.onnx")
    refused(cli, kit, [tmp_path], source, "--act-bits", "0", says=("w.bin", "missing"))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlinked_folder"])
def test_external_data_outside_the_model_folder(cli, kit, tmp_path, how):
    folder = tmp_path / "m"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    externalize(kit.build_mlp(), folder, "x", data_file=secret)  # a data file that would even fit
    if how == "dotdot":
        location = "../secret.bin"
    elif how == "absolute":
        location = str(secret)
    elif how == "symlink":
        location = "w.bin"
        (folder / "w.bin").symlink_to(secret)
    else:
        location = "sub/secret.bin"
        (folder / "sub").symlink_to(tmp_path)
    source = kit.write_model(externalize(kit.build_mlp(), folder, location), folder / "mlp.onnx")
    refused(cli, kit, [tmp_path], source, "--act-bits", "0", says=("external data", "folder"))


@pytest.mark.parametrize(("extra_offset", "extra_length"), [(0, 4), (10_000_000, 0), (-1_000_000, 0)])
def test_external_data_past_the_end(cli, kit, tmp_path, extra_offset, extra_length):
    folder = tmp_path / "m"
    folder.mkdir()
    model = externalize(kit.build_mlp(), folder, "w.bin", data_file=folder / "w.bin", extra_offset=extra_offset, extra_length=extra_length)
    source = kit.write_model(model, folder / "mlp.onnx")
    refused(cli, kit, [tmp_path], source, "--act-bits", "0", says=("w.bin",))


# -- nothing to do ---------------------------------------------------------------


def _tiny(nodes, inputs, initializers=()) -> onnx.ModelProto:
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_nothing_to_convert_only_relu(cli, kit, tmp_path):
    model = _tiny([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])])
    path = kit.write_model(model, tmp_path / "relu.onnx")
    refused(cli, kit, [tmp_path], path, "--act-bits", "0", says=("nothing to convert",))


def test_nothing_to_convert_activation_matmul(cli, kit, tmp_path):
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4, 8]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 8, 3])]
    path = kit.write_model(_tiny([helper.make_node("MatMul", ["a", "b"], ["y"], name="attention")], inputs), tmp_path / "aa.onnx")
    refused(cli, kit, [tmp_path], path, "--act-bits", "0", says=("nothing to convert", "activation x activation"))


def test_nothing_to_convert_everything_excluded(cli, kit, tmp_path, cnn_path, calib_npz):
    refused(cli, kit, [tmp_path], cnn_path, "--calib", calib_npz, "--exclude", ".*", says=("nothing to convert", "--exclude"))


# -- options ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--n", "1"], ("--n", "1")),
        (["--n", "0"], ("--n",)),
        (["--act-bits", "3"], ("--act-bits", "3")),
        (["--op-types", "Add"], ("--op-types", "Add")),
        (["--weight-storage", "int4"], ("--weight-storage", "int4")),
        (["--exclude", "fc[1"], ("--exclude", "fc[1")),
        (["--percentile", "0"], ("--percentile",)),
        (["--std", "0"], ("--std",)),
        (["--calib-limit", "0"], ("--calib-limit",)),
    ],
)
def test_bad_option_values(cli, kit, tmp_path, cnn_path, calib_npz, args, says):
    refused(cli, kit, [tmp_path], cnn_path, "--calib", calib_npz, *args, says=says)


def test_act_bits_8_without_calibration(cli, kit, tmp_path, cnn_path):
    refused(cli, kit, [tmp_path], cnn_path, says=("--calib",))


def test_output_folder_missing(cli, kit, tmp_path, cnn_path):
    refused(cli, kit, [tmp_path], cnn_path, "--act-bits", "0", "-o", tmp_path / "nowhere" / "out.onnx", says=("nowhere", "does not exist"))


def test_json_folder_missing(cli, kit, tmp_path, cnn_path):
    refused(cli, kit, [tmp_path], cnn_path, "--act-bits", "0", "--json", tmp_path / "nowhere" / "r.json", says=("nowhere", "does not exist"))


@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink", "hardlink"])
def test_output_is_the_input(cli, kit, tmp_path, cnn_path, spelling):
    if spelling == "same":
        output = cnn_path
    elif spelling == "dotted":
        (tmp_path / "sub").mkdir()
        output = tmp_path / "sub" / ".." / "cnn.onnx"
    elif spelling == "symlink":
        output = tmp_path / "link.onnx"
        output.symlink_to(cnn_path)
    else:
        output = tmp_path / "hard.onnx"
        os.link(cnn_path, output)
    refused(cli, kit, [tmp_path], cnn_path, "--act-bits", "0", "-o", output, says=("input",))


@pytest.mark.parametrize("parts", [("[bold]model.onnx",), ("x[", "]model.onnx")])
def test_markup_like_file_name_is_printed_verbatim(cli, kit, tmp_path, parts):
    """Paths are user text, not rich markup: '[bold]' must not vanish, '[/]' (across folders) must not crash."""
    path = tmp_path.joinpath(*parts)
    path.parent.mkdir(exist_ok=True)
    line = refused(cli, kit, [tmp_path], path, "--act-bits", "0", says=("does not exist",))
    assert str(path) in line


# -- calibration data ------------------------------------------------------------


def test_calibration_path_missing(cli, kit, tmp_path, cnn_path):
    refused(cli, kit, [tmp_path], cnn_path, "--calib", tmp_path / "no_such_data", says=("no_such_data",))


def test_empty_calibration_folder(cli, kit, tmp_path, cnn_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    refused(cli, kit, [tmp_path], cnn_path, "--calib", empty, says=("no images", "empty"))


def test_only_unreadable_images(cli, kit, tmp_path, cnn_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for index in range(3):
        (folder / f"b{index}.png").write_bytes(b"not a png")
    before = kit.listing(tmp_path)
    result = cli("convert", cnn_path, "--calib", folder)
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "no samples" in errors[0], result.stderr
    assert kit.listing(tmp_path) == before


def test_a_corrupt_image_among_good_ones_is_skipped(cli, kit, tmp_path, cnn_path, image_dir):
    (image_dir / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    report_path = tmp_path / "r.json"
    result = cli("convert", cnn_path, "--calib", image_dir, "--json", report_path, "-q")
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning") and "zz_corrupt.png" in lines[0], result.stderr
    report = json.loads(report_path.read_text())
    assert report["calibration"]["skipped_unreadable"] == 1
    files = kit.N_IMAGES + 1
    assert report["calibration"]["samples"] == files - files // 5 - 1  # one in five held out; the corrupt one is the last
    assert any("unreadable" in note for note in report["notes"])
    assert (tmp_path / "cnn.fgq.onnx").is_file()


def _npz(tmp_path, **arrays) -> Path:
    path = tmp_path / "data" / "calib.npz"
    path.parent.mkdir(exist_ok=True)
    np.savez(path, **arrays)
    return path


def test_npz_wrong_channel_count(cli, kit, tmp_path, cnn_path):
    calib = _npz(tmp_path, x=np.zeros((4, 3, 28, 28), np.float32))
    refused(cli, kit, [tmp_path], cnn_path, "--calib", calib, says=("'x'", "shape"))


def test_npz_wrong_rank(cli, kit, tmp_path, cnn_path):
    calib = _npz(tmp_path, x=np.zeros((4, 784), np.float32))
    refused(cli, kit, [tmp_path], cnn_path, "--calib", calib, says=("rank",))


def test_npz_string_array(cli, kit, tmp_path, cnn_path):
    calib = _npz(tmp_path, x=np.full((4, 1, 28, 28), "pixel"))
    refused(cli, kit, [tmp_path], cnn_path, "--calib", calib, says=("'x'", "float32"))


def test_npz_object_array(cli, kit, tmp_path, cnn_path):
    calib = _npz(tmp_path, x=np.array([None, 1], dtype=object))
    refused(cli, kit, [tmp_path], cnn_path, "--calib", calib, says=("calib.npz",))


def test_npz_missing_input_key(cli, kit, tmp_path, cnn_path):
    calib = _npz(tmp_path, images=np.zeros((4, 1, 28, 28), np.float32))
    refused(cli, kit, [tmp_path], cnn_path, "--calib", calib, says=("'x'", "images"))


def test_npz_without_samples(cli, kit, tmp_path, cnn_path):
    calib = _npz(tmp_path, x=np.zeros((0, 1, 28, 28), np.float32))
    refused(cli, kit, [tmp_path], cnn_path, "--calib", calib, says=("no samples",))


def test_npz_not_an_archive(cli, kit, tmp_path, cnn_path):
    calib = tmp_path / "calib.npz"
    calib.write_bytes(b"PK\x03\x04 broken zip")
    refused(cli, kit, [tmp_path], cnn_path, "--calib", calib, says=("calib.npz",))


def test_npz_truncated(cli, kit, tmp_path, cnn_path):
    calib = _npz(tmp_path, x=np.random.default_rng(0).normal(size=(4, 1, 28, 28)).astype(np.float32))
    calib.write_bytes(calib.read_bytes()[:5000])
    refused(cli, kit, [tmp_path], cnn_path, "--calib", calib, says=("calib.npz",))


def test_npz_non_finite_values(cli, kit, tmp_path, cnn_path):
    calib = _npz(tmp_path, x=np.full((4, 1, 28, 28), np.nan, np.float32))
    refused(cli, kit, [tmp_path], cnn_path, "--calib", calib, says=("non-finite",))


def test_npz_batched_form_with_a_scalar_input(cli, kit, tmp_path):
    """x [batch, 16] and a scalar s: samples along the batch axis cannot split a scalar; say so."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (16, 8)).astype(np.float32), "w")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16]), helper.make_tensor_value_info("s", TensorProto.FLOAT, [])]
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"]), helper.make_node("MatMul", ["xs", "w"], ["y"], name="mm")]
    path = kit.write_model(_tiny(nodes, inputs, [w]), tmp_path / "scalar.onnx")
    calib = _npz(tmp_path, x=np.ones((4, 16), np.float32), s=np.array(2.0, np.float32))
    refused(cli, kit, [tmp_path], path, "--calib", calib, says=("'s'",))


@pytest.mark.parametrize("which", ["output", "json"])
def test_output_is_a_folder(cli, kit, tmp_path, cnn_path, which):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    args = ["-o", folder] if which == "output" else ["--json", folder]
    refused(cli, kit, [tmp_path], cnn_path, "--act-bits", "0", *args, says=("a_folder", "folder"))


def test_output_over_the_calibration_data(cli, kit, tmp_path, cnn_path, calib_npz):
    refused(cli, kit, [tmp_path], cnn_path, "--calib", calib_npz, "-o", calib_npz, says=("cnn_calib.npz",))


@pytest.mark.parametrize("which", ["output", "json"])
def test_output_over_the_input_external_data(cli, kit, tmp_path, which):
    folder = tmp_path / "m"
    folder.mkdir()
    source = kit.write_model(externalize(kit.build_mlp(), folder, "w.bin", data_file=folder / "w.bin"), folder / "mlp.onnx")
    args = ["-o", folder / "w.bin"] if which == "output" else ["--json", folder / "w.bin"]
    refused(cli, kit, [tmp_path], source, "--act-bits", "0", *args, says=("w.bin",))


def test_json_and_output_the_same_file(cli, kit, tmp_path, cnn_path):
    same = tmp_path / "out.onnx"
    refused(cli, kit, [tmp_path], cnn_path, "--act-bits", "0", "-o", same, "--json", same, says=("out.onnx",))


def test_missing_model_with_an_existing_output(cli, kit, tmp_path):
    (tmp_path / "out.onnx").write_bytes(b"previous output")
    refused(cli, kit, [tmp_path], tmp_path / "absent.onnx", "--act-bits", "0", "-o", tmp_path / "out.onnx", says=("absent.onnx", "does not exist"))


# -- failures while writing --------------------------------------------------------


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize(("raised", "code"), [(OSError(28, "No space left on device"), 2), (KeyboardInterrupt(), 130)])
def test_failed_write_leaves_nothing_behind(cli, kit, tmp_path, cnn_path, monkeypatch, external, raised, code):
    """A write that dies half way (disk full, Ctrl-C) leaves neither a partial model, nor data, nor a temp file."""
    import onnx_ir

    from fgq_onnx import model_io

    real_save = onnx_ir.save

    def dying_save(model, path, *args, **kwargs):
        real_save(model, path, *args, **kwargs)  # the bytes land, then the failure comes
        raise raised

    monkeypatch.setattr(model_io.ir, "save", dying_save)
    before = kit.listing(tmp_path)
    result = cli("convert", cnn_path, "--act-bits", "0", "-q", *(["--external-data"] if external else []))
    assert result.exit_code == code, result.stderr
    assert "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert kit.listing(tmp_path) == before
