"""HiDream-I1: the timestep argument is ``timesteps``; text comes from T5 and Llama-3 states."""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="hidream",
    pipeline_classes=("HiDreamImagePipeline",),
    denoiser_classes=("HiDreamImageTransformer2DModel",),
    timestep_scale=1.0,
    timestep_input="timesteps",
    text_token_inputs=("encoder_hidden_states_t5",),
    keep_16bit=("t_embedder", "p_embedder", "caption_projection", "final_layer"),
)
