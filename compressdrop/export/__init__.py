"""Export slim models to ONNX, verified in onnxruntime, and to ``torch.export`` programs
(``.pt2``), verified by loading them back."""

from .onnx import (
    ExportError,
    ExportMismatchError,
    ExportReport,
    ExportWarning,
    export_onnx,
    load_onnx_metadata,
)
from .program import ProgramReport, export_program

__all__ = [
    "ExportError",
    "ExportMismatchError",
    "ExportReport",
    "ExportWarning",
    "ProgramReport",
    "export_onnx",
    "export_program",
    "load_onnx_metadata",
]
