"""--n auto: per-layer sensitivity, the plan path, the budgeted search, and per-layer N in the graph."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import fgq_onnx
from fgq_onnx import mixed, pipeline
from fgq_onnx.passes.ternarize_weights import TernarizeWeightsPass
from ir_models import make_model

WIDTHS = (32, 48, 48, 48, 10)
LAYERS = [f"mm{i}" for i in range(len(WIDTHS) - 1)]
EXACT_AT = (64, 4, 16, 64)  # each layer's weights are ternary per this many inputs
QUICK = dict(act_bits=0, bias_correction=False, scale_format="f32", auto_ns=(4, 16, 64))  # weights only, exact scales: fast


def deep_mlp(kit) -> ir.Model:
    """x [batch, 32] -> four MatMuls (Relu between) whose weights are ternary with one scale per
    EXACT_AT[i] inputs: exact at that N and any divisor of it, off at larger N. A little noise keeps
    them from being taken as already ternary (which would pack them exactly, never fitted)."""
    rng = np.random.default_rng(11)
    weights, lines, previous = {}, [], "x"
    for i, (fan_in, fan_out) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        ternary = kit.ternary_exact_weight(rng, (fan_in, fan_out), 0, EXACT_AT[i]) * np.float32(4 / np.sqrt(fan_in))
        weights[f"w{i}"] = ternary * (1 + rng.normal(0, 1e-3, ternary.shape)).astype(np.float32)
        out = "y" if i == len(WIDTHS) - 2 else f"h{i}"
        lines += [f"{out} = MatMul({previous}, w{i})"] if out == "y" else [f"m{i} = MatMul({previous}, w{i})", f"{out} = Relu(m{i})"]
        previous = out
    text = f"g (float[N, {WIDTHS[0]}] x) => (float[N, {WIDTHS[-1]}] y) {{ " + " ".join(lines) + " }"
    model = make_model(text, weights)
    for node in model.graph:
        if node.op_type == "MatMul":
            node.name = f"mm{node.inputs[1].name[1:]}"
    return model


def run(model: ir.Model, x: np.ndarray, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> np.ndarray:
    """Outputs in onnxruntime. At ENABLE_ALL (what `fgq-onnx eval` uses) a MatMul whose weight has
    blocks of N >= 16 becomes MatMulNBits, which quantizes its activations to int8 as well."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, kit):
    """The model file, calibration data, and labelled data whose labels are the fp32 model's classes."""
    folder = tmp_path_factory.mktemp("mixed")
    model = deep_mlp(kit)
    path = folder / "mlp.onnx"
    onnx.save(ir.serde.serialize_model(model), path)
    rng = np.random.default_rng(5)
    calib, test = (rng.normal(0, 1, (count, WIDTHS[0])).astype(np.float32) for count in (64, 400))
    np.savez(folder / "calib.npz", x=calib)
    np.savez(folder / "data.npz", x=test, y=run(model, test).argmax(axis=1))
    np.savez(folder / "unlabelled.npz", x=test)
    return folder, model, calib, test


def top1_drop(model: ir.Model, reference: ir.Model, x: np.ndarray) -> float:
    labels = run(reference, x).argmax(axis=1)
    return 100.0 * float(np.mean(run(model, x).argmax(axis=1) != labels))


def dequantize_block_sizes(model: ir.Model) -> dict[str, int]:
    """block_size of the DequantizeLinear feeding each MatMul's weight (the converted ones)."""
    sizes = {}
    for node in model.graph:
        producer = node.inputs[1].producer() if node.op_type == "MatMul" else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            sizes[node.name] = producer.attributes["block_size"].as_int()
    return sizes


def test_pass_takes_a_group_size_per_node(kit):
    model = deep_mlp(kit)
    plan = dict(zip(LAYERS, (4, 8, 32, 16)))
    ternarize = TernarizeWeightsPass(lambda node: plan[node.name])
    ternarize(model)
    assert dequantize_block_sizes(model) == plan
    assert {r.node: r.n for r in ternarize.records} == plan


