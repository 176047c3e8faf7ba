"""The stages of a conversion: load, prepare, skip rules, calibration, the passes, stamp and save.

Shared by the two paths pipeline.convert chooses between: one group size N
for every layer (convert_fixed, here) and a searched N per layer (mixed.py,
which runs convert_fixed for each plan it measures). Nothing here imports
either of them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from fgq_onnx import __version__, evaluate, fidelity, layerwise, model_io
from fgq_onnx.calibration import AbsHistogram, ActivationObserver, CalibMethod, non_negative_by_construction, threshold
from fgq_onnx.data import Dataset, ImageOptions, Split, model_inputs
from fgq_onnx.errors import FgqError, fgq_error_in
from fgq_onnx.passes.add_zero_conv_bias import AddZeroConvBiasPass
from fgq_onnx.passes.dequantize_weights import DequantizeWeightsPass
from fgq_onnx.passes.fold_batchnorm import FoldBatchNormPass
from fgq_onnx.passes.fold_constants import FoldConstantsPass
from fgq_onnx.passes.fold_pad_into_conv import FoldPadIntoConvPass
from fgq_onnx.passes.fold_scale_mul import FoldScaleMulPass
from fgq_onnx.passes.insert_activation_qdq import (
    FLOAT_ACTIVATIONS_MARK,
    ActivationQuant,
    InsertActivationQdqPass,
    quantizes_activation,
)
from fgq_onnx.passes.quantize_embeddings import QuantizeEmbeddingsPass
from fgq_onnx.passes.ternarize_weights import LINEAR_OPS, REQUIRED_OPSET, TERNARY_MARK, TernarizeWeightsPass
from fgq_onnx.passes.use_custom_ops import to_custom_ops
from fgq_onnx.report import ActivationRecord, Report
from fgq_onnx.scales import SCALE_FORMATS
from fgq_onnx.ternary import Method

# IR version that the output's opset needs (INT2 arrived with IR 13).
_REQUIRED_IR = {"int2": 13, "int8": 10}


class OutputFormat(str, enum.Enum):
    QDQ = "qdq"  # standard ONNX: INT2 (or int8) codes -> blocked DequantizeLinear
    CUSTOM = "custom"  # com.fgq Ternary* ops for the custom-op library, with ONNX function fallbacks


@dataclass(frozen=True)
class ConvertConfig:
    """Every setting of a conversion, validated once here."""

    n: int | str = 4  # or "auto": a group size per layer, chosen under max_drop (fgq_onnx/mixed.py)
    method: Method = Method.EXACT
    act_bits: int = 8  # 8 or 4; 0 leaves activations in float (weights only)
    calib_method: CalibMethod = CalibMethod.MINMAX
    percentile: float = 99.99
    calib_batch_size: int = 8
    calib_limit: int | None = None
    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] = LINEAR_OPS
    keep_first_last: bool = False
    ternarize_float_layers: bool = False  # in a model with already-ternary weights, its float layers stay float unless set
    keep_quantized_weights: bool = False  # integer-coded weights (DequantizeLinear, Cast*Mul) stay as they are, not ternarized
    float_embeddings: bool = False  # constant tables read by Gather stay float32 instead of int8 rows (passes/quantize_embeddings.py)
    float_between_layers: bool = False  # custom format: TernaryConv outputs stay float32 NCHW even where only TernaryConvs read them (passes/quantize_between_convs.py)
    format: OutputFormat = OutputFormat.CUSTOM
    weight_storage: str = "int2"
    scale_format: str = "u8"  # group scales: f32, f16, or u8 codes under a float32 row scale (docs/packed-format.md)
    image: ImageOptions = field(default_factory=ImageOptions)
    bias_correction: bool = True  # needs calibration data; skipped (with a note) without it
    input_weighting: bool = False  # with calibration data: each weight's error weighted by its input channel's mean square (ternary.solve_weighted)
    refine_samples: int = 256  # calibration samples bias correction and fitting use (their memory grows with it)
    max_drop: float | None = None  # n="auto": points of top-1 the model may lose
    min_sqnr: float | None = None  # n="auto", instead of max_drop: the least SQNR (dB) of the output on held-out samples
    fidelity_output: str | None = None  # the output fidelity (and min_sqnr) is about; default: the first
    auto_ns: tuple[int, ...] = (4, 8, 16, 32, 64)  # n="auto": the group sizes a layer may get
    layer_n: tuple[tuple[str, int], ...] = ()  # per-layer N by node name (0: keep fp32), over `n`; what n="auto" chose
    float_activation_layers: tuple[str, ...] = ()  # node names whose weights are converted but whose activations stay float

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_n", tuple(dict(self.layer_n).items()))  # a dict is welcome too
        object.__setattr__(self, "float_activation_layers", tuple(self.float_activation_layers))
        object.__setattr__(self, "auto_ns", tuple(sorted(set(self.auto_ns))))
        _check_group_sizes(self)
        if self.act_bits not in (0, 4, 8):
            raise FgqError(f"--act-bits must be 8, 4 or 0 (float activations), got {self.act_bits}")
        if not 0.0 < self.percentile <= 100.0:
            raise FgqError(f"--percentile must be in (0, 100], got {self.percentile}")
        if self.weight_storage not in REQUIRED_OPSET:
            raise FgqError(f"--weight-storage must be one of {sorted(REQUIRED_OPSET)}, got {self.weight_storage!r}")
        if self.scale_format not in SCALE_FORMATS:
            raise FgqError(f"--scale-format must be one of {', '.join(SCALE_FORMATS)}, got {self.scale_format!r}")
        unknown = set(self.op_types) - set(LINEAR_OPS)
        if unknown or not self.op_types:
            raise FgqError(f"--op-types takes some of {', '.join(LINEAR_OPS)}; got {', '.join(sorted(unknown)) or 'none'}")
        if self.refine_samples < 1:
            raise FgqError(f"--refine-samples must be at least 1, got {self.refine_samples}")
        if self.calib_limit is not None and self.calib_limit < 1:
            raise FgqError(f"--calib-limit must be at least 1, got {self.calib_limit}")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as error:
                raise FgqError(f"--exclude '{pattern}' is not a valid regular expression: {error}") from None
        object.__setattr__(self, "method", Method(self.method))
        object.__setattr__(self, "calib_method", CalibMethod(self.calib_method))
        object.__setattr__(self, "format", OutputFormat(self.format))

    def n_of(self, node: ir.Node) -> int:
        """The node's group size: its entry in layer_n, else n."""
        return dict(self.layer_n).get(node.name or node.outputs[0].name, self.n)

    def settings(self) -> dict[str, object]:
        return {
            "n": self.n,
            "method": self.method.value,
            "act_bits": self.act_bits,
            "calib_method": self.calib_method.value if self.act_bits else "none",
            "format": self.format.value,
            "weight_storage": self.weight_storage,
            "scale_format": self.scale_format,
            "bias_correction": self.bias_correction,
            "input_weighting": self.input_weighting,
            "ternarize_float_layers": self.ternarize_float_layers,
            "keep_quantized_weights": self.keep_quantized_weights,
            "float_embeddings": self.float_embeddings,
            "float_between_layers": self.float_between_layers,
        }


