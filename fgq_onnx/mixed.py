"""Mixed group sizes under an accuracy budget: `--n auto --max-drop D`, or a fidelity one: `--n auto --min-sqnr DB`.

Under --min-sqnr (with u8 scales) a layer may also get 8-bit weights (N=1:
groups of one under u8 scale codes, which TernarizeWeightsPass stores as int8
per-channel weights, 8 bits a weight and a float32 scale a row, their bytes
and error as written); the proxy below is
the output noise ratio instead of the KL, and a plan is measured by a lower
confidence bound of its output's SQNR on the calibration samples, the chosen
plan then checked on the held-out ones (step 3).

Small groups (N=4) keep a layer accurate, large ones (N=64) make it smaller
(2 bits per weight plus one scale per N weights). Layers differ in how much
they suffer, so the search gives each its own N:

1. Sensitivity. One onnxruntime session of the fp32 model whose weights
   are graph inputs too: a run fed one layer's ternary weight (exact codes,
   the stored scale format, float activations) makes that layer alone
   ternary and measures KL(softmax fp32 || softmax candidate) on the
   calibration samples. A layers x N table (under --min-sqnr one N, the
   largest, measured, the others scaled by the weight's error). A weight
   shared by several layers is measured with all of them ternary.
2. Plans. From every layer at the smallest N, a greedy path: each step moves
   one layer to a larger N, the move adding the least KL per byte saved
   (bytes: codes + scales, as the report counts them). Before that start,
   the last resorts: under --min-sqnr, layers moved one by one (in the
   order below) to 8-bit weights under float activations (FLOAT_ACT: the
   same bytes, no activation noise; the sensitivity runs see no activation
   noise, so the proxy cannot rank them); then the most sensitive layers
   kept fp32 (most KL removed per byte added first). The path runs from
   large and accurate to small.
3. Verification. The KL sum only orders the plans. A real conversion (the
   user's method, bias correction and activation bits; calibration
   collected once) is measured on data: the top-1 drop against the fp32
   model on labelled `data`, or without it the share of calibration
   samples whose top-1 class changes (a bound on the top-1 drop there).
   A binary search along the path returns the smallest plan measured
   within the budget (to SEARCH_BYTE_TOLERANCE of its bytes): a plan the
   proxy misjudged is tightened by moving back along the path, and nothing
   unmeasured is returned. Under --min-sqnr its measure is the lower CONFIDENCE bound
   (bootstrap over samples) of the output SQNR on the calibration samples;
   the held-out samples, which no conversion step reads, then check the
   plan found by the same bound, and a miss raises the target by the dB
   missed and searches again among the plans before the one that missed
   (_search_sqnr).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from fgq_onnx import layerwise, stages
from fgq_onnx.calibration import session_with_outputs
from fgq_onnx.data import Dataset, model_inputs
from fgq_onnx.errors import FgqError
from fgq_onnx.evaluate import evaluate, open_session
from fgq_onnx.fidelity import Fidelity
from fgq_onnx.passes.ternarize_weights import TERNARY_MARK, TernarizeWeightsPass
from fgq_onnx.report import LayerRecord
from fgq_onnx.ternary import Method

KEEP = 0  # a plan's N for a layer kept fp32
EIGHT_BIT = 1  # a plan's N for 8-bit weights: with u8 scales, groups of one are stored as int8 per-channel weights
FLOAT_ACT = -1  # a plan's "N" for 8-bit weights under float activations (config.float_activation_layers)
Step = Callable[[str, int, int | None], None]  # (phase, advance, total)


@dataclass
class LayerOptions:
    """One layer's choices: stored bytes and KL added alone, per N (KEEP: fp32, KL 0)."""

    label: str
    nbytes: dict[int, int] = field(default_factory=dict)
    kl: dict[int, float] = field(default_factory=dict)


