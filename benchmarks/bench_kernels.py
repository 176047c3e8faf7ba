"""Benchmark the com.fgq ternary kernels against onnxruntime's own kernels.

One command: `python benchmarks/bench_kernels.py` prints a table and writes
JSON (--json, default benchmarks/results/bench_kernels.json). Every variant
runs in onnxruntime with the same session options (intra_op_num_threads,
ORT_ENABLE_ALL, sequential), is warmed up (kernels prepack on the first run),
and is timed as the median of repeated runs (spread: min and max); activation
quantization is inside the timed region for every quantized variant.

Cases (--cases):
- gemv: batch-1 MatMul, 4096x4096 weights, a chain of 12 layers so the
  weights stream from DRAM (a 2-bit layer alone fits in L3); the table gives
  time per layer and the DRAM roofline of the variant's weight bytes.
- gemm: batch-64 MatMul 4096x4096 (a chain of 4), GOP/s.
- conv: ResNet-50 3x3 and 1x1 conv shapes at batch 1 and 8.
- stem: the 3-channel stems of ResNet-50 (7x7, stride 2, 224), PP-OCRv4 det (3x3, stride 2, 320)
  and EfficientNet-Lite0 (3x3, stride 2, 224) at batch 1; "ternary N=3" is the layout the
  converter gives them when it has the higher SQNR (groups of the 3 channels per kernel tap),
  "ternary N=4" the other one (groups of 4 along the whole filter).
- dwconv: depthwise 3x3 and 5x5 convs of EfficientNet-Lite0 / MobileNetV3 (C = 32..960,
  H = W = 112..7, stride 1 and 2) at batch 1 and 8.
- model: whole models converted at N=4 and N=16 (8-bit activations): the
  embedded Fashion-MNIST ResNet at batch 64 and a ResNet-50-shaped model
  (benchmarks/bench_convert.py, random weights) at batch 1, each as fp32, qdq
  (onnxruntime's int8 kernels) and custom (com.fgq ops).
Variants: fp32 (MatMul / Conv), int8 (DynamicQuantizeMatMul; Conv: QDQ that
onnxruntime fuses into QLinearConv), MatMulNBits 2- and 4-bit (block 128,
accuracy_level 4), ternary (com.fgq) at N=64 and N=4 (uint8 scales with a
row scale, the converter's default: codes 0..127, which the kernels fold into
int8 weights t * s; --scale-format to change; "u8-255" uses codes 0..255 as
older files may, which needs two int8 planes).
Activations are int8 (zero point 0, |x| <= 4 over 127 levels; inputs uniform in [-1, 1], conv inputs
normal clipped at -1); --unsigned makes them uint8 (255 levels, the inputs' absolute values), the
int8 QDQ conv too.
"rel_err" is ||y - y_fp32|| / ||y_fp32|| against the fp32 variant with the
original weights (MatMul: one layer of the chain): it includes each format's
quantization error (ternary: about 0.3 to 0.5 on random Gaussian weights). "kernel_err"
(ternary; MatMul: one layer) compares against numpy on the same dequantized
weights and activations: the kernel's own error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The installed package (pip install .): it carries the built library and fgq_onnx.passes.
from fgq_onnx import runtime  # noqa: E402
from fgq_onnx.packing import pack_rows  # noqa: E402
from fgq_onnx.scales import store_scales  # noqa: E402
from fgq_onnx.ternary import GroupLayout, solve_exact  # noqa: E402

OPSET = 21
U8_LEVELS = {"u8": 127, "u8-255": 255}  # largest uint8 scale code
MS = "com.microsoft"


# -- model builders -------------------------------------------------------------------


def _model(nodes, inputs, outputs, inits, extra_opsets=()):
    graph = helper.make_graph(nodes, "bench", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1), *extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def _init(name, array):
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


class Activations:
    """How the benchmark quantizes activations: int8 (zero point 0, levels -128..127) or, with
    --unsigned, uint8 (levels 0..255, inputs made non-negative), both for |x| <= 4."""

    def __init__(self, signed: bool):
        self.signed = signed
        self.scale = 4.0 / (127 if signed else 255)
        self.qmin, self.qmax = (-128, 127) if signed else (0, 255)
        self.zero_point = np.int8(0) if signed else np.uint8(0)
        self.name = "s8" if signed else "u8"

    def inputs(self, x: np.ndarray) -> np.ndarray:
        return x if self.signed else np.abs(x)

    def quantized(self, x: np.ndarray) -> np.ndarray:
        return quantize_input(x, self.scale, self.qmin, self.qmax)


def ternarize_rows(w_rows: np.ndarray, n: int, scale_format: str):
    """w_rows [M, K] (groups along K) -> packed codes, stored scales, row_scale, dequantized rows."""
    m, k = w_rows.shape
    layout = GroupLayout((m, k), axis=1, n=n)
    codes, scales = solve_exact(layout.group(w_rows.astype(np.float32)))  # [M, G, N], [M, G]
    with _converter_u8_levels(U8_LEVELS.get(scale_format)):
        stored = store_scales(scales, layout, "u8" if scale_format in U8_LEVELS else scale_format)
    decoded = stored.decoded
    deq = (codes * decoded[:, :, None]).reshape(m, -1)[:, :k]
    return pack_rows(codes.reshape(m, -1)), stored.values, stored.row_scale, deq.astype(np.float32)


def ternary_node(op, x, y, prefix, w_rows, n, scale_format, act, inits, **attrs):
    codes, stored, row_scale, deq = ternarize_rows(w_rows, n, scale_format)
    inits += [_init(f"{prefix}.codes", codes), _init(f"{prefix}.scales", stored)]
    inputs = [x, f"{prefix}.xs", f"{prefix}.zp", f"{prefix}.codes", f"{prefix}.scales"]
    inits += [_init(f"{prefix}.xs", np.float32(act.scale)), _init(f"{prefix}.zp", act.zero_point)]
    if row_scale is not None:
        inits.append(_init(f"{prefix}.rs", row_scale))
        inputs.append(f"{prefix}.rs")
    node = helper.make_node(op, inputs, [y], domain=runtime.DOMAIN, N=n, **attrs)
    weight_bytes = codes.nbytes + stored.nbytes + (row_scale.nbytes if row_scale is not None else 0)
    return node, deq, weight_bytes


def nbits_node(x, y, prefix, w_km: np.ndarray, bits: int, inits, block=128):
    """MatMulNBits with symmetric-range quantization (default zero point 2^(bits-1))."""
    k, m = w_km.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, m), np.float32)
    padded[:k] = w_km
    wb = padded.T.reshape(m, blocks, block)
    zero = 2 ** (bits - 1)
    scale = np.abs(wb).max(axis=2) / zero
    scale = np.where(scale > 0, scale, 1).astype(np.float32)
    q = np.clip(np.rint(wb / scale[:, :, None]) + zero, 0, 2**bits - 1).astype(np.uint8)
    per = 8 // bits
    q = q.reshape(m, blocks, block // per, per)
    packed = np.zeros(q.shape[:3], np.uint8)
    for i in range(per):
        packed |= q[..., i] << (bits * i)
    inits += [_init(f"{prefix}.B", packed), _init(f"{prefix}.scales", scale.reshape(-1))]
    node = helper.make_node("MatMulNBits", [x, f"{prefix}.B", f"{prefix}.scales"], [y], domain=MS,
                            K=k, N=m, bits=bits, block_size=block, accuracy_level=4)
    return node, packed.nbytes + scale.nbytes


def int8_matmul_node(x, y, prefix, w_km, inits):
    scale = (np.abs(w_km).max(axis=0) / 127).astype(np.float32)
    q = np.clip(np.rint(w_km / scale), -127, 127).astype(np.int8)
    inits += [_init(f"{prefix}.B", q), _init(f"{prefix}.bs", scale)]
    node = helper.make_node("DynamicQuantizeMatMul", [x, f"{prefix}.B", f"{prefix}.bs"], [y], domain=MS)
    return node, q.nbytes + scale.nbytes


def matmul_chain(variant: str, weights: list[np.ndarray], batch: int, scale_format: str, act: Activations):
    """A chain y_{i+1} = y_i @ W_i. Returns (model, weight bytes per layer, numpy check or None)."""
    k = weights[0].shape[0]
    nodes, inits, wbytes, check = [], [], 0, []
    prev = "X"
    for i, w in enumerate(weights):
        out = "Y" if i == len(weights) - 1 else f"y{i}"
        prefix = f"l{i}"
        if variant == "fp32":
            inits.append(_init(f"{prefix}.W", w))
            nodes.append(helper.make_node("MatMul", [prev, f"{prefix}.W"], [out]))
            wbytes = w.nbytes
        elif variant == "int8":
            node, wbytes = int8_matmul_node(prev, out, prefix, w, inits)
            nodes.append(node)
        elif variant.startswith("nbits"):
            node, wbytes = nbits_node(prev, out, prefix, w, int(variant[5:]), inits)
            nodes.append(node)
        else:  # ternary N=<n>
            n = int(variant.split("=")[1])
            node, deq, wbytes = ternary_node("TernaryMatMul", prev, out, prefix, w.T, n, scale_format, act, inits,
                                             K=k)
            nodes.append(node)
            check.append(deq)
        prev = out
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    extra = [helper.make_opsetid(runtime.DOMAIN, 1)] if variant.startswith("ternary") else []
    return _model(nodes, [x], [y], inits, extra), wbytes, check or None


def conv_model(variant: str, w: np.ndarray, x_shape, stride: int, pad: int, scale_format: str, act: Activations,
               group: int = 1):
    m, c, r, s = w.shape  # c: channels per group
    inits, nodes, check = [], [], None
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    attrs = dict(strides=[stride, stride], pads=[pad] * 4, group=group)
    x_scale = act.scale
    if variant == "fp32":
        inits.append(_init("W", w))
        nodes.append(helper.make_node("Conv", ["X", "W"], ["Y"], **attrs))
    elif variant == "int8":
        ws = (np.abs(w).reshape(m, -1).max(axis=1) / 127).astype(np.float32)
        q = np.clip(np.rint(w / ws[:, None, None, None]), -127, 127).astype(np.int8)
        inits += [_init("W", q), _init("ws", ws), _init("wz", np.zeros(m, np.int8)), _init("xs", np.float32(x_scale)),
                  _init("xz", act.zero_point), _init("ys", np.float32(0.05)), _init("yz", np.int8(0))]
        nodes += [
            helper.make_node("QuantizeLinear", ["X", "xs", "xz"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
            helper.make_node("DequantizeLinear", ["W", "ws", "wz"], ["wd"], axis=0),
            helper.make_node("Conv", ["xd", "wd"], ["yc"], **attrs),
            helper.make_node("QuantizeLinear", ["yc", "ys", "yz"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["Y"]),
        ]
    else:
        n = int(variant.split("=")[1])
        rows = w.transpose(0, 2, 3, 1).reshape(m, -1) if c >= n else w.reshape(m, -1)
        segments = r * s if c >= n else 1
        # groups per segment: ternarize each segment separately by padding rows per segment
        seg_len = rows.shape[1] // segments
        g_seg = -(-seg_len // n)
        padded = np.zeros((m, segments, g_seg * n), np.float32)
        padded[:, :, :seg_len] = rows.reshape(m, segments, seg_len)
        codes, stored, row_scale, deq_rows = ternarize_rows(padded.reshape(m, -1), n, scale_format)
        deq = deq_rows.reshape(m, segments, -1)[:, :, :seg_len].reshape(m, -1)
        check = deq.reshape(m, r, s, c).transpose(0, 3, 1, 2) if c >= n else deq.reshape(w.shape)
        inits += [_init("codes", codes), _init("scales", stored), _init("xs", np.float32(x_scale)),
                  _init("zp", act.zero_point)]
        inputs = ["X", "xs", "zp", "codes", "scales"] + (["rs"] if row_scale is not None else [])
        if row_scale is not None:
            inits.append(_init("rs", row_scale))
        nodes.append(helper.make_node("TernaryConv", inputs, ["Y"], domain=runtime.DOMAIN, N=n,
                                      weight_shape=list(w.shape), **attrs))
    extra = [helper.make_opsetid(runtime.DOMAIN, 1)] if variant.startswith("ternary") else []
    return _model(nodes, [x], [y], inits, extra), check


# -- timing ---------------------------------------------------------------------------------


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if any(o.domain == runtime.DOMAIN for o in model.opset_import):
        options = runtime.session_options(options=options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def timed(cases, repeat: int, min_seconds: float, rounds: int = 1) -> list[tuple[np.ndarray, list[float]]]:
    """(output, run times) of each (session, feed) in `cases`. With several rounds the cases
    take turns, each round a share of the runs, so that a slow spell of a shared machine
    falls on every variant of a comparison alike."""
    outs = []
    for sess, feed in cases:
        for _ in range(2):
            sess.run(None, feed)
        outs.append(sess.run(None, feed)[0])
    times = [[] for _ in cases]
    for _ in range(rounds):
        for (sess, feed), spent in zip(cases, times):
            start, runs = time.perf_counter(), len(spent)
            while (len(spent) - runs < -(-repeat // rounds)
                   or (time.perf_counter() - start < min_seconds / rounds and len(spent) - runs < 200 // rounds)):
                t0 = time.perf_counter()
                sess.run(None, feed)
                spent.append(time.perf_counter() - t0)
    return list(zip(outs, times))


def rel_err(y, ref) -> float:
    return float(np.linalg.norm(y.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def dram_bandwidth(threads: int) -> float:
    """Read bandwidth (GB/s) of onnxruntime's ReduceSum over 512 MiB, same thread count."""
    count = 128 * 1024 * 1024
    model = _model([helper.make_node("ReduceSum", ["X"], ["Y"], keepdims=0)],
                   [helper.make_tensor_value_info("X", TensorProto.FLOAT, [count])],
                   [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [])
    x = np.ones(count, np.float32)
    [(_, times)] = timed([(session(model, threads), {"X": x})], 5, 0.5)
    return x.nbytes / float(np.min(times)) / 1e9


def quantize_input(x, scale, qmin=-128, qmax=127):
    return (np.clip(np.rint(x / np.float32(scale)), qmin, qmax) * np.float32(scale)).astype(np.float64)


# -- cases -----------------------------------------------------------------------------------


def bench_matmul(name, batch, layers, variants, threads_list, args, rows):
    rng = np.random.default_rng(0)
    k = m = 4096
    weights = [(rng.normal(size=(k, m)) / np.sqrt(k)).astype(np.float32) for _ in range(layers)]
    x = args.act.inputs(rng.uniform(-1, 1, size=(batch, k)).astype(np.float32))
    ref = x.astype(np.float64) @ weights[0]  # accuracy: first layer only (errors compound along a chain)
    cases = []  # (variant, threads, session, weight bytes, error, kernel error)
    for variant in variants:
        one_layer, _, one_check = matmul_chain(variant, weights[:1], batch, args.scale_format, args.act)
        y1 = session(one_layer, 1).run(None, {"X": x})[0]
        error = rel_err(y1, ref)
        kernel_err = None  # one layer too: along a chain, rounding flips cascade
        if one_check is not None:
            kernel_err = rel_err(y1, args.act.quantized(x) @ one_check[0].T.astype(np.float64))
        model, wbytes, _ = matmul_chain(variant, weights, batch, args.scale_format, args.act)
        cases += [(variant, threads, session(model, threads), wbytes, error, kernel_err) for threads in threads_list]
        del model
    results = timed([(c[2], {"X": x}) for c in cases], args.repeat, args.min_seconds, args.rounds)
    for (variant, threads, _, wbytes, error, kernel_err), (_, times) in zip(cases, results):
        per_layer = float(np.median(times)) / layers
        row = dict(case=name, variant=variant, threads=threads, batch=batch, layers=layers,
                   us_per_layer=per_layer * 1e6, us_min=float(np.min(times)) / layers * 1e6,
                   us_max=float(np.max(times)) / layers * 1e6, gops=2 * batch * k * m / per_layer / 1e9,
                   weight_bytes=int(wbytes), bytes_per_weight=wbytes / (k * m), rel_err=error,
                   kernel_err=kernel_err)
        if batch == 1 and args.bandwidth.get(threads):
            row["roofline_us"] = wbytes / (args.bandwidth[threads] * 1e9) * 1e6
            row["x_roofline"] = row["us_per_layer"] / row["roofline_us"]
        rows.append(row)
        print_row(row)


RESNET50_CONVS = [  # (C_in, C_out, kernel, stride, H=W of the input)
    (64, 64, 3, 1, 56),
    (128, 128, 3, 1, 28),
    (256, 256, 3, 1, 14),
    (512, 512, 3, 1, 7),
    (256, 64, 1, 1, 56),
    (64, 256, 1, 1, 56),  # the expansions and projection shortcuts of the first stage
    (1024, 256, 1, 1, 14),
]


STEM_CONVS = [  # (C_in, C_out, kernel, stride, H=W of the input)
    (3, 64, 7, 2, 224),
    (3, 16, 3, 2, 320),
    (3, 32, 3, 2, 224),
]


def bench_conv(variants, threads_list, args, rows, batches=(1, 8), shapes=RESNET50_CONVS, name="conv"):
    rng = np.random.default_rng(1)
    for c, m, ksz, stride, hw in shapes[: args.conv_limit]:
        w = (rng.normal(size=(m, c, ksz, ksz)) / np.sqrt(c * ksz * ksz)).astype(np.float32)
        pad = ksz // 2
        for batch in batches:
            x = args.act.inputs(np.maximum(rng.normal(size=(batch, c, hw, hw)), -1).astype(np.float32))
            cases = []  # (variant, threads, session, dequantized weights)
            for variant in variants:  # fp32 first: the reference
                model, check = conv_model(variant, w, x.shape, stride, pad, args.scale_format, args.act)
                cases += [(variant, threads, session(model, threads), check) for threads in threads_list]
            results = timed([(c[2], {"X": x}) for c in cases], args.repeat, args.min_seconds, args.rounds)
            ref = results[0][0].astype(np.float64)
            for (variant, threads, _, check), (y, times) in zip(cases, results):
                kernel_err = None
                if check is not None:
                    want = session(conv_model("fp32", check, x.shape, stride, pad, args.scale_format, args.act)[0],
                                   threads).run(None, {"X": args.act.quantized(x).astype(np.float32)})[0]
                    kernel_err = rel_err(y, want.astype(np.float64))
                med = float(np.median(times))
                out_hw = (hw + 2 * pad - ksz) // stride + 1
                macs = batch * m * c * ksz * ksz * out_hw * out_hw
                row = dict(case=f"{name}{ksz}x{ksz}{f' s{stride}' if stride > 1 else ''} {c}->{m} @{hw}", variant=variant, threads=threads, batch=batch,
                           us=med * 1e6, us_min=float(np.min(times)) * 1e6, us_max=float(np.max(times)) * 1e6,
                           gops=2 * macs / med / 1e9, rel_err=rel_err(y, ref), kernel_err=kernel_err)
                rows.append(row)
                print_row(row)


DEPTHWISE_CONVS = [  # (channels, kernel, stride, H=W of the input): EfficientNet-Lite0 / MobileNetV3 layers
    (32, 3, 1, 112),
    (96, 3, 2, 112),
    (144, 5, 2, 56),
    (240, 5, 1, 28),
    (480, 3, 1, 14),
    (672, 5, 2, 14),
    (960, 5, 1, 7),
]


def bench_dwconv(variants, threads_list, args, rows, batches=(1, 8)):
    """Depthwise convs (group = channels): every variant of a shape timed in the same rounds."""
    rng = np.random.default_rng(2)
    for c, ksz, stride, hw in DEPTHWISE_CONVS[: args.conv_limit]:
        w = (rng.normal(size=(c, 1, ksz, ksz)) / ksz).astype(np.float32)
        pad = ksz // 2
        for batch in batches:
            x = args.act.inputs(np.maximum(rng.normal(size=(batch, c, hw, hw)), -1).astype(np.float32))
            cases = []
            for variant in variants:  # fp32 first: the reference
                model, check = conv_model(variant, w, x.shape, stride, pad, args.scale_format, args.act, group=c)
                cases += [(variant, threads, session(model, threads), check) for threads in threads_list]
            results = timed([(case[2], {"X": x}) for case in cases], args.repeat, args.min_seconds, args.rounds)
            ref = results[0][0].astype(np.float64)
            out_hw = (hw + 2 * pad - ksz) // stride + 1
            for (variant, threads, _, check), (y, times) in zip(cases, results):
                kernel_err = None
                if check is not None:
                    fp32 = conv_model("fp32", check, x.shape, stride, pad, args.scale_format, args.act, group=c)[0]
                    want = session(fp32, threads).run(None, {"X": args.act.quantized(x).astype(np.float32)})[0]
                    kernel_err = rel_err(y, want.astype(np.float64))
                med = float(np.median(times))
                row = dict(case=f"dwconv{ksz}x{ksz} s{stride} {c} @{hw}", variant=variant, threads=threads, batch=batch,
                           us=med * 1e6, us_min=float(np.min(times)) * 1e6, us_max=float(np.max(times)) * 1e6,
                           gops=2 * batch * c * ksz * ksz * out_hw * out_hw / med / 1e9, rel_err=rel_err(y, ref),
                           kernel_err=kernel_err)
                rows.append(row)
                print_row(row)


@contextlib.contextmanager
def _converter_u8_levels(levels):
    """The converter with `levels` as its largest uint8 scale code (u8-255 is not a converter option)."""
    import fgq_onnx.scales

    saved = fgq_onnx.scales.U8_LEVELS
    fgq_onnx.scales.U8_LEVELS = levels or saved
    try:
        yield
    finally:
        fgq_onnx.scales.U8_LEVELS = saved


def whole_models(folder: pathlib.Path) -> list[tuple[str, pathlib.Path, dict, object, dict]]:
    """(name, fp32 model, feed, calibration data, converter settings) of the whole-model cases."""
    from bench_convert import resnet50

    test = np.load(ROOT / "models" / "fashion_mnist_test.npz")["input"]
    resnet, calib = folder / "resnet50.onnx", folder / "resnet50_calib.npz"
    resnet50(resnet)
    rng = np.random.default_rng(1)
    np.savez(calib, input=rng.uniform(0, 1, (16, 3, 224, 224)).astype(np.float32))
    return [
        ("fashion_mnist", ROOT / "models" / "fashion_mnist_resnet.onnx", {"input": test[:64]}, ROOT / "models" / "calib", {}),
        # Random weights: bias correction would only slow the conversion down, not change the speed.
        ("resnet50", resnet, {"input": rng.uniform(0, 1, (1, 3, 224, 224)).astype(np.float32)}, calib, {"bias_correction": False}),
    ]


def bench_model(threads_list, args, rows, ns=(4, 16)):
    import tempfile

    import fgq_onnx

    scale_format = "u8" if args.scale_format in U8_LEVELS else args.scale_format
    with tempfile.TemporaryDirectory() as folder, _converter_u8_levels(U8_LEVELS.get(args.scale_format)):
        folder = pathlib.Path(folder)
        for name, source, feed, calib, settings in whole_models(folder):
            models = {"fp32": source}
            for n in ns:
                for fmt in ("qdq", "custom"):
                    path = folder / f"{name}_{fmt}{n}.onnx"
                    conversion = fgq_onnx.convert(source, n=n, format=fgq_onnx.OutputFormat(fmt), calib=calib, scale_format=scale_format, **settings)
                    fgq_onnx.save(conversion.model, path)
                    models[f"{fmt} N={n}"] = path
            batch = len(feed["input"])
            cases = [(variant, threads, session(onnx.load(str(path)), threads))
                     for variant, path in models.items() for threads in threads_list]
            results = timed([(c[2], feed) for c in cases], args.repeat, args.min_seconds, args.rounds)
            for (variant, threads, _), (_, times) in zip(cases, results):
                row = dict(case=f"model {name}", variant=variant, threads=threads, batch=batch, us=float(np.median(times)) * 1e6,
                           us_min=float(np.min(times)) * 1e6, us_max=float(np.max(times)) * 1e6, gops=0.0)
                rows.append(row)
                print_row(row)


def print_row(row):
    time_us = row.get("us_per_layer", row.get("us"))
    extra = ""
    if "x_roofline" in row:
        extra = f" roofline {row['roofline_us']:7.0f} us (x{row['x_roofline']:.2f})"
    kerr = f" kernel_err {row['kernel_err']:.1e}" if row.get("kernel_err") is not None else ""
    rerr = f" rel_err {row['rel_err']:.3f}" if row.get("rel_err") is not None else ""
    print(f"{row['case']:<24} b={row['batch']:<3} t={row['threads']} {row['variant']:<12} "
          f"{time_us:9.1f} us [{row['us_min']:.0f}-{row['us_max']:.0f}] {row['gops']:7.1f} GOP/s{extra}{rerr}{kerr}",
          flush=True)


def summarize(rows) -> list[str]:
    """The targets of the brief, as ratios from this run: median time (and best time, robust to a busy machine)."""
    lines = []

    def find(case, variant, threads, batch=None):
        for r in rows:
            if r["case"] == case and r["variant"] == variant and r["threads"] == threads and (batch is None or r["batch"] == batch):
                return r
        return None

    def ratio(slow, fast, key="us_per_layer"):
        return f"{slow[key] / fast[key]:.2f}x (best {slow['us_min'] / fast['us_min']:.2f}x)"

    for t in sorted({r["threads"] for r in rows}):
        tern64 = find("gemv 4096x4096", "ternary N=64", t)
        tern4 = find("gemv 4096x4096", "ternary N=4", t)
        nb2 = find("gemv 4096x4096", "nbits2", t)
        fp = find("gemv 4096x4096", "fp32", t)
        i8 = find("gemv 4096x4096", "int8", t)
        if tern64 and nb2:
            lines.append(f"t={t} gemv N=64 vs MatMulNBits 2-bit: {ratio(nb2, tern64)} faster (target >= 1.8x)")
        if tern64 and fp:
            lines.append(f"t={t} gemv N=64 vs fp32: {ratio(fp, tern64)} faster (target >= 10x)")
        if tern64 and "roofline_us" in tern64:
            lines.append(f"t={t} gemv N=64 at {tern64['x_roofline']:.2f}x the DRAM roofline "
                         f"(best {tern64['us_min'] / tern64['roofline_us']:.2f}x; target <= 1.2x)")
        if tern4 and i8:
            lines.append(f"t={t} gemv N=4 vs int8: {ratio(i8, tern4)} faster (target > 1x)")
        g64, g8 = find("gemm b64 4096x4096", "ternary N=64", t), find("gemm b64 4096x4096", "int8", t)
        if g64 and g8:
            lines.append(f"t={t} gemm b64 N=64 vs int8: {ratio(g8, g64)} faster")
        for case in sorted({r["case"] for r in rows if r["case"].startswith("dwconv")}):
            for b in sorted({r["batch"] for r in rows if r["case"] == case}):
                c8, c32, tr = find(case, "int8", t, b), find(case, "fp32", t, b), find(case, "ternary N=4", t, b)
                if tr and c8 and c32:
                    lines.append(f"t={t} {case} b={b} ternary N=4: vs int8 {ratio(c8, tr, 'us')}, "
                                 f"vs fp32 {ratio(c32, tr, 'us')} (targets >= 1x, >= 1x)")
        conv_cases = sorted({r["case"] for r in rows if r["case"].startswith(("conv", "stem"))})
        for case in conv_cases:
            for b in sorted({r["batch"] for r in rows if r["case"] == case}):
                c8, c32 = find(case, "int8", t, b), find(case, "fp32", t, b)
                for variant in ("ternary N=64", "ternary N=4", "ternary N=3"):
                    tr = find(case, variant, t, b)
                    if tr and c8 and c32:
                        lines.append(f"t={t} {case} b={b} {variant}: vs int8 {ratio(c8, tr, 'us')}, "
                                     f"vs fp32 {ratio(c32, tr, 'us')} (targets >= 1x, >= 3x)")
        for case in sorted({r["case"] for r in rows if r["case"].startswith("model")}):
            base = find(case, "fp32", t)
            model_ns = {int(r["variant"].split("=")[1]) for r in rows if r["case"] == case and "=" in r["variant"]}
            for n in sorted(model_ns) if base else ():
                qdq, custom = find(case, f"qdq N={n}", t), find(case, f"custom N={n}", t)
                if qdq and custom:
                    lines.append(f"t={t} {case} N={n}: custom vs qdq {ratio(qdq, custom, 'us')}, "
                                 f"vs fp32 {ratio(base, custom, 'us')} (targets > 1x, >= 3x)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cases", nargs="+", default=["gemv", "gemm", "conv", "stem", "dwconv", "model"],
                        choices=["gemv", "gemm", "conv", "stem", "dwconv", "model"])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="the variants of a case take turns this many times")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--layers", type=int, default=12, help="chained layers for the batch-1 case")
    parser.add_argument("--conv-limit", type=int, default=None,
                        help="first K shapes of the conv, stem and dwconv cases (default: all)")
    parser.add_argument("--scale-format", default="u8", choices=["f32", "f16", *U8_LEVELS])
    parser.add_argument("--unsigned", action="store_true",
                        help="uint8 activations (levels 0..255, non-negative inputs) instead of int8")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 2 conv shapes (a smoke run)")
    parser.add_argument("--json", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "bench_kernels.json")
    parser.add_argument("--summarize", type=pathlib.Path, help="only print the targets of an earlier JSON result")
    args = parser.parse_args(argv)
    if args.summarize:
        for line in summarize(json.loads(args.summarize.read_text())["rows"]):
            print(line)
        return 0
    args.act = Activations(signed=not args.unsigned)
    if args.quick:
        args.repeat, args.min_seconds, args.conv_limit = 3, 0.2, 2
    try:
        runtime.library_path()
    except runtime.RuntimeLibraryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    kernels = runtime.supported_kernels()
    print(f"onnxruntime {ort.__version__}, kernels {kernels} (using {os.environ.get('FGQ_KERNEL', kernels[-1])}), "
          f"cpu {platform.processor() or platform.machine()}, {os.cpu_count()} cores", flush=True)
    args.bandwidth = {}
    if "gemv" in args.cases:
        for t in args.threads:
            args.bandwidth[t] = dram_bandwidth(t)
            print(f"DRAM read bandwidth (onnxruntime ReduceSum, 512 MiB), {t} thread(s): {args.bandwidth[t]:.1f} GB/s", flush=True)
    rows: list[dict] = []
    mm_variants = ["fp32", "int8", "nbits4", "nbits2", "ternary N=64", "ternary N=4"]
    if "gemv" in args.cases:
        bench_matmul("gemv 4096x4096", 1, args.layers, mm_variants, args.threads, args, rows)
    if "gemm" in args.cases:
        bench_matmul("gemm b64 4096x4096", 64, 4, mm_variants, args.threads, args, rows)
    if "conv" in args.cases:
        bench_conv(["fp32", "int8", "ternary N=64", "ternary N=4"], args.threads, args, rows)
    if "stem" in args.cases:
        bench_conv(["fp32", "int8", "ternary N=3", "ternary N=4"], args.threads, args, rows, (1,), STEM_CONVS, "stem")
    if "dwconv" in args.cases:
        bench_dwconv(["fp32", "int8", "ternary N=64", "ternary N=4"], args.threads, args, rows)
    if "model" in args.cases:
        bench_model(args.threads, args, rows)
    summary = summarize(rows)
    print("\nTargets:")
    for line in summary:
        print("  " + line)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(onnxruntime=ort.__version__, kernels=kernels, kernel=os.environ.get("FGQ_KERNEL", kernels[-1]),
                cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), scale_format=args.scale_format,
                activations=args.act.name,
                bandwidth_gbs=args.bandwidth, load_average=os.getloadavg())
    args.json.write_text(json.dumps(dict(meta=meta, rows=rows, summary=summary), indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
