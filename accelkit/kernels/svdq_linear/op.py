"""``torch.ops.accelkit.svdq_linear``: the custom op, its fake, and the Python wrapper.

Backend choice is explicit and logged once per (device type, backend): the op runs the Triton kernel
for CUDA inputs when ``triton`` imports, and the reference otherwise (CPU, or CUDA without triton: that
case is logged as a warning, since the reference dequantizes the whole weight per call). The wrapper's
``backend="triton"`` raises when Triton cannot run instead of falling back.
"""

from __future__ import annotations

import logging

import torch

from accelkit.kernels._backend import BACKENDS, BackendLog
from accelkit.kernels._backend import resolve_backend as _resolve_backend

from .reference import svdq_linear_reference

__all__ = ["svdq_linear", "resolve_backend", "BACKENDS"]

logger = logging.getLogger(__name__)

_log_choice = BackendLog(logger, "accelkit::svdq_linear", "correct, but it dequantizes the whole weight on every call")
_LOGGED = _log_choice.seen


def _triton_available() -> bool:
    from .triton import is_available

    return is_available()


def resolve_backend(device: torch.device | str, backend: str = "auto") -> str:
    """The backend that runs for inputs on ``device`` (see :func:`accelkit.kernels._backend.resolve_backend`)."""
    return _resolve_backend(device, backend, _triton_available)


def _run(x, packed, scales, lora_down, lora_up, smooth, bias, group_size, act_mode, backend):
    chosen = resolve_backend(x.device, backend)
    _log_choice(x.device.type, chosen)
    if chosen == "triton":
        from .triton import svdq_linear_triton

        return svdq_linear_triton(
            x, packed, scales, lora_down, lora_up, smooth, bias, group_size=group_size, act_mode=act_mode
        )
    return svdq_linear_reference(
        x, packed, scales, lora_down, lora_up, smooth, bias, group_size=group_size, act_mode=act_mode
    )


@torch.library.custom_op("accelkit::svdq_linear", mutates_args=())
def _svdq_linear_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    smooth: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    act_mode: str,
) -> torch.Tensor:
    return _run(x, packed, scales, lora_down, lora_up, smooth, bias, group_size, act_mode, "auto")


@_svdq_linear_op.register_fake
def _(x, packed, scales, lora_down, lora_up, smooth, bias, group_size, act_mode):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def svdq_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    smooth: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group_size: int = 64,
    act_mode: str = "w4a16",
    backend: str = "auto",
) -> torch.Tensor:
    """SVDQuant 4-bit linear (forward only); the formula is in :mod:`.reference`.

    ``backend="auto"`` goes through ``torch.ops.accelkit.svdq_linear`` (so it captures under
    ``torch.export`` / ``torch.compile``); ``"triton"`` checks that Triton can run (raises otherwise)
    and then uses the same op; ``"reference"`` calls the PyTorch reference directly.

    Args:
        x: ``(..., K)`` input.
        packed: uint8 ``(N, K // 2)`` INT4 residual weight.
        scales: ``(N, K // group_size)`` group scales.
        lora_down: ``(r, K)`` down-projection (1/smooth folded in).
        lora_up: ``(N, r)`` up-projection.
        smooth: ``(K,)`` smoothing factors.
        bias: ``(N,)`` or None.
        group_size: group size of the weight (and of ``w4a4`` activations).
        act_mode: ``"w4a16"``, ``"w4a8"`` or ``"w4a4"``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(..., N)`` in ``x``'s dtype.
    """
    chosen = resolve_backend(x.device, backend)
    if backend == "reference":
        _log_choice(x.device.type, chosen)
        return svdq_linear_reference(
            x, packed, scales, lora_down, lora_up, smooth, bias, group_size=group_size, act_mode=act_mode
        )
    return torch.ops.accelkit.svdq_linear(
        x, packed, scales, lora_down, lora_up, smooth, bias, int(group_size), str(act_mode)
    )
