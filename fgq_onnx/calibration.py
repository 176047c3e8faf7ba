"""Activation ranges from calibration data.

One lifecycle: `ActivationObserver.collect` runs the model over the data and
streams every watched tensor into a fixed-size histogram of |x|; then
`threshold` turns a histogram into a clipping range with the chosen method.
Memory is one histogram per tensor, however many samples pass.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from fgq_onnx import model_io
from fgq_onnx.errors import FgqError
from fgq_onnx.graph_utils import DEFAULT_DOMAINS


class CalibMethod(str, enum.Enum):
    MINMAX = "minmax"  # the largest |x| seen
    PERCENTILE = "percentile"  # the given percentile of |x|
    ENTROPY = "entropy"  # least KL divergence between float and quantized histograms
    MSE = "mse"  # least expected squared quantization error


class AbsHistogram:
    """A streaming histogram of |x| over [0, bins * width), widened by merging bins.

    With bins=0 only the extremes and the count are kept (all minmax needs).
    """

    def __init__(self, bins: int = 2048):
        self.counts = np.zeros(max(bins, 1), np.int64)
        self.binned = bins > 0
        self.total = 0
        self.width = 0.0
        self.min = math.inf
        self.max = -math.inf

    @property
    def abs_max(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    @property
    def count(self) -> int:
        return self.total

    def update(self, array: np.ndarray) -> None:
        array = np.asarray(array, np.float32)
        if array.size == 0:
            return
        low, high = float(array.min()), float(array.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise FgqError("calibration produced non-finite activations (NaN or Inf); check the data's scaling")
        self.min, self.max = min(self.min, low), max(self.max, high)
        self.total += array.size
        if not self.binned:
            return
        values = np.abs(array.ravel())
        top = max(-low, high)
        bins = self.counts.size
        if self.width == 0.0:
            self.width = max(top, 1e-12) / bins
        while top >= self.width * bins:  # double the range: merge neighbouring bins
            self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(axis=1), np.zeros(bins // 2, np.int64)])
            self.width *= 2
        index = np.minimum((values / self.width).astype(np.int64), bins - 1)
        self.counts += np.bincount(index, minlength=bins)


def threshold(hist: AbsHistogram, method: CalibMethod, levels: int, percentile: float = 99.99) -> float:
    """The clipping value T for |x|; `levels` is the number of positive quantization steps."""
    if hist.count == 0 or hist.abs_max == 0.0:
        return 0.0
    if method is CalibMethod.MINMAX:
        return hist.abs_max
    edges = hist.width * np.arange(1, hist.counts.size + 1)
    if method is CalibMethod.PERCENTILE:
        cdf = np.cumsum(hist.counts) / hist.count
        return float(min(edges[np.searchsorted(cdf, percentile / 100.0)], hist.abs_max))
    if method is CalibMethod.MSE:
        return float(min(_mse_threshold(hist, edges, levels), hist.abs_max))
    if method is CalibMethod.ENTROPY:
        return float(min(_entropy_threshold(hist, levels), hist.abs_max))
    raise ValueError(f"unknown calibration method {method!r}")


def _mse_threshold(hist: AbsHistogram, edges: np.ndarray, levels: int) -> float:
    """argmin_T of the expected error: step^2/12 inside [0, T], (x - T)^2 beyond it."""
    centres = edges - hist.width / 2
    h = hist.counts.astype(np.float64)
    inside = np.cumsum(h)
    tail0 = inside[-1] - inside
    tail1 = np.cumsum((h * centres)[::-1])[::-1] - h * centres
    tail2 = np.cumsum((h * centres**2)[::-1])[::-1] - h * centres**2
    step = edges / levels
    error = inside * step**2 / 12 + tail2 - 2 * edges * tail1 + edges**2 * tail0
    return float(edges[np.argmin(error)])


def _entropy_threshold(hist: AbsHistogram, levels: int, candidates: int = 256) -> float:
    """TensorRT-style: the T whose `levels`-bin quantized histogram is closest (KL) to the float one."""
    counts = hist.counts.astype(np.float64)
    last = int(np.nonzero(counts)[0][-1]) + 1
    start = min(levels, last)
    best, best_kl = last, math.inf
    for stop in np.unique(np.linspace(start, last, min(candidates, last - start + 1)).astype(int)):
        reference = counts[:stop].copy()
        reference[-1] += counts[stop:].sum()
        chunks = np.array_split(np.arange(stop), min(levels, stop))
        quantized = np.zeros(stop)
        for chunk in chunks:
            nonzero = counts[chunk] > 0
            if nonzero.any():
                quantized[chunk[nonzero]] = counts[chunk].sum() / nonzero.sum()
        p = reference / reference.sum()
        q = quantized / max(quantized.sum(), 1e-30)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best, best_kl = stop, kl
    return best * hist.width


class ActivationObserver:
    """Runs a model with chosen tensors exposed and keeps a histogram of each."""

    def __init__(self, tensor_names: Iterable[str], bins: int = 2048):
        """bins=0 keeps only the extremes, enough for minmax and much faster."""
        self.histograms = {name: AbsHistogram(bins) for name in tensor_names}
        self.samples = 0

    def collect(self, model: ir.Model, batches: Iterable[tuple[dict[str, np.ndarray], object]], on_batch: Callable[[int], None] | None = None) -> None:
        """Feed every batch through `model`; `on_batch(samples)` reports progress."""
        graph_inputs = {v.name for v in model.graph.inputs}
        fetched = [name for name in self.histograms if name not in graph_inputs]
        with model_io.temporary_folder("fgq-calib-") as folder:
            session = session_with_outputs(model, fetched, folder)
            for feed, _ in batches:
                try:
                    outputs = session.run(fetched, feed)
                except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
                    raise FgqError(f"the model failed on calibration data: {str(error).splitlines()[0]}") from None
                for name, value in zip(fetched, outputs):
                    self.histograms[name].update(value)
                for name in self.histograms.keys() & feed.keys():
                    self.histograms[name].update(feed[name])
                batch = batches.samples_in(feed) if hasattr(batches, "samples_in") else _samples_in(feed)
                self.samples += batch
                if on_batch:
                    on_batch(batch)
        if self.samples == 0:
            raise FgqError("the calibration data produced no samples")


def _samples_in(feed: dict[str, np.ndarray]) -> int:
    first = next(iter(feed.values()), None)
    return len(first) if first is not None and np.ndim(first) else 1


def session_with_outputs(model: ir.Model, names: list[str], folder: Path) -> ort.InferenceSession:
    """An onnxruntime session of `model` that also returns the named tensors."""
    values = {v.name: v for node in model.graph for v in node.outputs}
    exposed = [values[name] for name in names if not values[name].is_graph_output()]
    model.graph.outputs.extend(exposed)
    try:
        path = folder / "calibration.onnx"
        with model_io.interrupts_deferred():  # a Ctrl-C mid-write would leave the file open
            ir.save(model, path, external_data="calibration.onnx.data")
    finally:
        for value in exposed:
            model.graph.outputs.remove(value)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise FgqError(f"onnxruntime cannot run the model for calibration: {str(error).splitlines()[0]}") from None


# -- sign tracing -------------------------------------------------------------------------------
# An activation feeding a ternary layer is quantized as uint8 (all 256 levels on [0, max]) when it is
# >= 0 by construction: made by a non-negative op, possibly through ops that keep signs, whatever
# exporters put in between (Relu -> Cast -> Transpose, Clip(0, 6) -> Pad, Relu -> MaxPool -> Concat).
# _SIGN_RULES maps an op to whether its output is non-negative, given a test for its inputs; an op not
# in the table (Sub, LayerNormalization, LeakyRelu, HardSwish, MatMul, ...) counts as signed.

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_MAX_TRACE_DEPTH = 100  # a longer chain of sign-preserving ops counts as signed (keeps the recursion bounded)

NonNegative = Callable[[ir.Value | None], bool]


def _always(node: ir.Node, non_negative: NonNegative) -> bool:
    return True


def _first_input(node: ir.Node, non_negative: NonNegative) -> bool:
    return bool(node.inputs) and non_negative(node.inputs[0])


def _all_inputs(node: ir.Node, non_negative: NonNegative) -> bool:
    return bool(node.inputs) and all(non_negative(v) for v in node.inputs)


def _any_input(node: ir.Node, non_negative: NonNegative) -> bool:
    return any(non_negative(v) for v in node.inputs)


def _string_attr(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    return attr.as_string() if attr is not None else default


def _optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _clip(node: ir.Node, non_negative: NonNegative) -> bool:
    """min(max(x, low), high): >= 0 when high is absent or >= 0, and low or x is >= 0 (opset < 11: attributes)."""
    if "min" in node.attributes or "max" in node.attributes:
        low, high = node.attributes.get("min"), node.attributes.get("max")
        high_ok = high is None or high.as_float() >= 0.0
        return high_ok and ((low is not None and low.as_float() >= 0.0) or _first_input(node, non_negative))
    low, high = _optional_input(node, 1), _optional_input(node, 2)
    high_ok = high is None or non_negative(high)
    return high_ok and ((low is not None and non_negative(low)) or _first_input(node, non_negative))


def _cast(node: ir.Node, non_negative: NonNegative) -> bool:
    to = node.attributes.get("to")
    return to is not None and ir.DataType(to.as_int()) in _FLOAT_TYPES and _first_input(node, non_negative)


def _pad(node: ir.Node, non_negative: NonNegative) -> bool:
    """reflect / edge / wrap copy the input; constant mode adds the constant (default 0; opset < 11: `value`)."""
    if _string_attr(node, "mode", "constant") == "constant":
        value = _optional_input(node, 2)
        if value is not None and not non_negative(value):
            return False
        if "value" in node.attributes and node.attributes["value"].as_float() < 0.0:
            return False
    return _first_input(node, non_negative)


def _resize(node: ir.Node, non_negative: NonNegative) -> bool:
    """Nearest and linear interpolation stay within the input's range; cubic overshoots below 0."""
    return _string_attr(node, "mode", "nearest") != "cubic" and _first_input(node, non_negative)


