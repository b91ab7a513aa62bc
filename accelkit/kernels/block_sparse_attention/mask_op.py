"""``torch.ops.accelkit.predict_block_mask``: SpargeAttn block-mask prediction as a custom op.

The op wraps :func:`predict_block_mask_with_dense_tokens`, which extends the reference
:func:`~accelkit.kernels.block_sparse_attention.reference.predict_block_mask` with token ranges that
stay dense: joint-attention models (Flux, SD3) put the text tokens first or last in the sequence, and
their rows and columns are kept whole (SpargeAttn keeps text tokens dense). The op returns the
``(counts, indices)`` form :func:`torch.ops.accelkit.block_sparse_attention` reads, so the pair
captures under ``torch.export`` / ``torch.compile`` as two graph nodes with no host sync.

Only the PyTorch reference exists so far (CPU and CUDA; on CUDA it is a handful of small kernels);
a fused Triton version is future work and will keep this signature.
"""

from __future__ import annotations

import logging
import math

import torch

from .reference import (
    _block_mean,
    _block_self_similarity,
    indices_from_dense_mask,
    num_blocks,
    predict_block_mask,
    top_p_block_mask,
)

__all__ = ["predict_block_mask_op", "predict_block_mask_with_dense_tokens"]

logger = logging.getLogger(__name__)
_LOGGED: set[str] = set()


def _dense_blocks(length: int, block: int, prefix: int, suffix: int, device: torch.device) -> torch.Tensor:
    """bool ``(NB,)``: blocks holding any of the first ``prefix`` or last ``suffix`` tokens."""
    starts = torch.arange(num_blocks(length, block), device=device) * block
    ends = torch.clamp(starts + block, max=length)
    return (starts < prefix) | (ends > length - suffix)


def predict_block_mask_with_dense_tokens(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int = 128,
    block_k: int = 64,
    tau: float = 0.9,
    min_blocks: int = 1,
    similarity_threshold: float | None = None,
    dense_prefix: int = 0,
    dense_suffix: int = 0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SpargeAttn block mask where the first ``dense_prefix`` / last ``dense_suffix`` tokens stay dense.

    A query block holding any of those tokens keeps every KV block (its rows are exact); a KV block
    holding any of them is kept for every query block and is left out of the pooled softmax, as the
    self-similarity rule does for dissimilar key blocks, so it takes no top-p mass from the others.
    The ranges apply to both the query and the key sequence (joint self-attention, ``Lq == Lk``).
    With no dense range this is exactly :func:`predict_block_mask`.

    Args:
        q: ``(B, H, Lq, D)``.
        k: ``(B, H, Lk, D)``.
        block_q: query block size.
        block_k: key block size.
        tau: top-p mass in ``[0, 1]``.
        min_blocks: minimum pooled-selected KV blocks per query block.
        similarity_threshold: θ of the self-similarity rule, or ``None``.
        dense_prefix: number of leading tokens kept dense.
        dense_suffix: number of trailing tokens kept dense.
        scale: score scale; ``1 / sqrt(D)`` when ``None``.

    Returns:
        ``(counts, indices)``: int32 ``(B, H, NQ)`` and int32 ``(B, H, NQ, NK)``.
    """
    if dense_prefix < 0 or dense_suffix < 0:
        raise ValueError(f"dense token ranges must be >= 0, got {dense_prefix}, {dense_suffix}")
    if dense_prefix == 0 and dense_suffix == 0:
        return predict_block_mask(
            q, k, block_q=block_q, block_k=block_k, tau=tau, min_blocks=min_blocks,
            similarity_threshold=similarity_threshold, scale=scale,
        )
    if not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    pq = _block_mean(q, block_q) * scale
    pk = _block_mean(k, block_k)
    scores = torch.matmul(pq, pk.transpose(-1, -2))  # (B, H, NQ, NK)
    nq, nk = scores.shape[-2:]
    dense_q = _dense_blocks(lq, block_q, dense_prefix, dense_suffix, q.device).expand(b, h, nq)
    dense_k = _dense_blocks(lk, block_k, dense_prefix, dense_suffix, k.device).expand(b, h, nk)
    if similarity_threshold is not None:
        dense_q = dense_q | (_block_self_similarity(q, block_q) < similarity_threshold)
        dense_k = dense_k | (_block_self_similarity(k, block_k) < similarity_threshold)
    scores = scores.masked_fill(dense_k[:, :, None, :], float("-inf"))
    # A row whose key blocks are all dense has no pooled distribution (NaN); dense_k keeps them anyway.
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    keep = top_p_block_mask(probs, tau, min_blocks)
    keep = keep | dense_k[:, :, None, :] | dense_q[:, :, :, None]
    return indices_from_dense_mask(keep)


@torch.library.custom_op("accelkit::predict_block_mask", mutates_args=())
def _predict_block_mask_op(
    q: torch.Tensor,
    k: torch.Tensor,
    block_q: int,
    block_k: int,
    tau: float,
    min_blocks: int,
    similarity_threshold: float | None,
    dense_prefix: int,
    dense_suffix: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if q.device.type not in _LOGGED:
        _LOGGED.add(q.device.type)
        # Explicit and logged: there is no Triton mask kernel yet, every device runs the reference.
        logger.info("accelkit::predict_block_mask: %s inputs run the reference backend", q.device.type)
    counts, indices = predict_block_mask_with_dense_tokens(
        q, k, block_q=block_q, block_k=block_k, tau=tau, min_blocks=min_blocks,
        similarity_threshold=similarity_threshold, dense_prefix=dense_prefix, dense_suffix=dense_suffix,
        scale=scale,
    )
    return counts.contiguous(), indices.contiguous()


@_predict_block_mask_op.register_fake
def _(q, k, block_q, block_k, tau, min_blocks, similarity_threshold, dense_prefix, dense_suffix, scale):
    b, h, lq, _ = q.shape
    nq, nk = num_blocks(lq, block_q), num_blocks(k.shape[2], block_k)
    return q.new_empty((b, h, nq), dtype=torch.int32), q.new_empty((b, h, nq, nk), dtype=torch.int32)


def predict_block_mask_op(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int = 128,
    block_k: int = 64,
    tau: float = 0.9,
    min_blocks: int = 1,
    similarity_threshold: float | None = None,
    dense_prefix: int = 0,
    dense_suffix: int = 0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.accelkit.predict_block_mask`` with keyword arguments (see
    :func:`predict_block_mask_with_dense_tokens`)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.accelkit.predict_block_mask(
        q, k, int(block_q), int(block_k), float(tau), int(min_blocks),
        None if similarity_threshold is None else float(similarity_threshold),
        int(dense_prefix), int(dense_suffix), float(scale),
    )
