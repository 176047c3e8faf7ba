"""End-to-end fidelity on held-out samples (fgq_onnx/fidelity.py), and declared -1 dims treated as dynamic."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import fgq_onnx
from fgq_onnx import runtime
from fgq_onnx.fidelity import AGREEMENT_SAMPLES, FEW_BUDGET_SAMPLES, Fidelity, OutputFidelity

HELD_OUT = slice(4, None, 5)  # one sample in five: the last of each run of five


def _serialized(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


@pytest.mark.parametrize("method", ["exact", "fit"])
def test_held_out_samples_never_reach_calibration(kit, cnn_path, cnn_samples, tmp_path, method):
    """Poisoning the held-out samples changes the fidelity figures and nothing else; poisoning a calibration sample
    changes the model (so the comparison can see a leak)."""
    def convert(samples, name):
        path = tmp_path / f"{name}.npz"
        np.savez(path, x=samples)
        return fgq_onnx.convert(cnn_path, calib=path, method=method)

    clean = convert(cnn_samples, "clean")
    poisoned = cnn_samples.copy()
    poisoned[HELD_OUT] = np.random.default_rng(0).uniform(-500.0, 500.0, poisoned[HELD_OUT].shape)
    held_out_poisoned = convert(poisoned, "held_out_poisoned")
    assert _serialized(held_out_poisoned.model) == _serialized(clean.model)
    assert held_out_poisoned.report.calibration == clean.report.calibration
    assert held_out_poisoned.report.activations == clean.report.activations
    assert held_out_poisoned.report.fidelity.samples == clean.report.fidelity.samples == len(cnn_samples[HELD_OUT])
    assert held_out_poisoned.report.fidelity.main.sqnr_db != clean.report.fidelity.main.sqnr_db

    leaked = cnn_samples.copy()
    leaked[0] *= 50.0  # a calibration sample
    assert _serialized(convert(leaked, "calibration_poisoned").model) != _serialized(clean.model)


def test_held_out_images_never_reach_calibration(kit, cnn_path, image_dir, tmp_path):
    clean = fgq_onnx.convert(cnn_path, calib=image_dir)
    poisoned_dir = tmp_path / "poisoned"
    shutil.copytree(image_dir, poisoned_dir)
    files = sorted(poisoned_dir.glob("*.png"))
    for path in files[HELD_OUT]:
        kit.write_images(tmp_path / "noise", 1, seed=99)
        shutil.copy(tmp_path / "noise" / "img_00.png", path)
    poisoned = fgq_onnx.convert(cnn_path, calib=poisoned_dir)
    assert _serialized(poisoned.model) == _serialized(clean.model)
    assert poisoned.report.fidelity.samples == len(files[HELD_OUT]) == 2
    assert poisoned.report.fidelity.main.sqnr_db != clean.report.fidelity.main.sqnr_db


@pytest.mark.parametrize("output_format", ["custom", "qdq"])
def test_fidelity_figures_match_a_direct_computation(kit, cnn_path, calib_npz, cnn_samples, tmp_path, output_format):
    model, report = fgq_onnx.convert(cnn_path, calib=calib_npz, format=output_format)
    path = tmp_path / "converted.onnx"
    fgq_onnx.save(model, path)
    held_out = cnn_samples[HELD_OUT]
    (expected,) = kit.run_ort(cnn_path, {"x": held_out})
    session = runtime.inference_session(str(path)) if output_format == "custom" else None
    (actual,) = session.run(None, {"x": held_out}) if session else kit.run_ort(path, {"x": held_out})
    ref, out = expected.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
    (result,) = report.fidelity.outputs
    assert result.output == "y" and report.fidelity.samples == len(held_out)
    assert result.sqnr_db == pytest.approx(10 * np.log10(ref @ ref / np.sum((ref - out) ** 2)), abs=1e-3)
    assert result.cosine == pytest.approx(ref @ out / np.linalg.norm(ref) / np.linalg.norm(out), abs=1e-5)
    assert result.top1_agreement == pytest.approx(np.mean(expected.argmax(1) == actual.argmax(1)))
    saved = json.loads(report.to_json())["fidelity"]
    assert saved == {"samples": len(held_out), "outputs": {"y": {"sqnr_db": result.sqnr_db, "cosine": result.cosine, "top1_agreement": result.top1_agreement}}}


def test_poor_fidelity_prints_one_warning_with_what_to_try(cli, cnn_path, calib_npz, tmp_path):
    result = cli("convert", cnn_path, "--calib", calib_npz, "-o", tmp_path / "out.onnx", "-q", "--n", "64", "--act-bits", "4", "--no-bias-correction")
    assert result.exit_code == 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("warning: poor fidelity on 4 held-out samples: output 'y' SQNR")
    for hint in ("--method fit", "--bias-correction", "--act-bits 8", "--n 4", "--exclude '"):
        assert hint in line, hint
    good = cli("convert", cnn_path, "--calib", calib_npz, "-o", tmp_path / "fit.onnx", "--method", "fit")
    assert good.exit_code == 0 and "fidelity of 'y'" in good.stdout and "warning" not in good.stderr


def test_warning_rule():
    def fidelity(sqnr, agreement, samples=AGREEMENT_SAMPLES):
        return Fidelity(samples, [OutputFidelity("y", sqnr, 0.9, agreement)])

    settings = {"method": "exact", "n": 4, "act_bits": 8, "bias_correction": True}
    assert fidelity(20.0, 0.95).warning(settings) is None
    assert "--method fit" in fidelity(9.0, 0.95).warning(settings)
    assert "--method fit" not in fidelity(9.0, 0.95).warning({**settings, "method": "fit"})
    assert fidelity(20.0, 0.5).warning(settings) is not None  # the classes disagree
    assert fidelity(20.0, 0.5, samples=AGREEMENT_SAMPLES - 1).warning(settings) is None  # too few samples to tell
    assert Fidelity(skipped="no calibration data").warning(settings) is None
    budget = {**settings, "n": "auto", "min_sqnr": 20.0}
    assert "checked on only 6 held-out samples" in fidelity(25.0, 0.99, samples=6).warning(budget)
    assert fidelity(25.0, 0.99, samples=FEW_BUDGET_SAMPLES).warning(budget) is None
    assert fidelity(25.0, 0.99, samples=6).warning(settings) is None  # no budget: nothing promised


def test_no_held_out_samples_without_calibration_data(cnn_path):
    _, report = fgq_onnx.convert(cnn_path, act_bits=0, bias_correction=False)
    assert report.fidelity.skipped and report.fidelity.to_dict() == {"skipped": report.fidelity.skipped}


# -- dim_value -1 (Paddle exports): dynamic --------------------------------------


def _negative_dims(model: onnx.ModelProto, spatial: bool) -> onnx.ModelProto:
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for index in [0, 2, 3] if spatial and value.name == "x" else [0]:
            dims[index].Clear()
            dims[index].dim_value = -1
    return model


@pytest.mark.parametrize("spatial", [False, True], ids=["batch", "batch_and_spatial"])
@pytest.mark.parametrize("source", ["npz", "images"])
def test_minus_one_dims_are_dynamic(cli, kit, calib_npz, image_dir, tmp_path, spatial, source):
    model_path = kit.write_model(_negative_dims(kit.build_cnn(), spatial), tmp_path / "paddle.onnx")
    output = tmp_path / "paddle.fgq.onnx"
    report_path = tmp_path / "r.json"
    size = ["--size", "28", "28"] if spatial and source == "images" else []
    result = cli("convert", model_path, "--calib", calib_npz if source == "npz" else image_dir, "-o", output, "--json", report_path, "-q", *size)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    total = kit.N_CALIB if source == "npz" else kit.N_IMAGES
    assert report["calibration"]["samples"] == total - total // 5 and report["fidelity"]["samples"] == total // 5
    x = np.random.default_rng(5).uniform(0, 1, (3, 1, 28, 28)).astype(np.float32)
    (expected,) = kit.run_ort(model_path, {"x": x})
    (actual,) = runtime.inference_session(str(output)).run(None, {"x": x})  # a batch of 3: the batch stays dynamic
    assert actual.shape == expected.shape == (3, 10)
