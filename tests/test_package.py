"""The package as a user meets it: the top-level library_path()."""

from __future__ import annotations

import onnxruntime as ort
import pytest
from test_runtime_helpers import library_or_skip

import fgq_onnx
from fgq_onnx import runtime


def test_library_path_is_a_str_that_onnxruntime_registers():
    library_or_skip()
    path = fgq_onnx.library_path()
    assert isinstance(path, str) and path == runtime.library_path()
    ort.SessionOptions().register_custom_ops_library(path)  # a pathlib.Path raises TypeError here


def test_library_path_names_a_missing_override(monkeypatch, tmp_path):
    monkeypatch.setenv(runtime.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(runtime.RuntimeLibraryError, match="missing.so is not a file"):
        fgq_onnx.library_path()
