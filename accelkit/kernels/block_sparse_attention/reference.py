"""Block-sparse attention: the plain-PyTorch reference (defines truth) and the block-mask helpers.

Layout follows ``F.scaled_dot_product_attention``: ``q`` is ``(B, H, Lq, D)``, ``k`` is ``(B, H, Lk, D)``
and ``v`` is ``(B, H, Lk, Dv)``; ``Lq`` may differ from ``Lk`` and neither has to be a multiple of the
block sizes (the last query / key block is then partial).

The block mask is given in the compressed form the kernels walk (the same form as FlexAttention's
``BlockMask.kv_num_blocks`` / ``kv_indices``): for each ``(batch, head, query block)`` a count
``kv_block_counts[b, h, qb]`` (int32, ``(B, H, NQ)``) and a padded list of key/value block indices
``kv_block_indices[b, h, qb, :]`` (int32, ``(B, H, NQ, W)`` with ``W >= max count``); only the first
``count`` entries are read, they must be distinct and in ``[0, NK)``; the order does not matter.
``NQ = ceil(Lq / block_q)`` and ``NK = ceil(Lk / block_k)``.

A query block whose count is zero attends to nothing: its output rows are defined to be **zeros**
(the softmax over an empty set has no value; zeros keep the output finite and match what the Triton
kernel writes).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "block_sparse_attention_reference",
    "dense_mask_from_indices",
    "indices_from_dense_mask",
    "predict_block_mask",
    "num_blocks",
]

# Query rows processed per chunk by the reference, bounded so the fp32 score tile stays ~256 MiB.
_MAX_SCORE_ELEMENTS = 1 << 26


def num_blocks(length: int, block: int) -> int:
    """Number of blocks of size ``block`` covering ``length`` tokens (the last one may be partial)."""
    return -(-int(length) // int(block))


def dense_mask_from_indices(
    kv_block_counts: torch.Tensor, kv_block_indices: torch.Tensor, num_kv_blocks: int
) -> torch.Tensor:
    """Expand the (count, indices) form into a dense boolean block mask.

    Args:
        kv_block_counts: int tensor ``(B, H, NQ)``: kept KV blocks per query block.
        kv_block_indices: int tensor ``(B, H, NQ, W)``: kept KV block indices, padded after ``count``.
        num_kv_blocks: ``NK``, the number of KV blocks (last dimension of the result).

    Returns:
        bool tensor ``(B, H, NQ, NK)``; ``True`` where the KV block is kept.
    """
    counts = kv_block_counts.long()
    idx = kv_block_indices.long()
    width = idx.shape[-1]
    valid = torch.arange(width, device=idx.device) < counts.unsqueeze(-1)
    # Padding slots are redirected to an extra, discarded column so they cannot mark a real block.
    target = torch.where(valid, idx, torch.full_like(idx, num_kv_blocks))
    mask = torch.zeros(*idx.shape[:-1], num_kv_blocks + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, target, True)
    return mask[..., :num_kv_blocks]


def indices_from_dense_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a dense boolean block mask ``(B, H, NQ, NK)`` into ``(counts, indices)``.

    Args:
        mask: bool tensor ``(B, H, NQ, NK)``; ``True`` where the KV block is kept.

    Returns:
        ``counts`` int32 ``(B, H, NQ)`` and ``indices`` int32 ``(B, H, NQ, NK)``: the kept block indices
        in ascending order first, then the dropped ones (valid, in-range padding that is never read).
    """
    mask = mask.to(torch.bool)
    counts = mask.sum(dim=-1, dtype=torch.int32)
    # Stable sort on "not kept" puts kept blocks first, each group in ascending block order.
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices
    return counts.contiguous(), order.to(torch.int32).contiguous()


def _token_mask(
    kv_block_counts: torch.Tensor,
    kv_block_indices: torch.Tensor,
    block_q: int,
    block_k: int,
    lq: int,
    lk: int,
) -> torch.Tensor:
    nk = num_blocks(lk, block_k)
    block_mask = dense_mask_from_indices(kv_block_counts, kv_block_indices, nk)
    rows = torch.arange(lq, device=block_mask.device) // block_q
    cols = torch.arange(lk, device=block_mask.device) // block_k
    return block_mask[:, :, rows][..., cols]  # (B, H, Lq, Lk)


