"""Accuracy, size and multiplications saved across group sizes, methods and activation widths.

    from fgq_onnx.sweep import sweep
    result = sweep("model.onnx", "calib/", "test.npz", ns=(4, 8, 16), out_dir="out")
    # out/sweep.csv, out/sweep.png

Activation statistics are collected once, on the fp32 model, and reused by
every setting (pipeline.collect_calibration); `recalibrate=True` instead
calibrates each converted model on its own, as a plain `convert` does.
"""

from __future__ import annotations

import csv
import itertools
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fgq_onnx import model_io, pipeline
from fgq_onnx.errors import FgqError
from fgq_onnx.evaluate import EvalResult, evaluate
from fgq_onnx.ternary import Method

CSV_COLUMNS = ["n", "method", "act_bits", "top1", "top5", "samples", "file_bytes", "weight_bytes", "multiplications_eliminated", "sqnr_mean_db", "convert_seconds", "eval_seconds"]


@dataclass
class SweepRow:
    n: int | None  # None for the fp32 reference
    method: str  # "fp32" for the reference
    act_bits: int | None  # 0: float activations; None for the reference
    top1: float
    top5: float
    samples: int
    file_bytes: int
    weight_bytes: int
    multiplications_eliminated: float  # share of linear-layer multiplications removed (0..1)
    sqnr_mean_db: float
    convert_seconds: float
    eval_seconds: float

    @property
    def label(self) -> str:
        if self.n is None:
            return "fp32"
        return f"N={self.n} {self.method} act={_act_name(self.act_bits)}"


def _act_name(bits: int | None) -> str:
    return "float" if not bits else f"{bits}-bit"


@dataclass
class SweepResult:
    model: str
    fp32: SweepRow
    rows: list[SweepRow] = field(default_factory=list)
    calibrations: int = 0  # calibration runs made
    calibration_seconds: float = 0.0  # time spent in them
    recalibrated: bool = False  # True: one calibration per setting
    settings_calibrated: int = 0  # settings that needed activation ranges
    time_saved_seconds: float = 0.0  # measured estimate: (plain - reusing conversion time) x settings - the one collection
    plain_convert_seconds: float = 0.0  # one such setting converted as a plain convert does (calibrating itself)
    reusing_convert_seconds: float = 0.0  # the same setting converted with the shared statistics
    csv_path: str = ""
    plot_path: str = ""

    def to_dict(self) -> dict[str, object]:
        def clean(obj):
            if isinstance(obj, dict):
                return {key: clean(value) for key, value in obj.items()}
            if isinstance(obj, list):
                return [clean(value) for value in obj]
            return None if isinstance(obj, float) and not math.isfinite(obj) else obj

        return clean(asdict(self))


def _settings(ns: Sequence[int], act_bits: Sequence[int], methods: Sequence[Method | str]) -> list[tuple[int, Method, int]]:
    if not ns or not act_bits or not methods:
        raise FgqError("a sweep needs at least one --n, one --act-bits and one --method")
    try:
        methods = [Method(m) for m in dict.fromkeys(methods)]
    except ValueError as error:
        raise FgqError(f"unknown --method: {error}") from None
    for bits in act_bits:
        if bits not in (0, 4, 8):
            raise FgqError(f"--act-bits must be 8, 4 or 0 (float activations), got {bits}")
    for n in ns:
        if n < 2:
            raise FgqError(f"--n must be at least 2 (one scale per group of N weights), got {n}")
    return [(n, method, bits) for method, bits, n in itertools.product(methods, dict.fromkeys(act_bits), sorted(set(ns)))]


