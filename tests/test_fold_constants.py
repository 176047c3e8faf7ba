"""FoldConstantsPass: small constant computations become initializers; weights and inputs are left alone."""

from __future__ import annotations

import numpy as np
import pytest

from fgq_onnx.passes.fold_constants import MAX_ELEMENTS, FoldConstantsPass
from fgq_onnx.passes.fold_pad_into_conv import FoldPadIntoConvPass
from ir_models import make_model, run

RNG = np.random.default_rng(3)
X = RNG.normal(size=(1, 3, 9, 8)).astype(np.float32)
W = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)

# torch.onnx.export's F.pad(x, [0, 1, 2, 0]) (left, right, top, bottom): the pads come out of a constant chain.
TORCH_PAD = """g (float[1, 3, 9, 8] x) => (float y) {
  zeros = ConstantOfShape <value = int64[1] {0}> (four)
  both = Concat <axis = 0> (given, zeros)
  pairs = Reshape (both, pair_shape)
  reversed = Slice (pairs, start, end, axis, step)
  columns = Transpose <perm = [1, 0]> (reversed)
  flat = Reshape (columns, minus_one)
  pads = Cast <to = 7> (flat)
  padded = Pad (x, pads)
  y = Conv (padded, w)
}"""
TORCH_PAD_CONSTANTS = {
    "w": W, "four": np.array([4], np.int64), "given": np.array([0, 1, 2, 0], np.int64),
    "pair_shape": np.array([-1, 2], np.int64), "start": np.array([-1], np.int64), "end": np.array([-9999], np.int64),
    "axis": np.array([0], np.int64), "step": np.array([-1], np.int64), "minus_one": np.array([-1], np.int64),
}


def test_folds_the_torch_pad_chain_so_the_pad_goes_into_the_conv():
    model = make_model(TORCH_PAD, TORCH_PAD_CONSTANTS)
    want = run(model, {"x": X})[0]
    assert FoldConstantsPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Pad", "Conv"]
    assert set(model.graph.initializers) == {"w", "pads"}  # the intermediate constants are gone
    assert FoldPadIntoConvPass()(model).modified
    [conv] = list(model.graph)
    assert list(conv.attributes["pads"].value) == [2, 0, 0, 1]  # [top, left, bottom, right]
    np.testing.assert_allclose(run(model, {"x": X})[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("text, constants", [
    # a weight-sized computation: decoded by DequantizeWeightsPass, or kept on purpose
    ("g (float[1, 64] x) => (float y) { wf = Cast <to = 1> (wq)\n y = MatMul (x, wf) }",
     {"wq": RNG.integers(-127, 127, size=(64, 64)).astype(np.int8)}),
    # nor a small one: 8-bit integers are quantized weights
    ("g (float[1, 4] x) => (float y) { wf = Cast <to = 1> (wq)\n y = MatMul (x, wf) }",
     {"wq": np.ones((4, 4), np.int8)}),
    # quantization ops are never folded
    ("g (float[1, 4] x) => (float y) { wf = DequantizeLinear (wq, s)\n y = MatMul (x, wf) }",
     {"wq": np.ones((4, 4), np.int8), "s": np.float32(0.5)}),
    # an input that the caller may feed is not a constant
    ("g (float[1, 4] x, int64[2] shape) => (float y) { s2 = Mul (shape, two)\n y = Reshape (x, s2) }",
     {"two": np.array([1, 1], np.int64)}),
    # a graph output stays a node output
    ("g (float[1, 4] x) => (float y, int64[2] s2) { s2 = Mul (one_four, one)\n y = Reshape (x, s2) }",
     {"one_four": np.array([1, 4], np.int64), "one": np.array([1, 1], np.int64)}),
])
def test_leaves_what_must_stay(text, constants):
    model = make_model(text, constants)
    before = [n.op_type for n in model.graph]
    assert not FoldConstantsPass()(model).modified
    assert [n.op_type for n in model.graph] == before


def test_an_output_larger_than_the_limit_stays_a_node():
    text = "g (float[1, 4] x) => (float y) { big = ConstantOfShape <value = float[1] {1.0}> (shape)\n y = Add (x, big) }"
    model = make_model(text, {"shape": np.array([MAX_ELEMENTS + 1, 4], np.int64)})
    assert not FoldConstantsPass()(model).modified
    assert "ConstantOfShape" in [n.op_type for n in model.graph]
