"""Stable Diffusion 3 / 3.5: MMDiT, batched CFG, timestep as the scheduler gives it."""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="sd3",
    pipeline_classes=("StableDiffusion3Pipeline",),
    denoiser_classes=("SD3Transformer2DModel",),
    timestep_scale=1.0,
)