# -- 1. sensitivity --------------------------------------------------------------


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores.reshape(-1, scores.shape[-1]).astype(np.float64)
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(candidate)), softmax over the last axis."""
    p, q = _log_softmax(reference), _log_softmax(candidate)
    return float(np.mean(np.sum(np.exp(p) * (p - q), axis=1)))


def noise_ratio(reference: np.ndarray, candidate: np.ndarray) -> float:
    """sum (reference - candidate)^2 / sum reference^2: the noise that --min-sqnr bounds (independent noises add)."""
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    return float(np.sum((reference - candidate) ** 2) / max(float(np.sum(reference**2)), 1e-300))


def _label(node: ir.Node) -> str:
    """A layer's name in the tables and plans (TernarizeWeightsPass's records use the same)."""
    return node.name or node.outputs[0].name or ""


def _ternarized(model: ir.Model, n: int, config: stages.ConvertConfig) -> tuple[ir.Model, dict[str, str], dict[str, LayerRecord]]:
    """A copy of `model` with every convertible layer ternary at N (exact codes, the stored scale format).

    Returns it, {layer label: the fp32 weight initializer it replaced}, {label: its record at N (stored
    bytes, weight SQNR)}.
    """
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    originals = {id(node): node.inputs[1] for node in copy.graph.all_nodes() if len(node.inputs) > 1}
    ternarize = TernarizeWeightsPass(n, Method.EXACT, config.weight_storage, skip=stages.skip_rule(config, copy), scale_format=config.scale_format,
                                     trained_float_stays_float=not config.ternarize_float_layers)
    ternarize(copy)
    replaced = {_label(node): str(originals[id(node)].name) for node in copy.graph.all_nodes() if TERNARY_MARK in node.metadata_props}
    return copy, replaced, {r.node: r for r in ternarize.records if r.converted}


def _ternary_weights(copy: ir.Model, feed: dict[str, np.ndarray], folder: Path) -> dict[str, np.ndarray]:
    """Each ternary layer's float weight as onnxruntime computes it from the stored form, by layer label."""
    weights = {_label(node): value for node in copy.graph.all_nodes() if TERNARY_MARK in node.metadata_props and (value := node.inputs[1]) is not None}
    constant = {label: value.const_value.numpy() for label, value in weights.items() if value.const_value is not None}
    computed = {label: str(value.name) for label, value in weights.items() if label not in constant}
    if not computed:
        return constant
    session = session_with_outputs(copy, list(computed.values()), folder)
    arrays = session.run(list(computed.values()), feed)  # onnxruntime computes only what they need
    return {**constant, **{label: np.asarray(array) for label, array in zip(computed, arrays)}}


def _weights_fed(model: ir.Model, folder: Path) -> ort.InferenceSession:
    """A session of `model` whose weight initializers (every node's input 1) are graph inputs too, so that
    a run may feed other values for them. (A Where switch between two weights, chosen by a graph input,
    made a ResNet-50's runs 5x slower than the fp32 model's; fed weights, 1.1-1.6x.)"""
    initializers = model.graph.initializers
    weights = list({id(v): v for node in model.graph.all_nodes() if len(node.inputs) > 1 and (v := node.inputs[1]) is not None
                    and v.name in initializers and not v.is_graph_input()}.values())
    model.graph.inputs.extend(weights)
    try:
        return session_with_outputs(model, [], folder)
    finally:
        for value in weights:
            model.graph.inputs.remove(value)


