"""Reading and writing models safely.

Loading checks what a file claims before trusting it: that it parses, that
external data stays inside the model's folder and inside its files, and that
tensor sizes agree with their bytes. Saving writes to a temporary file beside
the target and renames it, so an interrupted run leaves no half-written model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
from google.protobuf.message import DecodeError

from fgq_onnx.errors import FgqError

MIN_IR_VERSION = 3
MIN_OPSET = 7
# Models over protobuf's 2 GB limit must keep their weights in external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block ends, then raise it: files the block writes get closed, folders made whole.

    A KeyboardInterrupt can otherwise land between a library's open() and its `with`, leaving the file to the
    garbage collector (an "unclosed file" warning). Only the main thread receives signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
        previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt


@contextlib.contextmanager
def temporary_folder(prefix: str) -> Iterator[Path]:
    """A temporary folder that is gone when the block ends, however it ends: a Ctrl-C waits for its creation and removal."""
    folder = None
    try:
        with interrupts_deferred():
            folder = Path(tempfile.mkdtemp(prefix=prefix))
        yield folder
    finally:
        if folder is not None:
            with interrupts_deferred():
                shutil.rmtree(folder, ignore_errors=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _graphs(graph: onnx.GraphProto):
    """The graph and every subgraph below it (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from _graphs(sub)


def _tensors(model: onnx.ModelProto):
    for graph in _graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's dims and type need, or None for types without a fixed size."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    if any(d < 0 for d in tensor.dims):
        raise FgqError(f"tensor '{tensor.name}' has a negative dimension {list(tensor.dims)}")
    count = int(np.prod(tensor.dims, dtype=object))
    bits = ir.DataType(tensor.data_type).bitwidth
    return -(-count * bits // 8)


def _check_external(tensor: onnx.TensorProto, base_dir: Path) -> None:
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    name = tensor.name
    if not location or "\0" in location or os.path.isabs(location) or ".." in Path(location).parts:
        raise FgqError(f"tensor '{name}': external data location '{location}' must be a relative path inside the model's folder")
    path = base_dir / location
    real_base = base_dir.resolve()
    if real_base not in path.resolve().parents:
        raise FgqError(f"tensor '{name}': external data '{location}' leads outside the model's folder")
    if not path.is_file():
        raise FgqError(f"tensor '{name}': external data file '{location}' is missing")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise FgqError(f"tensor '{name}': external data offset/length are not integers") from None
    size = path.stat().st_size
    expected = _expected_bytes(tensor)
    length = size - offset if length is None else length
    if offset < 0 or length < 0 or offset + length > size:
        raise FgqError(f"tensor '{name}': external data offset {offset} + length {length} runs past the end of '{location}' ({size} bytes)")
    if expected is not None and expected != length:
        raise FgqError(f"tensor '{name}': dims {list(tensor.dims)} need {expected} bytes but its external data holds {length}")


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def _expected_values(tensor: onnx.TensorProto) -> int:
    """Entries the typed field (float_data, int32_data, ...) needs: complex takes two, sub-byte types pack into one."""
    count = int(np.prod(tensor.dims, dtype=object))
    if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        return 2 * count
    bits = ir.DataType(tensor.data_type).bitwidth if tensor.data_type != onnx.TensorProto.STRING else 8
    return -(-count * bits // 8) if bits < 8 else count


def _check_inline(tensor: onnx.TensorProto) -> None:
    if tensor.HasField("raw_data") and tensor.data_type != onnx.TensorProto.STRING:  # strings live in string_data only
        expected, held, unit = _expected_bytes(tensor), len(tensor.raw_data), "bytes"
    else:
        expected, held, unit = _expected_values(tensor), max(len(getattr(tensor, f)) for f in _TYPED_FIELDS), "values"
    if expected is not None and expected != held:
        raise FgqError(f"tensor '{tensor.name}': dims {list(tensor.dims)} need {expected} {unit} but it holds {held}")


def _check_model(model: onnx.ModelProto, base_dir: Path) -> None:
    if not model.HasField("graph") or not model.graph.node:
        raise FgqError("the file is not an ONNX model (no graph or no nodes)")
    if model.ir_version < MIN_IR_VERSION:
        raise FgqError(f"IR version {model.ir_version} is too old; {MIN_IR_VERSION} or newer is needed")
    opset = default_opset(model)
    if opset is None or opset < MIN_OPSET:
        raise FgqError(f"opset {opset} is too old; {MIN_OPSET} or newer is needed")
    for tensor in _tensors(model):
        if tensor.data_type not in onnx.TensorProto.DataType.values() or tensor.data_type == onnx.TensorProto.UNDEFINED:
            raise FgqError(f"tensor '{tensor.name}' has an unknown data type {tensor.data_type}")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external(tensor, base_dir)
        else:
            _check_inline(tensor)


def default_opset(model: onnx.ModelProto) -> int | None:
    return next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), None)


def read_model_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse and validate a model file, leaving external data on disk."""
    path = Path(path)
    if path.is_dir():
        raise FgqError(f"model '{path}' is a folder, not a model file")
    if not path.is_file():
        raise FgqError(f"model file '{path}' does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as error:
        raise FgqError(f"'{path}' is not a readable ONNX model (corrupt or truncated): {error}") from None
    _check_model(model, path.parent)
    return model


def upgrade_opset(model: onnx.ModelProto, opset: int) -> tuple[onnx.ModelProto, bool]:
    """Bring the default-domain opset up to `opset` with onnx's version converter."""
    model = negative_dims_to_dynamic(model)
    current = default_opset(model)
    if current is not None and current >= opset:
        return model, False
    try:
        return onnx.version_converter.convert_version(model, opset), True
    except Exception as error:  # noqa: BLE001 - the converter raises many types
        raise FgqError(f"cannot upgrade the model from opset {current} to {opset}: {str(error).splitlines()[0]}") from None


def to_ir(model: onnx.ModelProto, base_dir: Path) -> ir.Model:
    """Proto -> onnx-ir model whose external tensors load lazily from base_dir (dims of -1 made dynamic)."""
    try:
        ir_model = ir.serde.deserialize_model(negative_dims_to_dynamic(model))
    except Exception as error:  # noqa: BLE001 - onnx-ir wraps what it finds (duplicate outputs, bad types, ...) in SerdeError
        raise FgqError(f"the model's graph is malformed: {_innermost(error)}") from None
    try:
        ir_model.graph.sort()  # nodes in dependency order, as the passes expect
    except ValueError:
        raise FgqError("the model's graph has a cycle: a node depends on its own output") from None
    ir.external_data.set_base_dir(ir_model.graph, str(base_dir))
    return ir_model


def negative_dims_to_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`, or a copy whose declared dimensions of -1 (Paddle's 'any size') are unnamed dynamic ones instead.

    Left as -1, shape inference (in onnx's version converter too) computes
    sizes from it, e.g. a pool's output size 0, and onnxruntime then rejects the graph.
    """
    def negative(proto: onnx.ModelProto):
        for graph in _graphs(proto.graph):
            for value in (*graph.input, *graph.output, *graph.value_info):
                yield from (d for d in value.type.tensor_type.shape.dim if d.HasField("dim_value") and d.dim_value < 0)

    if next(negative(model), None) is None:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for dim in list(negative(copy)):
        dim.Clear()
    return copy


def _innermost(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def weight_bytes(model: ir.Model) -> int:
    """Bytes held by initializers in all graphs (INT2 counts a quarter byte)."""
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def _external_files(model: ir.Model) -> set[Path]:
    files = set()
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                files.add(Path(value.const_value.path).resolve())
    return files


def check_output_path(output: Path, inputs: list[Path]) -> None:
    """Refuse outputs that would overwrite an input or land in a missing folder."""
    if not output.parent.is_dir():
        raise FgqError(f"output folder '{output.parent}' does not exist")
    if output.is_dir():
        raise FgqError(f"output '{output}' is a folder; give a file path")
    for source in inputs:
        if output.resolve() == source.resolve() or (output.exists() and source.exists() and os.path.samefile(output, source)):
            raise FgqError(f"output '{output}' is the input file; choose another path")
        # Only an existing file can be a model's external data, so new outputs cost no extra parse.
        if output.is_file() and source.is_file() and source.suffix != ".npz" and output.resolve() in _model_data_files(source):
            raise FgqError(f"output '{output}' holds external data of the input '{source}'; choose another path")


def _model_data_files(path: Path) -> set[Path]:
    """The external data files a model file refers to (none if it does not parse)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model: the conversion reports that itself
        return set()
    files = set()
    for tensor in _tensors(model):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if tensor.data_location == onnx.TensorProto.EXTERNAL and location:
            files.add((path.parent / location).resolve())
    return files


def save_model(model: ir.Model, output: Path, *, external_data: bool | None = None) -> Path | None:
    """Write atomically; external data in '<output>.data' on request or when over 2 GB.

    Returns the external data path when one was written.
    """
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_path = output.with_name(output.name + ".data") if external_data else None
    if data_path is not None and data_path.resolve() in _external_files(model):
        raise FgqError(f"external data file '{data_path}' is read by the model being saved; choose another output")
    handle, temp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp_name, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
    try:
        ir.save(model, temp_name, external_data=data_path.name if data_path else None)
        os.replace(temp_name, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        if data_path is not None:
            with contextlib.suppress(OSError):
                data_path.unlink()
        raise
    return data_path
