"""How far a converted model drifts from its reference, output by output and layer by layer.

    from fgq_onnx.compare import compare
    result = compare("model.onnx", "model.fgq.onnx", "test.npz")
    for layer in result.layers:  # worst SQNR first
        print(layer.name, layer.sqnr_db)

Both models run on the same batches. Outputs are matched by name; so are the
outputs of the candidate's ternarized nodes (metadata key "fgq.ternary"),
which the converter keeps under their original names, so each can be compared
with the reference's tensor of that name (the idea of onnxruntime's
qdq_loss_debug); a custom op's output given as 8-bit levels, or NHWC, is
compared as the NCHW values it stands for. Only running sums are kept,
never whole tensors.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from onnx import numpy_helper

from fgq_onnx import model_io
from fgq_onnx.custom_op_functions import CONV_INPUTS, NHWC, Y_LAYOUT
from fgq_onnx.data import Dataset, ImageOptions
from fgq_onnx.errors import FgqError
from fgq_onnx.evaluate import CUSTOM_DOMAIN, iterate_labelled, open_session

TERNARY_MARK = "fgq.ternary"


def sqnr(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB; inf when there is no noise."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


class _Stats:
    """Running sums for one tensor compared across the two models."""

    def __init__(self) -> None:
        self.elements = 0
        self.signal = 0.0  # sum ref^2
        self.noise = 0.0  # sum (ref - cand)^2
        self.abs_sum = 0.0
        self.abs_max = 0.0
        self.cos_sum = 0.0  # per-sample cosine similarity, summed
        self.samples = 0
        self.kl_sum = 0.0  # per-row KL(softmax(ref) || softmax(cand)), summed
        self.rows = 0
        self.agree = 0  # rows whose argmax agrees
        self.nonfinite = 0

    def update(self, ref: np.ndarray, cand: np.ndarray, scores: bool) -> None:
        ref64 = np.asarray(ref, np.float64)
        cand64 = np.asarray(cand, np.float64)
        finite = np.isfinite(ref64) & np.isfinite(cand64)
        if not finite.all():
            self.nonfinite += int((~finite).sum())
            ref64, cand64 = np.where(finite, ref64, 0.0), np.where(finite, cand64, 0.0)
        diff = ref64 - cand64
        self.elements += diff.size
        self.signal += float(np.sum(ref64 * ref64))
        self.noise += float(np.sum(diff * diff))
        self.abs_sum += float(np.sum(np.abs(diff)))
        if diff.size:
            self.abs_max = max(self.abs_max, float(np.max(np.abs(diff))))
        flat_ref = ref64.reshape(len(ref64), -1) if ref64.ndim else ref64.reshape(1, 1)
        flat_cand = cand64.reshape(flat_ref.shape)
        norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_cand, axis=1)
        dots = np.sum(flat_ref * flat_cand, axis=1)
        both_zero = (norms == 0) & np.all(flat_ref == flat_cand, axis=1)
        self.cos_sum += float(np.sum(np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))))
        self.samples += len(flat_ref)
        if scores:
            p_log = _log_softmax(ref64)
            q_log = _log_softmax(cand64)
            self.kl_sum += float(np.sum(np.exp(p_log) * (p_log - q_log)))
            self.rows += len(ref64)
            self.agree += int(np.sum(ref64.argmax(axis=1) == cand64.argmax(axis=1)))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


@dataclass
class OutputComparison:
    name: str
    sample_shape: tuple[int, ...]  # of one sample (batch axis left out)
    elements: int
    top1_agreement: float | None  # share of rows whose argmax agrees (class-score outputs only)
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float  # mean per-sample cosine similarity
    kl: float | None  # mean KL(softmax(ref) || softmax(candidate)) per row (class-score outputs only)
    sqnr_db: float
    nonfinite: int = 0


@dataclass
class LayerComparison:
    name: str  # the tensor compared: the ternarized node's output
    node: str
    op_type: str
    setting: str  # the node's "fgq.ternary" value, e.g. "n=4 method=exact"
    elements: int
    sqnr_db: float
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float
    nonfinite: int = 0


@dataclass
class CompareResult:
    reference: str
    candidate: str
    n: int  # samples compared
    outputs: list[OutputComparison] = field(default_factory=list)
    layers: list[LayerComparison] = field(default_factory=list)  # worst SQNR first
    unmatched: list[str] = field(default_factory=list)  # ternarized tensors the reference lacks
    skipped: int = 0  # unreadable images

    def to_dict(self) -> dict[str, object]:
        return _finite(asdict(self))

    def to_csv(self) -> str:
        buffer = io.StringIO()
        columns = ["kind", "name", "node", "op_type", "setting", "elements", "sqnr_db", "max_abs_diff", "mean_abs_diff", "cosine", "kl", "top1_agreement"]
        writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.outputs:
            writer.writerow({"kind": "output", **asdict(row)})
        for row in self.layers:
            writer.writerow({"kind": "layer", **asdict(row)})
        return buffer.getvalue()


def _finite(obj):
    """JSON has no inf or NaN: infinities become strings, NaN None."""
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def ternary_nodes(path: Path) -> list[tuple[str, str, str, str]]:
    """(output tensor, node name, op type, setting) of every ternarized node of the main graph.

    Ternarized: marked "fgq.ternary" (the QDQ format) or a com.fgq custom op.
    """
    proto = model_io.read_model_proto(path)
    found = []
    for node in proto.graph.node:
        marks = {entry.key: entry.value for entry in node.metadata_props}
        if (TERNARY_MARK in marks or node.domain == CUSTOM_DOMAIN) and node.output and node.output[0]:
            found.append((node.output[0], node.name, node.op_type, marks.get(TERNARY_MARK, CUSTOM_DOMAIN)))
    return found


@dataclass(frozen=True)
class _OutputForm:
    """How a com.fgq node returns its output (passes/quantize_between_convs.py)."""

    levels: tuple[np.ndarray, np.ndarray] | None  # 8-bit levels under (y_scale, y_zero_point)
    nhwc: bool  # y_layout "NHWC"

    def values(self, array: np.ndarray) -> np.ndarray:
        """The NCHW float32 values `array` stands for."""
        if self.levels is not None:
            scale, zero = self.levels
            array = (array.astype(np.float32) - zero.astype(np.float32)) * scale
        return array.transpose(0, 3, 1, 2) if self.nhwc else array


def _output_forms(path: Path) -> dict[str, _OutputForm]:
    """The forms of the com.fgq outputs that are not float32 NCHW, by tensor name."""
    proto = model_io.read_model_proto(path)
    constants = {tensor.name: tensor for tensor in proto.graph.initializer}
    first = CONV_INPUTS.index("y_scale")
    found = {}
    for node in (node for node in proto.graph.node if node.domain == CUSTOM_DOMAIN):
        names = list(node.input[first:first + 2])
        levels = None
        if len(names) == 2 and all(name in constants for name in names):
            scale, zero = (numpy_helper.to_array(constants[name], str(path.parent)) for name in names)
            levels = scale, zero
        nhwc = any(attr.name == Y_LAYOUT and attr.s.decode() == NHWC for attr in node.attribute)
        if levels is not None or nhwc:
            found[node.output[0]] = _OutputForm(levels, nhwc)
    return found


def compare(
    reference: str | Path,
    candidate: str | Path,
    data,
    *,
    options: ImageOptions = ImageOptions(),
    batch_size: int = 32,
    limit: int | None = None,
    layers: bool = True,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> CompareResult:
    """Run both models on `data` (image folder or .npz; labels not needed) and compare them."""
    reference, candidate = Path(reference), Path(candidate)
    marked = ternary_nodes(candidate) if layers else []
    forms = _output_forms(candidate) if layers else {}
    ref_names = _tensor_names(reference)
    watched = [entry for entry in marked if entry[0] in ref_names]
    unmatched = [entry[0] for entry in marked if entry[0] not in ref_names]
    ref_session = open_session(reference, [entry[0] for entry in watched])
    cand_session = open_session(candidate, [entry[0] for entry in watched])
    _check_same_inputs(ref_session.inputs, cand_session.inputs)
    common = [name for name in ref_session.outputs if name in cand_session.outputs]
    if not common:
        raise FgqError(f"the models share no output name: {ref_session.outputs} and {cand_session.outputs}")
    dataset = Dataset(data, ref_session.inputs, options=options, batch_size=batch_size, limit=limit, labelled=False)
    output_stats = {name: _Stats() for name in common}
    layer_stats = {entry[0]: _Stats() for entry in watched}
    shapes: dict[str, tuple[int, ...]] = {}
    mismatched: set[str] = set()
    samples = 0
    for feed, _ in iterate_labelled(dataset, on_progress):
        ref_values = ref_session.run(feed)
        cand_values = cand_session.run(feed)
        for name, stats in output_stats.items():
            ref, cand = ref_values[name], cand_values[name]
            if ref.shape != cand.shape:
                raise FgqError(f"output '{name}' has shape {list(ref.shape)} in the reference but {list(cand.shape)} in the candidate")
            shapes[name] = ref.shape[1:]
            numeric = np.issubdtype(ref.dtype, np.number) and not np.issubdtype(ref.dtype, np.complexfloating)
            if not numeric:
                raise FgqError(f"output '{name}' is {ref.dtype}, which cannot be compared numerically")
            stats.update(ref, cand, scores=ref.ndim == 2 and ref.shape[1] > 1 and np.issubdtype(ref.dtype, np.floating))
        for name, stats in layer_stats.items():
            ref, cand = ref_values[name], cand_values[name]
            if name in forms:
                cand = forms[name].values(cand)
            if ref.shape != cand.shape:
                mismatched.add(name)
                continue
            stats.update(ref, cand, scores=False)
        samples += len(next(iter(feed.values()))) if feed else 1
    if samples == 0:
        raise FgqError(f"no samples could be read from '{data}'")
    result = CompareResult(str(reference), str(candidate), samples, skipped=dataset.skipped, unmatched=unmatched + sorted(mismatched))
    for name, stats in output_stats.items():
        result.outputs.append(OutputComparison(
            name=name, sample_shape=tuple(shapes[name]), elements=stats.elements,
            top1_agreement=stats.agree / stats.rows if stats.rows else None,
            max_abs_diff=stats.abs_max, mean_abs_diff=stats.abs_sum / max(stats.elements, 1),
            cosine=stats.cos_sum / max(stats.samples, 1), kl=stats.kl_sum / stats.rows if stats.rows else None,
            sqnr_db=sqnr(stats.signal, stats.noise), nonfinite=stats.nonfinite,
        ))
    for tensor, node, op_type, setting in watched:
        if tensor in mismatched:
            continue
        stats = layer_stats[tensor]
        result.layers.append(LayerComparison(
            name=tensor, node=node, op_type=op_type, setting=setting, elements=stats.elements,
            sqnr_db=sqnr(stats.signal, stats.noise), max_abs_diff=stats.abs_max,
            mean_abs_diff=stats.abs_sum / max(stats.elements, 1), cosine=stats.cos_sum / max(stats.samples, 1),
            nonfinite=stats.nonfinite,
        ))
    result.layers.sort(key=lambda layer: layer.sqnr_db)
    return result


def _check_same_inputs(ref: list, cand: list) -> None:
    """Both models must take the same feeds: names, element types, ranks and static sizes."""

    def describe(specs) -> str:
        return ", ".join(f"{s.name} {s.dtype} {['?' if d is None else d for d in s.shape]}" for s in specs)

    by_name = {spec.name: spec for spec in cand}
    same = len(ref) == len(cand) and all(
        spec.name in by_name and spec.dtype == by_name[spec.name].dtype and len(spec.shape) == len(by_name[spec.name].shape)
        and all(a is None or b is None or a == b for a, b in zip(spec.shape, by_name[spec.name].shape))
        for spec in ref
    )
    if not same:
        raise FgqError(f"the models take different inputs: {describe(ref)} and {describe(cand)}")


def _tensor_names(path: Path) -> set[str]:
    """Names of the tensors the main graph produces or takes."""
    proto = model_io.read_model_proto(path)
    names = {name for node in proto.graph.node for name in node.output if name}
    return names | {v.name for v in proto.graph.input}
