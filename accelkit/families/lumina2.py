"""Lumina Image 2.0: the pipeline passes 1 - t/1000 and runs CFG as separate calls.

The rotary embedder counts each caption's valid tokens with ``encoder_attention_mask.sum(dim=1).tolist()``
and builds the joint text+image sequence from those Python counts, which ``torch.export`` cannot trace
("unhashable type: non-nested SymInt"). The mask is a value input: each capture is specialized to its
counts (the positive and the empty negative prompt are two captures).
"""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="lumina2",
    pipeline_classes=("Lumina2Pipeline",),
    denoiser_classes=("Lumina2Transformer2DModel",),
    timestep_scale=-1e-3,
    timestep_offset=1.0,
    keep_16bit=("time_caption_embed",),
    cfg="separate",
    value_inputs=("encoder_attention_mask",),
)