def _check_group_sizes(config: ConvertConfig) -> None:
    if config.n == "auto":
        if (config.max_drop is None) == (config.min_sqnr is None):
            raise FgqError("--n auto needs one budget: --max-drop (points of top-1 the model may lose) or --min-sqnr (dB of the output)")
        if config.min_sqnr is not None and not math.isfinite(config.min_sqnr):
            raise FgqError(f"--min-sqnr must be a finite number of dB, got {config.min_sqnr}")
        if config.max_drop is not None and (not math.isfinite(config.max_drop) or config.max_drop < 0):
            raise FgqError(f"--max-drop must be a number of points >= 0, got {config.max_drop}")
        if not config.auto_ns or min(config.auto_ns) < 2:
            raise FgqError(f"the group sizes --n auto chooses from must all be at least 2, got {list(config.auto_ns)}")
        return
    if isinstance(config.n, str) or config.n < 2:
        raise FgqError(f"--n must be 'auto' or at least 2 (one scale per group of N weights), got {config.n}")
    if config.max_drop is not None or config.min_sqnr is not None:
        raise FgqError(f"{'--max-drop' if config.max_drop is not None else '--min-sqnr'} only applies with --n auto")
    bad = [f"{name}={n}" for name, n in config.layer_n if n < 0]
    if bad:
        raise FgqError(f"per-layer group sizes must be at least 1 (1: 8-bit weights; 0 keeps a layer fp32), got {', '.join(bad)}")