def test_fitting_keeps_each_layers_group_size(tiny):
    folder, model, calib, _ = tiny
    plan = dict(zip(LAYERS, (16, 4, 8, 0)))
    fitted, report = fgq_onnx.convert(folder / "mlp.onnx", n=4, layer_n=plan, method="fit", calib=folder / "calib.npz", act_bits=0)
    assert dequantize_block_sizes(fitted) == {"mm0": 16, "mm1": 4, "mm2": 8}
    assert any(note.startswith("fit: 3 layer(s) refitted") for note in report.notes), report.notes
    assert next(r for r in report.layers if r.node == "mm3").reason.startswith("kept fp32")


def test_sensitivity_matches_each_layer_converted_alone(tiny):
    """The per-layer sessions (the ternary weight as a session initializer) against brute force: a real
    conversion of each layer alone, at each N."""
    folder, model, calib, _ = tiny
    config = pipeline.ConvertConfig(n="auto", max_drop=1.0, **QUICK)
    table = {layer.label: layer for layer in mixed.sensitivity(model, [{"x": calib}], config)}
    reference = run(model, calib)
    basic = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # the weights alone, as the sensitivity sessions get them
    for label in LAYERS:
        for n in config.auto_ns:
            plan = {other: (n if other == label else mixed.KEEP) for other in LAYERS}
            alone, report = fgq_onnx.convert(folder / "mlp.onnx", n=4, layer_n=plan, act_bits=0, bias_correction=False, scale_format="f32")
            assert table[label].kl[n] == pytest.approx(mixed.kl_divergence(reference, run(alone, calib, basic)), rel=1e-4, abs=1e-9), (label, n)
            assert table[label].nbytes[n] == sum(r.code_bytes + r.scale_bytes for r in report.converted)
        assert table[label].nbytes[mixed.KEEP] == model.graph.initializers[f"w{label[2:]}"].const_value.nbytes
    for label, at in zip(LAYERS, EXACT_AT):  # next to no loss where the weights are ternary per group of N (up to the noise)
        assert [table[label].kl[n] < 1e-7 for n in config.auto_ns] == [at % n == 0 for n in config.auto_ns]


def test_plan_path_shrinks_and_starts_from_the_smallest_n():
    layers = [
        mixed.LayerOptions("a", {0: 4000, 4: 520, 16: 280, 64: 260}, {0: 0.0, 4: 0.01, 16: 0.02, 64: 0.5}),
        mixed.LayerOptions("b", {0: 4000, 4: 520, 16: 280, 64: 260}, {0: 0.0, 4: 0.2, 16: 0.9, 64: 0.7}),
    ]
    path, start = mixed.plan_path(layers)
    assert path[start] == {"a": 4, "b": 4}
    sizes = [mixed.plan_bytes(plan, layers) for plan in path]
    assert all(later < earlier for earlier, later in zip(sizes, sizes[1:]))
    assert path[0] == {"a": 4, "b": mixed.KEEP}  # the last resort keeps the most sensitive layer, never all
    assert path[start + 1] == {"a": 16, "b": 4}  # cheapest KL per byte first
    assert path[-1] == {"a": 64, "b": 64}


@pytest.mark.parametrize("drops, budget, expected", [
    ([0.0, 0.1, 0.2, 0.3, 0.6, 0.9, 1.5], 0.5, 3),  # start fits: search forward
    ([0.0, 0.1, 0.2, 0.3, 0.6, 0.9, 1.5], 0.15, 1),  # start fails: search back into the last resort
    ([0.0, 0.1, 0.2, 0.3, 0.6, 0.9, 1.5], 2.0, 6),
    ([0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5], 0.5, -1),  # nothing fits
    ([0.0, 0.1, 0.2, 0.3, 100 * (0.9298 - 0.9268), 0.9, 1.5], 0.3, 4),  # 15 samples in 5,000 are 0.3 points, not more
])
def test_search_returns_the_last_plan_measured_within_budget(drops, budget, expected):
    path = [{"layer": i} for i in range(len(drops))]
    measured = []

    def measure(plan):
        measured.append(plan["layer"])
        return drops[plan["layer"]]

    chosen, trials = mixed.search(path, 3, measure, budget)
    assert chosen == expected
    assert len(measured) == len(set(measured)) <= 1 + math.ceil(math.log2(len(path)))
    assert set(trials) == set(measured)
    if chosen >= 0:
        assert mixed.within(trials[chosen], budget) and (chosen + 1 not in trials or not mixed.within(trials[chosen + 1], budget))


