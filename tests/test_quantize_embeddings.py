"""QuantizeEmbeddingsPass: constant tables read by Gather become int8 rows with a float32 scale per row."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import fgq_onnx
from fgq_onnx.passes.quantize_embeddings import MIN_TABLE_VALUES, QuantizeEmbeddingsPass, quantize_rows
from ir_models import make_model, run

RNG = np.random.default_rng(11)
ROWS, WIDTH = 300, 40  # 12,000 values: above MIN_TABLE_VALUES


def _table(rows=ROWS, width=WIDTH) -> np.ndarray:
    table = RNG.normal(size=(rows, width)).astype(np.float32) * RNG.uniform(0.01, 10, (rows, 1)).astype(np.float32)
    table[3] = 0.0  # an all-zero row
    table[5] = 0.0
    table[5, 7] = -1e-30  # a tiny row: its scale stays a normal float32
    return table


def _gather_model(table: np.ndarray, text: str | None = None):
    text = text or "g (int64[2, 7] ids) => (float[2, 7, 40] y) { y = Gather(t, ids) }"
    return make_model(text, {"t": table})


def _ids(rows=ROWS) -> np.ndarray:
    ids = RNG.integers(0, rows, (2, 7)).astype(np.int64)
    ids[0, :3] = [3, 5, rows - 1]
    return ids


def test_dequantization_is_exact_and_within_half_a_step():
    table, ids = _table(), _ids()
    model = _gather_model(table)
    embeddings = QuantizeEmbeddingsPass()
    assert embeddings(model).modified
    got = run(model, {"ids": ids})[0]
    codes, scales = quantize_rows(table)
    np.testing.assert_array_equal(got, (codes.astype(np.float32) * scales)[ids])  # bit-exact: one multiply per value
    assert np.all(np.abs(got - table[ids]) <= scales[ids] / 2 * (1 + 1e-6))
    assert np.all(got[0, 0] == 0.0) and abs(got[0, 1, 7] - table[5, 7]) < 1e-6 * 1e-30
    assert codes.dtype == np.int8 and np.abs(codes).max() == 127 and scales.shape == (ROWS, 1)
    (record,) = embeddings.records
    assert record.converted and record.int8_bytes == ROWS * WIDTH + 4 * ROWS and record.float_bytes == 4 * ROWS * WIDTH
    assert "t" not in {v.name for n in model.graph for v in n.inputs if v is not None}  # the float table is no longer read


def test_shared_table_is_stored_once_and_negative_axis_and_int32_ids_work():
    text = "g (int32[2, 7] ids, int64[3] pos) => (float y, float z) { y = Gather <axis: int = -2> (t, ids)\n z = Gather(t, pos) }"
    table = _table()
    model = _gather_model(table, text)
    embeddings = QuantizeEmbeddingsPass()
    embeddings(model)
    ids, pos = _ids().astype(np.int32), np.array([0, 3, ROWS - 1], np.int64)
    y, z = run(model, {"ids": ids, "pos": pos})
    codes, scales = quantize_rows(table)
    np.testing.assert_array_equal(y, (codes.astype(np.float32) * scales)[ids])
    np.testing.assert_array_equal(z, (codes.astype(np.float32) * scales)[pos])
    assert len(embeddings.records) == 1 and sum(name.endswith(".int8") for name in model.graph.initializers) == 1


@pytest.mark.parametrize("table, text, reason", [
    (RNG.normal(size=(ROWS, 4, 10)).astype(np.float32), None, "rank 3"),
    (RNG.normal(size=(8, 8)).astype(np.float32), None, f"fewer than {MIN_TABLE_VALUES}"),
    (RNG.normal(size=(ROWS, WIDTH)).astype(np.float16), None, "FLOAT16"),
    (np.full((ROWS, WIDTH), np.inf, np.float32), None, "inf or NaN"),
    (RNG.normal(size=(ROWS, WIDTH)).astype(np.float32), "g (int64[2, 7] ids) => (float y) { y = Gather <axis: int = 1> (t, ids) }", "axis 1"),
    (RNG.normal(size=(ROWS, WIDTH)).astype(np.float32), "g (int64[2, 7] ids, float[3, 300] x) => (float y, float z) { y = Gather(t, ids)\n z = MatMul(x, t) }", "also read by MatMul"),
])
def test_leaves_tables_it_cannot_store(table, text, reason):
    model = _gather_model(table, text)
    embeddings = QuantizeEmbeddingsPass()
    assert not embeddings(model).modified
    (record,) = embeddings.records
    assert not record.converted and reason in record.reason
    assert [n.op_type for n in model.graph] == (["Gather", "MatMul"] if "MatMul" in reason else ["Gather"])


def test_gathers_of_computed_values_are_not_tables():
    text = "g (float[4, 3] x, int64[2] ids) => (float y, int64 s) { y = Gather(x, ids)\n shape = Shape(x)\n s = Gather(shape, zero) }"
    model = make_model(text, {"zero": np.array(0, np.int64)})
    embeddings = QuantizeEmbeddingsPass()
    assert not embeddings(model).modified and embeddings.records == []


def test_conversion_stores_tables_int8_unless_float_embeddings(tmp_path):
    """A token embedding feeding a MatMul: int8 rows by default (the report says so), float32 with float_embeddings."""
    text = "g (int64[batch, 6] ids) => (float[batch, 6, 16] y) { e = Gather(t, ids)\n y = MatMul(e, w) }"
    table, weight = _table(), RNG.normal(size=(WIDTH, 16)).astype(np.float32)
    source = tmp_path / "embed.onnx"
    ir.save(make_model(text, {"t": table, "w": weight}, opset=21), source)
    calib = tmp_path / "ids.npz"
    np.savez(calib, ids=RNG.integers(0, ROWS, (20, 6)).astype(np.int64))
    stored = fgq_onnx.convert(str(source), calib=str(calib))
    kept = fgq_onnx.convert(str(source), calib=str(calib), float_embeddings=True)
    types = {init.const_value.dtype for init in stored.model.graph.initializers.values()}
    assert ir.DataType.INT8 in types and "t" not in stored.model.graph.initializers
    assert "t" in kept.model.graph.initializers
    assert stored.report.weight_bytes_after < kept.report.weight_bytes_after - 3 * ROWS * WIDTH + 4 * ROWS + 1
    assert any("embedding table(s)" in note for note in stored.report.notes)
    assert stored.report.to_dict()["embeddings"][0]["converted"] and stored.report.settings["float_embeddings"] is False
    assert stored.report.fidelity.main.cosine > kept.report.fidelity.main.cosine - 0.005  # the ternary MatMul's noise dominates
