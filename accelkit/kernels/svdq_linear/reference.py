"""SVDQuant linear: the plain-PyTorch reference (defines truth), INT4 packing and activation quantizers.

The layer computes ``y = x Wᵀ + b`` with the weight stored as (SVDQuant, arXiv 2411.05007)::

    W · diag(λ) = L_up · L_down' + R          (λ: per-input-channel smoothing, L: rank-r SVD, R: residual)

so that ``x Wᵀ = (x / λ) Rᵀ + (x / λ) L_down'ᵀ L_upᵀ``. The smoothing is **folded into the low-rank
down-projection**: the stored ``lora_down = L_down' · diag(1/λ)`` reads the raw activation ``x`` (that is
what lets a fused kernel compute ``x · lora_downᵀ`` in the same read of ``x`` that quantizes it). The
residual GEMM still needs ``x / λ``: the ``smooth`` vector (λ) is stored and the activation is divided by
it before it is quantized. So::

    svdq_linear(x) = Q_act(x / smooth) · dequant(R)ᵀ + (x · lora_downᵀ) · lora_upᵀ + bias

Weights: signed symmetric INT4 in ``[-8, 7]``, per group of ``group_size`` consecutive input channels,
scale ``max|w| / 7`` stored as float16 (the quantization uses the fp16-rounded scale, so dequantization
is exact with respect to what is stored). Two values per uint8 along the input dim: element ``2j`` in
the low nibble, ``2j + 1`` in the high nibble, two's complement. ``packed`` is ``(N, K // 2)`` uint8 and
``scales`` is ``(N, K // group_size)`` float16.

Activations (``act_mode``): ``"w4a16"`` (x/λ rounded to x's dtype: a 16-bit GEMM), ``"w4a8"`` (dynamic
per-token FP8 e4m3, scale ``amax / 448``) or ``"w4a4"`` (dynamic per-token, per-group symmetric INT4 with
the weight's group size, fake-quantized).
"""

from __future__ import annotations

import torch

__all__ = [
    "ACT_MODES",
    "FP8_MAX",
    "dequantize_weight_int4",
    "fake_quant_act",
    "fake_quant_weight_int4",
    "pack_int4",
    "quantize_act_fp8",
    "quantize_act_int4",
    "quantize_weight_int4",
    "svdq_linear_reference",
    "unpack_int4",
]

