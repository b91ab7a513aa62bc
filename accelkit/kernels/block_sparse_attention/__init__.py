"""Block-sparse attention: reference (truth), Triton kernel, and the ``accelkit::block_sparse_attention`` op.

Importing this package imports torch but not triton (``triton.py`` imports it lazily) and registers the
custom op ``torch.ops.accelkit.block_sparse_attention``; :mod:`.mask_op` adds
``torch.ops.accelkit.predict_block_mask``. Both ops' registry entries (cost, ONNX lowering, TensorRT
plugin) are in :mod:`.registration`, imported here.
"""

from __future__ import annotations

from typing import Any

from . import registration as _registration  # noqa: F401  (registers the ops' specs)
from .op import block_sparse_attention
from .reference import (
    block_sparse_attention_reference,
    dense_mask_from_indices,
    indices_from_dense_mask,
    predict_block_mask,
)

_LAZY = {
    "block_sparse_attention_triton": (
        "accelkit.kernels.block_sparse_attention.triton",
        "block_sparse_attention_triton",
    ),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "block_sparse_attention_triton",
    "dense_mask_from_indices",
    "indices_from_dense_mask",
    "predict_block_mask",
]