def test_search_stops_within_the_byte_tolerance():
    """Plans 1% apart in bytes: the search stops once a fitting plan and a failing one after it are
    within SEARCH_BYTE_TOLERANCE, returning the fitting one."""
    path = [{"layer": i} for i in range(200)]
    sizes = [int(1e6 * 0.99**i) for i in range(200)]
    chosen, trials = mixed.search(path, 0, lambda plan: float(plan["layer"] > 120), 0.5, nbytes=lambda plan: sizes[plan["layer"]])
    failing = min(i for i, drop in trials.items() if drop > 0.5)
    assert chosen <= 120 and trials[chosen] == 0.0 and chosen < failing
    assert sizes[chosen] - sizes[failing] <= mixed.SEARCH_BYTE_TOLERANCE * sizes[chosen] and len(trials) < 1 + math.ceil(math.log2(200))


def test_search_respects_the_budget_on_labelled_data(tiny):
    folder, model, calib, test = tiny
    budget = 2.0
    converted, report = fgq_onnx.convert(folder / "mlp.onnx", n="auto", max_drop=budget, calib=folder / "calib.npz", data=folder / "data.npz", **QUICK)
    search = report.search
    measured = top1_drop(converted, model, test)
    assert measured == pytest.approx(search["drop_points"]) and measured <= budget
    assert search["weight_bytes"] < search["uniform_smallest_n_bytes"]
    assert dequantize_block_sizes(converted) == {k: v for k, v in search["plan"].items() if v}
    assert {r.node: r.n for r in report.converted} == {k: v for k, v in search["plan"].items() if v}
    assert report.settings["n"] == "auto" and '"search"' in report.to_json() and converted.metadata_props["fgq_onnx.n"] == "auto"
    assert search["plan"]["mm0"] == 64 and len(set(search["plan"].values())) > 1  # mm0 is exact at any N


def test_search_without_labels_bounds_top1_changes_on_calibration_data(tiny):
    folder, model, calib, _ = tiny
    converted, report = fgq_onnx.convert(folder / "mlp.onnx", n="auto", max_drop=3.0, calib=folder / "calib.npz", **QUICK)
    assert "calibration samples" in report.search["measure"]
    changed = top1_drop(converted, model, calib)
    assert changed == pytest.approx(report.search["drop_points"]) and changed <= 3.0
    assert report.search["weight_bytes"] < report.search["uniform_smallest_n_bytes"]


@pytest.mark.parametrize("settings, says", [
    (dict(n="auto"), "--max-drop"),
    (dict(n="auto", max_drop=-0.5), "--max-drop"),
    (dict(n="auto", max_drop=float("nan")), "--max-drop"),
    (dict(n=4, max_drop=0.5), "only applies with --n auto"),
    (dict(n="four"), "--n"),
    (dict(n="auto", max_drop=0.5, auto_ns=(1, 4)), "at least 2"),
    (dict(layer_n={"mm0": -1}), "mm0=-1"),  # 1 is 8-bit weights, 0 fp32
])
def test_bad_settings(settings, says):
    with pytest.raises(fgq_onnx.FgqError, match=says):
        pipeline.ConvertConfig(**settings)


@pytest.mark.parametrize("args, says", [
    (("--n", "auto", "--data", "DATA/unlabelled.npz", "--max-drop", "1"), ("needs labels", "'y'")),
    (("--n", "auto"), ("--max-drop",)),
    (("--n", "auto", "--max-drop", "-1"), ("--max-drop", ">= 0")),
    (("--n", "4", "--data", "DATA/data.npz"), ("--data", "--n auto")),
    (("--n", "x4"), ("--n", "'x4'")),
])
def test_cli_refuses_bad_auto_settings(cli, kit, tiny, tmp_path, args, says):
    from test_bad_input import refused

    folder = tiny[0]
    args = [str(a).replace("DATA", str(folder)) for a in args]
    refused(cli, kit, [folder, tmp_path], folder / "mlp.onnx", "--calib", folder / "calib.npz", "--act-bits", "0", "-o", tmp_path / "out.onnx", *args, says=says)


