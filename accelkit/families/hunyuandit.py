"""HunyuanDiT: rotary embeddings passed in as a tuple of tensors (flattened into graph inputs)."""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="hunyuandit",
    pipeline_classes=("HunyuanDiTPipeline",),
    denoiser_classes=("HunyuanDiT2DModel",),
    timestep_scale=1.0,
    text_token_inputs=("encoder_hidden_states", "encoder_hidden_states_t5"),
    keep_16bit=("time_extra_emb", "text_embedder"),
)
