"""HunyuanVideo: latents (B, C, F, H, W), timestep as is, guidance-distilled (true CFG runs a second call)."""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="hunyuan_video",
    pipeline_classes=("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline"),
    denoiser_classes=("HunyuanVideoTransformer3DModel",),
    timestep_scale=1.0,
    keep_16bit=("x_embedder", "context_embedder", "time_text_embed", "proj_out", "norm_out"),
    cfg="separate",
    media="video",
)
