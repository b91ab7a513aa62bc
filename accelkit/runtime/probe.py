"""Capture a pipeline's denoiser as the pipeline calls it at a plan's generation settings."""

from __future__ import annotations

from typing import Any

from accelkit.pipeline_io import find_denoiser, probe_and_capture
from accelkit.runtime.pipeline import original_forward


def capture_at_generation(pipe: Any, generation: dict[str, Any]) -> Any:
    """Capture the pipeline's original denoiser as it is called at a plan's generation settings.

    The probe runs ``generation["probe_prompt"]`` at the plan's resolution, guidance and call arguments; a
    pipeline an earlier load accelerated is probed through its original denoiser forward.
    """
    _, denoiser = find_denoiser(pipe)
    probe = {key: value for key, value in generation.items() if key != "probe_prompt"}
    with original_forward(denoiser):
        _, graph = probe_and_capture(pipe, probe, prompt=generation.get("probe_prompt", "a photo"))
    return graph
