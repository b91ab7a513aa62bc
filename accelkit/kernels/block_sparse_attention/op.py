"""``torch.ops.accelkit.block_sparse_attention``: the custom op, its fake, and the Python wrapper.

Backend choice is explicit and logged once per (device type, backend): the op runs the Triton kernel
for CUDA inputs when ``triton`` imports, and the reference otherwise (CPU, or CUDA without triton: that
case is logged as a warning, since the reference is slow). The wrapper's ``backend="triton"`` raises
when Triton cannot run instead of falling back.
"""

from __future__ import annotations

import logging
import math

import torch

from accelkit.kernels._backend import BACKENDS, BackendLog
from accelkit.kernels._backend import resolve_backend as _resolve_backend

from .reference import block_sparse_attention_reference

__all__ = ["block_sparse_attention", "resolve_backend", "BACKENDS"]

logger = logging.getLogger(__name__)

_log_choice = BackendLog(logger, "accelkit::block_sparse_attention", "correct, but slow and memory-hungry")
_LOGGED = _log_choice.seen


def _triton_available() -> bool:
    from .triton import is_available

    return is_available()


def resolve_backend(device: torch.device | str, backend: str = "auto") -> str:
    """The backend that runs for inputs on ``device`` (see :func:`accelkit.kernels._backend.resolve_backend`)."""
    return _resolve_backend(device, backend, _triton_available)


def _run(q, k, v, counts, indices, block_q, block_k, scale, backend):
    chosen = resolve_backend(q.device, backend)
    _log_choice(q.device.type, chosen)
    if chosen == "triton":
        from .triton import block_sparse_attention_triton

        return block_sparse_attention_triton(
            q, k, v, counts, indices, block_q=block_q, block_k=block_k, scale=scale
        )
    return block_sparse_attention_reference(
        q, k, v, counts, indices, block_q=block_q, block_k=block_k, scale=scale
    )


@torch.library.custom_op("accelkit::block_sparse_attention", mutates_args=())
def _block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_counts: torch.Tensor,
    kv_block_indices: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
) -> torch.Tensor:
    return _run(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k, scale, "auto")


@_block_sparse_attention_op.register_fake
def _(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_counts: torch.Tensor,
    kv_block_indices: torch.Tensor,
    *,
    block_q: int = 128,
    block_k: int = 64,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-sparse attention (forward only).

    ``backend="auto"`` goes through ``torch.ops.accelkit.block_sparse_attention`` (so it captures under
    ``torch.export`` / ``torch.compile``); ``"triton"`` checks that Triton can run (raises otherwise)
    and then uses the same op; ``"reference"`` calls the PyTorch reference directly.

    Args:
        q: ``(B, H, Lq, D)``.
        k: ``(B, H, Lk, D)``.
        v: ``(B, H, Lk, Dv)``.
        kv_block_counts: int32 ``(B, H, NQ)``, kept KV blocks per query block.
        kv_block_indices: int32 ``(B, H, NQ, W)``, kept KV block indices (first ``count`` read).
        block_q: query block size of the mask.
        block_k: key/value block size of the mask.
        scale: softmax scale; ``1 / sqrt(D)`` when ``None``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(B, H, Lq, Dv)`` in ``q``'s dtype.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    chosen = resolve_backend(q.device, backend)
    if backend == "reference":
        _log_choice(q.device.type, chosen)
        return block_sparse_attention_reference(
            q, k, v, kv_block_counts, kv_block_indices, block_q=block_q, block_k=block_k, scale=scale
        )
    return torch.ops.accelkit.block_sparse_attention(
        q, k, v, kv_block_counts, kv_block_indices, int(block_q), int(block_k), float(scale)
    )
