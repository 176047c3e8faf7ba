"""Ternarize the constant weights of Conv, Gemm and MatMul in groups of N.

The float weight is replaced by 2-bit codes and one scale per group of N
weights along the reduction axis, decoded by a blocked DequantizeLinear, so
the model stays a standard ONNX model (docs/packed-format.md, "Groups").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from fgq_onnx import already_ternary
from fgq_onnx.graph_utils import DEFAULT_DOMAINS, add_initializer, constant_array, int_attr, unique_name
from fgq_onnx.passes.dequantize_weights import DEQUANTIZED_MARK
from fgq_onnx.report import LayerRecord
from fgq_onnx.scales import SCALE_FORMATS, StoredScales, row_axis, store_scales
from fgq_onnx.ternary import GroupLayout, Method, TernaryWeight, ternarize

LINEAR_OPS = ("Conv", "Gemm", "MatMul")
MAX_ROW_GROUP = 65536  # largest N the custom ops take: per-row trained scales get one group a row up to this
TERNARY_MARK = "fgq.ternary"  # node metadata key: the node's weight is ternary
EXACT_MARK = "fgq.already_ternary"  # node metadata key: its weight was ternary already and is kept exactly
TRAINED_SHARE = 0.5  # a model whose already-ternary weights are more than this share of all was trained ternary
# Opset that introduced what the output needs: INT2 (25) or blocked DequantizeLinear (21).
REQUIRED_OPSET = {"int2": 25, "int8": 21}
_STORAGE_DTYPE = {"int2": ir.DataType.INT2.numpy(), "int8": np.int8}


def weight_layout(node: ir.Node, shape: tuple[int, ...], n: int) -> tuple[GroupLayout, str]:
    """Where the groups of `node`'s weight run, and a phrase saying so."""
    if node.op_type == "Conv":
        if shape[1] >= n:
            return GroupLayout(shape, axis=1, n=n), "input channels"
        return GroupLayout(shape, axis=1, n=n, flatten=True), "whole filter (C/group < N)"
    if node.op_type == "Gemm" and int_attr(node, "transB", 0):
        return GroupLayout(shape, axis=1, n=n), "inputs"
    return GroupLayout(shape, axis=0, n=n), "inputs"


def narrow_conv_group_size(node: ir.Node, weight: np.ndarray, n: int, method: Method) -> tuple[int, str]:
    """The group size for `node`'s weight, with a note when a narrow Conv gets channel groups instead of N.

    A Conv with fewer input channels per group than N (a 1- or 3-channel stem,
    a depthwise layer) can take groups of N along the whole flattened filter,
    or groups of its C/group channels at each kernel tap (C/group = 1: one
    scale per weight, which u8 scales make an 8-bit weight). It gets the one
    whose ternary weight has the higher SQNR (ties: whole-filter groups, the
    smaller); on the Fashion-MNIST ResNet's 1-channel stem whole-filter groups
    of 4 alone cost 14 points of top-1.
    """
    channels = weight.shape[1] if node.op_type == "Conv" and weight.ndim >= 3 else n
    if channels >= n:
        return n, ""
    whole = ternarize(weight, weight_layout(node, weight.shape, n)[0], method).sqnr_db(weight)
    per_tap = ternarize(weight, weight_layout(node, weight.shape, channels)[0], method).sqnr_db(weight)
    if per_tap <= whole:
        return n, ""
    return channels, f"groups of its {channels} input channel(s) per kernel tap, not of N={n} along the filter: weight SQNR {_db(per_tap)} vs {_db(whole)}"


def _db(value: float) -> str:
    return f"{value:.1f} dB" if np.isfinite(value) else "exact"


