"""Shared fixtures: small models written into tmp_path, calibration data, a CLI runner.

Models are built with onnx.helper so that every test knows exactly what went in:
- `cnn_path`: Conv+BatchNorm+Relu -> MaxPool -> Conv+Relu -> MaxPool -> Flatten ->
  Gemm(transB)+Relu -> Gemm, input x [batch, 1, 28, 28], about 128k weights.
- `mlp_path`: MatMul+Add+Relu -> MatMul, input x [batch, 64].
`build_cnn(exact=True)` makes weights that are already ternary per group of N
(scale * {-1, 0, +1} along each layer's reduction axis), so an exact solver
must reproduce them and the converted model must match the fp32 one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

IMAGE_HW = 28
N_CALIB = 24
N_IMAGES = 10


# -- weights ---------------------------------------------------------------------


def ternary_exact_weight(rng: np.random.Generator, shape: tuple[int, ...], axis: int, n: int) -> np.ndarray:
    """A weight equal to scale * {-1,0,1} with one scale per run of n values along `axis`."""
    codes = rng.choice(np.array([-1.0, 0.0, 1.0]), size=shape, p=[0.35, 0.3, 0.35])
    length = shape[axis]
    scale_shape = list(shape)
    scale_shape[axis] = -(-length // n)
    scales = rng.uniform(0.05, 0.3, scale_shape)
    scales = np.repeat(scales, n, axis=axis).take(np.arange(length), axis=axis)
    return (codes * scales).astype(np.float32)


def _weight(rng, shape, axis, n, exact, std):
    if exact:
        return ternary_exact_weight(rng, shape, axis, n)
    return rng.normal(0.0, std, shape).astype(np.float32)


def _model(nodes, inputs, outputs, initializers, opset: int, ir_version: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, [numpy_helper.from_array(np.asarray(a, np.float32), name) for name, a in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fgq-tests")
    model.ir_version = ir_version
    return model


def build_cnn(*, exact: bool = False, n: int = 4, batch: str | int = "batch", opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """The small CNN (see the module docstring); `exact` makes ternary-exact weights and no BN."""
    rng = np.random.default_rng(seed)
    # conv1 has C=1 < N: its groups run over the flattened filter [8, 9].
    conv1 = _weight(rng, (8, 9), 1, n, exact, 0.3).reshape(8, 1, 3, 3)
    weights = {
        "conv1.w": conv1,
        "conv1.b": rng.normal(0, 0.1, 8),
        "conv2.w": _weight(rng, (16, 8, 3, 3), 1, n, exact, 0.1),
        "conv2.b": rng.normal(0, 0.1, 16),
        "fc1.w": _weight(rng, (160, 784), 1, n, exact, 0.05),  # Gemm transB=1: [out, in]
        "fc1.b": rng.normal(0, 0.1, 160),
        "fc2.w": _weight(rng, (160, 10), 0, n, exact, 0.1),  # Gemm: [in, out]
        "fc2.b": rng.normal(0, 0.1, 10),
    }
    nodes = [helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    if exact:
        nodes.append(helper.make_node("Relu", ["c1"], ["r1"], name="relu1"))
    else:
        weights.update({"bn1.g": rng.uniform(0.5, 1.5, 8), "bn1.b": rng.normal(0, 0.1, 8), "bn1.m": rng.normal(0, 0.1, 8), "bn1.v": rng.uniform(0.5, 1.5, 8)})
        nodes += [
            helper.make_node("BatchNormalization", ["c1", "bn1.g", "bn1.b", "bn1.m", "bn1.v"], ["bn1"], name="bn1"),
            helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        ]
    nodes += [
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2.w", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc1.w", "fc1.b"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["r3"], name="relu3"),
        helper.make_node("Gemm", ["r3", "fc2.w", "fc2.b"], ["y"], name="fc2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, IMAGE_HW, IMAGE_HW])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])
    return _model(nodes, [x], [y], weights, opset)


def build_mlp(*, exact: bool = False, n: int = 4, opset: int = 17, seed: int = 1) -> onnx.ModelProto:
    """x [batch, 64] -> MatMul [64, 96] + b -> Relu -> MatMul [96, 10] -> y."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": _weight(rng, (64, 96), 0, n, exact, 0.15),
        "b1": rng.normal(0, 0.1, 96),
        "w2": _weight(rng, (96, 10), 0, n, exact, 0.15),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])
    return _model(nodes, [x], [y], weights, opset)