def _div(node: ir.Node, non_negative: NonNegative) -> bool:
    return len(node.inputs) == 2 and non_negative(node.inputs[0]) and non_negative(node.inputs[1])


_SIGN_RULES: dict[str, Callable[[ir.Node, NonNegative], bool]] = {
    # non-negative whatever the input
    **dict.fromkeys(["Relu", "Sigmoid", "HardSigmoid", "Softmax", "Softplus", "Abs", "Exp", "Sqrt"], _always),
    # lower-bounded by an operand
    "Clip": _clip,
    "Max": _any_input,
    # move, select, pool or average values of the data input
    **dict.fromkeys(["Identity", "Dropout", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand",
                     "Tile", "Slice", "Split", "Gather", "GatherElements", "GatherND", "DepthToSpace",
                     "SpaceToDepth", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMax",
                     "ReduceMin", "ReduceMean", "ReduceSum"], _first_input),
    "Cast": _cast,
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _resize,
    # combine operands that must all be non-negative (a constant counts when every element is >= 0)
    **dict.fromkeys(["Concat", "Add", "Sum", "Mul", "Min"], _all_inputs),
    "Div": _div,
}


def _constant(value: ir.Value) -> np.ndarray | None:
    """The value's data when it is an initializer (not also a graph input) or a Constant node's output."""
    if value.is_graph_input():
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant node
        return None
    return None if tensor is None else tensor.numpy()


