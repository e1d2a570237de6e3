"""Export slim models to ONNX, verified in onnxruntime."""

from .onnx import ExportError, ExportMismatchError, ExportReport, export_onnx, load_onnx_metadata

__all__ = [
    "ExportError",
    "ExportMismatchError",
    "ExportReport",
    "export_onnx",
    "load_onnx_metadata",
]
