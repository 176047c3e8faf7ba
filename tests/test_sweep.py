"""`fgq-onnx sweep`: settings x accuracy, one calibration reused, CSV and plot."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from fgq_onnx import pipeline
from fgq_onnx.errors import FgqError
from fgq_onnx.sweep import sweep


@pytest.fixture
def labelled(kit, cnn_path, cnn_samples, tmp_path):
    """The calibration samples labelled with the fp32 model's own predictions (fp32 top-1 = 1)."""
    path = tmp_path / "labelled.npz"
    np.savez(path, x=cnn_samples, y=kit.run_ort(cnn_path, {"x": cnn_samples})[0].argmax(axis=1))
    return path


# Multiply-accumulates per sample of conftest's CNN: conv1 8x1x3x3 and conv2 16x8x3x3 at 28x28 and 14x14, fc1, fc2.
STEM_MACS = 8 * 9 * 28 * 28
CNN_MACS = STEM_MACS + 16 * 8 * 9 * 14 * 14 + 160 * 784 + 160 * 10


def test_sweep_writes_csv_and_plot_and_calibrates_once(cnn_path, calib_npz, labelled, tmp_path):
    result = sweep(cnn_path, calib_npz, labelled, ns=(8, 4), act_bits=(8, 0), methods=("exact",), out_dir=tmp_path / "out")
    assert [(row.n, row.method, row.act_bits) for row in result.rows] == [(4, "exact", 8), (8, "exact", 8), (4, "exact", 0), (8, "exact", 0)]
    assert result.fp32.top1 == 1.0 and result.fp32.method == "fp32"
    assert result.calibrations == 1 and result.settings_calibrated == 2
    assert result.plain_convert_seconds > 0 and result.reusing_convert_seconds > 0
    saved = (result.plain_convert_seconds - result.reusing_convert_seconds) * 2 - result.calibration_seconds
    assert result.time_saved_seconds == pytest.approx(max(0.0, saved))
    for row in result.rows:
        assert 0.0 <= row.top1 <= 1.0 and row.samples == 24
        # every linear layer converted; the 1-channel stem with one group per weight (channel groups per kernel tap)
        assert row.multiplications_eliminated == pytest.approx((1 - 1 / row.n) * (1 - STEM_MACS / CNN_MACS))
        assert 0 < row.file_bytes < result.fp32.file_bytes
    with open(tmp_path / "out" / "sweep.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["method"] for row in rows] == ["fp32", "exact", "exact", "exact", "exact"]
    assert float(rows[1]["top1"]) == pytest.approx(result.rows[0].top1, abs=1e-6)
    with Image.open(tmp_path / "out" / "sweep.png") as image:
        assert image.format == "PNG" and image.width > 500
    assert not (tmp_path / "out" / "models").exists()


def test_recalibrate_runs_one_calibration_per_setting(cnn_path, calib_npz, labelled, tmp_path):
    result = sweep(cnn_path, calib_npz, labelled, ns=(4,), act_bits=(8, 4), methods=("twn",), recalibrate=True, keep_models=True, out_dir=tmp_path / "out")
    assert (result.calibrations, result.time_saved_seconds, result.recalibrated) == (2, 0.0, True)
    assert sorted(p.name for p in (tmp_path / "out" / "models").iterdir()) == ["cnn.n4.twn.a4.onnx", "cnn.n4.twn.a8.onnx"]


def test_cached_fp32_statistics_give_the_ranges_of_a_plain_convert(kit, calib_npz, tmp_path):
    # Ternary-exact weights: the ternarized model computes what the fp32 one does, so
    # statistics taken on fp32 must give the very ranges a plain convert calibrates.
    path = kit.write_model(kit.build_cnn(exact=True), tmp_path / "exact.onnx")
    cache = pipeline.collect_calibration(path, calib_npz)
    plain = pipeline.convert(path, n=4, calib=calib_npz)
    cached = pipeline.convert(path, n=4, calib=calib_npz, calibration_cache=cache)
    assert [a.tensor for a in cached.report.activations] == [a.tensor for a in plain.report.activations]
    assert [a.scale for a in cached.report.activations] == pytest.approx([a.scale for a in plain.report.activations], rel=1e-5)
    assert cached.report.calibration["reused_fp32_statistics"] is True
    with pytest.raises(FgqError, match="no statistics"):
        pipeline.convert(path, n=4, calibration_cache=pipeline.CalibrationCache({}))


def test_reused_statistics_give_the_very_model_of_a_plain_convert(cnn_path, calib_npz):
    # With bias correction (the default) ranges come from the fp32 pass in both cases.
    cache = pipeline.collect_calibration(cnn_path, calib_npz)
    for method in ("exact", "twn"):
        plain = pipeline.convert(cnn_path, n=8, method=method, calib=calib_npz).model
        cached = pipeline.convert(cnn_path, n=8, method=method, calib=calib_npz, calibration_cache=cache).model
        assert plain.graph.initializers.keys() == cached.graph.initializers.keys()
        for name, value in plain.graph.initializers.items():
            np.testing.assert_array_equal(value.const_value.numpy(), cached.graph.initializers[name].const_value.numpy(), err_msg=name)


def test_cli_sweep(cli, cnn_path, calib_npz, labelled, tmp_path):
    run = cli("sweep", cnn_path, "--calib", calib_npz, "--data", labelled, "--n", "4", "--n", "16", "--act-bits", "8", "--method", "exact", "-o", tmp_path / "out")
    assert run.exit_code == 0, run.output
    assert "fp32" in run.stdout and "collected once" in run.stdout and "sweep.png" in run.stdout
    assert (tmp_path / "out" / "sweep.csv").is_file() and (tmp_path / "out" / "sweep.png").is_file()
    payload = json.loads(cli("sweep", cnn_path, "--calib", calib_npz, "--data", labelled, "--n", "4", "--act-bits", "0", "--method", "twn", "-o", tmp_path / "o2", "--json").stdout)
    assert payload["fp32"]["top1"] == 1.0 and [row["n"] for row in payload["rows"]] == [4] and payload["calibrations"] == 0


@pytest.mark.parametrize(("args", "fragment"), [
    (["--n", "1"], "--n must be at least 2"),
    (["--act-bits", "3"], "--act-bits must be 8, 4 or 0"),
    (["--act-bits", "8", "--no-calib"], "calibration data"),
])
def test_cli_sweep_bad_settings(cli, cnn_path, calib_npz, labelled, tmp_path, args, fragment):
    calib = [] if "--no-calib" in args else ["--calib", calib_npz]
    run = cli("sweep", cnn_path, "--data", labelled, "-o", tmp_path / "out", *calib, *[a for a in args if a != "--no-calib"])
    assert run.exit_code == 1, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], run.stderr
    assert not (tmp_path / "out").exists()  # refused before any work


def test_output_must_be_a_folder(cli, cnn_path, calib_npz, labelled, tmp_path):
    (tmp_path / "file").write_text("")
    run = cli("sweep", cnn_path, "--calib", calib_npz, "--data", labelled, "-o", tmp_path / "file", "--n", "4")
    assert run.exit_code == 1 and "not a folder" in run.stderr
