"""CogVideoX (1.0/1.5): latents (B, F, C, H, W), timestep as is, batched CFG.

Capture: when the video size differs from the one the model was configured for (``sample_height``,
``sample_width``, ``sample_frames``), ``CogVideoXPatchEmbed`` rebuilds its sin-cos position table on
every call and writes it through ``tensor.data``, which ``torch.export`` cannot trace ("We found a fake
tensor in the exported program constant's list"). The table depends only on the shape, so the strategy
builds it eagerly for the shape being captured and hands export that real tensor, which becomes a
graph constant like any buffer.

The same table holds ``max_text_seq_length`` text rows: the pipeline must pad prompts to that length.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from accelkit.families.base import FamilyTraits


@contextmanager
def precomputed_position_table(denoiser: Any, kwargs: Mapping[str, Any]) -> Iterator[None]:
    """While active, ``patch_embed._get_positional_embeddings`` returns the table for the captured shape."""
    embed = getattr(denoiser, "patch_embed", None)
    latent = kwargs.get("hidden_states")
    if embed is None or not hasattr(embed, "_get_positional_embeddings") or getattr(latent, "ndim", 0) != 5:
        yield
        return
    frames, height, width = int(latent.shape[1]), int(latent.shape[3]), int(latent.shape[4])
    # The patch embedding asks for the frame count before temporal compression.
    raw_frames = (frames - 1) * int(embed.temporal_compression_ratio) + 1
    original = embed._get_positional_embeddings
    table = original(height, width, raw_frames, device=latent.device)

    def lookup(sample_height: int, sample_width: int, sample_frames: int, device: Any = None) -> Any:
        if (sample_height, sample_width, sample_frames) == (height, width, raw_frames):
            return table
        return original(sample_height, sample_width, sample_frames, device=device)

    embed._get_positional_embeddings = lookup
    try:
        yield
    finally:
        del embed._get_positional_embeddings  # the instance attribute; the class method shows again


def text_length_of_the_model(pipe: Any, generation: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline pads prompts to ``max_sequence_length`` (226); the model's position table is built for
    ``max_text_seq_length`` text tokens, so a model configured for another length needs the pipeline told."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    length = getattr(config, "max_text_seq_length", None)
    return {"max_sequence_length": int(length)} if isinstance(length, int) and length != 226 else {}


TRAITS = FamilyTraits(
    name="cogvideox",
    pipeline_classes=("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline"),
    denoiser_classes=("CogVideoXTransformer3DModel",),
    timestep_scale=1.0,
    keep_16bit=("patch_embed", "time_embedding", "norm_final", "norm_out"),
    media="video",
    call_arguments=text_length_of_the_model,
    capture_strategy=precomputed_position_table,
)
