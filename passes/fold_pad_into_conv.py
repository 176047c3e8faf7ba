"""Fold a zero-constant Pad in front of Conv nodes into their pads.

Exporters (TensorFlow/TFLite conversions such as EfficientNet-Lite, Paddle)
often write an explicit Pad before a strided Conv instead of the Conv's own
pads. Left alone, the Pad is an extra pass over the activation, and the
activation quantization then sits after it, where the Conv cannot take over
the padding.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fgq_onnx.graph_utils import DEFAULT_DOMAINS, constant_array


def _attribute(node: ir.Node, name: str):
    attr = node.attributes.get(name)
    return None if attr is None else attr.value


def _pad_amounts(pad: ir.Node) -> np.ndarray | None:
    """The Pad's [begin..., end...] amounts over all of its input's axes, if constant, zero-valued and constant-mode."""
    mode = _attribute(pad, "mode") or "constant"
    if mode != "constant":
        return None
    if "pads" in pad.attributes:  # opset < 11: pads and value are attributes
        pads, value = np.asarray(_attribute(pad, "pads"), np.int64), _attribute(pad, "value") or 0.0
        if len(pad.inputs) != 1:
            return None
    else:
        if len(pad.inputs) < 2 or pad.inputs[1] is None:
            return None
        pads = constant_array(pad.inputs[1])
        value_input = pad.inputs[2] if len(pad.inputs) > 2 else None
        value = constant_array(value_input) if value_input is not None else np.zeros(())
        axes_input = pad.inputs[3] if len(pad.inputs) > 3 else None
        if pads is None or value is None or axes_input is not None:
            return None  # axes (opset 18) would need the input's rank: left alone
        pads = pads.astype(np.int64).reshape(-1)
    if np.size(value) != 1 or np.asarray(value).reshape(()) != 0 or pads.size % 2 or np.any(pads < 0):
        return None
    return pads


def _conv_pads(conv: ir.Node, spatial: int) -> list[int] | None:
    """The Conv's explicit pads (default zeros), or None when auto_pad or its pads do not fit."""
    auto_pad = _attribute(conv, "auto_pad")
    if auto_pad not in (None, "NOTSET"):
        return None
    pads = list(_attribute(conv, "pads") or [0] * (2 * spatial))
    return pads if len(pads) == 2 * spatial else None


class FoldPadIntoConvPass(ir.passes.InPlacePass):
    """Fold Pad -> Conv into the Conv's pads.

    Rewrites a default-domain Pad (mode constant, value 0 or absent, pads a
    constant initializer or, before opset 11, an attribute; no `axes` input),
    whose pads are non-negative and zero on the first two axes (batch and
    channels), and whose output feeds only Conv nodes (as their input X, with
    auto_pad NOTSET or absent) and is not a graph output: each Conv reads the
    Pad's input and adds the spatial amounts to its pads; the Pad is removed.
    Works in subgraphs too; requires nothing.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = 0
        for pad in list(model.graph.all_nodes()):
            if pad.op_type != "Pad" or pad.domain not in DEFAULT_DOMAINS or pad.outputs[0].is_graph_output():
                continue
            amounts = _pad_amounts(pad)
            uses = list(pad.outputs[0].uses())
            if amounts is None or not uses or amounts.size < 6:
                continue
            rank = amounts.size // 2
            begin, end = amounts[:rank], amounts[rank:]
            if begin[:2].any() or end[:2].any():
                continue  # batch or channel padding: not a Conv's
            convs = [use.node for use in uses]
            if any(c.op_type != "Conv" or c.domain not in DEFAULT_DOMAINS for c in convs) or any(u.idx for u in uses):
                continue  # a consumer that is not a Conv, or reads the Pad as its weight
            conv_pads = [_conv_pads(conv, rank - 2) for conv in convs]
            if any(pads is None for pads in conv_pads):
                continue
            added = [*begin[2:], *end[2:]]
            for conv, pads in zip(convs, conv_pads):
                pads = [int(p + a) for p, a in zip(pads, added)]
                conv.attributes["pads"] = ir.AttrInt64s("pads", pads)
                conv.replace_input_with(0, pad.inputs[0])
            pad.graph.remove(pad, safe=True)
            folded += 1
        return ir.passes.PassResult(model, modified=folded > 0)
