"""fgq-onnx: fine-grained ternary quantization of ONNX models.

    import fgq_onnx
    model, report = fgq_onnx.convert("model.onnx", n=4, calib="imgs/")
    fgq_onnx.save(model, "model.fgq.onnx")
    options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(fgq_onnx.library_path())  # runs the com.fgq ops
"""

__version__ = "0.1.0"

from fgq_onnx.calibration import CalibMethod  # noqa: E402
from fgq_onnx.pipeline import Conversion, ConvertConfig, OutputFormat, convert, save  # noqa: E402
from fgq_onnx.data import Color, ImageOptions, Layout  # noqa: E402
from fgq_onnx.errors import FgqError  # noqa: E402
from fgq_onnx.runtime import library_path  # noqa: E402
from fgq_onnx.ternary import Method  # noqa: E402

__all__ = ["CalibMethod", "Color", "Conversion", "ConvertConfig", "FgqError", "ImageOptions", "Layout", "Method", "OutputFormat", "convert", "library_path", "save", "__version__"]
