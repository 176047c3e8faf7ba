"""Calibration-data passes over linear layers: fitting and bias correction, layer by layer.

`capture` runs on the fp32 model before ternarization: one pass over the
calibration data (the exposed-outputs runner of fgq_onnx.calibration) keeps
every linear node's per-channel output mean and std, and the |x| histograms
activation calibration needs. `refine` runs on the converted model,
in topological order with the layers before each one already converted *and*
corrected: the ternarized nodes are grouped by dependency level (1 + the
highest level among the ternarized nodes they depend on; nodes of one level
do not depend on each other, so correcting them together is exact). Each
level is measured with fgq_onnx/segments.py, which runs only the part of the
graph not run yet, from the tensors it kept: all levels together cost about
one pass over the data instead of one pass each. Per level, `fit` refits
the codes and scales to the layer's inputs (fgq_onnx/fitting.py; target: the
fp32 layer on fp32 inputs, from a second runner over a copy of the fp32
model, about one more pass) and rewrites them (passes/replace_ternary_weights.py);
bias correction measures the layer's outputs and writes the gain and shift
(fgq_onnx/correction.py, passes/correct_bias.py) into the graph, and into the
kept outputs so that the next level sees the corrected layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from fgq_onnx import blockwise, model_io
from fgq_onnx.calibration import AbsHistogram, session_with_outputs
from fgq_onnx.correction import ChannelMoments, affine_correction
from fgq_onnx.errors import FgqError
from fgq_onnx.fitting import FitResult, PatchGram, damp, fit_rows, objective
from fgq_onnx.graph_utils import DEFAULT_DOMAINS, constant_array, int_attr
from fgq_onnx.passes.correct_bias import CorrectBiasPass, scalable
from fgq_onnx.passes.replace_ternary_weights import ReplaceTernaryWeightsPass
from fgq_onnx.passes.ternarize_weights import EXACT_MARK, LINEAR_OPS, TERNARY_MARK, weight_layout
from fgq_onnx.segments import SegmentRunner
from fgq_onnx.ternary import GroupLayout, Method, TernaryWeight


def _channel_axis(node: ir.Node) -> int:
    return 1 if node.op_type == "Conv" else -1


def _linear_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type in LINEAR_OPS and n.domain in DEFAULT_DOMAINS and len(n.inputs) > 1 and n.inputs[1] is not None]


@dataclass
class Reference:
    """What one fp32 pass saw: per-channel output statistics of each linear node (keyed by its
    output name), |x| histograms of their activation inputs (keyed by tensor name), and the
    calibration feeds themselves when they fit in memory, so later passes skip the decoding."""

    moments: dict[str, ChannelMoments] = field(default_factory=dict)
    histograms: dict[str, AbsHistogram] = field(default_factory=dict)
    samples: int = 0
    feeds: list | None = None
    weights: dict[str, ir.Value] = field(default_factory=dict)  # the fp32 weight initializers, for fitting
    model: ir.Model | None = None  # a copy of the fp32 model (keep_model), for fitting to fp32 targets
    inputs: dict[tuple[str, int], ChannelMoments] = field(default_factory=dict)  # (tensor, channel axis): per-channel input statistics

    def input_importance(self, node: ir.Node, damping: float = 0.01) -> np.ndarray | None:
        """How much each weight of `node` counts in its output error: the mean square E[x_c^2] of
        the input channel it multiplies, shaped to broadcast against the weight (None when unknown).

        `damping` * the mean over channels is added, as fitting damps H: a channel the
        calibration data never excites still counts a little.
        """
        weight = constant_array(node.inputs[1])
        moments = self.inputs.get((node.inputs[0].name, _channel_axis(node))) if node.inputs[0] is not None else None
        if weight is None or moments is None or not moments.count:
            return None
        energy = np.square(moments.mean) + np.square(moments.std)
        energy = energy + damping * float(np.mean(energy))
        shape = weight.shape
        if node.op_type == "Conv":
            groups = int_attr(node, "group", 1)
            if energy.size != groups * shape[1] or shape[0] % groups:
                return None
            per_row = np.repeat(energy.reshape(groups, shape[1]), shape[0] // groups, axis=0)  # [O, C/group]: a grouped Conv's rows see their own channels
            return per_row.reshape(*per_row.shape, *[1] * (len(shape) - 2))
        if node.op_type == "Gemm" and int_attr(node, "transA", 0):
            return None
        transposed = node.op_type == "Gemm" and int_attr(node, "transB", 0)
        if energy.size != shape[1 if transposed else 0]:
            return None
        return energy[None, :] if transposed else energy[:, None]


def capture(model: ir.Model, dataset: Iterable, *, ranges: bool = True, keep_model: bool = False, input_statistics: bool = False, cache_bytes: int = 1 << 30) -> Reference:
    """One pass of the fp32 model: output mean and std per channel of every linear node of the main graph.

    With `ranges`, also the |x| histograms of their non-constant first inputs
    (what activation calibration needs: the corrected model's activations
    follow the fp32 ones, the uncorrected ternary model's do not). With
    `keep_model`, a copy of the fp32 model is kept for fitting. With
    `input_statistics`, the per-channel mean and std of those inputs too
    (Reference.input_importance).
    """
    nodes = _linear_nodes(model)
    reference = Reference({n.outputs[0].name: ChannelMoments(_channel_axis(n)) for n in nodes})
    reference.weights = {n.outputs[0].name: n.inputs[1] for n in nodes if constant_array(n.inputs[1]) is not None}
    activations = [n for n in nodes if n.inputs[0] is not None and n.inputs[0].const_value is None]
    if ranges:
        reference.histograms = {n.inputs[0].name: AbsHistogram() for n in activations}
    if input_statistics:
        reference.inputs = {(n.inputs[0].name, _channel_axis(n)): ChannelMoments(_channel_axis(n)) for n in activations}
    kept: list = []
    watched: dict = {}
    for name, accumulator in [*reference.moments.items(), *reference.histograms.items(), *((name, m) for (name, _), m in reference.inputs.items())]:
        watched.setdefault(name, _All()).accumulators.append(accumulator)  # a linear node's output may be the next one's input
    reference.samples = stream(model, watched, dataset, keep=kept, cache_bytes=cache_bytes)
    reference.feeds = kept if kept and kept[0] is not None else None
    if keep_model:
        reference.model = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    return reference


class _All:
    """Accumulators fed the same tensor."""

    def __init__(self):
        self.accumulators: list = []

    def update(self, array: np.ndarray) -> None:
        for accumulator in self.accumulators:
            accumulator.update(array)


def stream(model: ir.Model, watched: dict, dataset: Iterable, keep: list | None = None, cache_bytes: int = 0) -> int:
    """Run the data through `model` once, feeding each named tensor to its accumulator (anything with
    update(array)); returns samples seen. `keep` collects every batch, or ends as [None] when they
    do not fit in `cache_bytes`."""
    graph_inputs = {v.name for v in model.graph.inputs}
    fetched = [name for name in watched if name not in graph_inputs]
    samples, kept_bytes = 0, 0
    with model_io.temporary_folder("fgq-layerwise-") as folder:
        session = session_with_outputs(model, fetched, folder)
        for batch in dataset:
            feed = batch[0]
            if keep is not None and keep[:1] != [None]:
                kept_bytes += sum(np.asarray(v).nbytes for v in feed.values())
                keep.append(batch)
                if kept_bytes > cache_bytes:
                    keep[:] = [None]
            try:
                outputs = session.run(fetched, feed)
            except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise FgqError(f"the model failed on calibration data: {str(error).splitlines()[0]}") from None
            for name, value in zip(fetched, outputs):
                watched[name].update(value)
            for name in watched.keys() & feed.keys():
                watched[name].update(feed[name])
            if hasattr(dataset, "samples_in"):  # a Dataset knows its one-feed-per-entry sources
                samples += dataset.samples_in(feed)
            else:
                first = next(iter(feed.values()), None)
                samples += len(first) if first is not None and np.ndim(first) else 1
    if samples == 0:
        raise FgqError("the calibration data produced no samples")
    return samples


def dependency_levels(model: ir.Model, chosen: list[ir.Node]) -> list[list[ir.Node]]:
    """`chosen` nodes grouped by level: 1 + the highest level among chosen nodes upstream of them."""
    ids = {id(n) for n in chosen}
    depth: dict[int, int] = {}
    levels: dict[int, list[ir.Node]] = {}
    for node in model.graph:  # the graph is in topological order
        level = max((depth.get(id(v), 0) for v in node.inputs if v is not None), default=0)
        if id(node) in ids:
            level += 1
            levels.setdefault(level, []).append(node)
        for value in node.outputs:
            depth[id(value)] = level
    return [levels[k] for k in sorted(levels)]


def _bias_vector(node: ir.Node, channels: int) -> np.ndarray | None:
    """The node's own additive bias per output channel (0 without one); None if it is not a constant."""
    bias_input = node.inputs[2] if len(node.inputs) > 2 else None
    if node.op_type == "MatMul" or bias_input is None:
        return np.zeros(channels)
    bias = constant_array(bias_input)
    if bias is None:
        return None
    beta = node.attributes["beta"].as_float() if node.op_type == "Gemm" and "beta" in node.attributes else 1.0
    bias = np.asarray(bias, np.float64) * beta
    if node.op_type == "Gemm":
        bias = bias.reshape(-1, bias.shape[-1]).mean(axis=0) if bias.ndim else bias
    return np.broadcast_to(bias, (channels,))


@dataclass(frozen=True)
class FitSettings:
    """How `refine` refits ternary weights (fgq_onnx/fitting.py) and stores them (each node keeps its own N)."""

    storage: str
    scale_format: str
    iterations: int = 4
    damping: float = 0.01
    block: bool = False  # layers that close a residual branch are fitted to the block output (fgq_onnx/blockwise.py)


@dataclass
class Refinement:
    """What `refine` did, for the report."""

    levels: int = 0
    shifts: dict[str, float] = field(default_factory=dict)  # node label -> |shift| / (|fp32 mean| + |fp32 std|)
    fits: dict[str, tuple[float, float]] = field(default_factory=dict)  # node label -> relative output error (exact, fitted)
    blocks: dict[str, tuple[float, float]] = field(default_factory=dict)  # node label -> relative block output error (layer-wise fit, block fit)
    unfitted: dict[str, str] = field(default_factory=dict)  # node label -> why it kept its exact weights
    skipped: str = ""  # why nothing was done, if so


def refine(
    model: ir.Model,
    reference: Reference,
    dataset: Iterable,
    *,
    correct: bool = True,
    scale: bool = True,
    fit: FitSettings | None = None,
    samples: int | None = None,
    on_level: Callable[[int, int], None] | None = None,
) -> Refinement:
    """Fit (optionally) and correct every ternarized linear node of the main graph, level by level; changes `model`.

    Each level (see dependency_levels) is handled with every level before it
    converted, fitted and corrected, at the cost of about one pass over the
    data (fgq_onnx/segments.py). `fit`: refit codes and scales to the layer's
    inputs from that upstream model (fgq_onnx/fitting.py). `correct`: give the
    layer the fp32 per-channel output mean and, with `scale`, std (gain in the
    group scales, shift in the bias). `samples` caps the calibration samples
    used (whole batches, from the start): time and the kept tensors' memory
    grow with it; per-channel statistics settle after a few dozen images.
    """
    control = sorted({n.op_type for n in model.graph if n.op_type in ("If", "Loop", "Scan")})
    if control:  # the piecewise runner cannot cut through subgraphs that read outer values
        return Refinement(skipped=f"the main graph has {', '.join(control)}")
    # Weights that were ternary already are kept exactly: neither fitted nor corrected.
    chosen = [n for n in model.graph if TERNARY_MARK in n.metadata_props and EXACT_MARK not in n.metadata_props and n.outputs[0].name in reference.moments]
    levels = dependency_levels(model, chosen)
    feeds = list(_first_samples(reference.feeds or dataset, samples))
    runner = SegmentRunner(model, feeds)
    fp_runner = SegmentRunner(reference.model, feeds) if fit is not None and reference.model is not None else None
    result = Refinement(levels=len(levels))
    for index, nodes in enumerate(levels):
        try:
            if fit is not None:
                pending = {id(n) for level in levels[index:] for n in level}  # not final yet: no skip path may read them
                _fit_level(model, runner, fp_runner, nodes, reference, fit, result, pending)
            if correct:
                _correct_level(model, runner, nodes, reference, scale, result)
        except FgqError as error:
            raise FgqError(f"at layer {', '.join(n.name or n.outputs[0].name for n in nodes)}: {error}") from None
        if on_level:
            on_level(index + 1, len(levels))
    return result


def _first_samples(batches: Iterable, limit: int | None):
    """The feeds of `batches` until `limit` samples (whole batches); all of them for None."""
    seen = 0
    for feed, _ in batches:
        if limit is not None and seen >= limit:
            return
        yield feed
        first = next(iter(feed.values()), None)
        seen += len(first) if first is not None and np.ndim(first) else 1


def _correct_level(model, runner, nodes, reference, scale, result) -> None:
    outputs = runner.run([n.outputs[0] for n in nodes])
    shifts, gains, fixes = {}, {}, []
    for node in nodes:
        key = node.outputs[0].name
        measured = ChannelMoments(_channel_axis(node))
        for array in outputs[id(node.outputs[0])]:
            measured.update(array)
        fp = reference.moments[key]
        bias = _bias_vector(node, fp.mean.size)
        fix = affine_correction(fp, measured, 0.0 if bias is None else bias, scale=scale and bias is not None and scalable(node))
        shifts[key], gains[key] = fix.shift, fix.gain
        fixes.append((key, node, fix, 0.0 if bias is None else bias))
        result.shifts[node.name or key] = float(np.linalg.norm(fix.shift) / (np.linalg.norm(fp.mean) + np.linalg.norm(fp.std) + 1e-12))
    correct = CorrectBiasPass(shifts, gains)
    correct(model)
    for key, node, fix, bias in fixes:  # what the corrected node now outputs, for the layers downstream
        value = node.outputs[0]
        if runner.kept(value):
            runner.transform(value, _corrected_output(fix, bias, key in correct.in_bias, _channel_axis(node)))


# Conv filters up to this many weights (taps x channels) are fitted with the full input statistics
# (cross-tap terms included: 42 MB of float64 per matrix at the limit, three matrices); wider
# ones with one block per kernel tap.
JOINT_WIDTH = 2304


def _gram_for(node: ir.Node, layout: GroupLayout) -> PatchGram | str:
    """The input statistics a node's fit needs, or why it cannot be fitted."""
    if node.op_type == "Gemm" and int_attr(node, "transA", 0):
        return "Gemm with transA"
    if node.op_type != "Conv":
        return PatchGram()
    if int_attr(node, "group", 1) != 1:
        return "grouped Conv"
    attrs = {name: node.attributes[name].value for name in ("kernel_shape", "strides", "dilations", "pads", "auto_pad") if name in node.attributes}
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"Conv auto_pad={attrs['auto_pad']}"
    kernel = tuple(attrs.get("kernel_shape") or layout.shape[2:])
    joint = not layout.flatten and layout.length % layout.n == 0 and int(np.prod(kernel)) * layout.length <= JOINT_WIDTH
    return PatchGram(kernel, attrs.get("strides"), attrs.get("dilations"), attrs.get("pads"), per_tap=not layout.flatten, joint=joint)


def _group_size(node: ir.Node) -> int:
    """The N that TernarizeWeightsPass gave the node (recorded in its metadata: "n=4 method=...")."""
    fields = dict(item.split("=", 1) for item in node.metadata_props[TERNARY_MARK].split())
    return int(fields["n"])


def _fit_level(model, runner, fp_runner, nodes, reference, fit: FitSettings, result: Refinement, pending: set[int]) -> None:
    """Refit the level's fit/block nodes; `pending`: ids of the nodes not final yet (this level's and later ones)."""
    todo = _fit_todo(nodes, reference, result)
    if not todo:
        return
    inputs = runner.run([node.inputs[0] for node, *_ in todo])
    fp_inputs = {}
    if fp_runner is not None:  # the same layers' inputs in the fp32 model: fit to the fp32 layer's outputs
        fp_nodes = {n.outputs[0].name: n for n in reference.model.graph}
        wanted = {id(node): fp_nodes[node.outputs[0].name].inputs[0] for node, *_ in todo}
        fetched = fp_runner.run(list(wanted.values()))
        fp_inputs = {key: fetched[id(value)] for key, value in wanted.items()}
    block_targets = _block_targets(runner, fp_runner, todo, reference, pending) if fit.block and fp_runner is not None else {}
    replacements = {}
    for node, label, original, array, layout, gram in todo:
        xs, target = inputs[id(node.inputs[0])], block_targets.get(id(node))
        if target is not None and target[0].shape != gram.output_shape(xs[0], layout.rows):
            target = None  # the chain's Adds broadcast the layer's output
        fps = fp_inputs.get(id(node))
        for batch, x in enumerate(xs):
            gram.update(x, None if fps is None else fps[batch], None if target is None else target[batch])
        segments = layout.group(array).reshape(-1, layout.groups_per_segment * layout.n)[:, : layout.length].astype(np.float64)
        span = gram.h.shape[-1] // layout.length  # segments fitted as one row: every tap of a filter when joint
        segments = segments.reshape(-1, span * layout.length)
        codes = np.zeros((segments.shape[0], span * layout.groups_per_segment, layout.n), np.int8)
        scales = np.zeros((segments.shape[0], span * layout.groups_per_segment), np.float32)
        blocks = gram.h.shape[0]  # one H per kernel tap (segments of one output row cycle through the taps)
        before = after = energy = 0.0
        for tap in range(blocks):
            rows = segments[tap::blocks]
            h = damp(gram.h[tap], fit.damping)
            ridge = h[0, 0] - gram.h[tap][0, 0]  # damping adds ridge * ||s - w||^2: b gets ridge * w
            b = None if gram.cross is None else rows @ gram.cross[tap].T + ridge * rows
            fitted = fit_rows(rows, h, layout.n, b=b, iterations=fit.iterations)
            before, after = before + fitted.history[0], after + fitted.history[-1]
            reach = h if gram.fp is None else gram.fp[tap] + ridge * np.eye(len(h))
            energy += float(np.einsum("rl,lm,rm->", rows, reach, rows))
            if gram.toward is not None:  # one full H (checked in _block_targets): the block output's objective
                fitted = _fit_block(rows, h, ridge, gram, fitted, fit, layout.n, result, label)
            codes[tap::blocks], scales[tap::blocks] = fitted.codes, fitted.scales
        if energy > 0:  # output error ||w^T X_fp - s^T X||^2 = objective + w^T F w, relative to ||w^T X_fp||^2
            result.fits[label] = ((before + energy) / energy, (after + energy) / energy)
        shape = (-1, layout.groups_per_segment)
        replacements[node.outputs[0].name] = (original, TernaryWeight(layout, codes.reshape(*shape, layout.n), scales.reshape(shape)))
    ReplaceTernaryWeightsPass(replacements, fit.storage, fit.scale_format)(model)


def _fit_block(rows, h, ridge, gram: PatchGram, layer_wise: FitResult, fit: FitSettings, n: int, result: Refinement, label: str) -> FitResult:
    """Refit to the block output from the layer-wise solution: the objective never rises from it."""
    toward = gram.toward[0].T  # [rows, width]: X t^T per output channel
    block = fit_rows(rows, h, n, b=toward + ridge * rows, iterations=fit.iterations, init=(layer_wise.codes, layer_wise.scales))

    def block_error(solution: FitResult) -> float:  # ||X^T s - t||^2 / ||t||^2 on the sampled columns
        s = (solution.codes * solution.scales[..., None]).reshape(len(rows), -1)[:, : rows.shape[1]].astype(np.float64)
        return float(objective(s, gram.h[0], toward).sum() + gram.target_energy) / gram.target_energy

    if gram.target_energy > 0:
        result.blocks[label] = (block_error(layer_wise), block_error(block))
    return block


def _fit_todo(nodes, reference, result: Refinement) -> list:
    """(node, label, fp32 weight value, its array, layout, PatchGram) for each node of the level to fit."""
    todo = []
    for node in nodes:
        label = node.name or node.outputs[0].name
        original = reference.weights.get(node.outputs[0].name)
        if not any(f"method={m.value}" in node.metadata_props.get(TERNARY_MARK, "") for m in Method if m.fits):
            continue
        if original is None or not scalable(node):
            result.unfitted[label] = "weight shared with another node"
            continue
        array = constant_array(original).astype(np.float32)
        layout, _ = weight_layout(node, array.shape, _group_size(node))
        gram = _gram_for(node, layout)
        if isinstance(gram, str):
            result.unfitted[label] = gram
            continue
        todo.append((node, label, original, array, layout, gram))
    return todo


def _block_targets(runner, fp_runner, todo, reference, pending: set[int]) -> dict[int, list[np.ndarray]]:
    """For each node of `todo` that closes a residual branch (fgq_onnx/blockwise.py): its bias-free
    output target per batch, z_fp - skip - bias."""
    fp_values = {v.name: v for n in reference.model.graph for v in n.outputs}
    joins = {}
    for node, _, _, _, layout, gram in todo:
        join = blockwise.residual_join(node)
        full = gram.kernel is None or gram.joint or not gram.per_tap or int(np.prod(gram.kernel)) == 1
        bias = _bias_vector(node, layout.rows)
        if join is None or not full or bias is None or join.end.name not in fp_values or blockwise.depends_on(join.others, pending):
            continue
        joins[id(node)] = (node, join, fp_values[join.end.name], bias)
    if not joins:
        return {}
    computed = runner.run([v for _, join, _, _ in joins.values() for v in join.others if v.const_value is None])
    ends = fp_runner.run([end for _, _, end, _ in joins.values()])
    found = {}
    for key, (node, join, end, bias) in joins.items():
        per_batch = []
        for batch, end_fp in enumerate(ends[id(end)]):
            wanted = end_fp - blockwise.skip_terms(join, computed, batch)
            shape = [1] * wanted.ndim
            shape[_channel_axis(node)] = -1
            per_batch.append((wanted - bias.reshape(shape)).astype(np.float32))
        found[key] = per_batch
    return found


def _corrected_output(fix, bias, shifted: bool, axis: int) -> Callable[[np.ndarray], np.ndarray]:
    """y -> gain * (y - b) + b (+ shift when the shift went into the node's own bias)."""

    def apply(y: np.ndarray) -> np.ndarray:
        shape = [1] * y.ndim
        shape[axis] = -1
        b = np.broadcast_to(np.asarray(bias, np.float64), fix.gain.shape)
        offset = (1.0 - fix.gain) * b + (fix.shift if shifted else 0.0)  # gain * (y - b) + b (+ shift)
        out = y if y.flags.writeable else y.copy()  # in place: the runner owns the kept arrays
        np.multiply(out, fix.gain.astype(y.dtype).reshape(shape), out=out)
        np.add(out, offset.astype(y.dtype).reshape(shape), out=out)
        return out

    return apply


def describe(result: Refinement) -> list[str]:
    """Report lines about a refinement."""
    if result.skipped:
        return [f"fitting and bias correction skipped: {result.skipped}"]
    lines = []
    if result.fits:
        exact, fitted = np.mean([pair for pair in result.fits.values()], axis=0)
        lines.append(f"fit: {len(result.fits)} layer(s) refitted to their calibration inputs; mean relative output error {exact:.4f} (exact) -> {fitted:.4f}")
    if result.blocks:
        layer_wise, block = np.mean([pair for pair in result.blocks.values()], axis=0)
        lines.append(f"block fit: {len(result.blocks)} layer(s) closing a residual branch refitted to the block output; mean relative block output error {layer_wise:.4f} (layer-wise fit) -> {block:.4f}")
    for label, reason in result.unfitted.items():
        lines.append(f"fit: {label} keeps its exact weights ({reason})")
    if result.shifts:
        worst = max(result.shifts, key=result.shifts.get)
        lines.append(f"bias correction: {len(result.shifts)} layer(s) in {result.levels} level(s), about one data pass after the fp32 one; largest shift {result.shifts[worst]:.3f} of |mean| + |std| ({worst})")
    return lines


class _Replay:
    """A CalibrationDataReader that remembers its feeds, so the data can be read more than once."""

    def __init__(self, reader):
        self._reader, self._seen, self._position, self._done = reader, [], 0, False

    def get_next(self):
        if self._position < len(self._seen):
            self._position += 1
            return self._seen[self._position - 1]
        feed = None if self._done else self._reader.get_next()
        if feed is None:
            self._done, self._position = True, 0  # the next read starts over
            return None
        self._seen.append(feed)
        self._position += 1
        return feed


def replayable(source):
    """`source` unchanged, unless it is a one-shot reader (get_next): then one that can be replayed."""
    return _Replay(source) if hasattr(source, "get_next") else source
