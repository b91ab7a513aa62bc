"""Allegro: latents (B, C, F, H, W), rotary tables passed as nested tuples, batched CFG, timestep as is;
its embedders and output layers are the generic 16-bit ones (PixArt-style names).

Its VAE decodes only tiled (``enable_tiling``; a flag a saved folder does not keep): it is turned on at load.
"""

from typing import Any

from accelkit.families.base import FamilyTraits


def decode_tiled(pipe: Any) -> None:
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()


TRAITS = FamilyTraits(
    name="allegro",
    pipeline_classes=("AllegroPipeline",),
    denoiser_classes=("AllegroTransformer3DModel",),
    timestep_scale=1.0,
    media="video",
    prepare=decode_tiled,
)