def _check_inputs(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D (B, H, L, D)")
    b, h, lq, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h):
        raise ValueError(f"batch/head mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[-1] != d or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"k must be (B, H, Lk, {d}) and v (B, H, Lk, Dv); got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if block_q <= 0 or block_k <= 0:
        raise ValueError("block sizes must be positive")
    nq = num_blocks(lq, block_q)
    if tuple(kv_block_counts.shape) != (b, h, nq):
        raise ValueError(f"kv_block_counts must be {(b, h, nq)}, got {tuple(kv_block_counts.shape)}")
    if kv_block_indices.dim() != 4 or tuple(kv_block_indices.shape[:3]) != (b, h, nq):
        raise ValueError(f"kv_block_indices must be {(b, h, nq)} + (W,), got {tuple(kv_block_indices.shape)}")


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_counts: torch.Tensor,
    kv_block_indices: torch.Tensor,
    *,
    block_q: int = 128,
    block_k: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact block-sparse attention in plain PyTorch with fp32 accumulation.

    Dense scores are masked at block granularity (``-inf`` outside kept blocks), soft-maxed and
    multiplied by ``V``. Query blocks with zero kept blocks output zeros.

    Args:
        q: ``(B, H, Lq, D)``.
        k: ``(B, H, Lk, D)``.
        v: ``(B, H, Lk, Dv)``.
        kv_block_counts: int ``(B, H, NQ)``, kept KV blocks per query block.
        kv_block_indices: int ``(B, H, NQ, W)``, kept KV block indices (first ``count`` entries read).
        block_q: query block size of the mask.
        block_k: key/value block size of the mask.
        scale: softmax scale; ``1 / sqrt(D)`` when ``None`` (as SDPA).

    Returns:
        ``(B, H, Lq, Dv)`` in ``q``'s dtype.
    """
    _check_inputs(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k)
    lq, d = q.shape[2], q.shape[3]
    lk = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    kf = k.float()
    vf = v.float()
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float32, device=q.device)
    # Chunk whole query blocks so the fp32 score tile stays bounded at long sequence lengths.
    bh = q.shape[0] * q.shape[1]
    rows_per_chunk = max(block_q, (_MAX_SCORE_ELEMENTS // max(1, bh * lk)) // block_q * block_q)
    for start in range(0, lq, rows_per_chunk):
        stop = min(lq, start + rows_per_chunk)
        qb0, qb1 = start // block_q, num_blocks(stop, block_q)
        tok_mask = _token_mask(
            kv_block_counts[:, :, qb0:qb1],
            kv_block_indices[:, :, qb0:qb1],
            block_q,
            block_k,
            stop - start,
            lk,
        )
        scores = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~tok_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # Rows with no kept key are all -inf -> NaN after softmax; they are defined as zeros.
        probs = torch.where(tok_mask.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
        out[:, :, start:stop] = torch.matmul(probs, vf)
    return out.to(q.dtype)


def _block_reduce(x: torch.Tensor, block: int, *, mean: bool) -> torch.Tensor:
    """fp32 sum (or mean) over each block of ``block`` tokens along dim -2, ``(B, H, NB, D)``.

    The last block may be partial; its mean uses its real token count. Reads ``x`` once in its own
    dtype with fp32 accumulation (no fp32 copy, no padded copy): on GPU the mask prediction is
    bandwidth-bound and sits on the critical path of every sparse attention call.
    """
    b, h, length, d = x.shape
    n_full, tail = divmod(length, block)
    parts = []
    if n_full:
        full = x[:, :, : n_full * block].reshape(b, h, n_full, block, d).sum(dim=-2, dtype=torch.float32)
        parts.append(full / block if mean else full)
    if tail:
        last = x[:, :, n_full * block :].sum(dim=-2, keepdim=True, dtype=torch.float32)
        parts.append(last / tail if mean else last)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def _block_sizes(length: int, block: int, device: torch.device) -> torch.Tensor:
    nb = num_blocks(length, block)
    sizes = torch.full((nb,), float(block), device=device)
    sizes[-1] = float(length - (nb - 1) * block)
    return sizes


def _block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of ``block`` tokens along dim -2; the last partial block uses its real count."""
    return _block_reduce(x, block, mean=True)


def _block_self_similarity(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean pairwise cosine similarity of the tokens inside each block, ``(B, H, NB)``.

    Uses ``mean_{i,j} x̂_i·x̂_j = ||Σ_i x̂_i||² / n²`` (pairs include i == j, as SpargeAttn's
    ``(x̂ x̂ᵀ).mean()``), so it costs one pass over ``x``.
    """
    s = _block_reduce(torch.nn.functional.normalize(x.float(), dim=-1), block, mean=False)
    sizes = _block_sizes(x.shape[-2], block, x.device)
    return (s * s).sum(dim=-1) / (sizes * sizes)


def top_p_block_mask(probs: torch.Tensor, tau: float, min_blocks: int = 1) -> torch.Tensor:
    """Per row, keep the smallest set of entries (highest first) whose mass reaches ``tau``.

    Args:
        probs: ``(..., NK)`` non-negative probabilities along the last dim.
        tau: target cumulative mass in ``[0, 1]``; an entry is kept while the mass of the entries
            ranked above it is still below ``tau``.
        min_blocks: keep at least this many entries per row (clamped to ``NK``).

    Returns:
        bool ``(..., NK)``.
    """
    nk = probs.shape[-1]
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.nn.functional.pad(torch.cumsum(sorted_p, dim=-1)[..., :-1], (1, 0))
    # Zero-probability entries never count toward the mass (they only enter through min_blocks).
    keep_sorted = (mass_before < tau) & (sorted_p > 0)
    rank = torch.arange(nk, device=probs.device)
    keep_sorted |= rank < min(max(int(min_blocks), 0), nk)
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(-1, order, keep_sorted)
    return keep


def predict_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int = 128,
    block_k: int = 64,
    tau: float = 0.9,
    min_blocks: int = 1,
    similarity_threshold: float | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict a block mask SpargeAttn-style from mean-pooled Q and K blocks.

    ``P = softmax(pool(Q) · pool(K)ᵀ · scale)`` per query block; keep the smallest set of KV blocks,
    highest probability first, whose mass reaches ``tau`` (top-p), and at least ``min_blocks``.

    Self-similarity rule (``similarity_threshold = θ`` not ``None``): a block whose mean pairwise
    cosine similarity is below ``θ`` is not summarized well by its mean. Such a query block keeps all
    KV blocks; such a key block is kept for every query block and, as in SpargeAttn, is left out of the
    pooled softmax so it does not take top-p mass from the others.

    Args:
        q: ``(B, H, Lq, D)``.
        k: ``(B, H, Lk, D)``.
        block_q: query block size (last block may be partial; it is pooled over its real tokens).
        block_k: key block size (likewise).
        tau: top-p mass in ``[0, 1]``; ``1`` keeps every block with non-zero probability.
        min_blocks: minimum kept KV blocks per query block.
        similarity_threshold: θ of the self-similarity rule, or ``None`` to disable it.
        scale: score scale; ``1 / sqrt(D)`` when ``None``.

    Returns:
        ``(counts, indices)``: int32 ``(B, H, NQ)`` and int32 ``(B, H, NQ, NK)``; the first ``count``
        indices of a row are its kept KV blocks (highest pooled probability first without the
        similarity rule, ascending with it), the rest is in-range padding.
    """
    if not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    pq = _block_mean(q, block_q) * scale  # (B, H, NQ, D); scale folded into the small pooled tensor
    pk = _block_mean(k, block_k)  # (B, H, NK, D)
    scores = torch.matmul(pq, pk.transpose(-1, -2))  # (B, H, NQ, NK)
    if similarity_threshold is None:
        # Fast path (a handful of small kernels: this runs before every sparse attention call). The kept
        # set is a prefix of the probability-sorted order, so the sort order *is* the index list.
        probs = torch.softmax(scores, dim=-1)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.nn.functional.pad(torch.cumsum(sorted_p, dim=-1)[..., :-1], (1, 0))
        counts = ((mass_before < tau) & (sorted_p > 0)).sum(dim=-1, dtype=torch.int32)
        counts = counts.clamp_(min=min(max(int(min_blocks), 0), scores.shape[-1]))
        return counts, order.to(torch.int32)
    dense_q = _block_self_similarity(q, block_q) < similarity_threshold  # (B, H, NQ)
    dense_k = _block_self_similarity(k, block_k) < similarity_threshold  # (B, H, NK)
    scores = scores.masked_fill(dense_k[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A row whose key blocks are all dense has no pooled distribution (NaN); dense_k keeps them anyway.
    probs = torch.nan_to_num(probs, nan=0.0)
    keep = top_p_block_mask(probs, tau, min_blocks)
    keep = keep | dense_k[:, :, None, :] | dense_q[:, :, :, None]
    return indices_from_dense_mask(keep)