def test_cli_prints_the_plan(cli, tiny, tmp_path):
    folder = tiny[0]
    result = cli("convert", folder / "mlp.onnx", "--n", "auto", "--max-drop", "2", "--calib", folder / "calib.npz", "--data", folder / "data.npz",
                 "--act-bits", "0", "--no-bias-correction", "-o", tmp_path / "out.onnx", "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.stderr
    assert "Group sizes chosen under --max-drop 2.0" in result.stdout and "chosen:" in result.stdout
    import json

    search = json.loads((tmp_path / "report.json").read_text())["search"]
    assert search["drop_points"] <= 2.0 and set(search["plan"]) == set(LAYERS)


def test_custom_format_runs_a_mixed_plan_like_qdq(tiny):
    """Each com.fgq node takes its own N (here through the ONNX function fallbacks)."""
    folder, _, calib, _ = tiny
    plan = dict(zip(LAYERS, (16, 4, 8, 0)))
    qdq, _ = fgq_onnx.convert(folder / "mlp.onnx", n=4, layer_n=plan, calib=folder / "calib.npz")
    custom, _ = fgq_onnx.convert(folder / "mlp.onnx", n=4, layer_n=plan, calib=folder / "calib.npz", format="custom")
    assert {n.name: n.attributes["N"].as_int() for n in custom.graph if n.op_type == "TernaryMatMul"} == {"mm0": 16, "mm1": 4, "mm2": 8}
    basic = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    np.testing.assert_allclose(run(custom, calib, basic), run(qdq, calib, basic), rtol=1e-5, atol=1e-6)


def _sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    reference, actual = reference.astype(np.float64), actual.astype(np.float64)
    return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - actual) ** 2)))


def test_min_sqnr_budget_holds_on_held_out_samples(tiny):
    """--min-sqnr: each layer of the MLP is exact at its own N (EXACT_AT) and noisy above it, so a 40 dB budget
    needs every layer at most at that N; the search returns a plan smaller than N=4 everywhere that holds it,
    measured on held-out samples."""
    folder, model, calib, test = tiny
    budget = 40.0
    converted, report = fgq_onnx.convert(folder / "mlp.onnx", n="auto", min_sqnr=budget, calib=folder / "calib.npz", **QUICK)
    plan = report.search["plan"]
    assert all(0 < plan[layer] <= exact for layer, exact in zip(LAYERS, EXACT_AT)) and plan["mm0"] == 64  # mm0: exact at any N
    assert report.search["weight_bytes"] < report.search["uniform_smallest_n_bytes"]
    assert report.fidelity.samples == len(calib) // 5 and report.fidelity.main.sqnr_db >= budget
    assert report.search["drop_points"] == pytest.approx(budget - report.fidelity.main.sqnr_db)
    assert "calibration samples" in report.search["measure"] and report.search["checks"][-1]["held_out_db"] >= budget
    assert _sqnr_db(run(model, test), run(converted, test, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)) >= budget  # on unseen data too
    uniform, _ = fgq_onnx.convert(folder / "mlp.onnx", n=64, calib=folder / "calib.npz", **{k: v for k, v in QUICK.items() if k != "auto_ns"})
    assert _sqnr_db(run(model, test), run(uniform, test, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)) < budget  # the budget binds
    assert report.settings["min_sqnr"] == budget and "--min-sqnr" in report.search["budget"]


def test_min_sqnr_needs_held_out_samples_and_one_budget(tiny):
    folder, *_ = tiny
    with pytest.raises(fgq_onnx.FgqError, match="one budget"):
        fgq_onnx.convert(folder / "mlp.onnx", n="auto", min_sqnr=20.0, max_drop=1.0, calib=folder / "calib.npz", **QUICK)
    with pytest.raises(fgq_onnx.FgqError, match="--min-sqnr only applies with --n auto"):
        fgq_onnx.convert(folder / "mlp.onnx", n=4, min_sqnr=20.0, calib=folder / "calib.npz")
    with pytest.raises(fgq_onnx.FgqError, match="no output 'nope'"):
        fgq_onnx.convert(folder / "mlp.onnx", n="auto", min_sqnr=20.0, fidelity_output="nope", calib=folder / "calib.npz", **QUICK)


