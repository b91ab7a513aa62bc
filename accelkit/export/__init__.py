"""accelkit.export: a program's graph variants as ONNX models (checked against PyTorch with onnxruntime).

``onnx``/``onnxruntime`` are imported when an export or a check runs, not when this package is imported.
"""

from accelkit.export.onnx import (
    MANIFEST_NAME,
    OnnxExportError,
    example_inputs,
    export_program_onnx,
    onnx_lowerings,
    read_manifest,
    register_onnx_lowering,
    sanitize_name,
    verify_files,
)

__all__ = [
    "MANIFEST_NAME",
    "OnnxExportError",
    "example_inputs",
    "export_program_onnx",
    "onnx_lowerings",
    "read_manifest",
    "register_onnx_lowering",
    "sanitize_name",
    "verify_files",
]
