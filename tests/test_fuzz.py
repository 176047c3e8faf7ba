"""Fuzzing: hostile model files through load and convert, malformed com.fgq nodes through onnxruntime.

Every case runs in a worker process (tests/fuzz_worker.py) so that a crash
(a signal, an AddressSanitizer abort under .ci/sanitizers.sh) or a hang (no
answer within TIMEOUT seconds) fails the test with the input that caused it,
instead of taking pytest down. The only acceptable outcomes are success and a
clean error: FgqError from the converter, an onnxruntime exception from a
session. Example counts are small for CI; FGQ_FUZZ_EXAMPLES=2000 (and
FGQ_FUZZ_RANDOM=1 for fresh random seeds instead of the fixed ones) runs longer.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import select
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
import corpus  # noqa: E402
import fgq_onnx  # noqa: E402

EXAMPLES = int(os.environ.get("FGQ_FUZZ_EXAMPLES", "40"))
TIMEOUT = 120.0  # seconds for one case; a small model converts in well under one
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("FGQ_FUZZ_RANDOM"),
                suppress_health_check=list(HealthCheck), database=None)


class Worker:
    """One tests/fuzz_worker.py process, restarted after a crash or hang."""

    def __init__(self, folder: Path):
        self.folder, self.process = folder, None

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(Path(fgq_onnx.__file__).resolve().parent.parent))
        self.stderr = open(self.folder / "worker.stderr", "w+b")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fuzz_worker.py"))], cwd=self.folder, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)

    def ask(self, request: dict) -> dict:
        if self.process is None or self.process.poll() is not None:
            self.close()  # a crashed worker's pipes and log
            self._start()
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], TIMEOUT)
        if not ready:
            self.close()
            return {"outcome": "hang", "error": f"no answer in {TIMEOUT:.0f} s"}
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            self.stderr.seek(0)
            return {"outcome": "crash", "error": f"exit code {code}: " + self.stderr.read()[-3000:].decode(errors="replace")}
        return json.loads(line)

    def close(self) -> None:
        """Stop the process and close its pipes and log: left to the garbage collector, they would warn
        ('unclosed file') at some later moment, on the stderr of whatever CLI test runs then."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.stderr):
            stream.close()
        self.process = None


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    runner = Worker(tmp_path_factory.mktemp("fuzz"))
    yield runner
    runner.close()


_CASE_NUMBERS = itertools.count(1)


def _write(folder: Path, data: bytes) -> Path:
    """The model in a folder of its own (external data files land beside it)."""
    case = folder / f"case{next(_CASE_NUMBERS)}"
    case.mkdir()
    path = case / "model.onnx"
    path.write_bytes(data)
    return path


def assert_clean(answer: dict, what: str) -> None:
    assert answer["outcome"] in ("ok", "refused"), f"{what}: {answer['outcome']}\n{answer['error']}"
    if answer["outcome"] == "refused":
        assert "\n" not in answer["error"].strip() or "session" in what, answer["error"]


# -- model files ---------------------------------------------------------------------

BASE = corpus.small_cnn(opset=13)  # opset 13: the version converter runs on every case
BASE_BYTES = BASE.model.SerializeToString()
WEIRD_INTS = st.sampled_from([-(2**63), -(2**31), -1, 0, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1])
LOCATIONS = st.sampled_from(["../secret.bin", "/etc/passwd", "a/../../b", "", ".", "data.bin", "missing.bin", "sub/data.bin", "data.bin\x00x", "~/x"])


def _mutate_tensor(model: onnx.ModelProto, data, folder: Path) -> None:
    tensor = data.draw(st.sampled_from(list(model.graph.initializer)))
    field = data.draw(st.sampled_from(["dims", "dtype", "raw", "external", "float_data"]))
    if field == "dims":
        tensor.dims[:] = data.draw(st.lists(WEIRD_INTS, max_size=5))
    elif field == "dtype":
        tensor.data_type = data.draw(st.sampled_from([v for v in TensorProto.DataType.values()]))
    elif field == "raw":
        size = data.draw(st.sampled_from([0, 1, len(tensor.raw_data) - 1, len(tensor.raw_data) + 4]))
        tensor.raw_data = (tensor.raw_data * 2)[:max(size, 0)]
    elif field == "float_data":
        tensor.ClearField("raw_data")
        tensor.float_data[:] = data.draw(st.lists(st.floats(allow_nan=True), max_size=8))
    else:
        (folder / "data.bin").write_bytes(tensor.raw_data or b"\0" * 64)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        entries = {"location": data.draw(LOCATIONS)}
        for key in data.draw(st.sets(st.sampled_from(["offset", "length", "checksum"]))):
            entries[key] = data.draw(st.one_of(WEIRD_INTS.map(str), st.sampled_from(["abc", "1e3", "", " 5", "99999999999999999999999"])))
        for key, value in entries.items():
            tensor.external_data.add(key=key, value=value)


