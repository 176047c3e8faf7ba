"""Malformed com.fgq nodes must fail with an onnxruntime error, never crash.

Each case breaks one thing a model file can claim: sizes of packed codes or
scales, attributes (N, K, pads, strides, dilations, group, weight_shape),
absurd dimensions that overflow size_t, wrong dtypes, the invalid code 0b10.
The error may come at session creation (constant weights are checked once)
or at run time.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest
from onnx import TensorProto

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_runtime_helpers import build_model, library_or_skip, pack_weight, random_ternary  # noqa: E402

K, M, N = 20, 6, 4
G = 5


def _valid_inputs():
    rng = np.random.default_rng(0)
    codes, _ = pack_weight(random_ternary(rng, (M, K)), N)
    return dict(x_scale=np.float32(0.1), x_zero_point=np.uint8(0), codes=codes, scales=np.ones((M, G), np.float32))


def _expect_error(model, feeds, match=None, constant=True):
    library_or_skip()
    from fgq_onnx import runtime

    with pytest.raises(Exception) as info:
        session = runtime.inference_session(model.SerializeToString())
        session.run(None, feeds)
    assert not isinstance(info.value, (SystemExit, KeyboardInterrupt))
    if match:
        assert match in str(info.value), str(info.value)


X = {"X": np.ones((2, K), np.float32)}


def test_valid_baseline_runs():
    library_or_skip()
    from fgq_onnx import runtime

    model = build_model("TernaryMatMul", _valid_inputs(), dict(N=N, K=K), [2, K])
    runtime.inference_session(model.SerializeToString()).run(None, X)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(codes=np.zeros((M, 4), np.uint8)), "codes shape"),
        (dict(codes=np.zeros((M + 1, 5), np.uint8)), "scales shape"),
        (dict(codes=np.zeros((M * 5,), np.uint8)), "codes must be 2-D"),
        (dict(scales=np.ones((M, G + 1), np.float32)), "scales shape"),
        (dict(scales=np.ones((M * G,), np.float32)), "scales shape"),
        (dict(scales=np.ones((M, G), np.float64)), "scales must be"),
        (dict(scales=np.ones((M, G), np.uint8)), "row_scale"),
        (dict(scales=np.ones((M, G), np.uint8), row_scale=np.ones(M + 1, np.float32)), "row_scale shape"),
        (dict(row_scale=np.ones(M, np.float64)), "row_scale"),
        (dict(neg_scales=np.ones((M, G), np.float16)), "neg_scales must have the type"),
        (dict(neg_row_scale=np.ones(M, np.float32)), "neg_row_scale given without"),
        (dict(bias=np.ones(M + 2, np.float32)), "bias shape"),
        (dict(x_scale=np.float32(0)), "x_scale"),
        (dict(x_scale=np.float32(np.nan)), "x_scale"),
        (dict(x_scale=np.ones(2, np.float32)), "x_scale"),
        (dict(x_zero_point=np.int32(0)), "x_zero_point"),
        (dict(codes=np.full((M, 5), 0b10, np.uint8)), "invalid 2-bit code"),
    ],
)
def test_bad_inputs(change, match):
    inputs = _valid_inputs()
    inputs.update(change)
    _expect_error(build_model("TernaryMatMul", inputs, dict(N=N, K=K), [2, K]), X, match)


def test_bad_inputs_not_constant():
    """The same checks hold when the weights arrive at run time."""
    inputs = _valid_inputs()
    inputs["codes"] = np.zeros((M, 4), np.uint8)
    model = build_model("TernaryMatMul", inputs, dict(N=N, K=K), [2, K], constant=False)
    _expect_error(model, {**X, "codes": inputs["codes"], "scales": inputs["scales"]}, "codes shape")


def test_nonzero_padding_code():
    inputs = _valid_inputs()
    codes = np.zeros((M, 6), np.uint8)
    codes[0, 5] = 0b01 << 4  # K=22, N=4: positions 22, 23 (byte 5, bits 4-7) are padding
    inputs.update(codes=codes, scales=np.ones((M, 6), np.float32))
    _expect_error(build_model("TernaryMatMul", inputs, dict(N=N, K=22), [2, 22]), {"X": np.ones((2, 22), np.float32)},
                  "padding")


@pytest.mark.parametrize(
    "attrs, match",
    [
        (dict(N=0, K=K), "N (group size)"),
        (dict(N=-3, K=K), "N (group size)"),
        (dict(N=N), "missing int attribute 'K'"),
        (dict(N=N, K=0), "attribute K"),
        (dict(N=N, K=2**62), "attribute K"),
        (dict(N=2**40, K=K), "N (group size)"),
        (dict(N=N, K=K, act_qmin=5, act_qmax=2), "act_qmin"),
        (dict(N=N, K=K, act_qmin=0, act_qmax=300), "act_qmin"),
    ],
)
def test_bad_attributes(attrs, match):
    _expect_error(build_model("TernaryMatMul", _valid_inputs(), attrs, [2, K]), X, match)


def test_wrong_activation_dtype():
    model = build_model("TernaryMatMul", _valid_inputs(), dict(N=N, K=K), [2, K], x_type=TensorProto.INT8)
    _expect_error(model, {"X": np.ones((2, K), np.int8)}, "X must be float")


def test_wrong_activation_shape():
    model = build_model("TernaryMatMul", _valid_inputs(), dict(N=N, K=K), [2, K + 1])
    _expect_error(model, {"X": np.ones((2, K + 1), np.float32)}, "last dimension")


def test_wrong_codes_dtype():
    inputs = _valid_inputs()
    inputs["codes"] = inputs["codes"].astype(np.int8)
    _expect_error(build_model("TernaryMatMul", inputs, dict(N=N, K=K), [2, K]), X)


# -- conv ----------------------------------------------------------------------


def _conv_inputs(m=4, c=4, r=3, n=4, group=1):
    rng = np.random.default_rng(1)
    cg = c // group
    segments, length = (r * r, cg) if cg >= n else (1, cg * r * r)
    rows = random_ternary(rng, (m, segments * length))
    codes, groups = pack_weight(rows, n, segments)
    return dict(x_scale=np.float32(0.1), x_zero_point=np.uint8(0), codes=codes,
                scales=np.ones((m, groups.shape[1]), np.float32))


XC = {"X": np.ones((1, 4, 6, 6), np.float32)}


@pytest.mark.parametrize(
    "attrs, match",
    [
        (dict(pads=[-1, 0, 0, 0]), "pads must be >= 0"),
        (dict(pads=[0, 0]), "pads 4"),
        (dict(strides=[0, 1]), "strides must be >= 1"),
        (dict(dilations=[1, 0]), "dilations must be >= 1"),
        (dict(group=3), "group must"),
        (dict(group=0), "group must"),
        (dict(weight_shape=[4, 4, 3]), "weight_shape"),
        (dict(weight_shape=[4, 4, 3, 0]), "weight_shape values"),
        (dict(weight_shape=[4, 4, 2**40, 2**40]), "weight_shape values"),
        (dict(weight_shape=[4, 4, 3, 3], kernel_shape=[2, 2]), "kernel_shape"),
        (dict(relu=2), "relu"),
        (dict(auto_pad="SAME_UPPER"), "auto_pad"),
        (dict(weight_shape=[4, 5, 3, 3]), "codes shape"),
    ],
)
def test_bad_conv_attributes(attrs, match):
    full = dict(N=4, weight_shape=[4, 4, 3, 3])
    full.update(attrs)
    _expect_error(build_model("TernaryConv", _conv_inputs(), full, [1, 4, 6, 6]), XC, match)


def test_conv_channels_mismatch():
    model = build_model("TernaryConv", _conv_inputs(), dict(N=4, weight_shape=[4, 4, 3, 3]), [1, 5, 6, 6])
    _expect_error(model, {"X": np.ones((1, 5, 6, 6), np.float32)}, "channels")


def test_conv_empty_output():
    model = build_model("TernaryConv", _conv_inputs(), dict(N=4, weight_shape=[4, 4, 3, 3]), [1, 4, 2, 2])
    _expect_error(model, {"X": np.ones((1, 4, 2, 2), np.float32)}, "does not fit")


def test_conv_huge_dilation():
    model = build_model("TernaryConv", _conv_inputs(), dict(N=4, weight_shape=[4, 4, 3, 3], dilations=[2**20, 1]),
                        [1, 4, 6, 6])
    _expect_error(model, XC, "does not fit")


@pytest.mark.parametrize(
    ("residual", "match"),
    [
        (np.ones((1, 4, 4, 5), np.float32), "residual shape"),  # one column short: no broadcasting
        (np.ones((4, 4, 4), np.float32), "residual shape"),
        (np.ones((1, 4, 4, 4), np.float64), "residual"),  # refused by onnxruntime's type check
    ],
)
def test_conv_bad_residual(residual, match):
    model = build_model("TernaryConv", _conv_inputs() | dict(residual=residual), dict(N=4, weight_shape=[4, 4, 3, 3]),
                        [1, 4, 6, 6], fed=("residual",))
    _expect_error(model, XC | {"residual": residual}, match)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(y_scale=np.float32(0.1)), "y_scale"),  # without y_zero_point: onnxruntime's float registration, then ours
        (dict(y_scale=np.float32(-1), y_zero_point=np.uint8(0)), "y_scale must be"),
        (dict(y_scale=np.float32(np.inf), y_zero_point=np.int8(0)), "y_scale must be"),
        (dict(y_scale=np.ones(2, np.float32), y_zero_point=np.uint8(0)), "y_scale must be"),
        (dict(y_scale=np.float32(0.1), y_zero_point=np.int32(0)), ""),  # no registration takes an int32 zero point
        (dict(residual=np.ones((1, 4, 4, 4), np.uint8)), "residual must be float"),
        (dict(residual=np.ones((1, 4, 4, 4), np.uint8), residual_scale=np.float32(0.1),
              residual_zero_point=np.int8(0)), "residual must be int8"),
        (dict(residual=np.ones((1, 4, 4, 4), np.float32), residual_scale=np.float32(0.1),
              residual_zero_point=np.uint8(0)), "residual must be uint8"),
        (dict(residual_scale=np.float32(0.1), residual_zero_point=np.uint8(0)), "without a residual"),
        (dict(residual=np.ones((1, 4, 4, 5), np.uint8), residual_scale=np.float32(0.1),
              residual_zero_point=np.uint8(0)), "residual shape"),
        (dict(residual=np.ones((1, 4, 4, 4), np.uint8), residual_zero_point=np.uint8(0)), "residual_scale must be"),
    ],
)
def test_conv_bad_8bit_output_or_residual(change, match):
    """The 8-bit output and residual inputs (y_*, residual_*) are checked like x_scale and x_zero_point."""
    model = build_model("TernaryConv", _conv_inputs() | change, dict(N=4, weight_shape=[4, 4, 3, 3]), [1, 4, 6, 6],
                        fed=("residual",))
    _expect_error(model, XC | ({"residual": change["residual"]} if "residual" in change else {}), match)


@pytest.mark.parametrize(
    ("attrs", "feeds", "match"),
    [
        (dict(x_layout="NWHC"), XC, "x_layout must be NCHW or NHWC"),
        (dict(y_layout="nhwc"), XC, "y_layout must be NCHW or NHWC"),
        (dict(x_layout="NHWC"), XC, "X has 6 channels"),  # [1, 4, 6, 6] read as NHWC: 6 channels
        (dict(y_layout="NHWC", pads=[1] * 4), XC | {"residual": np.ones((1, 4, 6, 6), np.float32)},
         "residual shape [1, 4, 6, 6] must be the output's [1, 6, 6, 4]"),
    ],
)
def test_conv_bad_layouts(attrs, feeds, match):
    """x_layout/y_layout take NCHW or NHWC; X and the residual are checked in the layouts they name."""
    model = build_model("TernaryConv", _conv_inputs() | dict(residual=feeds.get("residual")),
                        dict(N=4, weight_shape=[4, 4, 3, 3]) | attrs, [1, 4, 6, 6], fed=("residual",))
    _expect_error(model, feeds, match)


def test_conv_rank():
    model = build_model("TernaryConv", _conv_inputs(), dict(N=4, weight_shape=[4, 4, 3, 3]), [4, 6, 6])
    _expect_error(model, {"X": np.ones((4, 6, 6), np.float32)}, "4-D")


def test_gemm_bad_c_and_trans():
    inputs = _valid_inputs()
    inputs["bias"] = np.ones((3, M), np.float32)
    _expect_error(build_model("TernaryGemm", inputs, dict(N=N, K=K), [2, K]), X, "does not broadcast")
    _expect_error(build_model("TernaryGemm", _valid_inputs(), dict(N=N, K=K, transA=2), [2, K]), X, "transA")
    _expect_error(build_model("TernaryGemm", _valid_inputs(), dict(N=N, K=K), [2, 2, K]),
                  {"X": np.ones((2, 2, K), np.float32)}, "2-D")


def test_forced_kernel_unknown(monkeypatch):
    library_or_skip()
    from fgq_onnx import runtime

    monkeypatch.setenv("FGQ_KERNEL", "sse9")
    with pytest.raises(runtime.RuntimeLibraryError, match="FGQ_KERNEL"):
        runtime.session_options()
    with pytest.raises(runtime.RuntimeLibraryError):
        runtime.inference_session(b"", kernel="sse9")


# The /proc/cpuinfo flags each SIMD path needs (the library asks CPUID and XGETBV itself).
_PATH_FLAGS = {"avx2": {"avx2", "fma", "f16c"}, "avxvnni": {"avx2", "fma", "f16c", "avx_vnni"},
               "avx512vnni": {"avx2", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni"}}


@pytest.mark.parametrize("kernel", sorted(_PATH_FLAGS))
def test_forced_kernel_follows_the_cpu(monkeypatch, kernel):
    """FGQ_KERNEL=<path> works where the CPU has the path's instructions and is refused with a message where not."""
    library_or_skip()
    from fgq_onnx import runtime

    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare the library's CPU detection with")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    monkeypatch.setenv("FGQ_KERNEL", kernel)
    if _PATH_FLAGS[kernel] <= flags:
        runtime.session_options()
        assert kernel in runtime.supported_kernels()
    else:
        with pytest.raises(runtime.RuntimeLibraryError, match="does not support"):
            runtime.session_options()
        pytest.skip(f"this CPU lacks {kernel} (refused with a message, as it should be)")


