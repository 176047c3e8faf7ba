"""fgq-onnx: fine-grained ternary quantization of ONNX models.

    import fgq_onnx
    model, report = fgq_onnx.convert("model.onnx", n=4, calib="imgs/")
    fgq_onnx.save(model, "model.fgq.onnx")
    options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(fgq_onnx.library_path())  # runs the com.fgq ops
"""

__version__ = "0.1.0"

import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def _register_source_passes() -> None:
    """In a source checkout, passes/ sits beside this package (the wheel installs it inside): make it fgq_onnx.passes.

    So that `import fgq_onnx` works from the repository root, where this source tree shadows the installed package.
    """
    package = Path(__file__).resolve().parent
    inside, beside = package / "passes", package.parent / "passes"
    if inside.is_dir() or not beside.is_dir():
        return
    spec = importlib.machinery.ModuleSpec("fgq_onnx.passes", None, is_package=True)
    spec.submodule_search_locations = [str(beside)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    globals()["passes"] = module  # as importing the submodule would


_register_source_passes()

from fgq_onnx.calibration import CalibMethod  # noqa: E402
from fgq_onnx.data import Color, ImageOptions, Layout  # noqa: E402
from fgq_onnx.errors import FgqError  # noqa: E402
from fgq_onnx.pipeline import Conversion, ConvertConfig, OutputFormat, convert, save  # noqa: E402
from fgq_onnx.runtime import library_path  # noqa: E402
from fgq_onnx.ternary import Method  # noqa: E402

__all__ = ["CalibMethod", "Color", "Conversion", "ConvertConfig", "FgqError", "ImageOptions", "Layout", "Method", "OutputFormat", "convert", "library_path", "save", "__version__"]
