"""Capture a pipeline's denoiser as the pipeline calls it at a plan's generation settings."""

from __future__ import annotations

from typing import Any

import torch

from accelkit.capture import capture
from accelkit.loading import record_denoiser_calls
from accelkit.runtime.pipeline import find_denoiser, original_forward


def capture_at_generation(pipe: Any, generation: dict[str, Any]) -> Any:
    """Capture the pipeline's original denoiser as it is called at a plan's generation settings.

    The probe runs 2 steps of ``generation["probe_prompt"]`` at the plan's resolution and guidance; a
    pipeline an earlier load accelerated is probed through its original denoiser forward.
    """
    _, denoiser = find_denoiser(pipe)
    with original_forward(denoiser):
        calls = record_denoiser_calls(
            pipe,
            prompt=generation.get("probe_prompt", "a photo"),
            num_inference_steps=2,
            height=generation["height"],
            width=generation["width"],
            guidance_scale=generation["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
        )
        return capture(denoiser, calls[0])
