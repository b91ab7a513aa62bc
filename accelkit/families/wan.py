"""Wan 2.1 / 2.2: latents (B, C, F, H, W), timestep as is, CFG as a second call (negative prompt).

Wan 2.2 A14B has a second denoiser (``transformer_2``, the low-noise expert) that accelkit leaves
untouched; the plan covers ``transformer``, which runs the high-noise steps.
"""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="wan",
    pipeline_classes=("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline"),
    denoiser_classes=("WanTransformer3DModel",),
    timestep_scale=1.0,
    keep_16bit=("patch_embedding", "condition_embedder", "proj_out", "norm_out"),
    cfg="separate",
    media="video",
)
