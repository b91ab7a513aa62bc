"""Z-Image: latents and captions passed as lists of tensors (``x``, ``cap_feats``), timestep
(1000 - t)/1000 as ``t``."""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="zimage",
    pipeline_classes=("ZImagePipeline",),
    denoiser_classes=("ZImageTransformer2DModel",),
    timestep_scale=-1e-3,
    timestep_offset=1.0,
    timestep_input="t",
    latent_input="x",
    text_token_inputs=("cap_feats",),
    keep_16bit=("t_embedder", "cap_embedder", "all_x_embedder", "all_final_layer"),
    cfg="batched",
)
