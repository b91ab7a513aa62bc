"""Block-sparse attention forward in Triton (FlashAttention-style, walks each query block's KV list).

Same signature as :func:`accelkit.kernels.block_sparse_attention.reference.block_sparse_attention_reference`.
``triton`` is imported lazily inside functions: importing this module does not import triton.

Per program = one (batch, head, tile of ``BLOCK_M`` query rows): load the Q tile once, then walk the
``count`` KV blocks of its query block in ``BLOCK_N``-row tiles (pieces of one block, or several blocks
gathered), online softmax in base 2 with fp32 statistics and an fp32 accumulator, and write ``acc / l``. Rows of a query block with no kept
KV block are written as zeros (as the reference). Head dims that are not a power of two (e.g. 72) run
as the next power of two with masked (zero-filled) loads, so no padded copy is made and the scale
stays the caller's (``1/sqrt(72)`` by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from accelkit.kernels._backend import triton_importable

__all__ = ["block_sparse_attention_triton", "KernelConfig", "is_available", "default_config"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KernelConfig:
    """Launch configuration of the Triton kernel.

    Args:
        block_m: query rows per program; must divide the mask's ``block_q``.
        block_n: key rows per inner step; divides the mask's ``block_k`` (a block in pieces) or is a
            multiple of it (several kept blocks, anywhere in the sequence, gathered into one tile).
        num_warps: warps per program.
        num_stages: software-pipelining depth of the KV loop.
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


is_available = triton_importable


def default_config(block_q: int, block_k: int, head_dim: int) -> KernelConfig:
    """Default launch config for Hopper: FA2-style 128×64 tiles, 8 warps, 3 stages.

    Not yet timed (the session that wrote it had no GPU): chosen from the ``ptxas`` resource report
    (no spills, K/V loads pipelined, wgmma); ``benchmarks/bench_attention.py --tune`` sweeps the rest.
    """
    block_m = math.gcd(block_q, 128)
    block_n = math.gcd(block_k, 64)
    num_warps = 8 if block_m >= 128 else 4
    num_stages = 3 if head_dim <= 128 else 2
    return KernelConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


def _kernel():
    from ._triton_kernel import _bsa_fwd

    return _bsa_fwd


def _next_pow2(x: int) -> int:
    return 1 << max(4, (int(x) - 1).bit_length())


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_counts: torch.Tensor,
    kv_block_indices: torch.Tensor,
    *,
    block_q: int = 128,
    block_k: int = 64,
    scale: float | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention forward with the Triton kernel (same contract as the reference).

    Args:
        q: ``(B, H, Lq, D)``, fp16/bf16 (fp32 runs, with tf32 dots).
        k: ``(B, H, Lk, D)``.
        v: ``(B, H, Lk, Dv)``.
        kv_block_counts: int ``(B, H, NQ)``.
        kv_block_indices: int ``(B, H, NQ, W)``.
        block_q: query block size of the mask.
        block_k: key/value block size of the mask.
        scale: softmax scale; ``1 / sqrt(D)`` when ``None``.
        config: launch configuration; :func:`default_config` when ``None``.
        out: optional preallocated ``(B, H, Lq, Dv)`` output (every element is written).

    Returns:
        ``(B, H, Lq, Dv)`` in ``q``'s dtype.
    """
    import triton

    from .reference import _check_inputs

    _check_inputs(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k)
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one of {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    if max(d, dv) > 256:
        raise ValueError(f"head dim up to 256 supported, got {d}/{dv}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if block_q % 16 or block_k % 16:
        # tl.dot needs tiles of at least 16 along every dimension.
        raise ValueError(
            f"Triton backend needs block_q and block_k multiples of 16, got {block_q}, {block_k}"
        )
    cfg = config or default_config(block_q, block_k, max(d, dv))
    n_ok = block_k % cfg.block_n == 0 if cfg.block_n <= block_k else cfg.block_n % block_k == 0
    if block_q % cfg.block_m or not n_ok or min(cfg.block_m, cfg.block_n) < 16:
        raise ValueError(
            f"kernel tile {cfg.block_m}x{cfg.block_n} does not fit mask block {block_q}x{block_k}: block_m "
            "must divide block_q, and block_n divide block_k or be a multiple of it"
        )
    counts = kv_block_counts.to(torch.int32)
    indices = kv_block_indices.to(torch.int32)
    if out is None:
        out = torch.empty(b, h, lq, dv, dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != (b, h, lq, dv) or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must be {(b, h, lq, dv)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype}"
        )
    block_d, block_dv = _next_pow2(d), _next_pow2(dv)
    grid = (triton.cdiv(lq, cfg.block_m), b * h)
    _kernel()[grid](
        q, k, v, out, counts, indices,
        float(scale) * 1.4426950408889634,  # log2(e): the kernel uses exp2
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *counts.stride(), *indices.stride(),
        h, lq, lk, d, dv,
        MASK_BQ=block_q, MASK_BK=block_k,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=block_d, BLOCK_DV=block_dv,
        EVEN_LK=(lk % block_k == 0), EVEN_D=(d == block_d and dv == block_dv),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
