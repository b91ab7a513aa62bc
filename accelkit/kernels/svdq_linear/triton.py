"""SVDQuant 4-bit linear in Triton: packed INT4 weights dequantized in registers, low-rank epilogue.

Same signature as :func:`accelkit.kernels.svdq_linear.reference.svdq_linear_reference`. ``triton`` is
imported lazily inside functions: importing this module does not import triton.

Pipeline per call (Hopper has no 4-bit tensor-core instruction, so 4-bit is the *storage* format):

1. *Activation step* (PyTorch ops for now, one fused Triton kernel is the next step): ``xs = x / smooth``,
   quantized per ``act_mode`` (``w4a16``: cast to the 16-bit compute dtype; ``w4a8``: per-token FP8
   e4m3 + fp32 scale; ``w4a4``: per-token per-group INT4 values held in FP8 + fp32 scales) and the
   low-rank down-projection ``xd = x · lora_downᵀ`` (rank r, fp32 accumulate, rounded to the 16-bit
   compute dtype). Unfused this step reads ``x`` twice; SVDQuant's fused kernel reads it once.
2. *GEMM* (:func:`._triton_kernel._svdq_gemm`): per output tile, the K loop takes one weight group per
   step: load the packed bytes, unpack the two nibbles to signed integers in registers, convert them to
   the dot dtype (BF16/FP16 for W4A16, e4m3 for W4A8/W4A4: exact for [-8, 7]), one tensor-core dot
   with fp32 accumulation, scaled by the group's weight scale (and for W4A4 the activation's group
   scale). The epilogue applies the per-token FP8 scale (W4A8), adds ``xd · lora_upᵀ`` (the low-rank
   up-projection, a second small dot) and the bias, and stores in ``x``'s dtype.

The CPU interpreter (``TRITON_INTERPRET=1``) has no FP8 or correct BF16 dot: ``fp8=False`` keeps the
quantized activation values in FP16 (exact for e4m3 and INT4 values), which tests the same math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from accelkit.kernels._backend import triton_importable

__all__ = ["svdq_linear_triton", "KernelConfig", "is_available", "default_config"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KernelConfig:
    """Launch configuration of the Triton GEMM.

    Args:
        block_m: output rows (tokens) per program.
        block_n: output columns (features) per program.
        num_warps: warps per program.
        num_stages: software-pipelining depth of the K loop.
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


is_available = triton_importable


def default_config(m: int, n: int) -> KernelConfig:
    """128x64 tiles, 8 warps, 3 stages; 64x64 with 4 warps for small M.

    Not yet timed (written without a GPU): chosen from the ``ptxas`` report for sm_90a, where 128x128
    tiles spill (the per-group partial product and the accumulator are both live) and 128x64 does not;
    ``benchmarks/bench_svdq.py --device cuda`` is where it gets tuned.
    """
    if m <= 64:
        return KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    return KernelConfig()


def _next_pow2(x: int) -> int:
    return 1 << max(4, (int(x) - 1).bit_length())


def _kernel():
    from ._triton_kernel import _svdq_gemm

    return _svdq_gemm


def prepare_activation(
    x2: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    *,
    group_size: int,
    act_mode: str,
    compute_dtype: torch.dtype,
    fp8: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, int, torch.Tensor | None]:
    """Step 1: (dot operand, activation scales or None, scale mode 0/1/2, ``x · lora_downᵀ`` or None)."""
    from .reference import FP8_MAX, quantize_act_int4

    xs = x2.float() / smooth.float()
    if act_mode == "w4a16":
        a, a_scale, mode = xs.to(compute_dtype), None, 0
    elif act_mode == "w4a8":
        a_scale = (xs.abs().amax(-1) / FP8_MAX).clamp_min(1e-12)
        q = (xs / a_scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        a, mode = (q if fp8 else q.to(torch.float16)), 1
    elif act_mode == "w4a4":
        q, a_scale = quantize_act_int4(xs, group_size)
        a, mode = (q.to(torch.float8_e4m3fn) if fp8 else q.to(torch.float16)), 2
    else:
        raise ValueError(f"unknown act_mode {act_mode!r}")
    xd = None
    if lora_down.shape[0]:
        xd = (x2.float() @ lora_down.float().t()).to(compute_dtype)
    return a.contiguous(), a_scale, mode, xd


def svdq_linear_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    smooth: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    group_size: int,
    act_mode: str,
    config: KernelConfig | None = None,
    fp8: bool | None = None,
) -> torch.Tensor:
    """SVDQuant linear with the Triton GEMM (same contract as the reference).

    Args:
        x: ``(..., K)``, bf16/fp16 (fp32 runs, with tf32 dots on GPU).
        packed: uint8 ``(N, K // 2)``.
        scales: ``(N, K // group_size)``.
        lora_down: ``(r, K)``.
        lora_up: ``(N, r)``.
        smooth: ``(K,)``.
        bias: ``(N,)`` or None.
        group_size: a power of two >= 16 (one K step of the kernel).
        act_mode: ``"w4a16"``, ``"w4a8"`` or ``"w4a4"``.
        config: launch configuration; :func:`default_config` when None.
        fp8: FP8 dot operands for W4A8/W4A4; default True on CUDA, False otherwise (the interpreter).

    Returns:
        ``(..., N)`` in ``x``'s dtype.
    """
    import triton

    from .reference import check_inputs

    n, k, rank = check_inputs(x, packed, scales, lora_down, lora_up, smooth, bias, group_size, act_mode)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"the Triton backend needs a power-of-two group size >= 16, got {group_size}")
    if fp8 is None:
        fp8 = x.is_cuda
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    compute = x.dtype
    a, a_scale, mode, xd = prepare_activation(
        x2, smooth, lora_down, group_size=group_size, act_mode=act_mode, compute_dtype=compute, fp8=fp8
    )
    up = lora_up.to(compute).contiguous() if rank else None
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    cfg = config or default_config(m, n)
    dummy = out  # never read: the constexpr flags compile the loads out
    asc = a_scale if a_scale is not None else dummy
    as_strides = (asc.stride(0), asc.stride(1) if asc.dim() == 2 else 0) if a_scale is not None else (0, 0)
    xd_t = xd if xd is not None else dummy
    up_t = up if up is not None else dummy
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    _kernel()[grid](
        a, asc, packed, scales, xd_t, up_t, bias if bias is not None else dummy, out,
        m, n, k, rank,
        a.stride(0), a.stride(1), *as_strides, packed.stride(0), packed.stride(1),
        scales.stride(0), scales.stride(1),
        xd_t.stride(0), xd_t.stride(1), up_t.stride(0), up_t.stride(1), out.stride(0), out.stride(1),
        GROUP=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=_next_pow2(max(rank, 1)),
        HAS_LORA=rank > 0, HAS_BIAS=bias is not None, ACT_SCALE=mode, FP8=bool(fp8) and mode > 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out.reshape(*lead, n)
