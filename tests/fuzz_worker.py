"""Runs fuzz cases for tests/test_fuzz.py in a process of its own, so that a crash or a hang is seen, not suffered.

Reads one JSON request a line from stdin, answers one JSON line on stdout:
- {"convert": MODEL, "calib": NPZ or null}: fgq_onnx.convert then save beside the model;
- {"session": MODEL, "feeds": NPZ}: an onnxruntime session with the custom-op library, one run.
The answer is {"outcome": "ok"} or {"outcome": "refused", "error": ...} for a
clean error (FgqError from the converter, any exception from onnxruntime), or
{"outcome": "unclean", "error": ...} for anything else: a bug.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import numpy as np


def convert(model: str, calib: str | None) -> None:
    import fgq_onnx

    settings = dict(act_bits=8, calib=calib, refine_samples=8) if calib else dict(act_bits=0, bias_correction=False)
    converted, _ = fgq_onnx.convert(model, n=4, **settings)
    fgq_onnx.save(converted, Path(model).with_suffix(".fgq.onnx"))


def session(model: str, feeds: str) -> None:
    from fgq_onnx import runtime

    with np.load(feeds) as data:
        runtime.inference_session(model).run(None, {k: data[k] for k in data.files})


def handle(request: dict) -> dict:
    from fgq_onnx.errors import FgqError

    try:
        if "convert" in request:
            convert(request["convert"], request.get("calib"))
        else:
            session(request["session"], request["feeds"])
    except FgqError as error:
        return {"outcome": "refused", "error": str(error)}
    except Exception as error:  # noqa: BLE001 - classifying every error is the point
        if "session" in request:  # onnxruntime's own exception types: a clean refusal of a bad node
            return {"outcome": "refused", "error": f"{type(error).__name__}: {error}"}
        return {"outcome": "unclean", "error": "".join(traceback.format_exception(error))[-3000:]}
    return {"outcome": "ok"}


def main() -> None:
    import warnings

    warnings.simplefilter("ignore")
    for line in sys.stdin:
        print(json.dumps(handle(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
