"""Load the com.fgq custom-op library (libfgq_ops.so) into onnxruntime.

The library is built by `pip install .` and installed inside this package;
FGQ_OPS_LIBRARY overrides the path (e.g. a sanitizer build). FGQ_KERNEL
(ref, avx2, avxvnni, avx512vnni) forces a kernel path; it is read when a session
creates its kernels, so `inference_session(kernel=...)` sets it for that
moment only.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import pathlib
import threading
from collections.abc import Iterator, Sequence

import onnxruntime as ort

from fgq_onnx.errors import FgqError

DOMAIN = "com.fgq"
LIBRARY_ENV = "FGQ_OPS_LIBRARY"
KERNEL_ENV = "FGQ_KERNEL"
KERNELS = ("ref", "avx2", "avxvnni", "avx512vnni")  # the last a CPU supports is its default
_LIBRARY_NAME = "libfgq_ops.so"
_env_lock = threading.Lock()


class RuntimeLibraryError(FgqError):
    """The custom-op library is missing, cannot be loaded, or rejected an option (an FgqError: the CLI prints it)."""


def library_path() -> str:
    """Path of the custom-op library, as the str SessionOptions.register_custom_ops_library takes.

    $FGQ_OPS_LIBRARY if set, else the one installed beside this module, else (when this module is
    imported from a source checkout, which shadows the installed package) the installed distribution's.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = pathlib.Path(override)
        if not path.is_file():
            raise RuntimeLibraryError(f"{LIBRARY_ENV}={override} is not a file")
        return str(path.resolve())
    here = pathlib.Path(__file__).resolve().parent
    for path in (here / _LIBRARY_NAME, _installed_library()):
        if path is not None and path.is_file():
            return str(path)
    raise RuntimeLibraryError(
        f"the custom-op library {_LIBRARY_NAME} is not built (looked in {here} and in the installed fgq-onnx); "
        f"install the package with `pip install .` or set {LIBRARY_ENV}"
    )


def _installed_library() -> pathlib.Path | None:
    """The library in the installed fgq-onnx distribution, if one is installed."""
    try:
        distribution = importlib.metadata.distribution("fgq-onnx")
    except importlib.metadata.PackageNotFoundError:
        return None
    recorded = [file for file in distribution.files or () if file.name == _LIBRARY_NAME]  # its RECORD: normal or editable
    return pathlib.Path(str(distribution.locate_file(recorded[0]))).resolve() if recorded else None


@contextlib.contextmanager
def _kernel_env(kernel: str | None) -> Iterator[None]:
    if kernel is None:
        yield
        return
    if kernel not in KERNELS:
        raise RuntimeLibraryError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    with _env_lock:
        previous = os.environ.get(KERNEL_ENV)
        os.environ[KERNEL_ENV] = kernel
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(KERNEL_ENV, None)
            else:
                os.environ[KERNEL_ENV] = previous


def session_options(
    threads: int | None = None,
    options: ort.SessionOptions | None = None,
    graph_optimization_level: ort.GraphOptimizationLevel | None = None,
) -> ort.SessionOptions:
    """SessionOptions with the custom-op library registered (and intra-op threads if given)."""
    opts = options if options is not None else ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise RuntimeLibraryError(f"threads must be >= 1, got {threads}")
        opts.intra_op_num_threads = threads
    if graph_optimization_level is not None:
        opts.graph_optimization_level = graph_optimization_level
    path = library_path()
    try:
        opts.register_custom_ops_library(path)
    except Exception as error:  # onnxruntime raises its own exception types
        raise RuntimeLibraryError(f"cannot load {path}: {error}") from error
    return opts


def inference_session(
    model: str | os.PathLike | bytes,
    threads: int | None = None,
    kernel: str | None = None,
    options: ort.SessionOptions | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    graph_optimization_level: ort.GraphOptimizationLevel | None = None,
) -> ort.InferenceSession:
    """An InferenceSession that runs the com.fgq ops; `kernel` forces ref, avx2, avxvnni or avx512vnni.

    A model whose com.fgq overloads were lost (an onnx-graphsurgeon round trip: onnxruntime refuses its
    duplicate function names) is opened with them restored (custom_op_functions.restore_overloads).
    """
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    with _kernel_env(kernel):
        opts = session_options(threads, options, graph_optimization_level)
        try:
            return ort.InferenceSession(model, sess_options=opts, providers=list(providers))
        except Exception as error:
            if kernel is not None and KERNEL_ENV in str(error):
                raise RuntimeLibraryError(str(error)) from error
            if _DUPLICATE_FUNCTION not in str(error):
                raise
        return ort.InferenceSession(_with_overloads(model), sess_options=opts, providers=list(providers))


_DUPLICATE_FUNCTION = "Duplicate model-local function identifier"


def _with_overloads(model: str | bytes) -> bytes:
    """The serialized model with its com.fgq overloads restored (external data read in: bytes carry no folder)."""
    import onnx

    from fgq_onnx.custom_op_functions import restore_overloads

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
    return restore_overloads(proto).SerializeToString()


def supported_kernels() -> list[str]:
    """Kernel paths this CPU runs, as the library's dispatch sees them (ref always)."""
    found = ["ref"]
    for name in KERNELS[1:]:
        with _kernel_env(name):
            try:
                session_options()
            except RuntimeLibraryError:
                continue
        found.append(name)
    return found