class Conversion(NamedTuple):
    model: ir.Model
    report: Report


@dataclass
class CalibrationCache:
    """Activation histograms of the fp32 model, keyed by tensor name (see collect_calibration).

    Passed to convert(..., calibration_cache=...) it replaces the calibration
    run, so that one collection serves every N, method and activation width.
    """

    histograms: dict[str, AbsHistogram]
    samples: int = 0
    skipped: int = 0
    dropped: int = 0
    reference: layerwise.Reference | None = None  # the fp32 pass bias correction and fitting need, taken once too


def skip_rule(config: ConvertConfig, model: ir.Model) -> Callable[[ir.Node], str | None]:
    """The user's exclusions as one predicate: node -> reason to skip, or None."""
    patterns = [re.compile(p) for p in config.exclude]
    first_last: set[int] = set()
    if config.keep_first_last:
        candidates = [n for n in model.graph if n.op_type in LINEAR_OPS and len(n.inputs) > 1 and n.inputs[1] is not None and n.inputs[1].const_value is not None]
        first_last = {id(candidates[0]), id(candidates[-1])} if candidates else set()

    def skip(node: ir.Node) -> str | None:
        if node.op_type not in config.op_types:
            return f"--op-types leaves {node.op_type} out"
        for pattern in patterns:
            names = [node.name or "", node.inputs[1].name or ""]
            if any(pattern.fullmatch(name) for name in names):
                return f"--exclude '{pattern.pattern}'"
        if id(node) in first_last:
            return "--keep-first-last"
        if config.n_of(node) == 0:
            return "kept fp32 by the per-layer plan (layer_n, or --n auto)"
        return None

    return skip


def load_model(model: str | Path | onnx.ModelProto | ir.Model, opset: int) -> tuple[ir.Model, Report]:
    report = Report()
    if isinstance(model, ir.Model):
        proto, base_dir = ir.serde.serialize_model(model), Path(".")
    elif isinstance(model, onnx.ModelProto):
        proto, base_dir = model, Path(".")
    else:
        path = Path(model)
        proto, base_dir = model_io.read_model_proto(path), path.parent
        report.file_bytes_before = path.stat().st_size
        report.settings["source_sha256"] = model_io.sha256_of(path)
    old_opset = model_io.default_opset(proto)
    proto, upgraded = model_io.upgrade_opset(proto, opset)
    if upgraded:
        report.notes.append(f"upgraded the model from opset {old_opset} to {opset} with onnx's version converter")
    return model_io.to_ir(proto, base_dir), report


def infer_shapes(model: ir.Model, report: Report) -> ir.Model:
    """Shapes let the report count multiplications; failing that, it counts weights."""
    try:
        return common.ShapeInferencePass().call(model).model
    except Exception as error:  # noqa: BLE001 - shape inference is a nicety here, never a blocker
        report.notes.append(f"shape inference failed ({str(error).splitlines()[0]}); multiplications are counted per weight")
        return model


def prepare(model: ir.Model, dequantize: bool = True) -> ir.Model:
    """Constants lifted to initializers, initializers out of the inputs, integer-coded weights decoded
    (unless not `dequantize`), small constant computations folded, zero Pads, scale Muls and BatchNorm
    folded into the Convs."""
    return ir.passes.PassManager([
        common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0),
        common.RemoveInitializersFromInputsPass(),
        *([DequantizeWeightsPass()] if dequantize else []),
        FoldConstantsPass(),  # exporters' pad arithmetic: FoldPadIntoConvPass needs constant pads
        FoldPadIntoConvPass(),
        FoldScaleMulPass(),  # before BatchNorm: Conv -> Mul -> BatchNorm then folds twice
        FoldBatchNormPass(),
    ])(model).model


