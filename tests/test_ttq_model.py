"""The TTQ-trained Fashion-MNIST model (models/train_ttq.py) converts exactly, in qdq and custom form.

Weights only: the converted model computes what the exported model computes.
With 8-bit activations: what the exported model computes with the same
activation Q/DQ and nothing else (fgq_onnx.reference.activation_only); the
custom format agrees with it through the library's kernels and through its
function bodies.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from fgq_onnx.pipeline import convert
from fgq_onnx.reference import activation_only

MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"
TTQ = MODELS / "fashion_mnist_ttq.onnx"
TERNARY_LAYERS = 8  # every Conv of the residual stages; the stem Conv and the classifier stay float

pytestmark = pytest.mark.skipif(not TTQ.exists(), reason="models/fashion_mnist_ttq.onnx not present")


def _run(model, x: np.ndarray) -> np.ndarray:
    """Without graph optimizations: onnxruntime's QDQ rewrites (at ORT_ENABLE_BASIC and up) move the
    activation Q/DQ of the float reference differently from the converted model's, by about 3e-3 of
    the logits' range; unoptimized, both compute exactly what their graphs say."""
    proto = ir.serde.serialize_model(model).SerializeToString() if isinstance(model, ir.Model) else str(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.load(MODELS / "fashion_mnist_test.npz")["input"][:200]


def _assert_exact_report(report) -> None:
    ternary = [layer for layer in report.layers if layer.converted]
    assert len(ternary) == TERNARY_LAYERS and all(layer.already_ternary.startswith("exact (per row, asymmetric") for layer in ternary)
    floats = [layer for layer in report.layers if not layer.converted]
    assert len(floats) == 2 and all("trained-ternary" in layer.reason for layer in floats)


def test_weights_only_equals_the_exported_model(images):
    model, report = convert(TTQ, act_bits=0)
    _assert_exact_report(report)
    np.testing.assert_array_equal(_run(model, images), _run(TTQ, images))  # the same weights, bit for bit


def test_8bit_activations_equal_the_exported_model_with_the_same_activation_quantization(images):
    qdq, report = convert(TTQ, act_bits=8, calib=MODELS / "calib", calib_limit=64, bias_correction=False)
    _assert_exact_report(report)
    assert len(report.activations) == TERNARY_LAYERS - 2  # each shortcut conv shares its block's input with conv1
    reference = _run(activation_only(TTQ, report), images)
    qdq_out = _run(qdq, images)
    np.testing.assert_array_equal(qdq_out, reference)
    assert np.abs(qdq_out - _run(TTQ, images)).max() > 1e-4  # the activation quantization is really there

    custom, custom_report = convert(TTQ, act_bits=8, calib=MODELS / "calib", calib_limit=64, bias_correction=False, format="custom")
    assert not any("qdq form" in note for note in custom_report.notes)  # the float layers are not ternary layers left behind
    ternary = [node for node in custom.graph if node.domain == "com.fgq"]
    assert len(ternary) == TERNARY_LAYERS and all("asymmetric" in node.overload.split("-") for node in ternary)
    assert any("residual" in node.overload.split("-") for node in ternary)  # the residual Adds fused too
    np.testing.assert_allclose(_run(custom, images), reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max())  # function bodies
    from fgq_onnx import runtime

    try:
        runtime.library_path()
    except runtime.RuntimeLibraryError as error:
        pytest.skip(f"custom-op library not built: {error}")
    kernel = runtime.inference_session(ir.serde.serialize_model(custom).SerializeToString()).run(None, {"input": images})[0]
    # Exact int32 group sums, float scaling in another order: rounding differences move a few
    # activations across a quantization level in later layers (measured: 7 of 2000 logits off by
    # more than 1e-3 of their range, at most 2e-3), so the kernel agrees to within 5e-3 and in top-1.
    np.testing.assert_allclose(kernel, reference, rtol=0, atol=5e-3 * np.abs(reference).max())
    assert (kernel.argmax(1) == reference.argmax(1)).mean() >= 0.99
