"""Generate the golden vectors of the packed 2-bit format from the Python reference.

Run from the repository root: `python tests/golden/make_golden.py`. Writes
tests/golden/packed_cases.json, read by tests/test_runtime_golden.py and by the
C++ kernel tests (runtime/tests/test_kernels.cpp). Deterministic (fixed seed).

Each case: one MatMul-like weight of M rows and reduction length K in groups
of N (one segment a row), as ternary codes t [M, K], scales [M, G] (float32),
the packed bytes [M, ceil(G * N / 4)], the dequantized weight [M, K], an
int8 activation x [K], the exact integer dot per group [M, G] and the
float result y[m] = sum_g scale[m, g] * dot[m, g] (float64, rounded to float32).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fgq_onnx.packing import pack_rows, unpack_rows  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "packed_cases.json"


def make_case(name, t, scales, n, x):
    t = np.asarray(t, np.int8)
    m, k = t.shape
    g = -(-k // n)
    padded = np.zeros((m, g * n), np.int8)
    padded[:, :k] = t
    packed = pack_rows(padded)
    assert np.array_equal(unpack_rows(packed, g * n), padded)
    scales = np.asarray(scales, np.float32).reshape(m, g)
    deq = (padded.reshape(m, g, n) * scales[:, :, None]).reshape(m, -1)[:, :k].astype(np.float32)
    xp = np.zeros(g * n, np.int64)
    xp[:k] = x
    dots = (padded.reshape(m, g, n).astype(np.int64) * xp.reshape(g, n)).sum(-1)
    y = (scales.astype(np.float64) * dots).sum(-1).astype(np.float32)
    return {
        "name": name,
        "M": m,
        "K": k,
        "N": n,
        "G": g,
        "ternary": t.tolist(),
        "packed": packed.tolist(),
        "scales": scales.tolist(),
        "dequantized": deq.tolist(),
        "x": [int(v) for v in x],
        "group_dots": dots.tolist(),
        "y": y.tolist(),
    }


def main() -> None:
    rng = np.random.default_rng(20240617)
    cases = []
    # The worked example of docs/packed-format.md.
    cases.append(make_case("worked_example", [[1, 0, -1, 0, 1, -1]], [[1.0, 0.45]], 4, [1, 2, 3, 4, 5, 6]))
    k, n, m = 16, 4, 2
    x = rng.integers(-128, 128, size=k)
    cases.append(make_case("all_minus_one", -np.ones((m, k)), rng.uniform(0.1, 1, (m, 4)), n, x))
    cases.append(make_case("all_zero", np.zeros((m, k)), rng.uniform(0.1, 1, (m, 4)), n, x))
    cases.append(make_case("all_plus_one", np.ones((m, k)), rng.uniform(0.1, 1, (m, 4)), n, x))
    t = rng.integers(-1, 2, size=(3, 64))
    cases.append(make_case("mixed_n64", t, rng.uniform(0.1, 1, (3, 1)), 64, rng.integers(-128, 128, size=64)))
    t = rng.integers(-1, 2, size=(3, 23))  # K not a multiple of 4 nor of N
    cases.append(make_case("k23_n8", t, rng.uniform(0.1, 1, (3, 3)), 8, rng.integers(-128, 128, size=23)))
    t = rng.integers(-1, 2, size=(2, 10))
    cases.append(make_case("k10_n3", t, rng.uniform(0.1, 1, (2, 4)), 3, rng.integers(-128, 128, size=10)))
    t = rng.integers(-1, 2, size=(2, 130))
    cases.append(make_case("k130_n100", t, rng.uniform(0.1, 1, (2, 2)), 100, rng.integers(-128, 128, size=130)))
    t = rng.integers(-1, 2, size=(2, 12))
    s = rng.uniform(0.1, 1, (2, 3))
    s[0, 1] = 0.0
    cases.append(make_case("zero_scale", t, s, 4, rng.integers(-128, 128, size=12)))
    t = rng.integers(-1, 2, size=(1, 5))
    cases.append(make_case("n1", t, rng.uniform(0.1, 1, (1, 5)), 1, rng.integers(-128, 128, size=5)))
    OUT.write_text(json.dumps({"format": "docs/packed-format.md", "cases": cases}, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
