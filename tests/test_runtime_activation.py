"""The com.fgq ops' fused activation (`activation`, `activation_params`, `activation_affine`) on every kernel path.

Exact mode (integer activations and weights, unit scales, biases and
residuals in quarters): the pre-activation output is exact, so each path's
output must equal numpy's float32 activation of it bit for bit, for the
GEMM (in place and gathered rows), the direct depthwise kernel, TernaryMatMul
and TernaryGemm; the ONNX function body of the node's overload (the model
without the library) must give the same bits. Bad attribute values fail at
session creation with a message naming them.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import onnxruntime as ort
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from fgq_onnx.custom_op_functions import function_protos, overload_name  # noqa: E402
from test_runtime_helpers import (  # noqa: E402
    build_model,
    conv2d_ref,
    conv_rows,
    library_or_skip,
    pack_weight,
    random_ternary,
    run_op,
)

pytestmark = pytest.mark.filterwarnings("ignore")

# (activation, activation_params, activation_affine); "relu=1": TernaryConv's relu attribute instead
ACTIVATIONS = [("relu", [], None), ("clip", [-2.5, 6.0], None), ("clip", [0.0, 6.0], None), ("hardsigmoid", [0.2, 0.5], None),
               ("hardsigmoid", [1 / 6, 0.5], None), ("hardswish", [], None), ("hardswish", [], [1.25, -0.375]),
               ("relu", [], [0.5, 0.25]), ("", [], [-2.0, 1.5]), ("relu=1", [], None), ("relu=1", [], [0.5, 0.25])]
F32 = np.float32


def _clamp(v, lo, hi):
    v = np.where(v < lo, F32(lo), v)
    return np.where(v > hi, F32(hi), v)


def _activation_ref(y: np.ndarray, kind: str, params: list[float]) -> np.ndarray:
    if kind in ("relu", "relu=1"):
        return np.where(y < 0, F32(0), y)
    if kind == "clip":
        return _clamp(y, F32(params[0]), F32(params[1]))
    if kind == "hardsigmoid":
        return _clamp(F32(params[0]) * y + F32(params[1]), 0, 1)
    if kind == "hardswish":
        return y * _clamp(y + F32(3), 0, 6) * F32(1 / 6)
    return y


def activation_ref(y: np.ndarray, kind: str, params: list[float], affine: list[float] | None) -> np.ndarray:
    """docs/custom-ops.md's definitions, in float32 in the kernel's order of operations."""
    y = _activation_ref(y.astype(np.float32), kind, params)
    return y if affine is None else y * F32(affine[0]) + F32(affine[1])


def _attrs(kind: str, params: list[float], affine: list[float] | None) -> dict:
    attrs = {"relu": int(kind == "relu=1"), **({"activation": kind} if kind and kind != "relu=1" else {})}
    return {**attrs, **({"activation_params": params} if params else {}), **({"activation_affine": affine} if affine else {})}


def _with_body(model, residual: bool = False):
    """The model with its node's overload and the FunctionProtos it needs (run without the library)."""
    attrs = {a.name for a in model.graph.node[0].attribute}
    kind = next((a.s.decode() for a in model.graph.node[0].attribute if a.name == "activation"), "")
    overload = overload_name(False, residual, kind, "activation_affine" in attrs)
    model.graph.node[0].overload = overload
    model.functions.extend(function_protos(21, overload))
    return model


def _body_output(model, feeds) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _levels(rng, shape) -> np.ndarray:
    """Small integer activations as float: quantized exactly at x_scale 1 (int8, zero point 0)."""
    return rng.integers(-3, 4, size=shape).astype(np.float32)


EXACT_ACT = dict(x_scale=F32(1), x_zero_point=np.int8(0))


# (name, C/group, group, M/group, kernel, N): the GEMM in place (N a multiple of 4, C/group >= N),
# the gathered GEMM (N = 3), fewer channels than N (planar stem), the direct depthwise kernel.
CONV_CASES = [("in-place", 16, 1, 20, 1, 4), ("gathered", 9, 1, 7, 3, 3), ("stem", 3, 1, 17, 3, 4),
              ("depthwise", 1, 12, 1, 3, 4), ("grouped", 2, 3, 4, 3, 4)]


