"""Compare the kernel paths (FGQ_KERNEL) on single convolutions against onnxruntime's fp32 and int8.

`python benchmarks/bench_paths.py --kernels avx2,avxvnni,avx512vnni` builds, per shape, one
model for onnxruntime's fp32 Conv, one for its int8 QDQ form (fused into QLinearConv) and one
TernaryConv (N=4, uint8 scale codes up to 127, int8 activations; bench_kernels.py's models),
runs the TernaryConv once per kernel path, and times every variant in the same rounds
(batch 1, one thread by default). It prints each variant's median time, each path's speed-up
over fp32 and int8, and whether every path gave the same output bytes.
Cases: dwconv (the depthwise layers of ppocr-v4-det, then EfficientNet-Lite0), conv
(ResNet-50 shapes).
"""

from __future__ import annotations

import argparse
import os
import sys

import bench_kernels as bk
import numpy as np

from fgq_onnx import runtime

PPOCR_DEPTHWISE = [(16, 3, 1, 160), (32, 3, 2, 160), (48, 3, 1, 80), (192, 5, 1, 20), (384, 5, 1, 10)]


def cases(name: str, rng: np.random.Generator):
    """(label, weight, stride, input hw, group) of a case set."""
    if name == "dwconv":
        for c, k, s, hw in PPOCR_DEPTHWISE + bk.DEPTHWISE_CONVS[:1] + bk.DEPTHWISE_CONVS[2:3] + bk.DEPTHWISE_CONVS[4:5] \
                + bk.DEPTHWISE_CONVS[6:]:
            yield f"dw{k}x{k} s{s} {c} ch @{hw}", (rng.normal(size=(c, 1, k, k)) / k).astype(np.float32), s, hw, c
    else:
        for c, m, k, s, hw in bk.RESNET50_CONVS:
            w = (rng.normal(size=(m, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
            yield f"conv{k}x{k} {c}->{m} @{hw}", w, s, hw, 1


def bench_case(label, w, stride, hw, group, kernels, args) -> None:
    act = bk.Activations(signed=True)
    x = act.inputs(np.maximum(np.random.default_rng(0).normal(size=(1, w.shape[1] * group, hw, hw)), -1))
    x = x.astype(np.float32)
    pad = w.shape[2] // 2
    sessions, names = [], []
    for variant in ("fp32", "int8"):
        model, _ = bk.conv_model(variant, w, x.shape, stride, pad, "u8", act, group=group)
        sessions.append(bk.session(model, args.threads))
        names.append(variant)
    model, _ = bk.conv_model("ternary N=4", w, x.shape, stride, pad, "u8", act, group=group)
    for kernel in kernels:
        os.environ[runtime.KERNEL_ENV] = kernel  # read when the session creates its kernels
        sessions.append(bk.session(model, args.threads))
        names.append(kernel)
    os.environ.pop(runtime.KERNEL_ENV, None)
    results = bk.timed([(s, {"X": x}) for s in sessions], args.repeat, args.min_seconds, args.rounds)
    us = {name: float(np.median(times)) * 1e6 for name, (_, times) in zip(names, results)}
    outputs = [y for _, (y, _) in zip(names, results)][2:]
    same = all(np.array_equal(outputs[0], y) for y in outputs)
    speedups = " ".join(f"{k} {us['fp32'] / us[k]:.2f}/{us['int8'] / us[k]:.2f}" for k in kernels)
    print(f"{label}: " + " ".join(f"{n} {v:.0f}us" for n, v in us.items())
          + f" | x fp32/int8: {speedups} | identical={same}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default="avx2,avx512vnni", help="comma-separated kernel paths")
    parser.add_argument("--cases", nargs="+", default=["dwconv"], choices=["dwconv", "conv"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--min-seconds", type=float, default=1.5)
    args = parser.parse_args(argv)
    kernels = args.kernels.split(",")
    missing = sorted(set(kernels) - set(runtime.supported_kernels()))
    if missing:
        print(f"error: this CPU (or build) lacks {', '.join(missing)}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(2)
    for name in args.cases:
        for label, w, stride, hw, group in cases(name, rng):
            bench_case(label, w, stride, hw, group, kernels, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
