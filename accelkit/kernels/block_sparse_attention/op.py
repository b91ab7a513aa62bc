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

from .reference import block_sparse_attention_reference

__all__ = ["block_sparse_attention", "resolve_backend", "BACKENDS"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "reference")
_LOGGED: set[tuple[str, str]] = set()


def _triton_available() -> bool:
    from .triton import is_available

    return is_available()


def resolve_backend(device: torch.device | str, backend: str = "auto") -> str:
    """Return the backend (``"triton"`` or ``"reference"``) that runs for inputs on ``device``.

    Args:
        device: device of the inputs.
        backend: ``"auto"`` (Triton on CUDA when importable, else the reference), ``"triton"`` (raise
            if it cannot run) or ``"reference"``.

    Raises:
        ValueError: unknown backend.
        RuntimeError: ``"triton"`` requested but triton is not importable or the device is not CUDA.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device_type = torch.device(device).type
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if device_type != "cuda":
            raise RuntimeError(f"backend='triton' needs CUDA tensors, got device {device_type!r}")
        if not _triton_available():
            raise RuntimeError("backend='triton' requested but triton is not importable (pip install triton)")
        return "triton"
    return "triton" if device_type == "cuda" and _triton_available() else "reference"


def _log_choice(device_type: str, chosen: str) -> None:
    key = (device_type, chosen)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    if device_type == "cuda" and chosen == "reference":
        logger.warning(
            "accelkit::block_sparse_attention: triton is not importable; CUDA inputs run the dense "
            "PyTorch reference (correct, but slow and memory-hungry)"
        )
    else:
        logger.info("accelkit::block_sparse_attention: %s inputs run the %s backend", device_type, chosen)


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
