"""Lumina Image 2.0: the pipeline passes 1 - t/1000 and runs CFG as separate calls."""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="lumina2",
    pipeline_classes=("Lumina2Pipeline",),
    denoiser_classes=("Lumina2Transformer2DModel",),
    timestep_scale=-1e-3,
    timestep_offset=1.0,
    keep_16bit=("time_caption_embed",),
    cfg="separate",
)
