"""HiDream-I1: the timestep argument is ``timesteps``; text comes from T5 and Llama-3 states.

Capture: its mixture-of-experts feed-forward routes tokens at inference by sorting them per expert and
slicing with counts read through ``.cpu().numpy()``, which ``torch.export`` cannot trace (".numpy() is
not supported for tensor subclasses"); the counts change with every step's latents, so they cannot be
fixed at capture either. While capturing, the routing runs densely: every expert on every token, weighted
by the gate's weight for that expert (zero where the gate did not choose it), which is the same sum.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from accelkit.families.base import FamilyTraits


def dense_expert_mixture(moe: Any, x: torch.Tensor, flat_expert_indices: torch.Tensor,
                         flat_expert_weights: torch.Tensor) -> torch.Tensor:
    """``moe.moe_infer`` without data-dependent sizes: sum over experts of gate weight x expert output."""
    chosen = flat_expert_indices.view(x.shape[0], moe.num_activated_experts)
    weights = flat_expert_weights.view(x.shape[0], moe.num_activated_experts)
    mixture = torch.zeros_like(x)
    for index, expert in enumerate(moe.experts):
        weight = (weights * (chosen == index)).sum(dim=-1, keepdim=True)
        output = expert(x)
        mixture = mixture.to(output.dtype) + output * weight.to(output.dtype)
    return mixture


@contextmanager
def dense_expert_routing(denoiser: Any, kwargs: Mapping[str, Any]) -> Iterator[None]:
    """While active, every mixture-of-experts module of ``denoiser`` routes densely."""
    mixtures = [m for m in denoiser.modules()
                if hasattr(m, "moe_infer") and hasattr(m, "experts") and hasattr(m, "num_activated_experts")]
    for moe in mixtures:
        moe.moe_infer = lambda x, indices, weights, moe=moe: dense_expert_mixture(moe, x, indices, weights)
    try:
        yield
    finally:
        for moe in mixtures:
            del moe.moe_infer  # the instance attribute; the class method shows again


TRAITS = FamilyTraits(
    name="hidream",
    pipeline_classes=("HiDreamImagePipeline",),
    denoiser_classes=("HiDreamImageTransformer2DModel",),
    timestep_scale=1.0,
    timestep_input="timesteps",
    text_token_inputs=("encoder_hidden_states_t5",),
    keep_16bit=("t_embedder", "p_embedder", "caption_projection", "final_layer"),
    capture_strategy=dense_expert_routing,
)
