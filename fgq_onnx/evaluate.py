"""Top-1 / top-5 accuracy of a classifier on labelled data, streamed.

    from fgq_onnx.evaluate import evaluate
    result = evaluate("model.fgq.onnx", "test.npz")
    print(result.top1, result.top5, result.n)

Also home of `open_session`, the one way fgq-onnx's checking tools
(eval, compare, sweep) open a model in onnxruntime: it validates the file,
loads the custom-op library for models with "com.fgq" nodes, and can
expose intermediate tensors as extra outputs.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from fgq_onnx import model_io
from fgq_onnx.data import Dataset, ImageOptions, model_inputs
from fgq_onnx.errors import FgqError
from fgq_onnx.fidelity import Fidelity, OutputFidelity

CUSTOM_DOMAIN = "com.fgq"
TOP_K = 5
# onnxruntime's x64 int8 kernels add u8 x s8 pairs in int16, which saturates without VNNI when int8 weights
# use their whole [-127, 127] range (a layer planned 8-bit in the qdq format); this entry makes them exact.
X64_QUANT_PRECISION = "session.x64quantprecision"


# -- sessions -----------------------------------------------------------------


def _node_domains(model: onnx.ModelProto) -> set[str]:
    domains = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domains.add(node.domain)
            for attribute in node.attribute:
                for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                    visit(sub)

    visit(model.graph)
    for function in model.functions:
        domains.update(node.domain for node in function.node)
    return domains


def _ops_without_body(model: onnx.ModelProto) -> list[str]:
    """com.fgq op types used by the main graph that no model-local function defines.

    The converter's custom-op models carry an ONNX function per op, which
    onnxruntime runs when the library is absent; only ops without one need it.
    """
    local = {(function.domain, function.name) for function in model.functions}
    used = []

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.domain == CUSTOM_DOMAIN and (node.domain, node.op_type) not in local and node.op_type not in used:
                used.append(node.op_type)
            for attribute in node.attribute:
                for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                    visit(sub)

    visit(model.graph)
    return used


def _custom_op_library(path: Path) -> str:
    """The path of the custom-op library, or a clear FgqError saying why it is not there."""
    try:
        from fgq_onnx import runtime
    except ImportError:
        raise FgqError(f"'{path}' uses fgq custom ops (domain {CUSTOM_DOMAIN}) but this installation has no custom-op library (fgq_onnx.runtime is missing); convert to the standard QDQ format or install fgq-onnx with its runtime") from None
    try:
        library = runtime.library_path()
    except FgqError as error:
        raise FgqError(f"'{path}' uses fgq custom ops (domain {CUSTOM_DOMAIN}) but the custom-op library cannot be loaded: {error}") from None
    except Exception as error:  # noqa: BLE001 - whatever stops the lookup, say so in one line
        raise FgqError(f"'{path}' uses fgq custom ops (domain {CUSTOM_DOMAIN}) but the custom-op library cannot be found: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    if not Path(library).is_file():
        raise FgqError(f"'{path}' uses fgq custom ops (domain {CUSTOM_DOMAIN}) but the custom-op library '{library}' does not exist; build it (pip install .)")
    return str(library)


@dataclass
class ModelSession:
    """An onnxruntime session with what the checking tools need to know of its model."""

    path: Path
    session: ort.InferenceSession
    inputs: list  # list[InputSpec]
    outputs: list[str]  # the model's own outputs, in order
    extra: list[str]  # intermediate tensors exposed as extra outputs
    shapes: dict[str, tuple[int | str | None, ...] | None]  # output name -> static shape (None: unknown rank)

    def run(self, feed: dict[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(names) if names is not None else self.outputs + self.extra
        try:
            values = self.session.run(names, feed)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise FgqError(f"onnxruntime failed running '{self.path}': {str(error).splitlines()[0]}") from None
        return dict(zip(names, values))


def _static_shape(value: ir.Value) -> tuple[int | str | None, ...] | None:
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else (str(d) if d is not None and str(d) not in ("", "None") else None) for d in value.shape)


def open_session(path: str | Path, extra_outputs: Sequence[str] = (), *, optimize: bool = True) -> ModelSession:
    """Open `path` in onnxruntime (CPU), with `extra_outputs` (node output names) exposed.

    Raises FgqError for unreadable models, for "com.fgq" models when the
    custom-op library cannot be loaded, and for tensors not in the graph.
    """
    path = Path(path)
    proto = model_io.read_model_proto(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.add_session_config_entry(X64_QUANT_PRECISION, "1")
    if CUSTOM_DOMAIN in _node_domains(proto):
        needed = _ops_without_body(proto)
        try:
            options.register_custom_ops_library(_custom_op_library(path))
        except FgqError as error:
            if needed:  # else onnxruntime runs the ops' function bodies
                raise FgqError(f"{error} ({', '.join(needed)} have no ONNX function to fall back on)") from None
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            if needed:
                raise FgqError(f"'{path}' uses fgq custom ops (domain {CUSTOM_DOMAIN}) but onnxruntime cannot load the custom-op library: {str(error).splitlines()[0]}") from None
    model = model_io.to_ir(proto, path.parent)
    inputs = model_inputs(model)
    outputs = [v.name for v in model.graph.outputs]
    shapes = {v.name: _static_shape(v) for v in model.graph.outputs}
    extra = [name for name in dict.fromkeys(extra_outputs) if name not in outputs]
    with contextlib.ExitStack() as stack:
        source = str(path)
        if extra:
            produced = {v.name: v for node in model.graph for v in node.outputs}
            missing = [name for name in extra if name not in produced]
            if missing:
                raise FgqError(f"'{path}' has no tensor named {missing[0]!r}")
            model.graph.outputs.extend(produced[name] for name in extra)
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fgq-debug-")))
            source = str(folder / "debug.onnx")
            ir.save(model, source, external_data="debug.onnx.data")
        try:
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            if CUSTOM_DOMAIN in message or "custom" in message.lower():
                raise FgqError(f"onnxruntime cannot create a session for '{path}' (custom ops of domain {CUSTOM_DOMAIN}): {message}") from None
            raise FgqError(f"onnxruntime cannot run '{path}': {message}") from None
    return ModelSession(path, session, inputs, outputs, extra, shapes)


# -- class scores -------------------------------------------------------------


def check_class_output(session: ModelSession, output: str | None) -> tuple[str, int | None]:
    """The output holding class scores [batch, classes], and its class count if static."""
    name = output or session.outputs[0]
    if name not in session.outputs:
        raise FgqError(f"'{session.path}' has no output {name!r}; its outputs are {session.outputs}")
    shape = session.shapes.get(name)
    if shape is not None and len(shape) != 2:
        raise FgqError(f"output '{name}' has shape {list(shape)}: accuracy needs class scores of shape [batch, classes]")
    classes = shape[1] if shape is not None and isinstance(shape[1], int) else None
    if classes is not None and classes < 2:
        raise FgqError(f"output '{name}' scores {classes} class: accuracy needs at least 2 classes")
    return name, classes


def scores_of(array: np.ndarray, name: str) -> np.ndarray:
    """A run's output as [batch, classes] scores, or FgqError when it is not that."""
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise FgqError(f"output '{name}' is {array.dtype} of shape {list(array.shape)}: accuracy needs class scores of shape [batch, classes]")
    if array.shape[1] < 2:
        raise FgqError(f"output '{name}' scores {array.shape[1]} class: accuracy needs at least 2 classes")
    return array


