"""Stable Diffusion 1.x/2.x and SDXL: a UNet denoiser (``pipe.unet``) taking ``sample``; SDXL adds
``added_cond_kwargs`` (a dict of tensors)."""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="unet",
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionXLPipeline"),
    denoiser_classes=("UNet2DConditionModel",),
    denoiser_attribute="unet",
    timestep_scale=1.0,
    latent_input="sample",
    keep_16bit=("conv_in", "conv_out", "time_embedding", "add_embedding"),
    output_type="diffusers.models.unets.unet_2d_condition:UNet2DConditionOutput",
)
