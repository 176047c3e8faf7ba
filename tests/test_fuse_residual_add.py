"""FuseResidualAddPass: TernaryConv -> Add(residual) [-> Relu] becomes one TernaryConv.

The fused model must compute what the unfused one does: its function body
bit-exactly like the qdq model, its kernel bit-exactly like the unfused
kernel (the same float additions in the same order).
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from test_custom_format import EMBEDDED, EMBEDDED_CALIB, EMBEDDED_TEST, _basic_session, _kernel_session

from fgq_onnx.custom_op_functions import DOMAIN, INPUTS
from fgq_onnx.passes.fuse_residual_add import FuseResidualAddPass
from fgq_onnx.passes.use_custom_ops import UseCustomOpsPass, to_custom_ops
from fgq_onnx.pipeline import convert
from ir_models import make_model


def _custom(qdq: ir.Model, fuse: bool) -> onnx.ModelProto:
    model = ir.serde.deserialize_model(ir.serde.serialize_model(qdq))
    # float_between_layers: the fusion alone (NHWC and 8-bit levels between layers: test_quantize_between_convs.py)
    model = to_custom_ops(model, float_between_layers=True)[0] if fuse else UseCustomOpsPass()(model).model
    return ir.serde.serialize_model(model)


def _residual_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.domain == DOMAIN and "residual" in n.overload.split("-")]


@pytest.mark.skipif(not EMBEDDED.exists(), reason="embedded model not present")
def test_embedded_model_residual_adds_fused():
    qdq = convert(EMBEDDED, calib=EMBEDDED_CALIB, n=16, act_bits=8, bias_correction=False, format="qdq").model
    adds = sum(node.op_type == "Add" for node in qdq.graph)
    fused, unfused = _custom(qdq, fuse=True), _custom(qdq, fuse=False)
    residual = _residual_nodes(fused)
    assert adds == 3 and len(residual) == adds
    assert "Add" not in {n.op_type for n in fused.graph.node}
    assert all(len(n.input) == len(INPUTS) + 1 for n in residual)
    assert ("TernaryConv", "residual") in {(f.name, f.overload) for f in fused.functions}
    onnx.checker.check_model(fused)  # also: still topologically sorted
    x = np.load(EMBEDDED_TEST)["input"][:64]
    want = _basic_session(ir.serde.serialize_model(qdq)).run(None, {"input": x})[0]
    np.testing.assert_array_equal(_basic_session(fused).run(None, {"input": x})[0], want)  # the function bodies
    got = _kernel_session(fused).run(None, {"input": x})[0]
    np.testing.assert_array_equal(got, _kernel_session(unfused).run(None, {"input": x})[0])
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99


def _two_branch_model(tmp_path: pathlib.Path, second_operand: str) -> tuple[pathlib.Path, pathlib.Path]:
    """c1 = Conv(x); c2 = Conv(x), after c1 in the node list; y = Relu(Add(c1, second_operand))."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(size=(8, 4, 3, 3)).astype(np.float32), "w2": rng.normal(size=(8, 4, 1, 1)).astype(np.float32),
               "b": rng.normal(size=(1, 8, 1, 1)).astype(np.float32)}
    model = make_model(f"""
        g (float[2, 4, 6, 6] x) => (float[2, 8, 6, 6] y) {{
            c1 = Conv <pads = [1, 1, 1, 1]> (x, w1)
            c2 = Conv (x, w2)
            s = Add (c1, {second_operand})
            y = Relu (s)
        }}""", weights, opset=21)
    path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(ir.serde.serialize_model(model), path)
    np.savez(calib, x=rng.uniform(-1, 1, (8, 4, 6, 6)).astype(np.float32))
    return path, calib


def test_residual_produced_later_is_fused_after_it(tmp_path):
    path, calib = _two_branch_model(tmp_path, "c2")
    qdq = convert(path, calib=calib, n=4, act_bits=8, bias_correction=False, format="qdq").model
    fused = _custom(qdq, fuse=True)
    (node,) = _residual_nodes(fused)
    assert {n.op_type for n in fused.graph.node if n.domain == ""}.isdisjoint({"Add", "Relu"})
    assert any(a.name == "relu" and a.i == 1 for a in node.attribute)
    onnx.checker.check_model(fused)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 4, 6, 6)).astype(np.float32)
    want = _basic_session(ir.serde.serialize_model(qdq)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(_basic_session(fused).run(None, {"x": x})[0], want)
    np.testing.assert_array_equal(_kernel_session(fused).run(None, {"x": x})[0],
                                  _kernel_session(_custom(qdq, fuse=False)).run(None, {"x": x})[0])


def test_broadcast_add_is_left_alone(tmp_path):
    """A per-channel constant is a bias (FoldBiasAddPass folds it), not a residual."""
    path, calib = _two_branch_model(tmp_path, "b")  # [1, 8, 1, 1]: not the conv output's shape
    qdq = convert(path, calib=calib, n=4, act_bits=8, bias_correction=False, format="qdq").model
    unfused = _custom(qdq, fuse=False)
    result = FuseResidualAddPass()(ir.serde.deserialize_model(unfused))
    fused = ir.serde.serialize_model(result.model)
    assert not result.modified and not _residual_nodes(fused)
    assert "Add" in {n.op_type for n in fused.graph.node}
    assert fused.SerializeToString() == unfused.SerializeToString()