def linear_weight_count(model: onnx.ModelProto) -> int:
    """Elements of the constant second inputs of Conv/Gemm/MatMul, counted from the proto."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return sum(sizes.get(node.input[1], 0) for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul"))


# -- files -----------------------------------------------------------------------


def write_model(model: onnx.ModelProto, path: Path) -> Path:
    """Serialize as-is (external data references are written untouched)."""
    path.write_bytes(model.SerializeToString())
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> dict[str, str]:
    """Every file below `folder` (hidden ones too) -> its sha256; symlinks -> their target, not followed."""
    entries = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                entries[key] = "-> " + os.readlink(path)
            elif path.is_file():
                entries[key] = sha256(path)
            else:
                entries[key] = "dir"
    return entries


def write_images(folder: Path, count: int, *, seed: int = 2, size: tuple[int, int] = (32, 36)) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, size, dtype=np.uint8)
        path = folder / f"img_{index:02d}.png"
        Image.fromarray(pixels, mode="L").save(path)
        paths.append(path)
    return paths


def run_ort(path: Path, feeds: dict[str, np.ndarray], optimization: str = "all") -> list[np.ndarray]:
    """Run a model file in stock onnxruntime (CPU); `optimization` is 'basic' or 'all' (the default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
    from fgq_onnx.evaluate import X64_QUANT_PRECISION

    options.add_session_config_entry(X64_QUANT_PRECISION, "1")  # int8 weights' layers exact (see there)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


class Cli:
    """Runs `fgq-onnx` in-process; stdout and stderr come back separately."""

    def __init__(self):
        from typer.testing import CliRunner

        from fgq_onnx.cli import app

        self.app, self.runner = app, CliRunner()

    def __call__(self, *args):
        result = self.runner.invoke(self.app, [str(a) for a in args], catch_exceptions=True)
        # An exception escaping the app is a test failure of its own kind: show it whole.
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            import traceback

            raise AssertionError("the CLI raised:\n" + "".join(traceback.format_exception(result.exception)))
        return result


# -- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernels() -> list[str]:
    """The kernel paths this CPU runs (ref, avx2, avxvnni, avx512vnni); skips when the custom-op library is not built."""
    from fgq_onnx import runtime

    try:
        runtime.library_path()
    except runtime.RuntimeLibraryError as error:
        pytest.skip(f"custom-op library not built: {error}")
    return runtime.supported_kernels()


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


@pytest.fixture
def cnn_path(tmp_path) -> Path:
    return write_model(build_cnn(), tmp_path / "cnn.onnx")


@pytest.fixture
def mlp_path(tmp_path) -> Path:
    return write_model(build_mlp(), tmp_path / "mlp.onnx")


@pytest.fixture(scope="session")
def cnn_samples() -> np.ndarray:
    return np.random.default_rng(3).uniform(0.0, 1.0, (N_CALIB, 1, IMAGE_HW, IMAGE_HW)).astype(np.float32)


@pytest.fixture(scope="session")
def mlp_samples() -> np.ndarray:
    return np.random.default_rng(4).normal(0.0, 1.0, (N_CALIB, 64)).astype(np.float32)


@pytest.fixture
def calib_npz(tmp_path, cnn_samples) -> Path:
    """Calibration data for the CNN: x [24, 1, 28, 28] in [0, 1)."""
    path = tmp_path / "calib" / "cnn_calib.npz"
    path.parent.mkdir()
    np.savez(path, x=cnn_samples)
    return path


@pytest.fixture
def mlp_calib_npz(tmp_path, mlp_samples) -> Path:
    path = tmp_path / "calib" / "mlp_calib.npz"
    path.parent.mkdir(exist_ok=True)
    np.savez(path, x=mlp_samples)
    return path


@pytest.fixture
def converted(cnn_path, calib_npz, tmp_path) -> Path:
    """The small CNN converted at N=4 with 8-bit activations, in the portable qdq format."""
    import fgq_onnx

    model, _ = fgq_onnx.convert(cnn_path, n=4, calib=calib_npz, format="qdq")
    path = tmp_path / "cnn.fgq.onnx"
    fgq_onnx.save(model, path)
    return path


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """10 grey 32x36 PNGs (the CNN crops them to 28x28)."""
    folder = tmp_path / "images"
    write_images(folder, N_IMAGES)
    return folder



@pytest.fixture(scope="session")
def kit():
    """The helpers above, for tests (importing conftest directly is fragile)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        build_cnn=build_cnn, build_mlp=build_mlp, write_model=write_model, sha256=sha256, listing=listing,
        write_images=write_images, run_ort=run_ort, linear_weight_count=linear_weight_count,
        ternary_exact_weight=ternary_exact_weight, N_CALIB=N_CALIB, N_IMAGES=N_IMAGES,
    )