def test_min_sqnr_gives_an_unternarizable_layer_8_bit_weights(tmp_path, kit):
    """A layer of Gaussian weights loses ~10 dB ternary at any N, so a 30 dB budget needs it 8-bit or fp32:
    8-bit (N=1 under u8 scales: int8 per-channel weights) is the smaller; the exact-ternary layer stays ternary."""
    rng = np.random.default_rng(2)
    ternary = kit.ternary_exact_weight(rng, (32, 48), 0, 4) * np.float32(0.5)
    weights = {"w0": ternary * (1 + rng.normal(0, 1e-3, ternary.shape)).astype(np.float32),  # noise: not taken as already ternary
               "w1": rng.normal(0, 0.2, (48, 10)).astype(np.float32)}
    model = make_model("g (float[N, 32] x) => (float[N, 10] y) { m0 = MatMul(x, w0) h0 = Relu(m0) y = MatMul(h0, w1) }", weights)
    for node, name in zip(model.graph, ("mm0", "relu0", "mm1")):
        node.name = name
    path = tmp_path / "mlp.onnx"
    onnx.save(ir.serde.serialize_model(model), path)
    np.savez(tmp_path / "calib.npz", x=rng.normal(0, 1, (40, 32)).astype(np.float32))
    converted, report = fgq_onnx.convert(path, n="auto", min_sqnr=30.0, calib=tmp_path / "calib.npz", act_bits=0, bias_correction=False, auto_ns=(4, 16))
    assert report.search["plan"] == {"mm0": 4, "mm1": 1} and "8-bit x1" in report.search["plan_summary"]
    assert report.fidelity.main.sqnr_db >= 30.0
    records = {r.node: r for r in report.layers}
    assert records["mm1"].n == 1 and records["mm1"].grouping == "int8 per channel"
    assert (records["mm1"].code_bytes, records["mm1"].scale_bytes) == (48 * 10, 4 * 10)  # a byte a weight, a float32 scale per output
    x = rng.normal(0, 1, (64, 32)).astype(np.float32)
    from fgq_onnx import runtime

    with tempfile.TemporaryDirectory() as folder:
        saved = Path(folder) / "auto.onnx"
        fgq_onnx.save(converted, saved)
        (actual,) = runtime.inference_session(str(saved)).run(None, {"x": x})  # the custom ops run N=1 rows
    (expected,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert _sqnr_db(expected, actual) >= 30.0


def test_sqnr_lower_bound_widens_with_uneven_samples():
    signal = np.ones(20)
    even = np.full(20, 0.01)  # 20 dB each
    assert mixed.sqnr_lower_bound(signal, even) == pytest.approx(20.0)
    uneven = even.copy()
    uneven[0] = 0.2  # one sample at 7 dB
    point = 10 * np.log10(signal.sum() / uneven.sum())
    bound = mixed.sqnr_lower_bound(signal, uneven)
    assert bound < point - 1.0 and bound == mixed.sqnr_lower_bound(signal, uneven)  # lower, and reproducible
    assert mixed.sqnr_lower_bound(signal[:1], uneven[:1]) == pytest.approx(7.0, abs=0.1)  # one sample: its own SQNR


def _placeholder(held_out_db: float, cosine: float = 1.0) -> fgq_onnx.stages.Conversion:
    """A conversion whose report says `held_out_db` on 6 held-out samples (the search reads nothing else of it)."""
    held_out = fgq_onnx.fidelity.OutputFidelity("y", sqnr_db=held_out_db, cosine=cosine)
    return fgq_onnx.stages.Conversion(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10),
                                      fgq_onnx.report.Report(fidelity=fgq_onnx.fidelity.Fidelity(6, [held_out])))