def structural_skip_reason(node: ir.Node) -> str | None:
    """Why a linear node's weight cannot be ternarized, or None if it can."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "no weight input"
    weight = node.inputs[1]
    if constant_array(weight) is None:
        if node.op_type == "MatMul" and constant_array(node.inputs[0]) is not None:
            return "constant first input (weight on the left) is not supported"
        decoder = _quantized_weight_decoder(weight)
        if decoder:
            return f"weight is already quantized ({decoder}): left as it is"
        return "activation x activation: no constant weight"
    dtype = weight.const_value.dtype
    if not dtype.is_floating_point():
        return f"weight is {dtype.name}, already quantized"
    rank = len(weight.const_value.shape)
    if node.op_type == "Conv" and rank < 3:
        return f"Conv weight of rank {rank}"
    if node.op_type in ("Gemm", "MatMul") and rank != 2:
        return f"{node.op_type} weight of rank {rank} (only 2-D weights are ternarized)"
    if weight.const_value.size == 0:
        return "empty weight"
    return None


def _quantized_weight_decoder(weight: ir.Value) -> str | None:
    """How a weight computed from constant integer codes is decoded (DequantizeLinear, Cast*Mul), or None."""
    producer = weight.producer()
    if producer is None:
        return None
    if producer.op_type == "DequantizeLinear" and constant_array(producer.inputs[0]) is not None:
        return f"{producer.inputs[0].const_value.dtype.name} codes through DequantizeLinear"
    if producer.op_type == "Mul":
        casts = [v.producer() for v in producer.inputs if v is not None and v.producer() is not None and v.producer().op_type == "Cast"]
        codes = [c.inputs[0] for c in casts if constant_array(c.inputs[0]) is not None]
        if codes and not codes[0].const_value.dtype.is_floating_point():
            return f"{codes[0].const_value.dtype.name} codes through Cast and Mul"
    return None


def macs_per_sample(node: ir.Node, params: int) -> int:
    """Multiply-accumulates for one sample: weight size times output positions."""
    if node.op_type != "Conv":
        return params  # one token / one row of the batch
    shape = node.outputs[0].shape
    if shape is None or len(shape) < 3 or not all(isinstance(d, int) for d in shape[2:]):
        return params  # unknown spatial size: count each weight once
    return params * int(np.prod(list(shape[2:])))


def is_int8(layout: GroupLayout, scales: list[StoredScales]) -> bool:
    """Whether a ternary weight is stored as int8 weights: groups of one under one set of uint8 scale codes.

    Then every decoded weight is row_scale[m] * q * t with t * q in [-127, 127]:
    a symmetric per-channel int8 weight (8 bits a weight, not a 2-bit code and a
    uint8 code). Asymmetric weights (two sets of scales) keep the ternary form.
    """
    return layout.n == 1 and not layout.flatten and len(scales) == 1 and scales[0].format == "u8"


def int8_values(ternary: TernaryWeight, stored: StoredScales) -> np.ndarray:
    """The int8 weight t * q of an is_int8 weight, in the weight's own shape."""
    layout = ternary.layout
    return layout.ungroup(ternary.codes.astype(np.int16) * stored.values.astype(np.int16)[..., None]).astype(np.int8)


