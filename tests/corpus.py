"""Small models shaped like what exporters write (see ../shared test-assets: the shapes real models take).

Each generator returns a Case: the fp32 model (an onnx.ModelProto, weights
inline unless the case is about external data), the calibration feeds it
takes, and feeds of other sizes it must still accept after conversion
(dynamic dims). Weights are random with a fixed seed; sizes are small so the
whole corpus converts in seconds.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CALIB = 16  # calibration samples per case
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # exporter-made models (make_fixtures.py)


@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    calib: dict[str, np.ndarray]  # input name -> [CALIB, ...] samples
    extra_feeds: list[dict[str, np.ndarray]] = field(default_factory=list)  # other shapes the output must still run
    subgraphs: bool = False  # ternarized layers inside If/Loop bodies


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _w(rng, *shape, fan_in=None) -> np.ndarray:
    fan_in = fan_in or int(np.prod(shape[1:])) or 1
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _model(nodes, inputs, outputs, inits: dict[str, np.ndarray], opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "corpus", inputs, outputs, [numpy_helper.from_array(a, k) for k, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fgq-corpus")
    model.ir_version = ir_version
    return model


def _input(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _images(seed: int, count: int, *shape: int) -> np.ndarray:
    return _rng(seed).uniform(0.0, 1.0, (count, *shape)).astype(np.float32)


def _cnn_body(rng, x: str, channels: int, prefix: str = "") -> tuple[list, dict, str]:
    """Conv3x3(c->8)+Relu -> Conv3x3(8->8)+Relu -> GlobalAveragePool -> Flatten -> Gemm(8->5): nodes, weights, output."""
    p = prefix
    inits = {f"{p}c1.w": _w(rng, 8, channels, 3, 3), f"{p}c1.b": np.zeros(8, np.float32),
             f"{p}c2.w": _w(rng, 8, 8, 3, 3), f"{p}c2.b": rng.normal(0, 0.1, 8).astype(np.float32),
             f"{p}fc.w": _w(rng, 5, 8, fan_in=8), f"{p}fc.b": np.zeros(5, np.float32)}
    nodes = [
        helper.make_node("Conv", [x, f"{p}c1.w", f"{p}c1.b"], [f"{p}c1"], name=f"{p}conv1", pads=[1] * 4),
        helper.make_node("Relu", [f"{p}c1"], [f"{p}r1"], name=f"{p}relu1"),
        helper.make_node("Conv", [f"{p}r1", f"{p}c2.w", f"{p}c2.b"], [f"{p}c2"], name=f"{p}conv2", pads=[1] * 4),
        helper.make_node("Relu", [f"{p}c2"], [f"{p}r2"], name=f"{p}relu2"),
        helper.make_node("GlobalAveragePool", [f"{p}r2"], [f"{p}gap"], name=f"{p}gap"),
        helper.make_node("Flatten", [f"{p}gap"], [f"{p}flat"], name=f"{p}flatten"),
        helper.make_node("Gemm", [f"{p}flat", f"{p}fc.w", f"{p}fc.b"], [f"{p}y"], name=f"{p}fc", transB=1),
    ]
    return nodes, inits, f"{p}y"


def small_cnn(opset: int = 17, ir_version: int = 8) -> Case:
    """The plain NCHW CNN of _cnn_body with dynamic batch and spatial dims."""
    rng = _rng(opset)
    nodes, inits, y = _cnn_body(rng, "x", 3)
    model = _model(nodes, [_input("x", ["batch", 3, "h", "w"])], [_input(y, ["batch", 5])], inits, opset, ir_version)
    return Case(f"opset{opset}", model, {"x": _images(1, CALIB, 3, 16, 16)}, [{"x": _images(9, 3, 3, 20, 24)}])


def constant_weights() -> Case:
    """Paddle style: every weight and bias a Constant node output, no initializers."""
    case = small_cnn()
    graph = case.model.graph
    constants = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in graph.initializer]
    del graph.initializer[:]
    nodes = [*constants, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    case.name = "constant_weights"
    return case


def if_and_loop() -> Case:
    """Conv in both branches of an If, and a Loop whose body applies a Conv twice (weights in the outer graph and in the body)."""
    rng = _rng(3)
    then_nodes, then_inits, then_y = _cnn_body(rng, "x", 3, "then_")
    else_nodes, else_inits, else_y = _cnn_body(rng, "x", 3, "else_")
    def branch(nodes, inits, y, name):
        return helper.make_graph(nodes, name, [], [_input(y, ["batch", 5])], [numpy_helper.from_array(a, k) for k, a in inits.items()])
    cond = helper.make_node("If", ["cond"], ["branch_y"], name="if", then_branch=branch(then_nodes, then_inits, then_y, "then"),
                            else_branch=branch(else_nodes, else_inits, else_y, "else"))
    body_w = _w(rng, 3, 3, 3, 3)
    body = helper.make_graph(
        [helper.make_node("Conv", ["state", "loop.w"], ["conv_out"], name="loop_conv", pads=[1] * 4),
         helper.make_node("Relu", ["conv_out"], ["state_out"], name="loop_relu"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond")],
        "body", [_input("i", [], TensorProto.INT64), _input("cond_in", [], TensorProto.BOOL), _input("state", None)],
        [_input("cond_out", [], TensorProto.BOOL), _input("state_out", None)],
        [numpy_helper.from_array(body_w, "loop.w")])
    loop = helper.make_node("Loop", ["trips", "", "x"], ["looped"], name="loop", body=body)
    stem, stem_inits, stem_y = _cnn_body(rng, "looped", 3, "main_")
    nodes = [cond, loop, *stem, helper.make_node("Add", ["branch_y", stem_y], ["y"], name="sum")]
    inits = {**stem_inits, "trips": np.array(2, np.int64)}
    model = _model(nodes, [_input("x", ["batch", 3, 16, 16]), _input("cond", [], TensorProto.BOOL)], [_input("y", ["batch", 5])], inits)
    # cond is a scalar, so the calibration file holds one complete feed per entry
    calib = {"x": _images(2, CALIB, 1, 3, 16, 16), "cond": np.arange(CALIB) % 2 == 0}
    return Case("if_loop", model, calib, [{"x": _images(9, 2, 3, 16, 16), "cond": np.array(False)}], subgraphs=True)


def nhwc_transposes() -> Case:
    """tf2onnx style: NHWC input, a Transpose to NCHW before every Conv and back after it."""
    rng = _rng(4)
    nodes, inits, x = [], {}, "x"
    for index, (cin, cout, group) in enumerate([(3, 8, 1), (8, 8, 8), (8, 16, 1)]):
        name = f"conv{index}"
        inits[f"{name}.w"] = _w(rng, cout, cin // group, 3, 3)
        inits[f"{name}.b"] = rng.normal(0, 0.1, cout).astype(np.float32)
        nodes += [
            helper.make_node("Transpose", [x], [f"{name}_nchw"], name=f"{name}_to_nchw", perm=[0, 3, 1, 2]),
            helper.make_node("Conv", [f"{name}_nchw", f"{name}.w", f"{name}.b"], [f"{name}_out"], name=name, pads=[1] * 4, group=group),
            helper.make_node("Transpose", [f"{name}_out"], [f"{name}_nhwc"], name=f"{name}_to_nhwc", perm=[0, 2, 3, 1]),
            helper.make_node("Relu", [f"{name}_nhwc"], [f"{name}_relu"], name=f"{name}_relu"),
        ]
        x = f"{name}_relu"
    inits["axes"] = np.array([1, 2], np.int64)
    inits["fc.w"] = _w(rng, 16, 5, fan_in=16)
    nodes += [helper.make_node("ReduceMean", [x, "axes"], ["pooled"], name="pool", keepdims=0),
              helper.make_node("MatMul", ["pooled", "fc.w"], ["y"], name="fc")]
    model = _model(nodes, [_input("x", ["batch", "h", "w", 3])], [_input("y", ["batch", 5])], inits, opset=18)
    return Case("nhwc_transposes", model, {"x": _images(5, CALIB, 16, 16, 3)}, [{"x": _images(9, 2, 12, 20, 3)}])


def depthwise_grouped() -> Case:
    """MobileNet-like: Conv -> depthwise 3x3 (group = C) -> grouped 1x1 (group = 4) -> pointwise."""
    rng = _rng(5)
    layers = [("stem", 3, 16, 1, 3), ("dw", 16, 16, 16, 3), ("grouped", 16, 32, 4, 1), ("pw", 32, 16, 1, 1)]
    nodes, inits, x = [], {}, "x"
    for name, cin, cout, group, k in layers:
        inits[f"{name}.w"] = _w(rng, cout, cin // group, k, k)
        nodes += [helper.make_node("Conv", [x, f"{name}.w"], [f"{name}_out"], name=name, group=group, pads=[k // 2] * 4),
                  helper.make_node("Relu", [f"{name}_out"], [f"{name}_relu"], name=f"{name}_relu")]
        x = f"{name}_relu"
    model = _model(nodes, [_input("x", ["batch", 3, 16, 16])], [_input(x, ["batch", 16, 16, 16])], inits)
    return Case("depthwise_grouped", model, {"x": _images(6, CALIB, 3, 16, 16)})


def attention(d: int = 32) -> Case:
    """One self-attention block: Q/K/V/out projections with constant weights; Q*K^T and P*V multiply two activations."""
    rng = _rng(6)
    inits = {f"{p}.w": _w(rng, d, d, fan_in=d) for p in ("q", "k", "v", "o")}
    inits["scale"] = np.array(1.0 / np.sqrt(d), np.float32)
    nodes = [helper.make_node("MatMul", ["x", f"{p}.w"], [p], name=f"{p}_proj") for p in ("q", "k", "v")]
    nodes += [
        helper.make_node("Transpose", ["k"], ["kt"], name="k_transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale_scores"),
        helper.make_node("Softmax", ["scaled"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["ctx"], name="pv"),
        helper.make_node("MatMul", ["ctx", "o.w"], ["y"], name="o_proj"),
    ]
    model = _model(nodes, [_input("x", ["batch", "seq", d])], [_input("y", ["batch", "seq", d])], inits)
    calib = {"x": _rng(7).standard_normal((CALIB, 10, d)).astype(np.float32)}
    return Case("attention", model, calib, [{"x": _rng(8).standard_normal((2, 7, d)).astype(np.float32)}])


def shared_weight() -> Case:
    """One initializer feeding two MatMuls (tied weights), plus a Conv weight used by two Convs."""
    rng = _rng(7)
    inits = {"tied.w": _w(rng, 24, 24, fan_in=24), "conv.w": _w(rng, 4, 4, 3, 3), "head.w": _w(rng, 24, 6, fan_in=24)}
    nodes = [
        helper.make_node("Conv", ["img", "conv.w"], ["c1"], name="conv_a", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu_a"),
        helper.make_node("Conv", ["r1", "conv.w"], ["c2"], name="conv_b", pads=[1] * 4),
        helper.make_node("MatMul", ["x", "tied.w"], ["m1"], name="mm_a"),
        helper.make_node("Relu", ["m1"], ["h1"], name="relu_b"),
        helper.make_node("MatMul", ["h1", "tied.w"], ["m2"], name="mm_b"),
        helper.make_node("MatMul", ["m2", "head.w"], ["y"], name="head"),
    ]
    model = _model(nodes, [_input("x", ["batch", 24]), _input("img", ["batch", 4, 8, 8])], [_input("y", ["batch", 6]), _input("c2", ["batch", 4, 8, 8])], inits)
    calib = {"x": _rng(8).standard_normal((CALIB, 24)).astype(np.float32), "img": _images(9, CALIB, 4, 8, 8)}
    return Case("shared_weight", model, calib)


def int8_weights(style: str, float_tail: bool = True) -> Case:
    """Already quantized: the first MatMul's weight is int8 codes through DequantizeLinear ("dq")
    or Cast -> Mul by a scale ("cast_mul"); with `float_tail` a second MatMul keeps a float weight."""
    rng = _rng(8)
    w = _w(rng, 32, 24, fan_in=32)
    scale = np.abs(w).max(axis=0) / 127
    codes = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    inits = {"w1.codes": codes, "w2": _w(rng, 24, 6, fan_in=24)}
    if style == "dq":
        inits.update({"w1.scale": scale.astype(np.float32), "w1.zero": np.zeros(24, np.int8)})
        decode = [helper.make_node("DequantizeLinear", ["w1.codes", "w1.scale", "w1.zero"], ["w1"], name="w1_dequantize", axis=1)]
    else:
        inits["w1.scale"] = scale.astype(np.float32)
        decode = [helper.make_node("Cast", ["w1.codes"], ["w1.float"], name="w1_cast", to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["w1.float", "w1.scale"], ["w1"], name="w1_scale")]
    nodes = [*decode, helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"), helper.make_node("Relu", ["m1"], ["r1"], name="relu1")]
    if float_tail:
        nodes.append(helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2"))
    else:
        del inits["w2"]
    y = _input("y", ["batch", 6]) if float_tail else _input("r1", ["batch", 24])
    model = _model(nodes, [_input("x", ["batch", 32])], [y], inits)
    return Case(f"int8_{style}", model, {"x": _rng(9).standard_normal((CALIB, 32)).astype(np.float32)})


def negative_dims() -> Case:
    """Paddle style: the batch and the image size declared as dim_value -1 (any size)."""
    case = small_cnn()
    for value in (*case.model.graph.input, *case.model.graph.output):
        for index, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param:
                dim.Clear()
                dim.dim_value = -1
    case.name = "negative_dims"
    return case


def ir3_initializers_as_inputs() -> Case:
    """IR 3 / opset 8: every initializer is also listed as a graph input (old exporters did this)."""
    case = small_cnn(opset=8, ir_version=3)
    graph = case.model.graph
    graph.input.extend(_input(t.name, list(t.dims)) for t in graph.initializer)
    case.name = "ir3_initializer_inputs"
    return case


def _torch_attention_class():
    import torch
    from torch import nn

    class TorchAttention(nn.Module):
        """A pre-norm transformer block written out (nn.TransformerEncoderLayer's traced MHA does not export here)."""

        def __init__(self, d: int, heads: int = 4):
            super().__init__()
            self.heads, self.norm1, self.norm2 = heads, nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            p = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            x = x + self.out((p @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.ff(self.norm2(x))

    return TorchAttention


def export_torch_module(kind: str, dynamo: bool = False) -> onnx.ModelProto:
    """A torch model exported live by torch.onnx.export (TorchScript, or dynamo: it needs onnxscript):
    "cnn" (Conv+BN, depthwise, Linear) or "attention" (a transformer block). Needs torch."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "cnn":
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 1, groups=4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        example, axes = torch.rand(2, 3, 16, 16), {"x": {0: "batch", 2: "h", 3: "w"}}
    else:
        net = _torch_attention_class()(32)
        example, axes = torch.randn(2, 6, 32), {"x": {0: "batch", 1: "seq"}}
    net.eval()
    if kind == "cnn":  # non-trivial BatchNorm statistics, as after training
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    if dynamo:
        with torch.no_grad():
            program = torch.onnx.export(net, (example,), input_names=["x"], output_names=["y"], dynamic_axes={**axes, "y": {0: "batch"}},
                                        dynamo=True, external_data=False)
        return program.model_proto
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(net, (example,), buffer, input_names=["x"], output_names=["y"], dynamic_axes={**axes, "y": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def torch_fixture_name(kind: str, dynamo: bool = False) -> str:
    return f"torch_dynamo_{kind}" if dynamo else f"torch_{kind}"


def torch_module(kind: str, dynamo: bool = False) -> Case:
    """export_torch_module's model as committed in tests/fixtures/ (made by tests/fixtures/make_fixtures.py),
    so that the corpus runs without torch; tests/test_fixtures.py checks them against a live export."""
    name = torch_fixture_name(kind, dynamo)
    model = onnx.load(str(FIXTURES / f"{name}.onnx"))
    if kind == "cnn":
        calib = {"x": _images(10, CALIB, 3, 16, 16)}
        extra = [{"x": _images(11, 3, 3, 20, 12)}]
    else:
        calib = {"x": _rng(12).standard_normal((CALIB, 6, 32)).astype(np.float32)}
        extra = [{"x": _rng(13).standard_normal((3, 9, 32)).astype(np.float32)}]
    return Case(name, model, calib, extra)


TORCH_FIXTURES = {torch_fixture_name(kind, dynamo): (kind, dynamo) for dynamo in (False, True) for kind in ("cnn", "attention")}


CASES: dict[str, Callable[[], Case]] = {
    "constant_weights": constant_weights,
    "if_loop": if_and_loop,
    "nhwc_transposes": nhwc_transposes,
    "depthwise_grouped": depthwise_grouped,
    "attention": attention,
    "shared_weight": shared_weight,
    "int8_dq": lambda: int8_weights("dq"),
    "int8_cast_mul": lambda: int8_weights("cast_mul"),
    "ir3_initializer_inputs": ir3_initializers_as_inputs,
    "dynamic_dims": small_cnn,
    "negative_dims": negative_dims,
    "torch_cnn": lambda: torch_module("cnn"),
    "torch_attention": lambda: torch_module("attention"),
    "torch_dynamo_cnn": lambda: torch_module("cnn", dynamo=True),
    "torch_dynamo_attention": lambda: torch_module("attention", dynamo=True),
}
OPSETS = range(11, 26)