def test_sqnr_search_tightens_when_the_held_out_check_misses():
    """Plan i reaches 40 - 3i dB on the calibration samples but 5 dB less held out: a 25 dB budget first finds
    plan 5 (20 dB held out), raises its target by the 5 dB missed, and returns plan 3 (26 dB held out),
    converting no plan twice and measuring the held-out samples only for the plans it chose."""
    path = [{"a": i} for i in range(10)]
    layers = [mixed.LayerOptions("a", nbytes={i: 1000 - 50 * i for i in range(10)}, kl={i: 10 ** (-(40 - 3 * i) / 10) for i in range(10)})]
    converted = []

    def convert_plan(plan):
        converted.append(plan["a"])
        return _placeholder(35.0 - 3 * plan["a"])

    def bound_of(conversion):
        return conversion.report.fidelity.main.sqnr_db + 5.0

    checked = []

    def check_of(conversion):
        checked.append(conversion.report.fidelity.main.sqnr_db)
        return conversion.report.fidelity, conversion.report.fidelity.main.sqnr_db

    found = mixed._search_sqnr(path, 0, layers, convert_plan, bound_of, check_of, 26, 25.0, None)
    assert found.chosen == 3 and found.drop == pytest.approx(25.0 - 26.0)
    assert [c["held_out_db"] for c in found.checks] == [20.0, 26.0] and found.checks[1]["target_db"] == pytest.approx(30.0)
    assert len(converted) == len(set(converted)) and "26 calibration samples" in found.measure
    assert checked == [20.0, 26.0]  # held-out samples measured for the two plans chosen, not for every plan converted


def test_sqnr_search_fails_with_one_line_when_no_plan_passes_the_check():
    path = [{"a": i} for i in range(4)]
    layers = [mixed.LayerOptions("a", nbytes={i: 100 - i for i in range(4)}, kl={i: 0.0 for i in range(4)})]

    def convert_plan(plan):
        return _placeholder(5.0, cosine=0.9)

    with pytest.raises(fgq_onnx.FgqError, match="no plan reaches 25.0 dB .*held out"):
        mixed._search_sqnr(path, 0, layers, convert_plan, lambda conversion: 30.0, lambda conversion: (conversion.report.fidelity, 5.0), 26, 25.0, None)


def test_sqnr_check_takes_the_lower_bound_over_the_held_out_samples():
    """The held-out check judges a plan as the search does, by the lower bound: on 6 samples one of which carries
    most of the noise, a plain SQNR above the budget is not enough (open_nsfw's 20 dB plan: 21.9 dB on 6 held-out
    views, one at 13 dB; 14 dB on 32 unseen photos)."""
    path = [{"a": i} for i in range(6)]
    layers = [mixed.LayerOptions("a", nbytes={i: 1000 - 100 * i for i in range(6)}, kl={i: 0.0 for i in range(6)})]
    signal = np.ones(6)
    even, uneven = np.full(6, 10**-2.6), np.array([10**-1.3, *[10**-5.0] * 5])  # 26 dB each; one at 13 dB, five at 50 dB: 20.8 dB in all
    sqnr = {id(noise): 10 * np.log10(signal.sum() / noise.sum()) for noise in (even, uneven)}
    assert sqnr[id(uneven)] > 20.0 > mixed.sqnr_lower_bound(signal, uneven) + 1.0  # 20.8 and 17.8 dB

    def noise_of(conversion):
        return even if conversion.report.fidelity.main.sqnr_db == sqnr[id(even)] else uneven

    found = mixed._search_sqnr(path, 0, layers, lambda plan: _placeholder(sqnr[id(even if plan["a"] < 3 else uneven)]),
                               lambda conversion: 40.0 if noise_of(conversion) is even else 21.0,  # plans 3-5: a 1 dB margin
                               lambda conversion: (conversion.report.fidelity, mixed.sqnr_lower_bound(signal, noise_of(conversion))),
                               26, 20.0, None)
    assert found.chosen == 2 and [c["plan_summary"] for c in found.checks] == ["N=5 x1", "N=2 x1"]
    assert found.checks[0]["held_out_db"] > 20.0 > found.checks[0]["held_out_bound_db"] + 1.0


