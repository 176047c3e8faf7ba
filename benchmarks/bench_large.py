"""Converting a model with more than 2 GB of weights: time and peak memory.

Generates an MLP of D x D MatMul weights (D = 8192 by default, 256 MiB each)
whose fp32 weights total more than 2 GB, stored as external data (protobuf
cannot hold them inline), written layer by layer so the generator itself stays
small. Then converts it in a fresh process (external data in and out, so
peak RSS is the conversion's own) and reports wall time, peak RSS and peak RSS
against the weight bytes (target: well under 2x). The generated files are
deleted at the end unless --keep.

    python benchmarks/bench_large.py [--gb 2.25] [--dir /tmp] [--calib 32] [--json out.json]

--calib S also quantizes activations to 8 bits from S random calibration
samples, with bias correction (onnxruntime then holds the fp32 model too).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

CONVERT = """
import sys, fgq_onnx
calib = sys.argv[3] if len(sys.argv) > 3 else None
settings = dict(act_bits=8, calib=calib) if calib else dict(act_bits=0, bias_correction=False)
model, report = fgq_onnx.convert(sys.argv[1], n=4, **settings)
fgq_onnx.save(model, sys.argv[2], external_data=True)
print(f"{len(report.converted)} layers ternarized; notes: {report.notes}")
"""


def generate(folder: Path, target_bytes: int, d: int) -> tuple[Path, int]:
    """Write model.onnx + model.bin (fp32 D x D weights, MatMul -> Relu chain); returns the path and weight bytes."""
    layers = -(-target_bytes // (d * d * 4))
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    with open(folder / "model.bin", "wb") as data:
        for index in range(layers):
            name = f"w{index}"
            offset = data.tell()
            for rows in range(0, d, 1024):  # 32 MiB at a time
                (rng.standard_normal((min(1024, d - rows), d), dtype=np.float32) * np.float32(np.sqrt(2.0 / d))).tofile(data)
            tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[d, d])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", "model.bin"), ("offset", str(offset)), ("length", str(d * d * 4))):
                tensor.external_data.add(key=key, value=value)
            inits.append(tensor)
            out = f"h{index}"
            nodes.append(helper.make_node("MatMul", [x, name], [out], name=f"layer{index}"))
            if index < layers - 1:
                nodes.append(helper.make_node("Relu", [out], [out + "_relu"], name=f"relu{index}"))
                out += "_relu"
            x = out
    graph = helper.make_graph(nodes, "large_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    onnx.save(model, path)
    return path, layers * d * d * 4


def measure(args: list[str]) -> dict:
    """Run the conversion in a fresh process; wall time and that process's peak RSS."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", CONVERT, *args], check=True, cwd=tempfile.gettempdir())
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.25, help="fp32 weight size to generate, in GB (10^9 bytes)")
    parser.add_argument("--d", type=int, default=8192, help="width of each square weight")
    parser.add_argument("--calib", type=int, default=0, help="calibration samples (0: weights only)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fgq-large-", dir=args.dir))
    try:
        start = time.perf_counter()
        model, weight_bytes = generate(folder, int(args.gb * 1e9), args.d)
        generated = time.perf_counter() - start
        convert_args = [str(model), str(folder / "out.onnx")]
        if args.calib:
            np.savez(folder / "calib.npz", x=np.random.default_rng(1).standard_normal((args.calib, args.d)).astype(np.float32))
            convert_args.append(str(folder / "calib.npz"))
        result = measure(convert_args)
        out_bytes = sum(p.stat().st_size for p in folder.glob("out.onnx*"))
        onnx.checker.check_model(str(folder / "out.onnx"))  # with its external data, by path
        result.update({"weight_mb": weight_bytes / 2**20, "output_mb": out_bytes / 2**20, "generate_seconds": generated,
                       "peak_over_weights": result["peak_rss_mb"] * 2**20 / weight_bytes, "calib_samples": args.calib})
        print(f"weights {result['weight_mb']:.0f} MiB (external data) -> output {result['output_mb']:.0f} MiB; "
              f"convert {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MiB = {result['peak_over_weights']:.2f}x the weights "
              f"(target < 2x: {'met' if result['peak_over_weights'] < 2 else 'MISSED'})")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
