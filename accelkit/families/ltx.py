"""LTX-Video: latents packed into tokens (B, F*H*W, C) before the denoiser, timestep as is, batched CFG."""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="ltx",
    pipeline_classes=("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"),
    denoiser_classes=("LTXVideoTransformer3DModel",),
    timestep_scale=1.0,
    keep_16bit=("proj_in", "time_embed", "caption_projection", "proj_out", "norm_out"),
    media="video",
)