def _mutate_node(model: onnx.ModelProto, data) -> None:
    node = data.draw(st.sampled_from(list(model.graph.node)))
    what = data.draw(st.sampled_from(["attribute", "input", "output", "op_type", "domain"]))
    if what == "attribute":
        name = data.draw(st.sampled_from(["pads", "strides", "group", "kernel_shape", "dilations", "transB", "axis", "alpha", "auto_pad"]))
        value = data.draw(st.one_of(WEIRD_INTS, st.lists(WEIRD_INTS, max_size=6), st.floats(allow_nan=True), st.text(max_size=8)))
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute(name, value)] if not (isinstance(value, list) and not value) else kept)
    elif what == "input" and node.input:
        node.input[data.draw(st.integers(0, len(node.input) - 1))] = data.draw(st.sampled_from(["", "nowhere", model.graph.node[-1].output[0], node.output[0]]))
    elif what == "output":
        node.output[0] = data.draw(st.sampled_from(["", "x", model.graph.node[0].output[0]]))
    elif what == "op_type":
        node.op_type = data.draw(st.sampled_from(["Conv", "Gemm", "MatMul", "If", "Loop", "NoSuchOp", ""]))
    else:
        node.domain = data.draw(st.sampled_from(["com.fgq", "ai.onnx.ml", "x"]))


def _mutate_model(model: onnx.ModelProto, data) -> None:
    what = data.draw(st.sampled_from(["opset", "ir", "input_dims", "drop_node", "duplicate_node"]))
    if what == "opset":
        model.opset_import[0].version = data.draw(st.integers(-1, 40))
    elif what == "ir":
        model.ir_version = data.draw(st.integers(-1, 40))
    elif what == "input_dims":
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[data.draw(st.integers(0, len(dims) - 1))].dim_value = data.draw(st.sampled_from([0, 1, 2**31, 2**40, 2**62]))
    elif what == "drop_node":
        del model.graph.node[data.draw(st.integers(0, len(model.graph.node) - 1))]
    else:
        model.graph.node.append(model.graph.node[data.draw(st.integers(0, len(model.graph.node) - 1))])


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, **{k: v[:8] for k, v in BASE.calib.items()})
    return path


@FUZZ
@given(data=st.data())
def test_mutated_protobuf_fields(worker, calib, data):
    model = onnx.ModelProto()
    model.CopyFrom(BASE.model)
    folder = worker.folder
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["tensor", "node", "model"]))
        if kind == "tensor":
            _mutate_tensor(model, data, folder)
        elif kind == "node":
            _mutate_node(model, data)
        else:
            _mutate_model(model, data)
    path = _write(folder, model.SerializeToString())
    if (folder / "data.bin").exists():
        (folder / "data.bin").rename(path.parent / "data.bin")
    with_calib = data.draw(st.booleans())
    assert_clean(worker.ask({"convert": str(path), "calib": str(calib) if with_calib else None}), f"convert {path}")


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(BASE_BYTES) - 1), st.integers(0, 7)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, len(BASE_BYTES))), junk=st.binary(max_size=16))
def test_bit_flips_and_truncations(worker, flips, cut, junk):
    data = bytearray(BASE_BYTES)
    for position, bit in flips:
        data[position] ^= 1 << bit
    if cut is not None:
        data = data[:cut] + junk
    path = _write(worker.folder, bytes(data))
    assert_clean(worker.ask({"convert": str(path), "calib": None}), f"convert {path}")


def _rss_mb(pid: int) -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


@pytest.mark.parametrize("where", ["initializer", "constant", "input", "image_input"])
def test_absurd_dimensions_refused_before_allocating(worker, calib, kit, where):
    """A tensor or input claiming 2^40 x 2^40 elements (or images of 2^20 x 2^20 pixels) is refused without the memory to match."""
    model = onnx.ModelProto()
    model.CopyFrom(BASE.model)
    weight = model.graph.initializer[0]
    if where == "initializer":
        weight.dims[:] = [2**40, 2**40, 3, 3]
    elif where == "constant":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(weight)
        tensor.dims[:] = [2**40, 2**40, 3, 3]
        model.graph.node.insert(0, helper.make_node("Constant", [], [weight.name], value=tensor))
        model.graph.initializer.remove(weight)
    else:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_value = dims[3].dim_value = 2**20 if where == "image_input" else 2**40
    path = _write(worker.folder, model.SerializeToString())
    if where == "image_input":  # an image folder: every image would be resized to the input's size
        calib = path.parent / "images"
        kit.write_images(calib, 2)
    answer = worker.ask({"convert": str(path), "calib": str(calib)})
    assert answer["outcome"] == "refused", answer
    assert _rss_mb(worker.process.pid) < 1024, "the refusal allocated what the file claimed"


