"""Mochi 1: latents (B, C, F, H, W), batched CFG.

The denoiser drops padded text tokens per sample with ``nonzero`` (a data-dependent size): it captures,
and the FLOP counter counts such sizes at their upper bound (all text tokens valid).
"""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="mochi",
    pipeline_classes=("MochiPipeline",),
    denoiser_classes=("MochiTransformer3DModel",),
    keep_16bit=("patch_embed", "time_embed", "proj_out", "norm_out"),
    media="video",
)