def labels_of(labels: np.ndarray | None, rows: int, classes: int) -> np.ndarray:
    """Integer labels for one batch, checked against the class count."""
    if labels is None:
        raise FgqError("the data has no labels")
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == classes:  # one-hot
        labels = labels.argmax(axis=1)
    labels = labels.reshape(-1)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise FgqError("labels 'y' must be integer class indices")
        labels = labels.astype(np.int64)
    elif not np.issubdtype(labels.dtype, np.integer):
        raise FgqError(f"labels 'y' must be integer class indices, got {labels.dtype}")
    if len(labels) != rows:
        raise FgqError(f"a batch has {len(labels)} labels for {rows} rows of scores")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = int(labels.min() if labels.min() < 0 else labels.max())
        raise FgqError(f"label {bad} is out of range: the model scores {classes} classes (0..{classes - 1})")
    return labels


def top_k_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[int, int]:
    """(top-1 hits, top-k hits): top-1 is the argmax; top-k counts a label fewer than k classes beat."""
    scores = scores.astype(np.float64, copy=False)
    target = scores[np.arange(len(labels)), labels]
    valid = ~np.isnan(scores).any(axis=1)  # a row with a NaN score never counts as right
    top1 = int(np.sum(valid & (scores.argmax(axis=1) == labels)))
    topk = int(np.sum(valid & ((scores > target[:, None]).sum(axis=1) < k)))
    return top1, topk


# -- evaluation ---------------------------------------------------------------


@dataclass
class EvalResult:
    """Accuracy of one model on one labelled data set."""

    top1: float
    top5: float  # top-k with k = min(5, classes)
    n: int  # samples evaluated
    correct1: int
    correct5: int
    k: int
    classes: int
    output: str
    skipped: int = 0  # unreadable images
    dropped: int = 0  # samples left out to fill a fixed batch size
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def iterate_labelled(dataset: Dataset, on_progress: Callable[[int, int | None], None] | None) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    for feed, labels in dataset:
        yield feed, labels
        if on_progress:
            on_progress(len(next(iter(feed.values()))) if feed else 1, dataset.size)