def test_sqnr_search_never_returns_a_plan_after_one_that_missed_the_check():
    """Calibration bounds that do not fall along the path (a few samples decide them) would take the search back
    to the plan that missed the held-out check, with a target raised too little; it looks before that plan."""
    path = [{"a": i} for i in range(8)]
    layers = [mixed.LayerOptions("a", nbytes={i: 1000 - 100 * i for i in range(8)}, kl={i: 0.0 for i in range(8)})]
    calibration = [40.0, 38.0, 36.0, 34.0, 30.0, 26.0, 33.0, 10.0]  # plan 6: a lucky draw
    held_out = [35.0, 33.0, 31.0, 29.0, 24.0, 23.0, 17.0, 5.0]

    found = mixed._search_sqnr(path, 0, layers, lambda plan: _placeholder(held_out[plan["a"]]),
                               lambda conversion: calibration[held_out.index(conversion.report.fidelity.main.sqnr_db)],
                               lambda conversion: (conversion.report.fidelity, conversion.report.fidelity.main.sqnr_db), 26, 20.0, None)
    assert [c["plan_summary"] for c in found.checks] == ["N=6 x1", "N=5 x1"] and found.chosen == 5


def test_sensitivity_measures_the_first_float_output(kit):
    """MiniLM's first output is an Identity of the token ids: no layer changes it, so it cannot rank layers."""
    rng = np.random.default_rng(4)
    weights = {"w0": rng.normal(0, 0.3, (32, 16)).astype(np.float32)}
    model = make_model("g (float[N, 32] x, int64[N] ids) => (int64[N] copy, float[N, 16] y) { copy = Identity(ids) y = MatMul(x, w0) }", weights)
    feeds = [{"x": rng.normal(0, 1, (8, 32)).astype(np.float32), "ids": np.arange(8, dtype=np.int64)}]
    config = pipeline.ConvertConfig(n="auto", min_sqnr=20.0, **QUICK)
    (layer,) = mixed.sensitivity(model, feeds, config)
    assert all(layer.kl[n] > 0.01 for n in config.auto_ns)  # a Gaussian weight ternarized: ~10 dB of noise
    with pytest.raises(fgq_onnx.FgqError, match="no output 'nope'"):
        mixed.sensitivity(model, feeds, pipeline.ConvertConfig(n="auto", min_sqnr=20.0, fidelity_output="nope", **QUICK))


def test_min_sqnr_sensitivity_scales_one_measured_pass_by_weight_noise():
    """Under --min-sqnr only the largest N is run; the other N's noise ratios, scaled by the weight's error,
    stay within a factor 2 of measuring each N alone (0.84 to 1.5 here) (Gaussian layers, ReLUs between)."""
    rng = np.random.default_rng(9)
    weights = {f"w{i}": rng.normal(0, 1 / np.sqrt(fan_in), (fan_in, fan_out)).astype(np.float32) for i, (fan_in, fan_out) in enumerate(zip(WIDTHS, WIDTHS[1:]))}
    text = "g (float[N, 32] x) => (float[N, 10] y) { m0 = MatMul(x, w0) h0 = Relu(m0) m1 = MatMul(h0, w1) h1 = Relu(m1) m2 = MatMul(h1, w2) h2 = Relu(m2) y = MatMul(h2, w3) }"
    model = make_model(text, weights)
    feeds = [{"x": rng.normal(0, 1, (64, 32)).astype(np.float32)}]
    config = pipeline.ConvertConfig(n="auto", min_sqnr=20.0, **{**QUICK, "scale_format": "u8"})
    ns = (1, 4, 16, 64)
    estimated = {layer.label: layer.kl for layer in mixed.sensitivity(model, feeds, config, ns=ns)}
    for n in ns[:-1]:
        for layer in mixed.sensitivity(model, feeds, config, ns=(n,)):  # one N alone: measured
            assert 0.5 < estimated[layer.label][n] / layer.kl[n] < 2.0, (layer.label, n)


