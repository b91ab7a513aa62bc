"""Qwen-Image: MMDiT with Qwen2.5-VL text states; timestep divided by 1000, CFG as separate calls."""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="qwenimage",
    pipeline_classes=("QwenImagePipeline",),
    denoiser_classes=("QwenImageTransformer2DModel",),
    timestep_scale=1e-3,
    keep_16bit=("img_in", "txt_in", "time_text_embed"),
    cfg="separate",
)
