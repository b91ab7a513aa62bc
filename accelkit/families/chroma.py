"""Chroma: Flux-derived, timestep divided by 1000, CFG as separate calls."""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="chroma",
    pipeline_classes=("ChromaPipeline",),
    denoiser_classes=("ChromaTransformer2DModel",),
    timestep_scale=1e-3,
    keep_16bit=("distilled_guidance_layer",),
    cfg="separate",
)