def dequantize_nodes(node: ir.Node, weight: ir.Value, ternary: TernaryWeight, storage: str, scales: list[StoredScales]) -> tuple[list[ir.Node], ir.Value]:
    """Nodes that rebuild the float weight from its codes and stored scales; returns them and their output.

    int8 weights (is_int8): one per-channel DequantizeLinear(int8 weight, float32
    row_scale [M], int8 zero point [M] of zeros, axis = the output-row axis), the
    standard form onnxruntime fuses into its int8 kernels (then `storage` does
    not apply). Otherwise:

    `scales` holds the stored group scales (two for the asymmetric method: + then -).
    f32: the scales are an initializer (in the weight's dtype). f16: a float16
    initializer; the weight DequantizeLinear then yields float16 and a Cast
    brings it to the weight's dtype. u8: a per-row DequantizeLinear(uint8
    codes, float32 row_scale, axis = the output-row axis) computes the float32
    group scales that the weight DequantizeLinear takes as x_scale.
    """
    graph = node.graph
    label = node.name or node.outputs[0].name  # node names must be unique; exporters may leave them empty
    layout = ternary.layout
    dtype = weight.const_value.dtype.numpy()
    if is_int8(layout, scales):
        return _int8_nodes(node, weight, ternary, scales[0], label)
    codes = layout.ungroup(ternary.codes).reshape(layout.work_shape)
    base = weight.name
    codes_value = add_initializer(graph, f"{base}.ternary_codes", ir.tensor(codes.astype(_STORAGE_DTYPE[storage])))
    attrs = {"axis": layout.axis, "block_size": layout.n}
    nodes: list[ir.Node] = []
    scale_format = scales[0].format
    out_dtype = {"f16": np.dtype(np.float16), "u8": np.dtype(np.float32)}.get(scale_format, np.dtype(dtype))

    def group_scales(stored: StoredScales, suffix: str) -> ir.Value:
        if stored.format != "u8":
            array = stored.values if stored.format == "f16" else stored.values.astype(dtype)
            return add_initializer(graph, f"{base}.group_scales{suffix}", layout.scales_to_tensor(array))
        q = add_initializer(graph, f"{base}.group_scale_codes{suffix}", layout.scales_to_tensor(stored.values))
        row_scale = add_initializer(graph, f"{base}.row_scale{suffix}", stored.row_scale)
        return add("DequantizeLinear", [q, row_scale], {"axis": row_axis(layout)}, f"dequantize_scales{suffix}", f"group_scales{suffix}")

    def add(op: str, inputs: list[ir.Value], attributes: dict, name: str, output: str) -> ir.Value:
        nodes.append(ir.node(op, inputs, attributes, name=f"{label}/{name}"))
        nodes[-1].outputs[0].name = unique_name(graph, f"{base}.{output}")  # readable; the last one is renamed below
        return nodes[-1].outputs[0]

    def dequantize(stored: StoredScales, suffix: str) -> ir.Value:
        return add("DequantizeLinear", [codes_value, group_scales(stored, suffix)], attrs, f"dequantize_weight{suffix}", f"dequantized{suffix}")

    if len(scales) == 1:
        dequantize(scales[0], "")
    else:
        # {-a_neg, 0, +a_pos} is not one affine map: max(t * a_pos, 0) + min(t * a_neg, 0).
        zero = add_initializer(graph, f"{base}.zero", np.zeros((), out_dtype))
        positive, negative = dequantize(scales[0], "_pos"), dequantize(scales[1], "_neg")
        upper = add("Max", [positive, zero], {}, "positive_weights", "positive")
        lower = add("Min", [negative, zero], {}, "negative_weights", "negative")
        add("Add", [upper, lower], {}, "ternary_weight", "signed")
    if out_dtype != np.dtype(dtype):
        add("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.from_numpy(np.dtype(dtype))}, "cast_weight", "cast")
    if layout.flatten:
        shape = add_initializer(graph, f"{base}.shape", np.array(layout.shape, np.int64))
        add("Reshape", [nodes[-1].outputs[0], shape], {}, "reshape_weight", "unflattened")
    output = nodes[-1].outputs[0]
    output.name = f"{base}.ternary"
    return nodes, output


def _int8_nodes(node: ir.Node, weight: ir.Value, ternary: TernaryWeight, stored: StoredScales, label: str) -> tuple[list[ir.Node], ir.Value]:
    graph, base = node.graph, weight.name
    values = add_initializer(graph, f"{base}.int8", int8_values(ternary, stored))
    row_scale = add_initializer(graph, f"{base}.row_scale", stored.row_scale)
    # An explicit zero point: onnxruntime's exact x64 int8 path (evaluate.X64_QUANT_PRECISION) fails without one.
    zero = add_initializer(graph, f"{base}.zero_point", np.zeros(stored.row_scale.shape, np.int8))
    nodes = [ir.node("DequantizeLinear", [values, row_scale, zero], {"axis": row_axis(ternary.layout)}, name=f"{label}/dequantize_weight")]
    dtype = weight.const_value.dtype.numpy()
    if dtype != np.float32:
        nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.from_numpy(dtype)}, name=f"{label}/cast_weight"))
        nodes[0].outputs[0].name = unique_name(graph, f"{base}.dequantized")
    nodes[-1].outputs[0].name = f"{base}.int8_weight"
    return nodes, nodes[-1].outputs[0]


