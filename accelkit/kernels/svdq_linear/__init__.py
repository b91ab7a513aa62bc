"""SVDQuant 4-bit linear: reference (truth), Triton kernel, and the ``accelkit::svdq_linear`` op.

Importing this package imports torch but not triton (``triton.py`` imports it lazily) and registers the
custom op ``torch.ops.accelkit.svdq_linear`` with its registry entry (:mod:`.registration`: cost,
precision, ONNX lowering). The lowering itself lives in :mod:`.onnx_lowering` (imports onnxscript) and
is imported when an export runs.
"""

from __future__ import annotations

from typing import Any

from . import registration as _registration  # noqa: F401  (registers the op's spec)
from .op import svdq_linear
from .reference import (
    ACT_MODES,
    dequantize_weight_int4,
    fake_quant_act,
    fake_quant_weight_int4,
    pack_int4,
    quantize_act_fp8,
    quantize_act_int4,
    quantize_weight_int4,
    svdq_linear_reference,
    unpack_int4,
)

_LAZY = {"svdq_linear_triton": ("accelkit.kernels.svdq_linear.triton", "svdq_linear_triton")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACT_MODES",
    "dequantize_weight_int4",
    "fake_quant_act",
    "fake_quant_weight_int4",
    "pack_int4",
    "quantize_act_fp8",
    "quantize_act_int4",
    "quantize_weight_int4",
    "svdq_linear",
    "svdq_linear_reference",
    "svdq_linear_triton",
    "unpack_int4",
]
