"""The package as a user meets it: the top-level library_path(), imports from the repository root."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

import fgq_onnx
from fgq_onnx import runtime
from test_runtime_helpers import library_or_skip


def test_library_path_is_a_str_that_onnxruntime_registers():
    library_or_skip()
    path = fgq_onnx.library_path()
    assert isinstance(path, str) and path == runtime.library_path()
    ort.SessionOptions().register_custom_ops_library(path)  # a pathlib.Path raises TypeError here


def test_library_path_names_a_missing_override(monkeypatch, tmp_path):
    monkeypatch.setenv(runtime.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(runtime.RuntimeLibraryError, match="missing.so is not a file"):
        fgq_onnx.library_path()


def test_imports_from_the_repository_root_use_the_source_tree_and_the_installed_library():
    """From the root of a checkout, the source tree shadows the installed package and has no fgq_onnx/passes."""
    library_or_skip()
    root = Path(__file__).resolve().parent.parent
    script = ("import fgq_onnx.runtime, fgq_onnx.passes, fgq_onnx.passes.use_custom_ops as custom, fgq_onnx; "
              "print(fgq_onnx.__file__); print(custom.__file__); print(fgq_onnx.library_path())")
    env = {k: v for k, v in os.environ.items() if k != runtime.LIBRARY_ENV}
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, check=True)
    package, passes, library = result.stdout.splitlines()
    assert Path(package) == root / "fgq_onnx" / "__init__.py"
    assert Path(passes) == root / "passes" / "use_custom_ops.py"
    assert Path(library).is_file() and Path(library) == Path(runtime.library_path())


def test_library_path_falls_back_to_the_installed_distribution_then_says_what_is_missing(monkeypatch, tmp_path):
    installed = library_or_skip()
    monkeypatch.delenv(runtime.LIBRARY_ENV, raising=False)
    monkeypatch.setattr(runtime, "__file__", str(tmp_path / "runtime.py"))  # a package folder without the library
    assert fgq_onnx.library_path() == installed

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(runtime.RuntimeLibraryError, match=r"is not built \(looked in .* and in the installed fgq-onnx\)"):
        fgq_onnx.library_path()