def open_data(calib, model: ir.Model, config: ConvertConfig) -> tuple[Dataset, Dataset | None]:
    """The calibration data and the samples held out of it to measure fidelity (None when there are none).

    One sample in fidelity.HOLDOUT_EVERY of a folder or .npz is held out
    (at most fidelity.HOLDOUT_LIMIT of them); ranges, correction and fitting
    read only the rest. A CalibrationDataReader is read whole: nothing held out.
    """
    source, inputs = layerwise.replayable(calib), model_inputs(model)
    options = {"options": config.image, "batch_size": config.calib_batch_size}
    if hasattr(source, "get_next"):
        return Dataset(source, inputs, limit=config.calib_limit, **options), None
    every = min(fidelity.HOLDOUT_EVERY, Dataset(source, inputs, **options).total)
    if every < 2:  # one sample: it calibrates
        return Dataset(source, inputs, limit=config.calib_limit, **options), None
    held_out = Dataset(source, inputs, limit=fidelity.HOLDOUT_LIMIT, split=Split(every, held_out=True), **options)
    calibration = Dataset(source, inputs, limit=config.calib_limit, split=Split(every, held_out=False), **options)
    return calibration, held_out if held_out.size else None


def collect_calibration(
    model: str | Path | onnx.ModelProto | ir.Model,
    calib,
    config: ConvertConfig | None = None,
    *,
    on_progress: Callable[[int, int | None], None] | None = None,
    **settings,
) -> CalibrationCache:
    """Histograms of the first input of every Conv/Gemm/MatMul of the fp32 model, collected once.

    Ranges then come from fp32 activations (not from the ternarized model's,
    as in a plain convert), which is what lets them be reused across settings.
    """
    config = replace(config or ConvertConfig(), **settings) if settings else (config or ConvertConfig())
    ir_model, _ = load_model(model, REQUIRED_OPSET[config.weight_storage])
    dataset, _ = open_data(calib, ir_model, config)
    ir_model = prepare(ir_model, dequantize=not config.keep_quantized_weights)
    targets = {
        node.inputs[0].name: node.inputs[0]
        for node in ir_model.graph
        if node.op_type in LINEAR_OPS and len(node.inputs) > 1 and node.inputs[0] is not None and node.inputs[0].const_value is None
    }
    if not targets:
        raise FgqError(nothing_to_convert(Report()))
    if config.bias_correction or config.method.fits or config.input_weighting:  # one fp32 pass gives the ranges and what refining needs
        reference = layerwise.capture(ir_model, dataset, keep_model=config.method.fits, input_statistics=config.input_weighting)
        return CalibrationCache(reference.histograms, reference.samples, dataset.skipped, dataset.dropped, reference)
    observer = ActivationObserver(targets, bins=0 if config.calib_method is CalibMethod.MINMAX else 2048)
    observer.collect(ir_model, dataset, on_batch=(lambda k: on_progress(k, dataset.size)) if on_progress else None)
    return CalibrationCache(observer.histograms, observer.samples, dataset.skipped, dataset.dropped)


