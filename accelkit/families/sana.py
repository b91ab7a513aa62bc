"""Sana: linear-attention DiT; the pipeline multiplies the timestep by the config's ``timestep_scale``."""

from accelkit.families.base import FamilyTraits, binning_only_for

TRAITS = FamilyTraits(
    name="sana",
    pipeline_classes=("SanaPipeline",),
    denoiser_classes=("SanaTransformer2DModel",),
    keep_16bit=("time_embed",),
    call_arguments=binning_only_for((32, 64, 128)),
)