@pytest.mark.parametrize("kind,params,affine", ACTIVATIONS)
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("scale_type", [np.float32, np.uint8])
def test_conv_activation_all_paths(kernels, kind, params, affine, case, residual, scale_type):
    """uint8 scale codes take the folded form, whose stores apply the bias and the activation themselves
    on the avx2 and avxvnni paths when there is no residual: the same bits."""
    _, cg, group, mg, k, n = case
    rng = np.random.default_rng(len(kind) + 10 * cg + residual)
    m, c = mg * group, cg * group
    t4 = random_ternary(rng, (m, cg, k, k))
    rows, segments = conv_rows(t4, n)
    codes, groups = pack_weight(rows, n, segments)
    bias = (rng.integers(-12, 13, size=m) / 4).astype(np.float32)
    x = _levels(rng, (2, c, 7, 9))
    pads = [k // 2] * 4
    res = (rng.integers(-20, 21, size=(2, m, 7, 9)) / 4).astype(np.float32) if residual else None
    model = build_model(
        "TernaryConv",
        dict(**EXACT_ACT, codes=codes, scales=np.ones((m, groups.shape[1]), scale_type), row_scale=np.ones(m, np.float32),
             bias=bias, residual=res),
        dict(N=n, weight_shape=[m, cg, k, k], group=group, pads=pads, act_qmin=-128, act_qmax=127,
             **_attrs(kind, params, affine)),
        list(x.shape), fed=("residual",),
    )
    pre = conv2d_ref(x.astype(np.float64), t4.astype(np.float64), bias, (1, 1), pads, (1, 1), group)
    want = activation_ref(pre + (res if residual else 0), kind, params, affine)
    feeds = {"X": x, **({"residual": res} if residual else {})}
    for kernel in kernels:
        np.testing.assert_array_equal(run_op(model, feeds, kernel), want, err_msg=kernel)
    np.testing.assert_array_equal(_body_output(_with_body(model, residual), feeds), want)


@pytest.mark.parametrize("kind,params,affine", ACTIVATIONS)
@pytest.mark.parametrize("op,beta,c_rows", [("TernaryMatMul", None, False), ("TernaryGemm", 0.5, False),
                                            ("TernaryGemm", 1.0, False), ("TernaryGemm", 1.0, True)])
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("scale_type", [np.float32, np.uint8])
def test_matmul_gemm_activation_all_paths(kernels, kind, params, affine, op, beta, c_rows, rows, scale_type):
    """uint8 scale codes take the folded form from 4 rows on, whose stores apply a bias [M] or a C [B, M]
    with beta 1, and the activation, themselves on the avx2 and avxvnni paths: the same bits."""
    rng = np.random.default_rng(rows + len(kind))
    k, m, n = 37, 19, 4
    t = random_ternary(rng, (m, k))
    codes, groups = pack_weight(t, n)
    bias = (rng.integers(-12, 13, size=(rows, m) if c_rows else m) / 4).astype(np.float32)
    shape = [rows, k] if op == "TernaryGemm" else [rows, 1, k]
    x = _levels(rng, shape)
    extra = {} if beta is None else dict(beta=beta)
    model = build_model(
        op,
        dict(**EXACT_ACT, codes=codes, scales=np.ones((m, groups.shape[1]), scale_type), row_scale=np.ones(m, np.float32),
             bias=bias),
        dict(N=n, K=k, act_qmin=-128, act_qmax=127, **extra, **_attrs(kind, params, affine)),
        shape,
    )
    pre = x.astype(np.float64) @ t.T.astype(np.float64) + bias * extra.get("beta", 1.0)
    want = activation_ref(pre, kind, params, affine)
    for kernel in kernels:
        np.testing.assert_array_equal(run_op(model, {"X": x}, kernel, threads=2), want, err_msg=kernel)
    np.testing.assert_array_equal(_body_output(_with_body(model), {"X": x}), want)


def test_matmul_body_without_bias_and_1d_input():
    """TernaryMatMul's body (a Gemm on [-1, K] rows) takes an omitted bias and a rank-1 input."""
    library_or_skip()
    rng = np.random.default_rng(5)
    k, m, n = 12, 5, 4
    t = random_ternary(rng, (m, k))
    codes, groups = pack_weight(t, n)
    model = build_model("TernaryMatMul", dict(**EXACT_ACT, codes=codes, scales=np.ones((m, groups.shape[1]), np.float32),
                                              row_scale=np.ones(m, np.float32)),
                        dict(N=n, K=k, act_qmin=-128, act_qmax=127, relu=0, activation="relu"), [k])
    x = _levels(rng, (k,))
    want = np.maximum(x @ t.T.astype(np.float32), 0)
    np.testing.assert_array_equal(run_op(model, {"X": x}, "ref"), want)
    np.testing.assert_array_equal(_body_output(_with_body(model), {"X": x}), want)


def _conv_model(**attrs):
    rng = np.random.default_rng(0)
    codes, groups = pack_weight(random_ternary(rng, (4, 8)), 4)
    return build_model("TernaryConv", dict(**EXACT_ACT, codes=codes, scales=np.ones((4, groups.shape[1]), np.float32)),
                       dict(N=4, weight_shape=[4, 8, 1, 1], **attrs), [1, 8, 3, 3])


@pytest.mark.parametrize("attrs,match", [
    (dict(activation="gelu"), "activation must be relu, clip, hardsigmoid or hardswish, got 'gelu'"),
    (dict(activation="Relu"), "got 'Relu'"),
    (dict(activation="clip"), "activation 'clip' takes 2 activation_params, got 0"),
    (dict(activation="clip", activation_params=[0.0]), "takes 2 activation_params, got 1"),
    (dict(activation="clip", activation_params=[6.0, 0.0]), "need min <= max"),
    (dict(activation="clip", activation_params=[float("nan"), 6.0]), "need min <= max"),
    (dict(activation="hardsigmoid", activation_params=[float("inf"), 0.5]), "must be finite"),
    (dict(activation="hardswish", activation_params=[1.0, 2.0]), "activation 'hardswish' takes 0 activation_params"),
    (dict(activation_params=[0.0, 6.0]), "activation_params given without an activation"),
    (dict(activation="clip", activation_params=[0.0, 6.0], relu=1), "relu=1 and an activation attribute exclude each other"),
    (dict(activation="relu", activation_affine=[1.0]), "activation_affine must be two finite values"),
    (dict(activation="relu", activation_affine=[1.0, float("inf")]), "activation_affine must be two finite values"),
])
def test_bad_activation_attributes_fail_at_session_creation(attrs, match):
    library_or_skip()
    from fgq_onnx import runtime

    with pytest.raises(Exception, match=match):
        runtime.inference_session(_conv_model(**attrs).SerializeToString())


def test_bad_activation_on_matmul():
    library_or_skip()
    from fgq_onnx import runtime

    codes, groups = pack_weight(random_ternary(np.random.default_rng(1), (3, 8)), 4)
    model = build_model("TernaryMatMul", dict(**EXACT_ACT, codes=codes, scales=np.ones((3, groups.shape[1]), np.float32)),
                        dict(N=4, K=8, activation="swish"), [2, 8])
    with pytest.raises(Exception, match="got 'swish'"):
        runtime.inference_session(model.SerializeToString())
    model = build_model("TernaryMatMul", dict(**EXACT_ACT, codes=codes, scales=np.ones((3, groups.shape[1]), np.float32)),
                        dict(N=4, K=8, relu=2), [2, 8])
    with pytest.raises(Exception, match="relu must be 0 or 1"):
        runtime.inference_session(model.SerializeToString())
