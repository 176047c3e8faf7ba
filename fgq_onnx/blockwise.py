"""Block-wise fitting (--method block): the layer that closes a residual branch, fitted to the block's output.

Layer-wise fitting (fgq_onnx/fitting.py) gives each layer the fp32 layer's
output as its target. In a residual block, z = y + skip (+ constants), the
block output z is what the rest of the model sees, and the converted skip
path carries the error of every block before it. The layer whose output y
joins the skip (a ResNet block's last Conv, a transformer layer's attention
output projection and second FFN MatMul) can absorb that error and what the
branch's earlier layers left: its target becomes

    t = z_fp - (skip_q + constants),     objective ||X^T s - t||^2,

the fp32 block output minus what the converted model adds to the layer's
output, with X the layer's inputs in the converted model (upstream layers
converted, fitted and corrected). This is the block output error itself (up
to the activation quantization of z). The fit starts from the layer-wise
solution and never accepts a step that raises the objective, so on the
calibration data the block output error is never above layer-wise fitting's.
Bias correction then matches the layer's per-channel mean and std to the
fp32 layer's, as with `fit` (measured on held-out inputs, better than
matching the target's mean: ResNet-50 31.9 against 30.5 dB, PP-OCRv4 rec
6.9 against 6.6 dB).

`residual_join` finds the block from the graph: the chain of Adds that the
layer's output runs through (each value used once) up to the last one, when
one of them adds a computed tensor (a skip path), not only a constant.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from fgq_onnx.graph_utils import DEFAULT_DOMAINS, constant_array


@dataclass(frozen=True)
class ResidualJoin:
    """Where a layer's output y joins a skip path: end = y + sum(others)."""

    end: ir.Value  # the block output, after the last Add of the chain
    others: tuple[ir.Value, ...]  # what the chain adds to y: the skip path and constants (biases)


def residual_join(node: ir.Node) -> ResidualJoin | None:
    """The chain of Adds from `node`'s first output to the block output, or None when it joins no skip path."""
    value, others = node.outputs[0], []
    while not value.is_graph_output():
        uses = list(value.uses())
        if len(uses) != 1:
            break
        user, index = uses[0].node, uses[0].idx
        if user.op_type != "Add" or user.domain not in DEFAULT_DOMAINS or len(user.inputs) != 2:
            break
        other = user.inputs[1 - index]
        if other is None or other is value or _widens(value.shape, user.outputs[0].shape):
            break  # the Add broadcasts the layer's output: no target for it
        others.append(other)
        value = user.outputs[0]
    if not any(other.const_value is None for other in others):
        return None
    return ResidualJoin(value, tuple(others))


def _widens(before: ir.Shape | None, after: ir.Shape | None) -> bool:
    """Whether an output of shape `after` is known to be wider than its input of shape `before`
    (checked again on the data: fgq_onnx/fitting.py PatchGram.output_shape)."""
    if before is None or after is None:
        return False
    return len(before) != len(after) or any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(before, after))


def depends_on(values: Iterable[ir.Value], nodes: set[int]) -> bool:
    """Whether any of `values` is computed from a node whose id is in `nodes`."""
    stack, seen = list(values), set()
    while stack:
        value = stack.pop()
        producer = value.producer()
        if producer is None or id(producer) in seen:
            continue
        if id(producer) in nodes:
            return True
        seen.add(id(producer))
        stack.extend(v for v in producer.inputs if v is not None)
    return False


def skip_terms(join: ResidualJoin, computed: dict[int, list[np.ndarray]], batch: int) -> np.ndarray | float:
    """What the converted model adds to the layer's output on one batch: the others, constants included."""
    total: np.ndarray | float = 0.0
    for other in join.others:
        constant = constant_array(other)
        total = total + (np.asarray(constant, np.float32) if constant is not None else computed[id(other)][batch])
    return total

