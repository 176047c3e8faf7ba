"""Store constant embedding tables read by Gather as int8 rows with one float32 scale per row.

A token or position embedding is a Gather along axis 0 of a constant 2-D
float table; in a small transformer it is most of the file (MiniLM-L3: a
30,522 x 384 table, 47 MB of the model's 69 MB). Each eligible Gather becomes

    Gather(int8 table, ids) -> Cast(float) -> Mul(Gather(row scales [rows, 1], ids))

standard ONNX ops whose cost grows with the ids read, not with the table (a
DequantizeLinear of the whole table would decode all of it on every run).
The scale of a row is max|row| / 127 and its codes round to nearest, so a
value moves by at most half its row's step; the output equals Gather on the
dequantized table exactly (one float32 multiply per value).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from fgq_onnx.graph_utils import DEFAULT_DOMAINS, add_initializer, constant_array, int_attr, unique_name

MIN_TABLE_VALUES = 4096  # smaller tables (a 2 x 384 token-type table) save too little to be worth three more nodes


@dataclass
class EmbeddingTable:
    """One constant table a Gather reads: stored as int8 (`converted`) or left float, and why."""

    table: str
    shape: tuple[int, ...]
    float_bytes: int
    int8_bytes: int = 0  # codes + row scales, when converted
    converted: bool = False
    reason: str = ""


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and float32 row scales [rows, 1] with codes * scales ~ table (symmetric, round to nearest)."""
    scales = (np.abs(table).max(axis=1, keepdims=True) / 127.0).astype(np.float32)
    divisor = np.where(scales > 0, scales, np.float32(1.0))  # an all-zero row: codes 0 under scale 0
    return np.clip(np.rint(table / divisor), -127, 127).astype(np.int8), scales


def _float_constant(value: ir.Value | None) -> bool:
    return constant_array(value) is not None and value.const_value.dtype.is_floating_point()


def _reads_rows(gather: ir.Node) -> bool:
    return int_attr(gather, "axis", 0) in (0, -2)  # of a 2-D table


def _skip_reason(gather: ir.Node, users: list[ir.Node]) -> str | None:
    table = gather.inputs[0]
    array = table.const_value.numpy()
    if table.const_value.dtype != ir.DataType.FLOAT:
        return f"the table is {table.const_value.dtype.name}, not float32"
    if array.ndim != 2:
        return f"the table has rank {array.ndim}, not 2"
    if not _reads_rows(gather):
        return "the Gather reads along axis 1, not rows"
    if array.size < MIN_TABLE_VALUES:
        return f"the table holds {array.size} values, fewer than {MIN_TABLE_VALUES}"
    if not np.isfinite(array).all():
        return "the table holds inf or NaN"
    others = sorted({node.op_type for node in users if node.op_type != "Gather" or node.domain not in DEFAULT_DOMAINS or not _reads_rows(node)})
    if others:
        return f"the table is also read by {', '.join(others)} (kept float for it, an int8 copy would add bytes)"
    return None


class QuantizeEmbeddingsPass(ir.passes.InPlacePass):
    """Rewrite each Gather of a constant 2-D float32 table along its rows to the int8 form above.

    Looks at Gathers of the main graph reading a constant float initializer
    (Gathers of shapes and other computed values are not tables). Rewrites those whose data input is a constant float32
    initializer of rank 2 with at least MIN_TABLE_VALUES values, read along
    axis 0 (or -2), finite, and read by nothing but such Gathers (a table
    shared by several Gathers is stored once). `records` lists each table
    seen, converted or not, with the reason.

    Requires: weights as initializers (lift Constant nodes first); opset >= 13.
    """

    def __init__(self):
        super().__init__()
        self.records: list[EmbeddingTable] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, stored = model.graph, {}
        gathers = [node for node in graph if node.op_type == "Gather" and node.domain in DEFAULT_DOMAINS and _float_constant(node.inputs[0])]
        for gather in gathers:
            table = gather.inputs[0]
            if table.name not in stored:
                stored[table.name] = self._store(graph, gather)
            if stored[table.name] is not None:
                self._rewrite(graph, gather, *stored[table.name])
        return ir.passes.PassResult(model, modified=any(r.converted for r in self.records))

    def _store(self, graph: ir.Graph, gather: ir.Node) -> tuple[ir.Value, ir.Value] | None:
        """The table's int8 codes and row scales as initializers (recorded), or None (recorded with the reason)."""
        table = gather.inputs[0]
        record = EmbeddingTable(table.name or "", tuple(table.const_value.shape.numpy()), table.const_value.nbytes)
        self.records.append(record)
        record.reason = _skip_reason(gather, [user for user, _ in table.uses()]) or ""
        if record.reason:
            return None
        codes, scales = quantize_rows(table.const_value.numpy())
        record.converted, record.int8_bytes = True, codes.nbytes + scales.nbytes
        return add_initializer(graph, f"{table.name}.int8", codes), add_initializer(graph, f"{table.name}.row_scales", scales)

    @staticmethod
    def _rewrite(graph: ir.Graph, gather: ir.Node, codes: ir.Value, scales: ir.Value) -> None:
        ids, label = gather.inputs[1], gather.name or gather.outputs[0].name
        rows = ir.node("Gather", [codes, ids], {"axis": 0}, name=f"{label}/gather_int8_rows")
        cast = ir.node("Cast", [rows.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{label}/to_float")
        row_scales = ir.node("Gather", [scales, ids], {"axis": 0}, name=f"{label}/gather_row_scales")
        scaled = ir.node("Mul", [cast.outputs[0], row_scales.outputs[0]], name=f"{label}/scale_rows")
        for node, suffix in ((rows, "int8_rows"), (cast, "rows_float"), (row_scales, "row_scales")):
            node.outputs[0].name = unique_name(graph, f"{gather.outputs[0].name}.{suffix}")
        ir.convenience.replace_nodes_and_values(graph, gather, [gather], [rows, cast, row_scales, scaled], [gather.outputs[0]], [scaled.outputs[0]])