def non_negative_by_construction(value: ir.Value, *, graph_inputs: bool = False) -> bool:
    """True when `value` is >= 0 whatever the model's input: see _SIGN_RULES.

    graph_inputs=True counts graph inputs as non-negative (the caller knows they are, e.g. from the
    calibration data), so that an image input reaching a layer through a Transpose counts too.
    """
    known: dict[int, bool] = {}

    def trace(v: ir.Value | None, depth: int) -> bool:
        if v is None or depth > _MAX_TRACE_DEPTH:
            return False
        if id(v) not in known:
            known[id(v)] = False  # a cycle (invalid graph) counts as signed
            known[id(v)] = _decide(v, lambda u: trace(u, depth + 1), graph_inputs)
        return known[id(v)]

    return trace(value, 0)


def _decide(value: ir.Value, non_negative: NonNegative, graph_inputs: bool) -> bool:
    array = _constant(value)
    if array is not None:
        return array.size > 0 and np.issubdtype(array.dtype, np.number) and bool(np.all(array >= 0))
    if value.is_graph_input():
        return graph_inputs
    producer = value.producer()
    if producer is None or producer.domain not in DEFAULT_DOMAINS:
        return False
    rule = _SIGN_RULES.get(producer.op_type)
    return rule is not None and rule(producer, non_negative)
