"""CogView4: timestep as the scheduler gives it, CFG as separate calls."""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="cogview4",
    pipeline_classes=("CogView4Pipeline",),
    denoiser_classes=("CogView4Transformer2DModel",),
    timestep_scale=1.0,
    keep_16bit=("patch_embed", "time_condition_embed"),
    cfg="separate",
)
