"""What accelkit knows about one model family, as one declarative record.

Everything family-specific that the layers above need (where the denoiser lives, how the pipeline scales
the timestep it passes, which inputs are text tokens, which linears stay 16-bit, what the denoiser returns,
which pipeline arguments a family needs) is a field here, so a new family is one file under
``accelkit/families/`` and no pass or runtime module names a model. Fields left at their defaults describe
the generic diffusers text-to-image pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

TRAITS_VERSION = 1

# Embedders, final projections and time/text embedders stay 16-bit (SVDQuant keeps them on FLUX).
# A pattern matches a layer path equal to it or below it (``fnmatch`` globs allowed), from the root.
GENERIC_KEEP_16BIT = (
    "x_embedder", "context_embedder", "time_text_embed", "proj_out", "norm_out",
    "pos_embed", "adaln_single", "caption_projection", "proj_out_1", "proj_out_2", "*.timestep_embedder.*",
)  # fmt: skip

TRANSFORMER_OUTPUT = "diffusers.models.modeling_outputs:Transformer2DModelOutput"

# (pipeline, generation settings) -> extra pipeline call arguments the family needs.
CallArguments = Callable[[Any, Mapping[str, Any]], dict[str, Any]]
# (denoiser, call kwargs) -> context manager active around ``torch.export`` (patches, dynamic marks).
CaptureStrategy = Callable[[Any, Mapping[str, Any]], AbstractContextManager[Any]]


def _no_call_arguments(pipe: Any, generation: Mapping[str, Any]) -> dict[str, Any]:
    return {}


def _nothing_to_prepare(pipe: Any) -> None:
    return None


def binning_only_for(sample_sizes: tuple[int, ...]) -> CallArguments:
    """Call arguments turning resolution binning off for a denoiser ``sample_size`` without a bin table.

    PixArt and Sana pipelines snap the resolution to a table chosen by ``transformer.config.sample_size``
    and raise "Invalid sample size" for any other (a fine-tuned or tiny model); without binning they
    generate at the requested size.
    """

    def call_arguments(pipe: Any, generation: Mapping[str, Any]) -> dict[str, Any]:
        config = getattr(getattr(pipe, "transformer", None), "config", None)
        if getattr(config, "sample_size", None) in sample_sizes:
            return {}
        return {"use_resolution_binning": False}

    return call_arguments


@dataclass(frozen=True, kw_only=True)
class FamilyTraits:
    """One model family's quirks.

    Args:
        name: short family name (``"flux"``), unique in the registry.
        pipeline_classes: diffusers pipeline class names of the family (lookup by pipeline).
        denoiser_classes: denoiser class names of the family (lookup by ``DenoiserGraph.family``).
        denoiser_attribute: the pipeline attribute holding the denoiser; None tries ``transformer``
            then ``unet``.
        timestep_scale: how the passed timestep relates to ``scheduler.timesteps``: ``1.0`` as is
            (SD3, PixArt, UNets), ``1e-3`` divided by 1000 (Flux, AuraFlow), None to find the nearest
            of both. A fixed scale matters where both fit: AuraFlow passes t/1000 and its last
            timestep is 1.0, so the first call would be taken for the last step.
        timestep_offset: added after scaling: Lumina2 and Z-Image pass ``1 - t/1000`` (scale ``-1e-3``,
            offset ``1.0``).
        timestep_input: the denoiser argument carrying the timestep.
        latent_input: the denoiser argument carrying the noisy latent (positional or keyword).
        text_token_inputs: denoiser inputs whose second-to-last dimension counts text tokens.
        keep_16bit: linear paths (patterns as in ``quant.skip_patterns``) that stay 16-bit in addition
            to :data:`GENERIC_KEEP_16BIT`.
        output_type: ``"module:Class"`` of the denoiser's ``return_dict=True`` output; the first field
            receives the predicted noise.
        default_guidance: guidance scale when the user gives none; None reads the default of the
            pipeline's own ``__call__`` signature.
        cfg: how the pipeline runs classifier-free guidance: one ``"batched"`` call, ``"separate"``
            calls per branch, or ``"none"`` (guidance-distilled).
        call_arguments: extra pipeline arguments the family needs for given generation settings
            (PixArt: ``use_resolution_binning=False`` when the size has no bin).
        media: ``"image"`` (latents ``(B, C, H, W)`` or packed tokens) or ``"video"`` (``(B, C, F, H, W)``).
        capture_strategy: context manager factory active around ``torch.export`` (patching a module
            export cannot trace, marking values dynamic); None captures as is.
        prepare: called on a pipeline once it is loaded, for settings a saved folder cannot hold that
            the pipeline needs to run at all (Allegro's VAE decodes only with tiling on).
        value_inputs: tensor inputs whose values the denoiser reads into Python (Lumina2's caption
            lengths from ``encoder_attention_mask``): the capture takes those numbers from an eager run
            of the recorded call (:mod:`accelkit.capture.specialize`) and is valid for these values only.
        version: schema version of this record.
    """

    name: str
    pipeline_classes: tuple[str, ...] = ()
    denoiser_classes: tuple[str, ...] = ()
    denoiser_attribute: str | None = None
    timestep_scale: float | None = None
    timestep_offset: float = 0.0
    timestep_input: str = "timestep"
    latent_input: str = "hidden_states"
    text_token_inputs: tuple[str, ...] = ("encoder_hidden_states",)
    keep_16bit: tuple[str, ...] = ()
    output_type: str = TRANSFORMER_OUTPUT
    default_guidance: float | None = None
    cfg: Literal["batched", "separate", "none"] = "batched"
    call_arguments: CallArguments = field(default=_no_call_arguments, repr=False)
    media: Literal["image", "video"] = "image"
    capture_strategy: CaptureStrategy | None = field(default=None, repr=False)
    value_inputs: tuple[str, ...] = ()
    prepare: Callable[[Any], None] = field(default=_nothing_to_prepare, repr=False)
    version: int = TRAITS_VERSION

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a family needs a name")
        if self.timestep_scale == 0:
            raise ValueError(f"family {self.name}: timestep_scale must not be 0")
        if ":" not in self.output_type:
            raise ValueError(f"family {self.name}: output_type must read 'module:Class', got {self.output_type!r}")

    @property
    def timestep_maps(self) -> tuple[tuple[float, float], ...]:
        """``(scale, offset)`` pairs the step locator tries: passed timestep = offset + scale * t."""
        if self.timestep_scale is not None:
            return ((self.timestep_scale, self.timestep_offset),)
        return ((1.0, 0.0), (1e-3, 0.0))

    @property
    def keep_16bit_patterns(self) -> tuple[str, ...]:
        return GENERIC_KEEP_16BIT + tuple(p for p in self.keep_16bit if p not in GENERIC_KEEP_16BIT)

    def output_class(self) -> type:
        """The class named by :attr:`output_type` (imported on use: diffusers is heavy)."""
        import importlib

        module_name, _, class_name = self.output_type.partition(":")
        return getattr(importlib.import_module(module_name), class_name)


GENERIC = FamilyTraits(name="generic")
