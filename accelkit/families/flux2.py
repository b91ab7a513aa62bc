"""Flux.2 and Flux.2 Klein: Flux-style packed tokens, timestep divided by 1000."""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="flux2",
    pipeline_classes=("Flux2Pipeline", "Flux2KleinPipeline"),
    denoiser_classes=("Flux2Transformer2DModel",),
    timestep_scale=1e-3,
    keep_16bit=("time_guidance_embed",),
    cfg="separate",
)