def sensitivity(model: ir.Model, feeds: list[dict[str, np.ndarray]], config: stages.ConvertConfig, on_step: Step | None = None,
                ns: tuple[int, ...] | None = None) -> list[LayerOptions]:
    """KL (noise ratio under --min-sqnr) added by each convertible layer alone at each N of config.auto_ns,
    and its bytes (model: prepared fp32).

    Under --min-sqnr one pass, at the largest N, measures each layer; at the
    other N its output noise is scaled by its weight's: a small weight error
    reaches the output linearly, so the noise ratios keep the ratio of
    |W - W_N|^2 / |W|^2 (the test checks this against measured ones).
    """
    output = _main_output(model, config)
    cost = kl_divergence if config.min_sqnr is None else noise_ratio
    ns = ns or config.auto_ns
    measured = ns if config.min_sqnr is None else (max(ns),)
    layers: dict[str, LayerOptions] = {}
    weight_noise: dict[str, dict[int, float]] = {}  # |W - W_N|^2 / |W|^2 per layer and N
    with tempfile.TemporaryDirectory(prefix="fgq-mixed-") as folder:
        # Each session's model in a folder of its own: the weights-fed session may map its external data
        # while the ternary copies are written.
        fed, ternary = Path(folder) / "fed", Path(folder) / "ternary"
        fed.mkdir()
        ternary.mkdir()
        session = _weights_fed(model, fed)
        reference = [np.asarray(session.run([output], feed)[0]) for feed in feeds]
        for n in ns:
            copy, replaced, records = _ternarized(model, n, config)
            for label, record in records.items():
                layers.setdefault(label, LayerOptions(label)).nbytes[n] = record.code_bytes + record.scale_bytes
                weight_noise.setdefault(label, {})[n] = 10.0 ** (-record.sqnr_db / 10.0)
            if n not in measured:
                continue
            for label, weight in _ternary_weights(copy, feeds[0], ternary).items():
                runs = [np.asarray(session.run([output], {**feed, replaced[label]: weight})[0]) for feed in feeds]
                layers[label].kl[n] = float(np.mean([cost(r, c) for r, c in zip(reference, runs)]))
                if on_step:
                    on_step("sensitivity", 1, len(replaced) * len(measured))
    for label, layer in layers.items():
        at = weight_noise[label]
        for n in set(ns) - set(measured):
            (ref,) = measured
            layer.kl[n] = layer.kl[ref] * at[n] / at[ref] if at[ref] > 0 else layer.kl[ref]
    weights = {_label(node): node.inputs[1] for node in model.graph.all_nodes() if len(node.inputs) > 1}
    for layer in layers.values():
        layer.kl[KEEP], layer.nbytes[KEEP] = 0.0, weights[layer.label].const_value.nbytes
        if EIGHT_BIT in layer.kl:  # the sensitivity runs have float activations: the same weight error
            layer.kl[FLOAT_ACT], layer.nbytes[FLOAT_ACT] = layer.kl[EIGHT_BIT], layer.nbytes[EIGHT_BIT]
    if not layers:
        raise FgqError(stages.nothing_to_convert(stages.Report()))
    return list(layers.values())


# -- 2. plans ---------------------------------------------------------------------


def _monotone_kl(layer: LayerOptions, ns: list[int]) -> dict[int, float]:
    """KL made non-decreasing in N: a larger group is never counted as more accurate (noise)."""
    cost, worst = {}, 0.0
    for n in ns:
        worst = max(worst, layer.kl[n])
        cost[n] = worst
    return cost


def plan_path(layers: list[LayerOptions]) -> tuple[list[dict[str, int]], int]:
    """Plans ({label: N}) from the most accurate to the smallest, and the index of all-smallest-N."""
    ns = sorted(n for n in layers[0].kl if n not in (KEEP, FLOAT_ACT))
    cost = {layer.label: _monotone_kl(layer, ns) for layer in layers}
    base = {layer.label: ns[0] for layer in layers}
    state, forward = dict(base), []
    while True:
        moves = []
        for layer in layers:
            here = state[layer.label]
            for n in ns[ns.index(here) + 1 :]:
                saved = layer.nbytes[here] - layer.nbytes[n]
                if saved > 0:
                    moves.append(((cost[layer.label][n] - cost[layer.label][here]) / saved, -saved, layer.label, n))
        if not moves:
            break
        _, _, label, n = min(moves)
        state[label] = n
        forward.append(dict(state))
    state, backward = dict(base), []
    worth = sorted(layers, key=lambda layer: layer.kl[ns[0]] / max(1, layer.nbytes[KEEP] - layer.nbytes[ns[0]]), reverse=True)
    if FLOAT_ACT in layers[0].kl:  # first float activations at the same bytes, then fp32
        for layer in worth:
            state[layer.label] = FLOAT_ACT
            backward.append(dict(state))
    for layer in worth[:-1]:  # at least one layer stays converted
        state[layer.label] = KEEP
        backward.append(dict(state))
    return [*reversed(backward), base, *forward], len(backward)


def plan_bytes(plan: dict[str, int], layers: list[LayerOptions]) -> int:
    return sum(layer.nbytes[plan[layer.label]] for layer in layers)


# -- 3. verification --------------------------------------------------------------


class _Top1Drop:
    """Points of top-1 lost against the fp32 model on labelled data."""

    def __init__(self, fp32: Path, data, config: stages.ConvertConfig):
        self.data, self.options = data, config.image
        self.reference = evaluate(fp32, data, options=config.image)
        self.description = f"top-1 drop on '{data}' ({self.reference.n:,} samples; fp32 {100 * self.reference.top1:.2f}%)"

    def __call__(self, path: Path) -> float:
        return 100.0 * (self.reference.top1 - evaluate(path, self.data, options=self.options).top1)