def evaluate(
    model: str | Path,
    data,
    *,
    options: ImageOptions = ImageOptions(),
    batch_size: int = 64,
    limit: int | None = None,
    output: str | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> EvalResult:
    """Top-1 and top-5 of `model` on labelled `data`.

    `data` is an image folder with one sub-folder per class (sorted names are
    the label indices) or an .npz with the model's input name(s) and `y`.
    `output` names the class-score output (default: the first). Only counts
    are kept, so memory does not grow with the data.
    """
    started = time.perf_counter()
    session = open_session(model)
    name, classes = check_class_output(session, output)
    dataset = Dataset(data, session.inputs, options=options, batch_size=batch_size, limit=limit, labelled=True)
    check_folder_classes(dataset, classes, name)
    n = correct1 = correct5 = 0
    k = TOP_K
    for feed, labels in iterate_labelled(dataset, on_progress):
        scores = scores_of(session.run(feed, [name])[name], name)
        if classes is None:
            classes = scores.shape[1]
            check_folder_classes(dataset, classes, name)
        elif scores.shape[1] != classes:
            raise FgqError(f"output '{name}' changed from {classes} to {scores.shape[1]} classes between batches")
        k = min(TOP_K, classes)
        hits1, hitsk = top_k_hits(scores, labels_of(labels, len(scores), classes), k)
        n, correct1, correct5 = n + len(scores), correct1 + hits1, correct5 + hitsk
    if n == 0:
        raise FgqError(f"no samples could be evaluated from '{data}'" + (f" ({dataset.skipped} unreadable images skipped)" if dataset.skipped else ""))
    return EvalResult(
        top1=correct1 / n, top5=correct5 / n, n=n, correct1=correct1, correct5=correct5, k=k, classes=classes or 0,
        output=name, skipped=dataset.skipped, dropped=dataset.dropped, seconds=time.perf_counter() - started,
    )


def check_folder_classes(dataset: Dataset, classes: int | None, output: str) -> None:
    if classes is not None and dataset.classes and len(dataset.classes) != classes:
        raise FgqError(f"the data folder has {len(dataset.classes)} class folders but output '{output}' scores {classes} classes")


class _Agreement:
    """Streaming sums for the SQNR, cosine and top-1 agreement of one output."""

    def __init__(self):
        self.ref2 = self.out2 = self.cross = self.noise = 0.0
        self.agree = self.rows = 0
        self.classes = True
        self.seen = False

    def update(self, reference: np.ndarray, output: np.ndarray) -> None:
        if reference.shape != output.shape:
            raise FgqError(f"the converted model's output has shape {list(output.shape)}, the source's {list(reference.shape)}")
        self.seen = True
        ref, out = reference.astype(np.float64).ravel(), output.astype(np.float64).ravel()
        self.ref2 += float(ref @ ref)
        self.out2 += float(out @ out)
        self.cross += float(ref @ out)
        self.noise += float(np.sum(np.square(ref - out)))
        self.classes = self.classes and reference.ndim == 2 and reference.shape[1] >= 2
        if self.classes:
            self.agree += int(np.sum(reference.argmax(axis=1) == output.argmax(axis=1)))
            self.rows += reference.shape[0]

    def result(self, name: str) -> OutputFidelity:
        sqnr = math.inf if self.noise == 0.0 else 10.0 * math.log10(max(self.ref2, 1e-300) / self.noise)
        norms = math.sqrt(self.ref2 * self.out2)
        cosine = self.cross / norms if norms > 0 else (1.0 if self.noise == 0.0 else 0.0)
        top1 = self.agree / self.rows if self.classes and self.rows else None
        return OutputFidelity(name, sqnr, cosine, top1)


def measure_fidelity(source: str | Path | onnx.ModelProto | ir.Model, converted: ir.Model, held_out, main: str | None = None) -> Fidelity:
    """Run the source and the converted model on `held_out` batches and compare their float outputs (`main` first)."""
    with tempfile.TemporaryDirectory(prefix="fgq-fidelity-") as folder:
        source_path = _model_file(source, Path(folder) / "source.onnx")
        converted_path = Path(folder) / "converted.onnx"
        ir.save(converted, converted_path, external_data="converted.onnx.data")
        reference, model = open_session(source_path), open_session(converted_path)
        names = [name for name in reference.outputs if name in model.outputs]
        if main is not None:
            if main not in names:
                raise FgqError(f"the model has no output {main!r}; its outputs are {names}")
            names = [main, *(name for name in names if name != main)]
        sums = {name: _Agreement() for name in names}
        samples = 0
        for feed, _ in held_out:
            expected, actual = reference.run(feed, names), model.run(feed, names)
            for name in names:
                if np.issubdtype(expected[name].dtype, np.floating):
                    sums[name].update(expected[name], actual[name])
            samples += held_out.samples_in(feed)
    return Fidelity(samples, [sums[name].result(name) for name in names if sums[name].seen])


def _model_file(source, path: Path) -> Path:
    """A file onnxruntime can open for the source model: its own path, else a copy saved to `path`."""
    if isinstance(source, (str, Path)):
        return Path(source)
    if isinstance(source, ir.Model):
        ir.save(source, path, external_data=path.name + ".data")
    else:
        onnx.save(source, str(path))
    return path
