"""Count the FLOPs a denoiser actually executes, whatever wraps or replaces its forward.

A :class:`torch.utils._python_dispatch.TorchDispatchMode` sees every aten op that really runs, so
blocks that a cache hook skips, a step that a schedule caches or a block that pruning removed simply
do not show up. The FLOPs of each op come from ``torch.utils.flop_counter``'s formula registry (matmul,
addmm, bmm, convolutions, SDPA kernels) plus the CPU flash-attention kernel, which that registry lacks.
``FlopCounterMode`` itself is not used: its module tracker recurses forever on models whose blocks
are wrapped by cache-dit.

:func:`count_denoiser` installs the mode only around calls of one module (via forward pre/post hooks),
so the text encoder and the sampler's arithmetic are left out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten


def _sdpa_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    b, h, lq, d = query.shape
    lk, dv = key.shape[-2], value.shape[-1]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


_EXTRA = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


class FlopCounter(TorchDispatchMode):
    """Sums the FLOPs of the matmul-like aten ops executed while active (elementwise ops count 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        formula = flop_registry.get(packet)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        elif packet in _EXTRA:
            self.flops += int(_EXTRA[packet](*args, out_val=out, **kwargs))
        return out


@dataclass
class DenoiserCount:
    """What :func:`count_denoiser` measured.

    Args:
        flops: FLOPs executed inside the denoiser's calls.
        calls: number of denoiser calls.
    """

    flops: int = 0
    calls: int = 0


@contextlib.contextmanager
def count_denoiser(module: torch.nn.Module) -> Iterator[DenoiserCount]:
    """Count the FLOPs executed inside ``module``'s calls while the context is open."""
    result = DenoiserCount()
    active: list[FlopCounter] = []

    def pre(_module, _args, _kwargs):
        if active:  # re-entrant call (a wrapper calling the module again): already counted
            active.append(None)
            return
        counter = FlopCounter()
        counter.__enter__()
        active.append(counter)

    def post(_module, _args, _kwargs, output):
        counter = active.pop()
        if counter is not None:
            counter.__exit__(None, None, None)
            result.flops += counter.flops
            result.calls += 1
        return output

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True),
               module.register_forward_hook(post, with_kwargs=True)]
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