class TernarizeWeightsPass(ir.passes.InPlacePass):
    """Replace each constant Conv/Gemm/MatMul weight by ternary codes and group scales.

    Rewrites the weight input of every Conv, Gemm and MatMul (in subgraphs too)
    whose weight is a constant float initializer into
    DequantizeLinear(codes, scales, axis, block_size=N), codes stored as INT2
    (opset 25) or int8 (opset 21), scales as `scale_format` ("f32", "f16" or
    "u8", see dequantize_nodes and fgq_onnx.scales). `n` is one group size,
    or a function node -> N for mixed group sizes. A weight shared by several
    nodes is ternarized once per N. MatMuls of two activations are left alone. Each rewritten
    node gets the metadata key "fgq.ternary". `records` lists every linear node
    seen, converted or not, with the reason.

    A weight that is already ternary at N (fgq_onnx/already_ternary.py) keeps
    its own codes and scales (method "already_ternary", metadata key
    "fgq.already_ternary"). When they hold most of the weights (TRAINED_SHARE),
    the model was trained ternary and the float layers it has (its first and
    last, as in TTQ) stay float too, unless `trained_float_stays_float` is False.

    A Conv with fewer input channels per group than N gets the grouping of
    narrow_conv_group_size; with `narrow_conv_groups` False, always groups
    of N along its whole filter.

    `importance` (node -> an array broadcastable to its weight, or None) weighs
    each weight's error in the exact solver (fgq_onnx.ternary.solve_weighted):
    the mean square of the input it multiplies makes it the layer's output error.

    Requires: the default-domain opset the storage needs; weights as
    initializers (lift Constant nodes first).
    """

    def __init__(self, n: int | Callable[[ir.Node], int], method: Method = Method.EXACT, storage: str = "int2", skip: Callable[[ir.Node], str | None] | None = None, scale_format: str = "f32", trained_float_stays_float: bool = True, narrow_conv_groups: bool = True, importance: Callable[[ir.Node], np.ndarray | None] | None = None):
        super().__init__()
        if not callable(n) and n < 1:
            raise ValueError(f"group size N must be at least 1, got {n}")
        if storage not in REQUIRED_OPSET:
            raise ValueError(f"weight storage must be one of {sorted(REQUIRED_OPSET)}, got {storage!r}")
        if scale_format not in SCALE_FORMATS:
            raise ValueError(f"scale format must be one of {', '.join(SCALE_FORMATS)}, got {scale_format!r}")
        self.n_of = n if callable(n) else (lambda node: n)  # per-node N (mixed group sizes) or one N
        self.method, self.storage, self.scale_format = Method(method), storage, scale_format
        self.skip = skip or (lambda node: None)
        self.trained_float_stays_float = trained_float_stays_float
        self.narrow_conv_groups = narrow_conv_groups
        self.importance = importance or (lambda node: None)
        self.exact: dict[tuple[int, int, int], already_ternary.AlreadyTernary] = {}
        self.trained_ternary = False  # most of the weights are already ternary
        self.records: list[LayerRecord] = []

    def requires(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", 1)
        if opset < REQUIRED_OPSET[self.storage]:
            raise ir.passes.PreconditionError(f"{self.storage} weight storage needs opset {REQUIRED_OPSET[self.storage]}, model has {opset}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.records = []
        done: dict[tuple[int, int, int], tuple[ir.Value, LayerRecord]] = {}
        self.exact = self._detect(model)
        for node in list(model.graph.all_nodes()):
            if node.op_type not in LINEAR_OPS or node.domain not in DEFAULT_DOMAINS:
                continue
            record = LayerRecord(node=node.name or node.outputs[0].name, op_type=node.op_type)
            self.records.append(record)
            reason = structural_skip_reason(node) or self.skip(node) or self._float_in_trained(node)
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if weight is not None and weight.const_value is not None:
                record.weight, record.shape = weight.name, tuple(weight.const_value.shape)
                record.params = weight.const_value.size
                record.macs = macs_per_sample(node, record.params)
            if reason:
                record.reason = reason
                continue
            n = self.n_of(node)
            if n < 1:
                raise ValueError(f"group size N must be at least 1, got {n} for {record.node}")
            key = (id(node.graph), id(weight), n)
            if key not in done:
                done[key] = self._ternarize(node, weight, record, n)
            replacement, first = done[key]
            node.replace_input_with(1, replacement)
            node.metadata_props[TERNARY_MARK] = f"n={first.n} method={first.method} scales={self.scale_format}"
            if first.already_ternary:
                node.metadata_props[EXACT_MARK] = first.already_ternary
            if first is not record:
                _copy_result(first, record, note=f"shares its weight with {first.node}")
            _drop_if_unused(node.graph, weight)
        return ir.passes.PassResult(model, modified=bool(done))

    def _ternarize(self, node: ir.Node, weight: ir.Value, record: LayerRecord, n: int) -> tuple[ir.Value, LayerRecord]:
        array = np.asarray(weight.const_value.numpy(), dtype=np.float32)  # no copy of a (memory-mapped) float32 weight
        exact = self.exact.get((id(node.graph), id(weight), n))
        n = exact.weight.layout.n if exact is not None else n  # one group a row where the trained scales allow
        narrow_note = ""
        if exact is None and self.narrow_conv_groups:
            n, narrow_note = narrow_conv_group_size(node, array, n, self.method)
        layout, grouping = weight_layout(node, array.shape, n)
        if exact is not None:  # keep the trained codes and scales: fitting again could only lose
            ternary = exact.weight
            stored, storage_note = already_ternary.store_exact(ternary, self.scale_format)
        else:
            ternary = ternarize(array, layout, self.method, self.importance(node))
            stored = [store_scales(s, layout, self.scale_format) for s in (ternary.scale, ternary.neg_scale) if s is not None]
        nodes, output = dequantize_nodes(node, weight, ternary, self.storage, stored)
        node.graph.insert_before(node, nodes)
        short = layout.length % n
        record.converted, record.n, record.method, record.grouping = True, n, "already_ternary" if exact else self.method.value, grouping
        record.groups = int(ternary.scale.size)
        record.short_group = short
        dtype = weight.const_value.dtype.numpy()  # f32 scales are stored in the weight's own float type
        if is_int8(layout, stored):  # 8 bits a weight and a float32 scale a row
            record.grouping, record.code_bytes, record.scale_bytes = "int8 per channel", array.size, stored[0].row_scale.nbytes
        else:
            record.code_bytes = -(-array.size * (2 if self.storage == "int2" else 8) // 8)
            record.scale_bytes = sum(s.values.size * dtype.itemsize if s.format == "f32" else s.nbytes for s in stored)
        record.sqnr_db = TernaryWeight(layout, ternary.codes, *(s.decoded for s in stored)).sqnr_db(array, dtype)  # exactly what the graph computes
        record.source = weight.metadata_props.get(DEQUANTIZED_MARK, "")
        notes = [f"from {record.source}" if record.source else "", narrow_note]
        if exact is not None:
            record.already_ternary = f"exact ({exact.describe()})"
            notes += [f"already ternary: {record.already_ternary}", storage_note]
        if short:
            notes.append(f"reduction {layout.length} is not a multiple of N: last group has {short}")
        record.reason = "; ".join(note for note in notes if note)
        return output, record

    def _detect(self, model: ir.Model) -> dict[tuple[int, int, int], already_ternary.AlreadyTernary]:
        """The weights this pass would ternarize that are already ternary at this N, keyed like `done` in call."""
        found, self.trained_ternary, candidates = {}, False, {}
        for node in model.graph.all_nodes():
            if node.op_type not in LINEAR_OPS or node.domain not in DEFAULT_DOMAINS or structural_skip_reason(node) or self.skip(node):
                continue
            tensor = node.inputs[1].const_value
            n = self.n_of(node)
            if n == 1:  # in groups of one every weight is "ternary": nothing to detect
                continue
            key = (id(node.graph), id(node.inputs[1]), n)
            candidates[key] = tensor.size
            array = np.asarray(tensor.numpy(), dtype=np.float32)
            detected = already_ternary.detect(array, weight_layout(node, array.shape, n)[0])
            row = _row_length(node, array.shape)
            if detected is not None and detected.granularity != "per group" and n < row <= MAX_ROW_GROUP:
                detected = already_ternary.detect(array, weight_layout(node, array.shape, row)[0])  # same values, one scale a row
            if detected is not None:
                found[key] = detected
            del array
            if isinstance(tensor, ir.ExternalTensor):  # maps again when ternarized: keep large models a layer at a time
                with contextlib.suppress(BufferError):
                    tensor.release()
        # Trained ternary when most weights are: one fixed 0/1 or constant-valued layer of a float model is not.
        self.trained_ternary = sum(candidates[key] for key in found) > TRAINED_SHARE * sum(candidates.values())
        return found

    def _float_in_trained(self, node: ir.Node) -> str | None:
        """Why a float layer stays float in a model whose other layers are already ternary."""
        if self.trained_float_stays_float and self.trained_ternary and (id(node.graph), id(node.inputs[1]), self.n_of(node)) not in self.exact:
            return "float layer of a trained-ternary model (its other layers are already ternary): kept float"
        return None


def _row_length(node: ir.Node, shape: tuple[int, ...]) -> int:
    """The reduction length of one output row: an N that makes one group per row."""
    if node.op_type == "Conv":
        return int(np.prod(shape[1:]))
    return shape[1] if node.op_type == "Gemm" and int_attr(node, "transB", 0) else shape[0]


def _drop_if_unused(graph: ir.Graph, weight: ir.Value) -> None:
    """Forget the float weight once nothing reads it: subgraphs keep no dead copy, and a memory-mapped
    external weight is unmapped (it maps again if read later), so large models convert a layer at a time."""
    if weight.uses() or weight.is_graph_output() or graph.initializers.get(weight.name) is not weight:
        return
    graph.initializers.pop(weight.name)
    if isinstance(weight.const_value, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # an array still viewing the map keeps it
            weight.const_value.release()


def _copy_result(source: LayerRecord, target: LayerRecord, note: str) -> None:
    for name in ("converted", "n", "method", "grouping", "groups", "short_group", "sqnr_db", "code_bytes", "scale_bytes", "already_ternary", "source"):
        setattr(target, name, getattr(source, name))
    target.reason = note
