"""Where a model's ternary loss comes from, layer by layer (issue #13's EfficientNet-Lite0 diagnosis).

For one model of benchmarks/real_models.py, on its fp32 graph after fgq-onnx's
preparation (BatchNorm, scale Muls and Pads folded into the Convs):

- each Conv/Gemm/MatMul with a constant weight is ternarized alone (weights
  only, activations float, no bias correction) and the main output's SQNR
  against fp32 is measured on the held-out samples: what that layer costs;
- its weight SQNR, and its output SQNR on its own calibration inputs
  (10 log10 tr(W H W^T) / tr(D H D^T), H the input Gram matrix, D the weight
  error), with the plain exact solver and with the activation-weighted one
  (fgq_onnx.ternary, weights = the mean square of each input channel);
- the spread of its input channels' mean squares (max / median, over the
  calibration samples): after BatchNorm folding they span decades.

    python benchmarks/diagnose_layers.py --model efficientnet-lite0 [--n 4] [--csv out.csv]

Slow part: one onnxruntime run of the held-out samples per layer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models as rm

from fgq_onnx import stages
from fgq_onnx.calibration import session_with_outputs
from fgq_onnx.graph_utils import constant_array, int_attr
from fgq_onnx.passes.ternarize_weights import LINEAR_OPS, narrow_conv_group_size, weight_layout
from fgq_onnx.scales import store_scales
from fgq_onnx.ternary import Method, TernaryWeight, ternarize


def linear_layers(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type in LINEAR_OPS and len(n.inputs) > 1 and constant_array(n.inputs[1]) is not None
            and n.inputs[0] is not None and n.inputs[0].const_value is None]


def run(model: ir.Model, feeds: dict[str, np.ndarray], output: str, folder: Path) -> np.ndarray:
    path = folder / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([output], {k: v[i: i + 8] for k, v in feeds.items()})[0] for i in range(0, len(next(iter(feeds.values()))), 8)])


def sqnr(y: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(np.sum((y.astype(np.float64) - ref) ** 2), 1e-30)))


def input_gram(x: np.ndarray, node: ir.Node) -> np.ndarray | None:
    """The C x C input Gram of a 1x1 Conv or a Gemm/MatMul (per column), else None."""
    weight = constant_array(node.inputs[1])
    if node.op_type == "Conv":
        if weight.shape[2:] != (1,) * (weight.ndim - 2) or int_attr(node, "group", 1) != 1:
            return None
        cols = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    else:
        cols = x.reshape(-1, x.shape[-1])
    cols = cols[:: max(1, len(cols) // 20000)].astype(np.float64)
    return cols.T @ cols / len(cols)


def rows_of(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """[out, in] rows of a 1x1 Conv / Gemm(transB) / MatMul weight."""
    if node.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1)
    if node.op_type == "Gemm" and int_attr(node, "transB", 0):
        return weight
    return weight.T


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fgq-onnx" / "models")
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    spec = rm.select(args.model, quick=False)[0]
    inputs = spec.inputs(args.cache)
    calib = {k: v[: rm.CALIB] for k, v in inputs.items()}
    held = {k: v[rm.CALIB:] for k, v in inputs.items()}
    model, _ = stages.load_model(str(spec.source.path(args.cache)), 13)
    model = stages.prepare(model)
    layers = linear_layers(model)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        reference = run(model, held, spec.output, folder)
        fetched = [n.inputs[0].name for n in layers if n.inputs[0].name not in calib]
        session = session_with_outputs(model, fetched, folder)
        parts = zip(*(session.run(fetched, {k: v[i: i + 8] for k, v in calib.items()}) for i in range(0, rm.CALIB, 8)))
        seen = {**calib, **{name: np.concatenate(part) for name, part in zip(fetched, parts)}}
        xs = [seen[n.inputs[0].name] for n in layers]
        for node, x in zip(layers, xs):
            weight = np.asarray(constant_array(node.inputs[1]), np.float32)
            n, _ = narrow_conv_group_size(node, weight, args.n, Method.EXACT)
            layout, _ = weight_layout(node, weight.shape, n)
            plain = ternarize(weight, layout, Method.EXACT)
            energy = np.mean(np.square(np.moveaxis(x, 1, -1) if node.op_type == "Conv" else x).reshape(-1, x.shape[1 if node.op_type == "Conv" else -1]), axis=0)
            row = {"layer": node.name, "shape": "x".join(map(str, weight.shape)), "n": n, "weight_sqnr": plain.sqnr_db(weight)}
            row["input_ms_max_over_median"] = float(energy.max() / max(np.median(energy), 1e-30))
            gram = input_gram(x, node)
            if gram is not None:
                w = rows_of(node, weight).astype(np.float64)
                importance = energy.reshape(1, -1, *[1] * (weight.ndim - 2)) if node.op_type == "Conv" else (energy[None] if rows_of(node, weight) is weight else energy[:, None])
                weighted = ternarize(weight, layout, Method.EXACT, importance + 0.01 * energy.mean())
                u8 = [TernaryWeight(layout, s.codes, store_scales(s.scale, layout, "u8").decoded) for s in (plain, weighted)]
                for label, solution in (("plain", plain), ("weighted", weighted), ("plain_u8", u8[0]), ("weighted_u8", u8[1])):
                    d = w - rows_of(node, solution.dequantize()).astype(np.float64)
                    row[f"output_sqnr_{label}"] = float(10 * np.log10(np.einsum("ri,ij,rj->", w, gram, w) / np.einsum("ri,ij,rj->", d, gram, d)))
                row["weight_sqnr_weighted"] = weighted.sqnr_db(weight)
            original = node.inputs[1].const_value
            node.inputs[1].const_value = ir.tensor(plain.dequantize().astype(np.float32), name=node.inputs[1].name)
            row["model_sqnr_alone"] = sqnr(run(model, held, spec.output, folder), reference)
            node.inputs[1].const_value = original
            rows.append(row)
            print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if args.csv:
        keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[-1]).index(k) if k in rows[-1] else 99)
        args.csv.write_text("\n".join([",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