class _Disagreement:
    """Points of calibration samples whose top-1 class differs from the fp32 model's."""

    def __init__(self, fp32: Path, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.reference = self._classes(fp32)
        self.description = f"top-1 changes against fp32 on {len(self.reference):,} calibration samples (no --data)"

    def _classes(self, path: Path) -> np.ndarray:
        session = open_session(path)
        name = session.outputs[0]
        scores = [session.run(feed, [name])[name] for feed in self.feeds]
        return np.concatenate([s.reshape(-1, s.shape[-1]).argmax(axis=1) for s in scores])

    def __call__(self, path: Path) -> float:
        return 100.0 * float(np.mean(self._classes(path) != self.reference))


def within(drop: float, budget: float) -> bool:
    """drop <= budget, allowing for rounding: a drop of 15 in 5,000 samples is 0.30000000000000004 points."""
    return drop <= budget + 1e-9


SEARCH_BYTE_TOLERANCE = 0.02  # the search stops once the smallest plan within budget is within 2% of the bytes of the largest failing one


def search(path: list[dict[str, int]], start: int, measure: Callable[[dict[str, int]], float], budget: float, on_step: Step | None = None,
           nbytes: Callable[[dict[str, int]], int] | None = None) -> tuple[int, dict[int, float]]:
    """Binary search for the last plan of `path` measured within `budget`, starting at index `start`.

    Assumes the drop grows along the path; every answer is a measured plan.
    With `nbytes`, the search stops once the plan found is within
    SEARCH_BYTE_TOLERANCE of the bytes of the first failing one after it.
    Returns its index (-1 when none fits) and the drop measured for each plan tried, by index.
    """
    trials: dict[int, float] = {}

    def fits(index: int) -> bool:
        if index not in trials:
            trials[index] = measure(path[index])
            if on_step:
                on_step("verifying", 1, None)
        return within(trials[index], budget)

    def close(low: int, high: int) -> bool:
        return nbytes is not None and low >= 0 and high < len(path) and nbytes(path[low]) - nbytes(path[high]) <= SEARCH_BYTE_TOLERANCE * nbytes(path[low])

    low, high = (start, len(path)) if fits(start) else (-1, start)  # low fits (or -1), high fails (or past the end)
    while high - low > 1 and not close(low, high):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, trials


CONFIDENCE = 0.9  # --min-sqnr holds for the lower bound at this confidence of the output SQNR over the samples measured
BOOTSTRAP_ROUNDS = 1000
MAX_CHECKS = 4  # searches tightened after a held-out check misses, at most


def sqnr_lower_bound(signal: np.ndarray, noise: np.ndarray, confidence: float = CONFIDENCE) -> float:
    """A lower confidence bound of the SQNR (dB) sum(signal) / sum(noise) over samples: the (1 - confidence)
    quantile of a bootstrap over the samples (fixed seed), never above the SQNR itself."""
    point = 10.0 * np.log10(max(float(signal.sum()), 1e-300) / max(float(noise.sum()), 1e-300))
    if len(signal) < 2:
        return point
    draws = np.random.default_rng(0).integers(0, len(signal), (BOOTSTRAP_ROUNDS, len(signal)))
    ratios = np.maximum(signal[draws].sum(axis=1), 1e-300) / np.maximum(noise[draws].sum(axis=1), 1e-300)
    return min(point, float(np.quantile(10.0 * np.log10(ratios), 1.0 - confidence)))


class _OutputNoise:
    """Per sample, the output's energy and its error against the fp32 model: one feed per sample."""

    def __init__(self, fp32: Path, feeds: list[dict[str, np.ndarray]], output: str):
        self.feeds, self.output = feeds, output
        self.reference = self._outputs(fp32)
        self.signal = np.array([float(np.sum(r.astype(np.float64) ** 2)) for r in self.reference])

    def _outputs(self, path: Path) -> list[np.ndarray]:
        session = open_session(path)
        return [session.run(feed, [self.output])[self.output] for feed in self.feeds]

    def noise(self, path: Path) -> np.ndarray:
        return np.array([float(np.sum((r.astype(np.float64) - c.astype(np.float64)) ** 2)) for r, c in zip(self.reference, self._outputs(path))])

    def lower_bound(self, path: Path) -> float:
        return sqnr_lower_bound(self.signal, self.noise(path))


def _held_out_feeds(model: ir.Model, calib, config: stages.ConvertConfig) -> list[dict[str, np.ndarray]]:
    """The held-out samples (stages.open_data's split), one per feed."""
    _, held_out = stages.open_data(calib, model, replace(config, calib_batch_size=1))
    return [feed for feed, _ in held_out] if held_out is not None else []


def _calibration_feeds(model: ir.Model, calib, config: stages.ConvertConfig, one_per_feed: bool = False) -> list[dict[str, np.ndarray]]:
    limit = min(config.refine_samples, config.calib_limit or config.refine_samples)
    batch = 1 if one_per_feed else config.calib_batch_size
    dataset, _ = stages.open_data(calib, model, replace(config, calib_limit=limit, calib_batch_size=batch))  # the held-out samples stay unseen
    return [feed for feed, _ in dataset]


def convert_auto(model, config: stages.ConvertConfig, *, calib, data=None, calibration_cache=None, on_step: Step | None = None) -> stages.Conversion:
    """The smallest mixed-N conversion measured within config.max_drop or config.min_sqnr (see the module docstring)."""
    if calib is None:
        raise FgqError("--n auto measures each layer's sensitivity on calibration data: give --calib")
    calib = layerwise.replayable(calib)
    ir_model, _ = stages.load_model(model, stages.REQUIRED_OPSET[config.weight_storage])
    if data is not None:
        try:  # labels checked before the slow work
            Dataset(data, model_inputs(ir_model), options=config.image, labelled=True)
        except FgqError as error:
            raise FgqError(f"--n auto measures top-1 on --data, so it needs labels: {error}") from None
    feeds = _calibration_feeds(ir_model, calib, config)
    prepared = stages.infer_shapes(stages.prepare(ir_model, dequantize=not config.keep_quantized_weights), stages.Report())
    eight_bit = config.min_sqnr is not None and config.scale_format == "u8"  # --min-sqnr may give a layer 8-bit weights
    layers = sensitivity(prepared, feeds, config, on_step, (EIGHT_BIT, *config.auto_ns) if eight_bit else config.auto_ns)
    path, start = plan_path(layers)
    cache = calibration_cache or stages.collect_calibration(model, calib, config)

    def convert_plan(plan: dict[str, int]) -> stages.Conversion:  # the held-out check only for the plans chosen
        return stages.convert_fixed(model, plan_config(config, plan), calib=calib, calibration_cache=cache, measure_fidelity=False)

    def held_out_of(conversion: stages.Conversion) -> Fidelity:
        conversion.report.fidelity = stages.held_out_fidelity(model, conversion, calib, config)
        return conversion.report.fidelity

    with tempfile.TemporaryDirectory(prefix="fgq-auto-") as folder:
        fp32 = Path(folder) / "fp32.onnx"
        ir.save(ir_model, fp32)
        if config.min_sqnr is not None:
            output = _main_output(prepared, config)
            noise = _OutputNoise(fp32, _calibration_feeds(ir_model, calib, config, one_per_feed=True), output)
            held_out_noise = _OutputNoise(fp32, _held_out_feeds(ir_model, calib, config), output)

            def bound_of(conversion: stages.Conversion, samples: _OutputNoise = noise) -> float:
                stages.save(conversion.model, Path(folder) / "candidate.onnx")
                return samples.lower_bound(Path(folder) / "candidate.onnx")

            def check_of(conversion: stages.Conversion) -> tuple[Fidelity, float]:
                return held_out_of(conversion), bound_of(conversion, held_out_noise)

            found = _search_sqnr(path, start, layers, convert_plan, bound_of, check_of, len(noise.feeds), config.min_sqnr, on_step)
        else:
            judge = _Top1Drop(fp32, data, config) if data is not None else _Disagreement(fp32, feeds)
            found = _search_top1(path, start, layers, convert_plan, judge, Path(folder), config.max_drop, on_step)
            held_out_of(found.conversion)
    conversion = found.conversion
    _record(conversion.report, config, found, layers, path)
    stages.stamp(conversion.model, conversion.report)  # the model's metadata says n=auto too (each node has its own N)
    return conversion


def plan_config(config: stages.ConvertConfig, plan: dict[str, int]) -> stages.ConvertConfig:
    """The fixed conversion of a plan: its N per layer, FLOAT_ACT layers as 8-bit weights under float activations."""
    layer_n = {label: EIGHT_BIT if n == FLOAT_ACT else n for label, n in plan.items()}
    float_act = tuple(label for label, n in plan.items() if n == FLOAT_ACT)
    return replace(config, n=config.auto_ns[0], max_drop=None, min_sqnr=None, layer_n=layer_n, float_activation_layers=float_act)


@dataclass
class Found:
    """What a search returned: the plan's index on the path and its conversion, the drop measured per plan tried."""

    chosen: int
    conversion: stages.Conversion
    drops: dict[int, float]
    measure: str  # what a drop is measured on
    drop: float  # the chosen plan's drop as reported (for --min-sqnr: dB short of it on the held-out samples)
    checks: list[dict[str, object]] = field(default_factory=list)


def _no_plan(path, layers, drops, limit: str, measure: str) -> FgqError:
    closest = min(drops, key=lambda index: drops[index])
    return FgqError(f"no plan {limit} ({measure}): the best tried, {describe_plan(path[closest])}, is {drops[closest]:.2f} off")


def _search_top1(path, start, layers, convert_plan, judge, folder: Path, budget: float, on_step) -> Found:
    """--max-drop: a binary search along the path, each plan converted and its top-1 drop measured by `judge`."""
    conversions: dict[int, stages.Conversion] = {}
    index_of = {id(plan): index for index, plan in enumerate(path)}

    def measure(plan: dict[str, int]) -> float:
        conversion = convert_plan(plan)
        candidate = folder / "candidate.onnx"
        stages.save(conversion.model, candidate)
        drop = judge(candidate)
        if within(drop, budget):
            conversions[index_of[id(plan)]] = conversion
        return drop

    chosen, drops = search(path, start, measure, budget, on_step, nbytes=lambda plan: plan_bytes(plan, layers))
    if chosen < 0:
        raise _no_plan(path, layers, drops, f"loses at most {budget} points", judge.description)
    return Found(chosen, conversions[chosen], drops, judge.description, drops[chosen])


def _search_sqnr(path, start, layers, convert_plan, bound_of: Callable[[stages.Conversion], float],
                 check_of: Callable[[stages.Conversion], tuple[Fidelity, float]], samples: int, min_sqnr: float, on_step) -> Found:
    """--min-sqnr: search on the calibration samples, check on the held-out ones, tighten and search again on a miss.

    A plan's measure, bound_of(its conversion), is the lower CONFIDENCE bound
    of its output SQNR over the `samples` calibration samples; the search returns the smallest plan
    whose bound reaches the target (at first min_sqnr). check_of(that conversion) gives its fidelity on
    the held-out samples, which no conversion step saw, and the same lower bound over them, which must
    reach min_sqnr too (their plain SQNR, on a few samples one of which carries most of the noise, let
    a plan through that the search had picked for its luck on the calibration samples: open_nsfw). When
    it misses by d dB the target rises by d and the search runs again among the plans before the one
    that missed (the path's order, which the bisection assumes, says the smaller ones would miss too;
    plans already measured are not converted again), MAX_CHECKS times at most.
    """
    bounds: dict[int, float] = {}
    conversions: dict[int, stages.Conversion] = {}
    index_of = {id(plan): index for index, plan in enumerate(path)}
    target, checks, end = min_sqnr, [], len(path)  # end: the first plan that missed the check
    for _ in range(MAX_CHECKS):
        def measure(plan: dict[str, int], target: float = target) -> float:
            index = index_of[id(plan)]
            if index not in bounds:
                conversions[index] = convert_plan(plan)
                bounds[index] = bound_of(conversions[index])
            return target - bounds[index]

        chosen, _ = search(path[:end], min(start, end - 1), measure, 0.0, on_step, nbytes=lambda plan: plan_bytes(plan, layers))
        for index in [i for i in conversions if i != chosen and bounds[i] < target]:  # never an answer again: the target only rises
            del conversions[index]
        if chosen < 0:
            break
        held_out, held_out_bound = check_of(conversions[chosen])
        if held_out.main is None:
            raise FgqError(f"--min-sqnr is checked on held-out calibration samples, but none were: {held_out.skipped}")
        checks.append({"target_db": target, "plan_summary": describe_plan(path[chosen]), "calibration_bound_db": bounds[chosen],
                       "held_out_db": held_out.main.sqnr_db, "held_out_bound_db": held_out_bound})
        if held_out_bound >= min_sqnr:
            measure_text = (f"lower {CONFIDENCE:.0%} bound of the output SQNR over {samples} calibration samples (bootstrap), "
                            f"the plan then checked by the same bound on {held_out.samples} held-out samples")
            drops = {index: min_sqnr - bound for index, bound in bounds.items()}
            return Found(chosen, conversions[chosen], drops, measure_text, min_sqnr - held_out.main.sqnr_db, checks)
        target += min_sqnr - held_out_bound
        end = chosen
        for index in [i for i in conversions if i >= end]:
            del conversions[index]
        if end == 0:
            break
    drops = {index: min_sqnr - bound for index, bound in bounds.items()}
    tried = "; ".join(f"{c['plan_summary']}: {c['held_out_bound_db']:.1f} dB held out (lower bound)" for c in checks)
    raise _no_plan(path, layers, drops, f"reaches {min_sqnr} dB on the calibration samples and on the held-out ones{f' ({tried})' if tried else ''}",
                   "lower bound of the output SQNR over the calibration samples")


def _main_output(model: ir.Model, config: stages.ConvertConfig) -> str:
    """config.fidelity_output, else the first float output (as the fidelity check takes it: an Identity of the
    token ids, MiniLM's first output, has no noise to measure)."""
    names = [value.name for value in model.graph.outputs]
    if config.fidelity_output is not None:
        if config.fidelity_output not in names:
            raise FgqError(f"the model has no output {config.fidelity_output!r}; its outputs are {names}")
        return config.fidelity_output
    floats = [value.name for value in model.graph.outputs if value.dtype is not None and value.dtype.is_floating_point()]
    if not floats:
        raise FgqError(f"--min-sqnr and --n auto measure a float output, but the model's outputs {names} are not float")
    return floats[0]


def describe_plan(plan: dict[str, int]) -> str:
    """'8-bit x1, N=4 x3, N=16 x5, fp32 x1': how many layers got each N."""
    counts = {n: list(plan.values()).count(n) for n in sorted(set(plan.values()), key=lambda n: (n == KEEP, n))}
    names = {KEEP: "fp32", EIGHT_BIT: "8-bit", FLOAT_ACT: "8-bit float-act"}
    return ", ".join(f"{names.get(n, f'N={n}')} x{count}" for n, count in counts.items())


def _record(report, config, found: Found, layers, path) -> None:
    report.settings.update(n="auto", **({"min_sqnr": config.min_sqnr} if config.min_sqnr is not None else {"max_drop": config.max_drop}))
    chosen, drops = found.chosen, found.drops
    report.search = {
        "budget": f"--min-sqnr {config.min_sqnr}" if config.min_sqnr is not None else f"--max-drop {config.max_drop}",
        "budget_points": config.max_drop,
        "measure": found.measure,
        "drop_points": found.drop,
        "plan": path[chosen],
        "plan_summary": describe_plan(path[chosen]),
        "weight_bytes": plan_bytes(path[chosen], layers),
        "smallest_n": config.auto_ns[0],
        "uniform_smallest_n_bytes": plan_bytes({layer.label: config.auto_ns[0] for layer in layers}, layers),
        "plans_on_path": len(path),
        "byte_tolerance": SEARCH_BYTE_TOLERANCE,
        "trials": [{"summary": describe_plan(path[i]), "weight_bytes": plan_bytes(path[i], layers), "drop_points": drop,
                    "within_budget": within(drop, 0.0 if config.min_sqnr is not None else config.max_drop)} for i, drop in sorted(drops.items())],
        **({"checks": found.checks} if found.checks else {}),
        "sensitivity_kl": {layer.label: {("fp32" if n == KEEP else str(n)): kl for n, kl in layer.kl.items()} for layer in layers},
    }
