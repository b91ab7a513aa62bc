"""PixArt-Alpha / PixArt-Sigma: the latent is passed positionally; resolution binning only exists for
the released sample sizes, so it is turned off for others."""

from accelkit.families.base import FamilyTraits, binning_only_for

TRAITS = FamilyTraits(
    name="pixart",
    pipeline_classes=("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
    denoiser_classes=("PixArtTransformer2DModel",),
    timestep_scale=1.0,
    call_arguments=binning_only_for((32, 64, 128, 256)),
)
