"""The custom-op format (passes/use_custom_ops.py) against the portable qdq format.

The qdq model is the reference; it runs with no graph optimization so
that onnxruntime does not swap in its own int8 kernels (they requantize
differently) nor, for a layer with per-channel int8 weights, round its bias
to int32 (which it does from ORT_ENABLE_BASIC on). The custom model is run twice: with the library (the kernels)
and without it (onnxruntime inlines the model-local FunctionProtos).
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from fgq_onnx.passes.use_custom_ops import DOMAIN, UseCustomOpsPass
from fgq_onnx.pipeline import convert

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "models" / "fashion_mnist_resnet.onnx"
EMBEDDED_CALIB = ROOT / "models" / "calib"
EMBEDDED_TEST = ROOT / "models" / "fashion_mnist_test.npz"


def _basic_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _kernel_session(proto: onnx.ModelProto, kernel=None) -> ort.InferenceSession:
    from fgq_onnx import runtime

    try:
        runtime.library_path()
    except runtime.RuntimeLibraryError as error:
        pytest.skip(f"custom-op library not built: {error}")
    return runtime.inference_session(proto.SerializeToString(), kernel=kernel)


def _to_custom(qdq: ir.Model, **options) -> tuple[onnx.ModelProto, UseCustomOpsPass, bool]:
    model = ir.serde.deserialize_model(ir.serde.serialize_model(qdq))
    rewrite = UseCustomOpsPass(**options)
    result = rewrite(model)
    return ir.serde.serialize_model(result.model), rewrite, result.modified


@pytest.fixture(scope="module")
def cnn_qdq(tmp_path_factory, kit):
    folder = tmp_path_factory.mktemp("cnn")
    path = kit.write_model(kit.build_cnn(), folder / "cnn.onnx")
    rng = np.random.default_rng(3)
    calib = folder / "calib.npz"
    np.savez(calib, x=rng.uniform(0, 1, (16, 1, 28, 28)).astype(np.float32))
    return convert(path, calib=calib, n=4, act_bits=8, bias_correction=False, format="qdq").model


def test_rewrites_every_layer(cnn_qdq):
    custom, rewrite, modified = _to_custom(cnn_qdq)
    assert modified
    assert all(record.converted for record in rewrite.records), rewrite.records
    ops = [node.op_type for node in custom.graph.node]
    assert not {"Conv", "Gemm", "MatMul", "QuantizeLinear"} & set(ops), ops
    conv_relu = [n for n in custom.graph.node if n.op_type == "TernaryConv" and any(a.name == "relu" and a.i == 1 for a in n.attribute)]
    assert conv_relu, "the Conv -> Relu pairs of the CNN are fused"
    assert {"TernaryConv", "TernaryGemm"} <= set(ops)
    assert {(f.domain, f.name) for f in custom.functions} == {
        (DOMAIN, "TernaryConv"), (DOMAIN, "TernaryGemm"), (DOMAIN, "TernaryMatMul")}
    assert any(o.domain == DOMAIN and o.version == 1 for o in custom.opset_import)
    onnx.checker.check_model(custom)
    inferred = onnx.shape_inference.infer_shapes(custom, strict_mode=True)
    assert inferred.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 10


def test_function_body_equals_qdq_and_kernel(cnn_qdq):
    custom, _, _ = _to_custom(cnn_qdq)
    qdq = ir.serde.serialize_model(cnn_qdq)
    x = np.random.default_rng(0).uniform(0, 1, (6, 1, 28, 28)).astype(np.float32)
    want = _basic_session(qdq).run(None, {"x": x})[0]
    fallback = _basic_session(custom).run(None, {"x": x})[0]
    np.testing.assert_array_equal(fallback, want)  # same standard ops, same order
    kernel = _kernel_session(custom).run(None, {"x": x})[0]
    np.testing.assert_allclose(kernel, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("scale_format, dtype", [("f32", onnx.TensorProto.FLOAT), ("f16", onnx.TensorProto.FLOAT16),
                                                  ("u8", onnx.TensorProto.UINT8)])
def test_scale_formats(tmp_path, kit, scale_format, dtype):
    path = kit.write_model(kit.build_cnn(), tmp_path / "cnn.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(3).uniform(0, 1, (8, 1, 28, 28)).astype(np.float32))
    qdq = convert(path, calib=calib, n=8, act_bits=4, scale_format=scale_format, bias_correction=False, format="qdq").model
    custom, rewrite, _ = _to_custom(qdq)
    assert all(r.converted for r in rewrite.records), rewrite.records
    scales = [t for t in custom.graph.initializer if t.name.endswith("packed_scales")]
    assert scales and all(t.data_type == dtype for t in scales)
    x = np.random.default_rng(1).uniform(0, 1, (3, 1, 28, 28)).astype(np.float32)
    want = _basic_session(ir.serde.serialize_model(qdq)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(_basic_session(custom).run(None, {"x": x})[0], want)
    np.testing.assert_allclose(_kernel_session(custom).run(None, {"x": x})[0], want, rtol=1e-3, atol=1e-3)


def test_leaves_unmatched_nodes(tmp_path, kit):
    path = kit.write_model(kit.build_mlp(), tmp_path / "mlp.onnx")
    weights_only = convert(path, n=4, act_bits=0, bias_correction=False, format="qdq").model
    _, rewrite, modified = _to_custom(weights_only)
    assert not modified
    assert rewrite.records and not any(r.converted for r in rewrite.records)
    assert all("not quantized" in r.reason for r in rewrite.records)


@pytest.mark.parametrize("scale_format", ["f32", "f16", "u8"])
def test_asymmetric_weights_kernel_body_and_qdq_agree(tmp_path, kit, scale_format):
    """max(t*a_p, 0) + min(t*a_n, 0) becomes a custom op with neg_scales; its overloaded body reads them."""
    path = kit.write_model(kit.build_cnn(), tmp_path / "cnn.onnx")
    x = np.random.default_rng(2).uniform(0, 1, (8, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    qdq = convert(path, calib=tmp_path / "calib.npz", n=4, act_bits=8, method="asymmetric", scale_format=scale_format, bias_correction=False, format="qdq").model
    custom, rewrite, modified = _to_custom(qdq)
    assert modified and all(r.converted for r in rewrite.records), rewrite.records
    ternary = [n for n in custom.graph.node if n.domain == DOMAIN]
    assert ternary and all(n.overload == "asymmetric" and len(n.input) >= 8 and n.input[6] and n.input[7] for n in ternary)
    assert {(f.name, f.overload) for f in custom.functions} >= {("TernaryConv", "asymmetric"), ("TernaryGemm", "asymmetric")}
    assert not {"Max", "Min", "Add"} & {n.op_type for n in custom.graph.node}
    onnx.checker.check_model(custom)
    want = _basic_session(ir.serde.serialize_model(qdq)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(_basic_session(custom).run(None, {"x": x})[0], want)
    symmetric = convert(path, calib=tmp_path / "calib.npz", n=4, act_bits=8, scale_format=scale_format, bias_correction=False, format="qdq").model
    assert np.abs(_basic_session(ir.serde.serialize_model(symmetric)).run(None, {"x": x})[0] - want).max() > 1e-3  # the neg scales matter
    kernel = _kernel_session(custom).run(None, {"x": x})[0]
    np.testing.assert_allclose(kernel, want, rtol=1e-3, atol=1e-3)
    del custom.functions[:]  # the overloaded nodes still find the kernel: it is what ran above
    np.testing.assert_array_equal(_kernel_session(custom).run(None, {"x": x})[0], kernel)


def test_rejects_low_opset():
    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 17}), ir_version=8)
    with pytest.raises(Exception, match="opset"):
        UseCustomOpsPass()(model)


@pytest.mark.skipif(not EMBEDDED.exists(), reason="embedded model not present")
@pytest.mark.parametrize("n, act_bits", [(16, 8), (4, 4)])
def test_embedded_model(n, act_bits):
    """Custom format vs qdq on the embedded Fashion-MNIST model (max abs diff on logits is printed)."""
    qdq_ir = convert(EMBEDDED, calib=EMBEDDED_CALIB, n=n, act_bits=act_bits, bias_correction=False, format="qdq").model
    custom, rewrite, _ = _to_custom(qdq_ir)
    assert all(r.converted for r in rewrite.records), [r for r in rewrite.records if not r.converted]
    x = np.load(EMBEDDED_TEST)["input"][:100]
    want = _basic_session(ir.serde.serialize_model(qdq_ir)).run(None, {"input": x})[0]
    fallback = _basic_session(custom).run(None, {"input": x})[0]
    np.testing.assert_array_equal(fallback, want)
    from fgq_onnx import runtime

    _kernel_session(custom)  # skips without the library
    for kernel in runtime.supported_kernels():
        count = 10 if kernel == "ref" else len(x)  # the scalar reference is slow
        got = _kernel_session(custom, kernel).run(None, {"input": x[:count]})[0]
        diff = float(np.abs(got - want[:count]).max())
        agree = float((got.argmax(1) == want[:count].argmax(1)).mean())
        print(f"N={n} act_bits={act_bits} kernel={kernel}: max |custom - qdq| = {diff:.2e}, top-1 agreement {agree:.3f}")
        assert diff < 0.05 and agree >= 0.99


@pytest.mark.skipif(not EMBEDDED.exists(), reason="embedded model not present")
def test_graphsurgeon_round_trip_keeps_overloads_usable(tmp_path):
    """The embedded ResNet in the custom format mixes TernaryConv overloads (plain and residual), which an
    onnx-graphsurgeon round trip drops: restore_overloads gives them back from each node's inputs and
    attributes, and runtime.inference_session does so by itself; the outputs stay those of the converted model."""
    gs = pytest.importorskip("onnx_graphsurgeon")
    from fgq_onnx import runtime
    from fgq_onnx.custom_op_functions import node_overload, restore_overloads

    model = convert(EMBEDDED, calib=EMBEDDED_CALIB, n=4, bias_correction=False).model
    custom = [node for node in model.graph if node.domain == DOMAIN]
    assert [node_overload(node) for node in custom] == [node.overload for node in custom]  # what the passes wrote
    assert len({node.overload for node in custom if node.op_type == "TernaryConv"}) > 1
    proto = ir.serde.serialize_model(model)
    edited = gs.export_onnx(gs.import_onnx(proto))
    assert {node.overload for node in edited.graph.node} == {""}
    path = tmp_path / "edited.onnx"  # weights in a file beside it, as models over 2 GB must be
    saved = onnx.ModelProto()
    saved.CopyFrom(edited)  # onnx.save moves the weights of the proto it is given out to the file
    onnx.save(saved, path, save_as_external_data=True, location="edited.data", size_threshold=0)
    restored = restore_overloads(edited)
    assert [node.overload for node in restored.graph.node if node.domain == DOMAIN] == [node.overload for node in custom]
    x = np.load(EMBEDDED_TEST)["input"][:32]
    want = _basic_session(proto).run(None, {"input": x})[0]  # the function bodies
    np.testing.assert_array_equal(_basic_session(restored).run(None, {"input": x})[0], want)
    _kernel_session(proto)  # skips without the library
    kernels = runtime.inference_session(proto.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_array_equal(runtime.inference_session(path).run(None, {"input": x})[0], kernels)


def test_to_custom_ops_function(cnn_qdq):
    from fgq_onnx.passes.use_custom_ops import to_custom_ops

    model = ir.serde.deserialize_model(ir.serde.serialize_model(cnn_qdq))
    rewritten, records = to_custom_ops(model)
    assert rewritten is model and records and all(r.converted for r in records)
    assert any(node.domain == DOMAIN for node in rewritten.graph)


def test_cli_format_custom_runs_with_and_without_the_library(tmp_path, kit, cli):
    path = kit.write_model(kit.build_cnn(), tmp_path / "cnn.onnx")
    x = np.random.default_rng(5).uniform(0, 1, (16, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    outputs = {}
    for fmt in ("qdq", "custom"):
        result = cli("convert", path, "--calib", tmp_path / "calib.npz", "--format", fmt, "-o", tmp_path / f"{fmt}.onnx", "-q")
        assert result.exit_code == 0, result.stderr
        outputs[fmt] = onnx.load(str(tmp_path / f"{fmt}.onnx"))
    assert any(node.domain == DOMAIN for node in outputs["custom"].graph.node)
    assert not any(node.domain == DOMAIN for node in outputs["qdq"].graph.node)
    reference = _basic_session(outputs["qdq"]).run(None, {"x": x})[0]
    fallback = _basic_session(outputs["custom"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(fallback, reference, rtol=1e-5, atol=1e-5)
    kernel = _kernel_session(outputs["custom"]).run(None, {"x": x})[0]
    assert (kernel.argmax(1) == reference.argmax(1)).mean() >= 0.9
    assert np.abs(kernel - reference).max() < 0.1 * np.abs(reference).max()
