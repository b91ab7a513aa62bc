"""Flux.1 (dev/schnell) and Flux Kontext: the timestep is passed divided by 1000; guidance-distilled, true CFG runs a second call."""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="flux",
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline", "FluxKontextPipeline"),
    denoiser_classes=("FluxTransformer2DModel",),
    timestep_scale=1e-3,
    cfg="separate",
)