def test_plan_path_tries_float_activations_before_fp32():
    """Under --min-sqnr the last resorts run, from the all-8-bit start back: 8-bit weights under float
    activations one layer at a time (the same bytes), then fp32 (never every layer)."""
    def options(label, kl_8bit):
        return mixed.LayerOptions(label, {0: 4000, 1: 1040, 4: 520}, {0: 0.0, 1: kl_8bit, 4: 0.3})

    layers = [options("a", 0.01), options("b", 0.02)]
    for layer in layers:  # what sensitivity() adds when 8-bit weights are a choice
        layer.kl[mixed.FLOAT_ACT], layer.nbytes[mixed.FLOAT_ACT] = layer.kl[1], layer.nbytes[1]
    path, start = mixed.plan_path(layers)
    fa, keep = mixed.FLOAT_ACT, mixed.KEEP
    assert path[: start + 1] == [{"a": fa, "b": keep}, {"a": fa, "b": fa}, {"a": 1, "b": fa}, {"a": 1, "b": 1}]
    assert {mixed.plan_bytes(plan, layers) for plan in path[1 : start + 1]} == {2 * 1040}
    assert mixed.describe_plan(path[1]) == "8-bit float-act x2"
    config = mixed.plan_config(pipeline.ConvertConfig(n="auto", min_sqnr=20.0), {"a": fa, "b": 4, "c": keep})
    assert dict(config.layer_n) == {"a": 1, "b": 4, "c": 0} and config.float_activation_layers == ("a",) and config.min_sqnr is None


def test_float_activation_layers_keep_their_input_float(tiny):
    """A layer named in float_activation_layers gets its converted weight but no activation Q/DQ: in the custom
    format it stays a MatMul on a weight DequantizeLinear, and the model computes what its qdq form does."""
    folder, _, calib, _ = tiny
    settings = dict(n=4, layer_n={"mm1": 1}, float_activation_layers=("mm1",), calib=folder / "calib.npz")
    qdq, report = fgq_onnx.convert(folder / "mlp.onnx", format="qdq", **settings)
    custom, _ = fgq_onnx.convert(folder / "mlp.onnx", format="custom", **settings)
    nodes = {node.name: node for node in qdq.graph}
    assert nodes["mm1"].inputs[0].producer().op_type == "Relu"  # no QuantizeLinear -> DequantizeLinear in front
    assert nodes["mm1"].inputs[1].producer().op_type == "DequantizeLinear"  # the int8 weight
    assert nodes["mm2"].inputs[0].producer().op_type == "DequantizeLinear"  # the other layers' activations are quantized
    assert {node.name: node.op_type for node in custom.graph if node.name in LAYERS} == {
        "mm0": "TernaryMatMul", "mm1": "MatMul", "mm2": "TernaryMatMul", "mm3": "TernaryMatMul"}
    mm1 = next(node for node in custom.graph if node.name == "mm1")
    cast = mm1.inputs[1].producer().inputs[0].producer()  # int8 values -> Cast -> Mul by the channel scale: folded at load
    assert cast.op_type == "Cast" and cast.inputs[0].const_value.dtype == ir.DataType.INT8
    assert any("keep float activations" in note for note in report.notes)
    assert [r.node for r in report.layers if r.float_activations] == ["mm1"]
    _, custom_report = fgq_onnx.convert(folder / "mlp.onnx", format="custom", **settings)
    assert not any("stay in qdq form" in note for note in custom_report.notes)  # by design: not reported as a failed rewrite
    basic = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    np.testing.assert_allclose(run(custom, calib, basic), run(qdq, calib, basic), rtol=1e-5, atol=1e-5)


def test_float_activations_on_a_ternary_layer_keep_its_blocked_dequantize(tiny):
    """Only per-channel int8 weights become Cast * scale; a ternary layer at float activations keeps its
    blocked DequantizeLinear (INT2 codes), and the model still computes its qdq form."""
    folder, _, calib, _ = tiny
    settings = dict(n=4, float_activation_layers=("mm2",), calib=folder / "calib.npz")
    qdq, _ = fgq_onnx.convert(folder / "mlp.onnx", format="qdq", **settings)
    custom, _ = fgq_onnx.convert(folder / "mlp.onnx", format="custom", **settings)
    mm2 = next(node for node in custom.graph if node.name == "mm2")
    assert mm2.op_type == "MatMul" and mm2.inputs[1].producer().op_type == "DequantizeLinear"
    assert mm2.inputs[1].producer().attributes["block_size"].as_int() == 4
    basic = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    np.testing.assert_allclose(run(custom, calib, basic), run(qdq, calib, basic), rtol=1e-5, atol=1e-5)