def test_missing_library(monkeypatch, tmp_path):
    from fgq_onnx import runtime

    monkeypatch.setenv("FGQ_OPS_LIBRARY", str(tmp_path / "nope.so"))
    with pytest.raises(runtime.RuntimeLibraryError, match="not a file"):
        runtime.library_path()
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"not an elf")
    monkeypatch.setenv("FGQ_OPS_LIBRARY", str(bad))
    with pytest.raises(runtime.RuntimeLibraryError, match="cannot load"):
        runtime.session_options()


# -- random claims (run under AddressSanitizer by .ci/sanitizers.sh) ---------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SMALL = st.integers(-2, 6)
WEIRD = st.sampled_from([-(2**62), -1, 0, 1, 2, 3, 4, 5, 9, 2**31, 2**62])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    n=WEIRD, cg=SMALL, m=SMALL, r=SMALL, group=SMALL,
    pads=st.lists(SMALL, min_size=0, max_size=5), strides=st.lists(SMALL, min_size=0, max_size=3),
    dilations=st.lists(SMALL, min_size=0, max_size=3),
    codes_shape=st.lists(st.integers(0, 7), min_size=1, max_size=3),
    scales_shape=st.lists(st.integers(0, 7), min_size=1, max_size=3),
    x_shape=st.lists(st.integers(0, 7), min_size=3, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_random_conv_claims_never_crash(n, cg, m, r, group, pads, strides, dilations, codes_shape, scales_shape,
                                        x_shape, seed):
    library_or_skip()
    from fgq_onnx import runtime

    rng = np.random.default_rng(seed)
    attrs = dict(N=n, weight_shape=[m, cg, r, r], group=group)
    if pads:
        attrs["pads"] = pads
    if strides:
        attrs["strides"] = strides
    if dilations:
        attrs["dilations"] = dilations
    inputs = dict(x_scale=np.float32(0.1), x_zero_point=np.uint8(0),
                  codes=rng.integers(0, 256, size=codes_shape).astype(np.uint8),
                  scales=rng.uniform(0, 1, size=scales_shape).astype(np.float32))
    model = build_model("TernaryConv", inputs, attrs, x_shape)
    x = rng.uniform(-1, 1, size=x_shape).astype(np.float32)
    try:
        runtime.inference_session(model.SerializeToString()).run(None, {"X": x})
    except Exception as error:  # noqa: BLE001 - an onnxruntime error is the expected outcome; a crash would end the process
        assert str(error)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    n=WEIRD, k=WEIRD, trans_a=st.integers(-1, 2),
    codes_shape=st.lists(st.integers(0, 9), min_size=1, max_size=3),
    scales_shape=st.lists(st.integers(0, 9), min_size=1, max_size=3),
    x_shape=st.lists(st.integers(0, 9), min_size=1, max_size=4),
    op=st.sampled_from(["TernaryMatMul", "TernaryGemm"]),
    seed=st.integers(0, 2**16),
)
def test_random_matmul_claims_never_crash(n, k, trans_a, codes_shape, scales_shape, x_shape, op, seed):
    library_or_skip()
    from fgq_onnx import runtime

    rng = np.random.default_rng(seed)
    attrs = dict(N=n, K=k)
    if op == "TernaryGemm":
        attrs["transA"] = trans_a
    inputs = dict(x_scale=np.float32(0.1), x_zero_point=np.int8(0),
                  codes=rng.integers(0, 256, size=codes_shape).astype(np.uint8),
                  scales=rng.integers(0, 256, size=scales_shape).astype(np.uint8),
                  row_scale=rng.uniform(0, 1, size=codes_shape[:1]).astype(np.float32))
    model = build_model(op, inputs, attrs, x_shape)
    x = rng.uniform(-1, 1, size=x_shape).astype(np.float32)
    try:
        runtime.inference_session(model.SerializeToString()).run(None, {"X": x})
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
        assert str(error)