ACT_MODES = ("w4a16", "w4a8", "w4a4")
FP8_MAX = 448.0
INT4_MIN, INT4_MAX = -8, 7
SCALE_DTYPE = torch.float16
# Smallest group scale: an all-zero group quantizes to zeros instead of dividing by zero. It is the
# smallest float16 subnormal: anything below rounds to a zero scale once stored in SCALE_DTYPE.
_TINY = 2.0**-24


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed integers in ``[-8, 7]`` two per byte along the last dim (even index in the low nibble).

    Args:
        q: integer tensor ``(..., K)`` with ``K`` even.

    Returns:
        uint8 tensor ``(..., K // 2)``.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"the packed dim must be even, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError("int4 values must lie in [-8, 7]")
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(..., K // 2)`` -> int8 ``(..., K)`` in ``[-8, 7]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    both = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def _check_group(k: int, group_size: int) -> None:
    if group_size < 2 or group_size % 2 or k % group_size:
        raise ValueError(f"input dim {k} must be a multiple of the (even) group size {group_size}")


def quantize_weight_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group INT4 quantization of a ``(N, K)`` weight along its input dim.

    Args:
        w: ``(N, K)`` float weight; ``K`` a multiple of ``group_size``.
        group_size: consecutive input channels sharing one scale.

    Returns:
        ``(packed, scales)``: uint8 ``(N, K // 2)`` and float16 ``(N, K // group_size)``.
    """
    n, k = w.shape
    _check_group(k, group_size)
    groups = w.detach().double().reshape(n, k // group_size, group_size)
    scales = (groups.abs().amax(-1) / INT4_MAX).clamp_min(_TINY).to(SCALE_DTYPE)
    q = torch.round(groups / scales.double().unsqueeze(-1)).clamp(INT4_MIN, INT4_MAX)
    return pack_int4(q.reshape(n, k).to(torch.int8)), scales


def dequantize_weight_int4(
    packed: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(N, K)`` weight from :func:`quantize_weight_int4`'s ``(packed, scales)``."""
    q = unpack_int4(packed)
    n, k = q.shape
    _check_group(k, group_size)
    w = q.to(torch.float32).reshape(n, k // group_size, group_size) * scales.float().unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


def fake_quant_weight_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``dequantize(quantize(w))`` in float64 (the refinement loop's ``Q``).

    Computed without packing (equal to the round trip: an INT4 value times an fp16 scale is exact in
    float32), because the calibration search calls this thousands of times.
    """
    n, k = w.shape
    _check_group(k, group_size)
    groups = w.detach().double().reshape(n, k // group_size, group_size)
    scales = (groups.abs().amax(-1) / INT4_MAX).clamp_min(_TINY).to(SCALE_DTYPE).double().unsqueeze(-1)
    return (torch.round(groups / scales).clamp(INT4_MIN, INT4_MAX) * scales).reshape(n, k)


def quantize_act_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 (e4m3) quantization of ``(M, K)``: returns (fp8 values, fp32 ``(M, 1)`` scales)."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_act_int4(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token, per-group symmetric INT4 of ``(M, K)``: (int8 values in [-8, 7], fp32 ``(M, K/g)``)."""
    m, k = x.shape
    _check_group(k, group_size)
    groups = x.float().reshape(m, k // group_size, group_size)
    scale = (groups.abs().amax(-1) / INT4_MAX).clamp_min(1e-12)
    q = torch.round(groups / scale.unsqueeze(-1)).clamp(INT4_MIN, INT4_MAX).to(torch.int8)
    return q.reshape(m, k), scale


def fake_quant_act(x: torch.Tensor, act_mode: str, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The activation as the residual GEMM sees it, in fp32 (``x`` is the smoothed ``(M, K)`` fp32 input).

    ``dtype`` is the layer's input dtype: ``"w4a16"`` rounds to it (a 16-bit GEMM operand).
    """
    if act_mode == "w4a16":
        return x.to(dtype).float() if dtype in (torch.float16, torch.bfloat16) else x.float()
    if act_mode == "w4a8":
        q, scale = quantize_act_fp8(x)
        return q.float() * scale
    if act_mode == "w4a4":
        q, scale = quantize_act_int4(x, group_size)
        m, k = q.shape
        return (q.float().reshape(m, k // group_size, group_size) * scale.unsqueeze(-1)).reshape(m, k)
    raise ValueError(f"act_mode must be one of {ACT_MODES}, got {act_mode!r}")


def check_inputs(x, packed, scales, lora_down, lora_up, smooth, bias, group_size, act_mode) -> tuple[int, int, int]:
    """Validate shapes; returns ``(N, K, rank)``."""
    if act_mode not in ACT_MODES:
        raise ValueError(f"act_mode must be one of {ACT_MODES}, got {act_mode!r}")
    k = x.shape[-1]
    n = packed.shape[0]
    _check_group(k, group_size)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, k // 2):
        raise ValueError(f"packed must be uint8 ({n}, {k // 2}), got {packed.dtype} {tuple(packed.shape)}")
    if tuple(scales.shape) != (n, k // group_size):
        raise ValueError(f"scales must be ({n}, {k // group_size}), got {tuple(scales.shape)}")
    rank = lora_down.shape[0]
    if tuple(lora_down.shape) != (rank, k) or tuple(lora_up.shape) != (n, rank):
        raise ValueError(
            f"lora_down must be (r, {k}) and lora_up ({n}, r), got {tuple(lora_down.shape)}, {tuple(lora_up.shape)}"
        )
    if tuple(smooth.shape) != (k,):
        raise ValueError(f"smooth must be ({k},), got {tuple(smooth.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")
    return n, k, rank


def svdq_linear_reference(
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
) -> torch.Tensor:
    """SVDQuant linear in fp32 (see the module docstring for the formula).

    Args:
        x: ``(..., K)`` input.
        packed: uint8 ``(N, K // 2)`` residual weight (INT4, two per byte).
        scales: ``(N, K // group_size)`` residual group scales.
        lora_down: ``(r, K)`` down-projection with ``1/smooth`` folded in (reads raw ``x``); ``r`` may be 0.
        lora_up: ``(N, r)`` up-projection.
        smooth: ``(K,)`` smoothing factors λ (the residual GEMM reads ``x / λ``).
        bias: ``(N,)`` or None.
        group_size: weight (and ``w4a4`` activation) group size.
        act_mode: ``"w4a16"``, ``"w4a8"`` or ``"w4a4"``.

    Returns:
        ``(..., N)`` in ``x``'s dtype.
    """
    n, k, rank = check_inputs(x, packed, scales, lora_down, lora_up, smooth, bias, group_size, act_mode)
    lead = x.shape[:-1]
    xf = x.reshape(-1, k).float()
    xa = fake_quant_act(xf / smooth.float(), act_mode, group_size, x.dtype)
    y = xa @ dequantize_weight_int4(packed, scales, group_size).t()
    if rank:
        y = y + (xf @ lora_down.float().t()) @ lora_up.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, n).to(x.dtype)
