"""The committed exporter-made models (tests/fixtures/) are what torch.onnx.export makes: checked where torch is installed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import corpus


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("name", list(corpus.TORCH_FIXTURES))
def test_fixture_matches_a_live_export(name):
    pytest.importorskip("torch", reason="torch is not installed: the live export behind tests/fixtures/ is not rerun")
    kind, dynamo = corpus.TORCH_FIXTURES[name]
    if dynamo:
        pytest.importorskip("onnxscript", reason="onnxscript is not installed: torch's dynamo exporter needs it")
    case = corpus.torch_module(kind, dynamo)
    live = corpus.export_torch_module(kind, dynamo)
    assert [n.op_type for n in live.graph.node] == [n.op_type for n in case.model.graph.node], \
        f"{name}: the exporter now writes another graph; rerun tests/fixtures/make_fixtures.py"
    for feeds in [case.calib, *case.extra_feeds]:
        for fixture, fresh in zip(_outputs(case.model, feeds), _outputs(live, feeds), strict=True):
            np.testing.assert_allclose(fixture, fresh, rtol=1e-5, atol=1e-6)
