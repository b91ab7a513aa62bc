"""HiDream-I1: the timestep argument is ``timesteps``; text comes from T5 and Llama-3 states.

Capture: its mixture-of-experts feed-forward routes tokens at inference by sorting them per expert and
slicing with counts read through ``.cpu().numpy()``, which ``torch.export`` cannot trace (".numpy() is
not supported for tensor subclasses"); the counts change with every step's latents, so they cannot be
fixed at capture either. While capturing, the routing runs densely: every expert on every token, weighted
by the gate's weight for that expert (zero where the gate did not choose it), which is the same sum.

Size: the pipeline rescales every request to the area of ``default_sample_size`` (128, hard-coded) latent
pixels squared, the 1024 x 1024 of the released model, whatever the transformer was configured for. At
load, that area becomes the transformer's own ``max_resolution`` (128 x 128 for the released model, so it
is unchanged there); a smaller model, a tiny test one with 8 x 8, generates at its size, not at 1024 x 1024.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from math import isqrt
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


def generate_at_the_transformers_resolution(pipe: Any) -> None:
    """Set the pipeline's target area (``default_sample_size`` squared) to the transformer's ``max_resolution``."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    height, width = getattr(config, "max_resolution", None) or (0, 0)
    if height > 0 and width > 0 and hasattr(pipe, "default_sample_size"):
        pipe.default_sample_size = isqrt(height * width)


TRAITS = FamilyTraits(
    name="hidream",
    pipeline_classes=("HiDreamImagePipeline",),
    denoiser_classes=("HiDreamImageTransformer2DModel",),
    timestep_scale=1.0,
    timestep_input="timesteps",
    text_token_inputs=("encoder_hidden_states_t5",),
    keep_16bit=("t_embedder", "p_embedder", "caption_projection", "final_layer"),
    capture_strategy=dense_expert_routing,
    prepare=generate_at_the_transformers_resolution,
)