def _calibrate(model: ir.Model, dataset: Dataset | None, config: ConvertConfig, report: Report, on_progress, cache: CalibrationCache | None = None) -> dict[str, ActivationQuant]:
    """Ranges for the activation inputs of ternarized nodes of the main graph."""
    targets = {}
    for node in model.graph:
        if quantizes_activation(node) and node.inputs[0] is not None and node.inputs[0].const_value is None:
            targets[node.inputs[0].name] = node.inputs[0]
    if any(TERNARY_MARK in n.metadata_props for g in model.graph.subgraphs() for n in g):
        report.notes.append("layers inside If/Loop/Scan subgraphs have ternary weights but float activations")
    if not targets:
        return {}
    if cache is not None:
        missing = sorted(set(targets) - set(cache.histograms))
        if missing:
            raise FgqError(f"the calibration cache has no statistics for tensor '{missing[0]}'; collect it from this model")
        histograms = cache.histograms
        report.calibration = {"samples": cache.samples, "skipped_unreadable": cache.skipped, "dropped_for_fixed_batch": cache.dropped, "reused_fp32_statistics": True}
    else:
        observer = ActivationObserver(targets, bins=0 if config.calib_method is CalibMethod.MINMAX else 2048)
        observer.collect(model, dataset, on_batch=(lambda k: on_progress(k, dataset.size)) if on_progress else None)
        histograms = observer.histograms
        report.calibration = {"samples": observer.samples, "skipped_unreadable": dataset.skipped, "dropped_for_fixed_batch": dataset.dropped}
    if report.calibration["skipped_unreadable"]:
        report.notes.append(f"skipped {report.calibration['skipped_unreadable']} unreadable calibration image(s)")
    quants = {}
    for name, value in targets.items():
        hist = histograms[name]
        # Graph inputs count as non-negative when the calibration data never made this tensor negative.
        signed = not non_negative_by_construction(value, graph_inputs=hist.min >= 0.0)
        levels = 2 ** (config.act_bits - 1) - 1 if signed else 2**config.act_bits - 1
        high = threshold(hist, config.calib_method, levels, config.percentile)
        scale = high / levels if high > 0 else 1.0
        quants[name] = ActivationQuant(scale=scale, signed=signed, bits=config.act_bits)
        report.activations.append(ActivationRecord(name, config.act_bits, signed, -high if signed else 0.0, high, scale))
    return quants


class _Progress:
    """The stages a conversion went through, so that a failure can say what was done and what was not."""

    def __init__(self):
        self.done: list[str] = []
        self.current: str | None = None

    def begin(self, stage: str) -> None:
        if self.current is not None:
            self.done.append(self.current)
        self.current = stage

    def explain(self, error: FgqError) -> str:
        if self.current is None:  # still loading: the error says it all
            return str(error)
        done = f"{', '.join(self.done)} done; " if self.done else ""
        message = str(error)
        return f"{done}{self.current} failed{'' if message.startswith('at layer') else ':'} {message}; nothing written"


def convert_fixed(
    model: str | Path | onnx.ModelProto | ir.Model,
    config: ConvertConfig,
    *,
    calib=None,
    on_progress: Callable[[int, int | None], None] | None = None,
    calibration_cache: CalibrationCache | None = None,
    measure_fidelity: bool = True,
) -> Conversion:
    """The conversion with config.n (or config.layer_n) fixed: pipeline.convert without the n="auto" search.

    measure_fidelity=False leaves report.fidelity unmeasured (the n="auto" search converts many plans and
    measures the one it returns: held_out_fidelity)."""
    progress = _Progress()
    try:
        return _convert(model, config, calib=calib, on_progress=on_progress, calibration_cache=calibration_cache, progress=progress,
                        measure_fidelity=measure_fidelity)
    except Exception as error:  # an FgqError, maybe wrapped by a pass: say what was done before it
        cause = fgq_error_in(error)
        if cause is None:
            raise
        raise FgqError(progress.explain(cause)) from None


