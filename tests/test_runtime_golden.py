"""Golden vectors of the packed format (tests/golden/packed_cases.json).

The Python reference must reproduce them, and the TernaryMatMul op must give
their dot products on every kernel path this CPU runs (int8 activations,
x_scale 1, zero point 0: the op's output is then the exact golden value).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from fgq_onnx.packing import pack_rows, unpack_rows  # noqa: E402
from test_runtime_helpers import build_model, library_or_skip  # noqa: E402

GOLDEN = pathlib.Path(__file__).parent / "golden" / "packed_cases.json"
CASES = json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_python_reference_reproduces_golden(case):
    m, k, n, g = case["M"], case["K"], case["N"], case["G"]
    t = np.array(case["ternary"], np.int8)
    padded = np.zeros((m, g * n), np.int8)
    padded[:, :k] = t
    assert pack_rows(padded).tolist() == case["packed"]
    assert np.array_equal(unpack_rows(np.array(case["packed"], np.uint8), g * n)[:, :k], t)
    scales = np.array(case["scales"], np.float32)
    deq = (padded.reshape(m, g, n) * scales[:, :, None]).reshape(m, -1)[:, :k]
    assert np.array_equal(deq.astype(np.float32), np.array(case["dequantized"], np.float32))


def test_worked_example_bytes():
    case = next(c for c in CASES if c["name"] == "worked_example")
    assert case["packed"] == [[0x31, 0x0D]]
    assert case["y"][0] == pytest.approx(-2.45, abs=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_op_matches_golden_on_every_kernel(case):
    library_or_skip()
    from fgq_onnx import runtime

    k, n = case["K"], case["N"]
    model = build_model(
        "TernaryMatMul",
        dict(
            x_scale=np.float32(1.0),
            x_zero_point=np.int8(0),
            codes=np.array(case["packed"], np.uint8),
            scales=np.array(case["scales"], np.float32),
        ),
        dict(N=n, K=k),
        [1, k],
        x_type=3,  # INT8
    )
    x = np.array(case["x"], np.int8)[None]
    want = np.array(case["y"], np.float32)
    for kernel in runtime.supported_kernels():
        session = runtime.inference_session(model.SerializeToString(), kernel=kernel)
        got = session.run(None, {"X": x})[0][0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5, err_msg=kernel)
