"""Conversion speed and peak memory.

Two measurements, each in a fresh subprocess so that peak RSS is its own:
- a ResNet-50-shaped model (25.5M parameters, random weights, generated here)
  converted at N=4 with 256 calibration samples: wall time and peak memory
  against the targets (< 60 s, < 3x the model's size + 1 GB);
- the embedded model calibrated with 320 and with 10,000 samples: peak memory
  must not grow with the number of samples.

    python benchmarks/bench_convert.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent


def resnet50(path: Path) -> int:
    """Write a ResNet-50-shaped model (bottleneck blocks 3-4-6-3, folded BN); returns its parameter count."""
    rng = np.random.default_rng(0)
    nodes, inits, count = [], [], [0]

    def conv(x, cin, cout, k, stride=1, relu=True):
        i = count[0] = count[0] + 1
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"conv{i}.w"), numpy_helper.from_array(np.zeros(cout, np.float32), f"conv{i}.b")])
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.w", f"conv{i}.b"], [f"conv{i}"], name=f"conv{i}", kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        if not relu:
            return f"conv{i}"
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        return f"relu{i}"

    x = conv("input", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "pool", 64
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            y = conv(conv(conv(x, cin, width, 1), width, width, 3, stride), width, width * 4, 1, relu=False)
            shortcut = conv(x, cin, width * 4, 1, stride, relu=False) if block == 0 else x
            name = f"add{stage}_{block}"
            nodes.extend([helper.make_node("Add", [y, shortcut], [name]), helper.make_node("Relu", [name], [name + "_relu"])])
            x, cin = name + "_relu", width * 4
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    fc = (rng.standard_normal((1000, 2048)) * 0.02).astype(np.float32)
    inits.extend([numpy_helper.from_array(fc, "fc.w"), numpy_helper.from_array(np.zeros(1000, np.float32), "fc.b")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "resnet50", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return sum(int(np.prod(t.dims)) for t in inits)


def run_measured(args: list[str]) -> dict:
    """Run `python -c ...` convert in a subprocess; return wall time and its peak RSS."""
    start = time.perf_counter()
    # Not cwd=ROOT: `python -c` puts the cwd first on sys.path, and the source tree's
    # fgq_onnx lacks what `pip install .` adds (the passes subpackage, the library).
    subprocess.run([sys.executable, *args], check=True, cwd=tempfile.gettempdir())
    elapsed = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over children so far
    return {"seconds": elapsed, "peak_rss_mb": peak_kb / 1024}


CONVERT = """
import sys, fgq_onnx
model, report = fgq_onnx.convert(sys.argv[1], n=4, calib=sys.argv[2], act_bits=8)
fgq_onnx.save(model, sys.argv[3])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        # Embedded model: peak memory with few and with many calibration samples (smallest first:
        # RUSAGE_CHILDREN keeps the maximum over all children, so growth would show).
        test = np.load(ROOT / "models/fashion_mnist_test.npz")
        for count in (320, 10_000):
            calib = folder / f"calib_{count}.npz"
            np.savez(calib, input=test["input"][:count])
            results[f"embedded_calib_{count}"] = run_measured(["-c", CONVERT, str(ROOT / "models/fashion_mnist_resnet.onnx"), str(calib), str(folder / "fm.onnx")])
        model = folder / "resnet50.onnx"
        params = resnet50(model)
        calib = folder / "calib.npz"
        np.savez(calib, input=np.random.default_rng(1).uniform(0, 1, (256, 3, 224, 224)).astype(np.float32))
        result = run_measured(["-c", CONVERT, str(model), str(calib), str(folder / "resnet50.fgq.onnx")])
        size_mb = model.stat().st_size / 2**20
        result.update({"params": params, "model_mb": size_mb, "memory_target_mb": 3 * size_mb + 1024, "output_mb": (folder / "resnet50.fgq.onnx").stat().st_size / 2**20})
        results["resnet50_256_samples"] = result
    print(f"{'case':<28}{'seconds':>10}{'peak RSS MB':>14}")
    for name, r in results.items():
        print(f"{name:<28}{r['seconds']:>10.1f}{r['peak_rss_mb']:>14.0f}")
    r = results["resnet50_256_samples"]
    print(f"ResNet-50: {r['params'] / 1e6:.1f}M params, {r['model_mb']:.0f} MB -> {r['output_mb']:.1f} MB; "
          f"targets: < 60 s ({'met' if r['seconds'] < 60 else 'MISSED'}), "
          f"< {r['memory_target_mb']:.0f} MB peak ({'met' if r['peak_rss_mb'] < r['memory_target_mb'] else 'MISSED'})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