def sweep(
    model: str | Path,
    calib,
    data,
    *,
    ns: Sequence[int] = (4, 8, 16, 32, 64),
    act_bits: Sequence[int] = (8, 4),
    methods: Sequence[Method | str] = (Method.EXACT, Method.TWN),
    config: pipeline.ConvertConfig | None = None,
    out_dir: str | Path | None = None,
    keep_models: bool = False,
    eval_batch_size: int = 64,
    eval_limit: int | None = None,
    recalibrate: bool = False,
    on_progress: Callable[[int, int | None], None] | None = None,
    on_setting: Callable[[SweepRow], None] | None = None,
) -> SweepResult:
    """Convert `model` with every (N, method, act_bits) and evaluate each on labelled `data`.

    `config` carries the other conversion settings (calibration method,
    exclusions, image options, ...); its n, method and act_bits are swept.
    The time saved by reusing statistics is measured, not assumed: one
    setting is also converted the plain way, and the difference, times the
    settings, less the one collection, is reported.
    Writes out_dir/sweep.csv and out_dir/sweep.png when `out_dir` is given
    (and the converted models too with `keep_models`). `on_progress(1, total)`
    ticks once per step: the fp32 evaluation, the calibration, each setting.
    """
    model = Path(model)
    base = config or pipeline.ConvertConfig()
    settings = _settings(ns, act_bits, methods)
    for n, method, bits in settings:  # every setting valid before the slow work
        replace(base, n=n, method=method, act_bits=bits)
    needs_calib = [s for s in settings if s[2]]
    if needs_calib and calib is None:
        raise FgqError("activation quantization needs calibration data (--calib), or sweep only --act-bits 0")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise FgqError(f"output '{out}' exists and is not a folder")
        if not out.parent.is_dir():
            raise FgqError(f"output folder '{out.parent}' does not exist")
        out.mkdir(exist_ok=True)
    total = len(settings) + 1 + (1 if needs_calib and not recalibrate else 0)

    def tick() -> None:
        if on_progress:
            on_progress(1, total)

    reference = evaluate(model, data, options=base.image, batch_size=eval_batch_size, limit=eval_limit)
    size = model.stat().st_size
    weights = model_io.weight_bytes(model_io.to_ir(model_io.read_model_proto(model), model.parent))
    result = SweepResult(str(model), _row(None, "fp32", None, reference, size, weights, 0.0, math.inf, 0.0), recalibrated=recalibrate, settings_calibrated=len(needs_calib))
    tick()

    cache = None
    if needs_calib and not recalibrate:
        started = time.perf_counter()
        # Fitting keeps a copy of the fp32 model in the statistics: collect as for it when it is swept.
        fit = next((m for _, m, _ in settings if m.fits), None)
        cache = pipeline.collect_calibration(model, calib, replace(base, method=fit) if fit else base)
        result.calibration_seconds = time.perf_counter() - started
        result.calibrations = 1
        tick()

    # The setting also converted the plain way, to measure the saving: the second, past warm-up costs.
    probe = needs_calib[min(1, len(needs_calib) - 1)] if needs_calib else None
    with tempfile.TemporaryDirectory(prefix="fgq-sweep-") as scratch:
        folder = out / "models" if out is not None and keep_models else Path(scratch)
        folder.mkdir(exist_ok=True)
        for n, method, bits in settings:
            setting = replace(base, n=n, method=method, act_bits=bits)
            started = time.perf_counter()
            conversion = pipeline.convert(model, setting, calib=calib, calibration_cache=cache if bits else None)
            convert_seconds = time.perf_counter() - started
            if cache is not None and (n, method, bits) == probe:  # measure what the reuse saves
                result.reusing_convert_seconds = convert_seconds
                started = time.perf_counter()
                pipeline.convert(model, setting, calib=calib)
                result.plain_convert_seconds = time.perf_counter() - started
            path = folder / f"{model.name.removesuffix('.onnx')}.n{n}.{method.value}.a{bits}.onnx"
            pipeline.save(conversion.model, path, inputs=(model,))
            if bits and recalibrate:
                result.calibrations += 1
            scores = evaluate(path, data, options=base.image, batch_size=eval_batch_size, limit=eval_limit)
            report = conversion.report
            row = _row(n, method.value, bits, scores, path.stat().st_size, report.weight_bytes_after, report.multiplications_eliminated, report.sqnr_mean_db, convert_seconds)
            result.rows.append(row)
            if not keep_models:
                path.unlink()
            if on_setting:
                on_setting(row)
            tick()

    if cache is not None:
        per_setting = result.plain_convert_seconds - result.reusing_convert_seconds
        result.time_saved_seconds = max(0.0, per_setting * len(needs_calib) - result.calibration_seconds)
    if out is not None:
        result.csv_path = str(write_csv(result, out / "sweep.csv"))
        result.plot_path = str(plot(result, out / "sweep.png"))
    return result


def _row(n, method, bits, scores: EvalResult, file_bytes: int, weight_bytes: int, eliminated: float, sqnr: float, convert_seconds: float) -> SweepRow:
    return SweepRow(n, method, bits, scores.top1, scores.top5, scores.n, file_bytes, weight_bytes, eliminated, sqnr, convert_seconds, scores.seconds)


def write_csv(result: SweepResult, path: Path) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in [result.fp32, *result.rows]:
            values = {key: getattr(row, key) for key in CSV_COLUMNS}
            for key, value in values.items():
                if value is None or (isinstance(value, float) and not math.isfinite(value)):
                    values[key] = ""
                elif isinstance(value, float):
                    values[key] = f"{value:.6g}"
            writer.writerow(values)
    return path


def plot(result: SweepResult, path: Path) -> Path:
    """Top-1 against N (log2 axis): a line per method and activation width, fp32 as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise FgqError("the sweep plot needs matplotlib (pip install matplotlib)") from None

    figure, axes = plt.subplots(figsize=(7.0, 4.4), dpi=150)
    try:
        groups: dict[tuple[str, int], list[SweepRow]] = {}
        for row in result.rows:
            groups.setdefault((row.method, row.act_bits), []).append(row)
        markers = {"exact": "o", "twn": "s", "asymmetric": "^"}
        lines = {8: "-", 4: "--", 0: ":"}
        palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        colors = {method: palette[i % len(palette)] for i, method in enumerate(dict.fromkeys(row.method for row in result.rows))}
        for (method, bits), rows in groups.items():  # a colour and marker per method, a line style per activation width
            rows = sorted(rows, key=lambda r: r.n)
            axes.plot(
                [r.n for r in rows], [100 * r.top1 for r in rows], color=colors[method], marker=markers.get(method, "D"),
                linestyle=lines.get(bits, "-"), label=f"{method}, {_act_name(bits)} activations",
            )
        axes.axhline(100 * result.fp32.top1, color="grey", linestyle="-.", linewidth=1.2, label=f"fp32 ({100 * result.fp32.top1:.2f}%)")
        ns = sorted({row.n for row in result.rows})
        axes.set_xscale("log", base=2)
        axes.set_xticks(ns, [str(n) for n in ns])
        axes.minorticks_off()
        axes.set_xlabel("group size N (weights per scale)")
        axes.set_ylabel("top-1 accuracy (%)")
        axes.set_title(f"{Path(result.model).name}: ternary weights, top-1 vs N")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8, loc="best")
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)
    return path