def _convert(
    model: str | Path | onnx.ModelProto | ir.Model,
    config: ConvertConfig,
    *,
    calib,
    on_progress: Callable[[int, int | None], None] | None,
    calibration_cache: CalibrationCache | None,
    progress: _Progress,
    measure_fidelity: bool,
) -> Conversion:
    """The body of convert; `progress` records the stages it begins."""
    if config.act_bits and calib is None and calibration_cache is None:
        raise FgqError("activation quantization needs calibration data (--calib), or use --act-bits 0 for weights only")
    ir_model, report = load_model(model, REQUIRED_OPSET[config.weight_storage])
    report.settings.update(config.settings())
    dataset = held_out = None
    if config.method.fits and calib is None:
        raise FgqError(f"--method {config.method.value} fits weights to calibration data: give --calib")
    if calib is not None:  # open the data now: a bad path should fail before the slow work
        dataset, held_out = open_data(calib, ir_model, config)
    report.weight_bytes_before = model_io.weight_bytes(ir_model)

    skip = skip_rule(config, ir_model)
    ir_model = prepare(ir_model, dequantize=not config.keep_quantized_weights)
    ir_model = infer_shapes(ir_model, report)
    reference = None
    if (config.bias_correction or config.method.fits or config.input_weighting) and dataset is not None:
        cached = calibration_cache.reference if calibration_cache is not None else None
        usable = cached is not None and (cached.model is not None or not config.method.fits) and (cached.inputs or not config.input_weighting)
        progress.begin("the fp32 calibration pass")
        reference = cached if usable else layerwise.capture(ir_model, dataset, keep_model=config.method.fits, input_statistics=config.input_weighting)
    importance = reference.input_importance if reference is not None and config.input_weighting else None
    ternarize = TernarizeWeightsPass(config.n_of, config.method, config.weight_storage, skip=skip, scale_format=config.scale_format, trained_float_stays_float=not config.ternarize_float_layers, importance=importance)
    progress.begin("ternarization")
    ir_model = ternarize(ir_model).model
    report.layers = ternarize.records
    _mark_float_activations(ir_model, config, report)
    if not report.converted:
        raise FgqError(nothing_to_convert(report))
    refining = reference is not None and (config.bias_correction or config.method.fits)
    ranges_from_capture = refining and calibration_cache is None
    if ranges_from_capture:  # fitting and bias correction bring activations back to the fp32 ranges: no second pass
        calibration_cache = CalibrationCache(reference.histograms, reference.samples, dataset.skipped, dataset.dropped)
    if config.act_bits:
        progress.begin("activation calibration")
        quants = _calibrate(ir_model, dataset, config, report, on_progress, calibration_cache)
        if ranges_from_capture:
            report.calibration.pop("reused_fp32_statistics", None)
            report.notes.append("activation ranges come from the fp32 model, whose statistics fitting and bias correction restore")
        ir_model = InsertActivationQdqPass(quants)(ir_model).model
    if refining:
        fit = layerwise.FitSettings(config.weight_storage, config.scale_format, block=config.method is Method.BLOCK) if config.method.fits else None
        progress.begin("fitting and bias correction" if fit and config.bias_correction else "fitting" if fit else "bias correction")
        report.notes += layerwise.describe(layerwise.refine(ir_model, reference, dataset, correct=config.bias_correction, fit=fit, samples=config.refine_samples))
    elif config.bias_correction:
        report.notes.append("bias correction needs calibration data (--calib): skipped")
    if not config.float_embeddings:
        ir_model = _quantize_embeddings(ir_model, report)
    finish = ir.passes.PassManager([
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedOpsetsPass(),
        common.TopologicalSortPass(),
    ])
    ir_model = finish(ir_model).model
    if config.format is OutputFormat.CUSTOM:
        progress.begin("the custom-op rewrite")
        ir_model = _use_custom_ops(ir_model, report, config.float_between_layers)
    else:
        ir_model = AddZeroConvBiasPass()(ir_model).model
    ir_model.ir_version = max(ir_model.ir_version, _REQUIRED_IR[config.weight_storage])
    stamp(ir_model, report)
    report.weight_bytes_after = model_io.weight_bytes(ir_model)
    if measure_fidelity:
        progress.begin("the fidelity check on held-out samples")
        report.fidelity = _fidelity(model, ir_model, calib, held_out, config.fidelity_output)
    return Conversion(ir_model, report)


def held_out_fidelity(model, conversion: Conversion, calib, config: ConvertConfig) -> fidelity.Fidelity:
    """What convert_fixed measures last, for a conversion made without it: the converted model against the
    source `model` on the calibration samples held out (the same split)."""
    held_out = open_data(calib, conversion.model, config)[1] if calib is not None else None
    return _fidelity(model, conversion.model, calib, held_out, config.fidelity_output)


