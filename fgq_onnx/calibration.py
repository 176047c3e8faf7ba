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


_NON_NEGATIVE_OPS = {"Relu", "Sigmoid", "Softmax", "Softplus", "Abs", "Exp", "HardSigmoid"}
_PASS_THROUGH_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Pad", "Resize", "Concat"}


def non_negative_by_construction(value: ir.Value) -> bool:
    """True when the tensor comes from a ReLU-like op, possibly through pooling or reshaping."""
    producer = value.producer()
    if producer is None:
        return False
    if producer.op_type in _NON_NEGATIVE_OPS:
        return True
    if producer.op_type == "Clip" and len(producer.inputs) > 1 and producer.inputs[1] is not None:
        low = producer.inputs[1].const_value
        return low is not None and float(low.numpy()) >= 0.0
    if producer.op_type in _PASS_THROUGH_OPS:
        data_inputs = producer.inputs if producer.op_type == "Concat" else producer.inputs[:1]
        return all(v is not None and non_negative_by_construction(v) for v in data_inputs)
    return False