# -- com.fgq nodes in onnxruntime ---------------------------------------------------------


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory) -> onnx.ModelProto:
    from test_runtime_helpers import library_or_skip

    library_or_skip()
    case = corpus.depthwise_grouped()
    folder = tmp_path_factory.mktemp("custom")
    onnx.save(case.model, folder / "m.onnx")
    np.savez(folder / "c.npz", **case.calib)
    converted, _ = fgq_onnx.convert(folder / "m.onnx", n=4, calib=folder / "c.npz", format="custom", bias_correction=False)
    fgq_onnx.save(converted, folder / "m.custom.onnx")
    model = onnx.load(str(folder / "m.custom.onnx"))
    assert [n for n in model.graph.node if n.domain == "com.fgq"]
    return model


CUSTOM_ATTRIBUTES = ["N", "K", "weight_shape", "group", "pads", "strides", "dilations", "kernel_shape", "act_qmin", "act_qmax", "relu", "transA", "alpha", "auto_pad"]
DTYPES = [np.uint8, np.int8, np.float32, np.float16, np.float64, np.int32, np.int64, bool]


def _mutate_custom_node(model: onnx.ModelProto, data) -> dict[str, np.ndarray]:
    """Change one com.fgq node: an attribute, a constant input's shape/dtype/bytes, or an input made a graph input."""
    node = data.draw(st.sampled_from([n for n in model.graph.node if n.domain == "com.fgq"]))
    initializers = {t.name: t for t in model.graph.initializer}
    feeds = {}
    what = data.draw(st.sampled_from(["attribute", "drop_attribute", "tensor", "bytes", "runtime_input", "omit_input"]))
    if what == "attribute":
        name = data.draw(st.sampled_from(CUSTOM_ATTRIBUTES))
        value = data.draw(st.one_of(WEIRD_INTS, st.lists(WEIRD_INTS, max_size=6), st.floats(allow_nan=True), st.just("SAME_UPPER")))
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute(name, value)] if not (isinstance(value, list) and not value) else kept)
    elif what == "drop_attribute" and node.attribute:
        del node.attribute[data.draw(st.integers(0, len(node.attribute) - 1))]
    else:
        constant = [i for i, name in enumerate(node.input) if name in initializers]
        if not constant:
            return feeds
        index = data.draw(st.sampled_from(constant))
        tensor = initializers[node.input[index]]
        array = numpy_helper.to_array(tensor)
        if what == "tensor":
            shape = data.draw(st.lists(st.integers(0, 9), max_size=3))
            dtype = data.draw(st.sampled_from(DTYPES))
            array = np.random.default_rng(data.draw(st.integers(0, 2**16))).integers(0, 256, size=shape).astype(dtype)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
        elif what == "bytes":
            raw = bytearray(array.tobytes())
            for _ in range(data.draw(st.integers(1, 4))):
                if raw:
                    raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
            tensor.raw_data = bytes(raw)
        elif what == "runtime_input":  # the same values, fed at run time instead of constant
            name = f"fed_{index}_{node.name}"
            node.input[index] = name
            model.graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))
            feeds[name] = array
        else:
            node.input[index] = ""
    return feeds


@FUZZ
@given(data=st.data())
def test_mutated_custom_op_nodes(worker, custom_model, data):
    model = onnx.ModelProto()
    model.CopyFrom(custom_model)
    feeds = {}
    for _ in range(data.draw(st.integers(1, 3))):
        feeds.update(_mutate_custom_node(model, data))
    shape = data.draw(st.sampled_from([[2, 3, 16, 16], [1, 3, 5, 5], [1, 3, 1, 1], [0, 3, 8, 8], [1, 4, 16, 16], [1, 3, 16]]))
    feeds["x"] = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    del model.graph.input[0].type.tensor_type.shape.dim[:]  # let any shape in
    path = _write(worker.folder, model.SerializeToString())
    np.savez(path.with_suffix(".npz"), **feeds)
    assert_clean(worker.ask({"session": str(path), "feeds": str(path.with_suffix(".npz"))}), f"session {path}")


# -- what the fuzzing found, kept as plain cases ----------------------------------------


def _duplicate_node(model):
    model.graph.node.append(model.graph.node[0])


def _cycle(model):
    model.graph.node[0].input[0] = model.graph.node[1].output[0]


def _float_data_mismatch(model):
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.float_data[:] = [0.0]


def _unknown_data_type(model):
    model.graph.initializer[0].data_type = 99


def _null_byte_location(model):
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="data.bin\x00x")


def _string_with_raw_data(model):
    model.graph.initializer[0].data_type = TensorProto.STRING


@pytest.mark.parametrize(("mutate", "says"), [
    (_duplicate_node, "malformed"), (_cycle, "cycle"), (_float_data_mismatch, "need 216 values but it holds 1"), (_unknown_data_type, "unknown data type 99"),
    (_string_with_raw_data, "need 216 values but it holds 0"),
    (_null_byte_location, "must be a relative path inside the model's folder"),
])
def test_found_by_fuzzing(cli, tmp_path, mutate, says):
    model = onnx.ModelProto()
    model.CopyFrom(BASE.model)
    mutate(model)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    result = cli("convert", path, "--act-bits", "0")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and says in lines[0], result.stderr