def _mark_float_activations(model: ir.Model, config: ConvertConfig, report: Report) -> None:
    """Mark the converted layers config.float_activation_layers names: calibration and the activation Q/DQ pass them by."""
    names = set(config.float_activation_layers)
    marked = [node for node in model.graph.all_nodes() if TERNARY_MARK in node.metadata_props and (node.name or node.outputs[0].name) in names]
    for node in marked:
        node.metadata_props[FLOAT_ACTIVATIONS_MARK] = "1"
    labels = {node.name or node.outputs[0].name for node in marked}
    for record in report.layers:
        record.float_activations = record.node in labels
    if marked:
        report.notes.append(f"{len(marked)} converted layer(s) keep float activations (their weights are converted; "
                            "they run as a weight DequantizeLinear and the float op)")


def _fidelity(source, converted: ir.Model, calib, held_out: Dataset | None, main: str | None) -> fidelity.Fidelity:
    """The converted model against the source on the held-out samples (`main` output first), or why it was not measured."""
    if held_out is not None:
        return evaluate.measure_fidelity(source, converted, held_out, main)
    if calib is None:
        return fidelity.Fidelity(skipped="no calibration data (--calib) to hold samples out of")
    if hasattr(calib, "get_next"):
        return fidelity.Fidelity(skipped="a CalibrationDataReader is used whole for calibration: give a folder or an .npz to hold samples out")
    return fidelity.Fidelity(skipped="too few calibration samples to hold any out")


def _quantize_embeddings(model: ir.Model, report: Report) -> ir.Model:
    embeddings = QuantizeEmbeddingsPass()
    model = embeddings(model).model
    report.embeddings = [dataclasses.asdict(record) for record in embeddings.records]
    stored = [r for r in embeddings.records if r.converted]
    if stored:
        before, after = sum(r.float_bytes for r in stored), sum(r.int8_bytes for r in stored)
        report.notes.append(f"{len(stored)} embedding table(s) read by Gather stored as int8 rows with a float32 scale per row: "
                            f"{before / 1e6:.1f} MB -> {after / 1e6:.1f} MB (--float-embeddings keeps them float32)")
    return model


def _use_custom_ops(model: ir.Model, report: Report, float_between_layers: bool) -> ir.Model:
    float_activations = {node.name or node.outputs[0].name for node in model.graph.all_nodes() if FLOAT_ACTIVATIONS_MARK in node.metadata_props}
    model, records = to_custom_ops(model, float_between_layers)
    ternary = {layer.node for layer in report.layers if layer.converted} - float_activations  # those stay in qdq form by design
    kept = [r for r in records if not r.converted and r.node in ternary]  # float layers stay float anyway
    if kept:
        report.notes.append(f"{len(kept)} ternary layer(s) stay in qdq form: " + "; ".join(f"{r.node} ({r.reason})" for r in kept))
    return model


def nothing_to_convert(report: Report) -> str:
    if not report.layers:
        return "nothing to convert: the model has no Conv, Gemm or MatMul"
    reasons = sorted({layer.reason for layer in report.layers})
    return f"nothing to convert: all {len(report.layers)} Conv/Gemm/MatMul nodes were skipped ({'; '.join(reasons)})"


def stamp(model: ir.Model, report: Report) -> None:
    model.producer_name = "fgq-onnx"
    model.producer_version = __version__
    model.metadata_props.update({f"fgq_onnx.{key}": str(value) for key, value in {"version": __version__, **report.settings}.items()})


def save(model: ir.Model, path: str | Path, *, external_data: bool | None = None, inputs: tuple[str | Path, ...] = ()) -> Path | None:
    """Write a converted model atomically (see model_io.save_model); refuses to overwrite `inputs`."""
    path = Path(path)
    model_io.check_output_path(path, [Path(p) for p in inputs])
    return model_io.save_model(model, path, external_data=external_data)


def check_model(path: Path) -> None:
    """Run onnx's checker on a saved model (with its external data)."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as error:
        raise FgqError(f"the converted model does not pass onnx's checker: {str(error).splitlines()[0]}") from None
