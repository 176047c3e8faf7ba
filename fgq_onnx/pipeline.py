"""convert(): one group size for every layer (stages.convert_fixed) or, with n="auto", one searched per layer (mixed.py).

The stages both paths share live in fgq_onnx/stages.py; their public names are
re-exported here, so that `pipeline.ConvertConfig`, `pipeline.save`, ... keep working.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import onnx
import onnx_ir as ir

from fgq_onnx import mixed
from fgq_onnx.errors import FgqError
from fgq_onnx.stages import (
    CalibrationCache,
    Conversion,
    ConvertConfig,
    OutputFormat,
    check_model,
    collect_calibration,
    convert_fixed,
    infer_shapes,
    load_model,
    nothing_to_convert,
    prepare,
    save,
    skip_rule,
    stamp,
)

__all__ = [
    "CalibrationCache",
    "Conversion",
    "ConvertConfig",
    "OutputFormat",
    "check_model",
    "collect_calibration",
    "convert",
    "infer_shapes",
    "load_model",
    "nothing_to_convert",
    "prepare",
    "save",
    "skip_rule",
    "stamp",
]


def convert(
    model: str | Path | onnx.ModelProto | ir.Model,
    config: ConvertConfig | None = None,
    *,
    calib=None,
    on_progress: Callable[[int, int | None], None] | None = None,
    calibration_cache: CalibrationCache | None = None,
    data=None,
    on_search: Callable[[str, int, int | None], None] | None = None,
    **settings,
) -> Conversion:
    """Ternarize a model's Conv/Gemm/MatMul weights and quantize their activations.

    `model` is a path, an onnx.ModelProto or an onnx_ir.Model (not modified).
    `calib` is an image folder, an .npz file or an object with get_next()
    (onnxruntime's CalibrationDataReader protocol); it is needed unless
    act_bits=0. Settings are ConvertConfig's fields, given either as `config`
    or as keywords (n=4, method="exact", act_bits=8, ...).
    `calibration_cache` (from collect_calibration) replaces the calibration
    run and `calib`. Returns (model, report); save it with fgq_onnx.save.
    n="auto" with max_drop=D chooses a group size per layer (fgq_onnx/mixed.py):
    the smallest model that loses at most D points of top-1 on labelled
    `data`, or, without `data`, that disagrees with the fp32 model on at most
    D% of the calibration samples; `on_search(phase, advance, total)` follows it.
    """
    config = replace(config or ConvertConfig(), **settings) if settings else (config or ConvertConfig())
    if config.n == "auto":
        return mixed.convert_auto(model, config, calib=calib, data=data, calibration_cache=calibration_cache, on_step=on_search)
    if data is not None:
        raise FgqError("--data is only used by --n auto (to measure the accuracy of candidate plans)")
    return convert_fixed(model, config, calib=calib, on_progress=on_progress, calibration_cache=calibration_cache)
