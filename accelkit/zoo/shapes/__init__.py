"""``zoo:shapes``: a small caption-to-image Flux transformer trained on procedural coloured shapes."""

from __future__ import annotations

__all__ = [
    "SHAPES_TRANSFORMER_CONFIG",
    "SHAPES_TEXT_ENCODER_CONFIG",
    "SHAPES_SCHEDULER_CONFIG",
    "build_pipeline",
]

# Architecture of the shipped model, shared by the training script, the tests and the registry.
# 3 heads x 64 = 192 wide; RoPE axes (id 0 unused, rows, cols) sum to the head dim.
SHAPES_TRANSFORMER_CONFIG: dict = {
    "patch_size": 1,
    "in_channels": 12,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 64,
    "num_attention_heads": 3,
    "joint_attention_dim": 128,
    "pooled_projection_dim": 128,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 24, 24),
}
SHAPES_TEXT_ENCODER_CONFIG: dict = {
    "max_length": 16,
    "hidden_dim": 128,
    "num_layers": 2,
    "num_heads": 4,
    "joint_attention_dim": 128,
    "pooled_dim": 128,
}
SHAPES_SCHEDULER_CONFIG: dict = {"num_train_timesteps": 1000, "shift": 1.0}


def build_pipeline(
    transformer_config: dict | None = None, text_encoder_config: dict | None = None, seed: int | None = 0
):
    """A randomly initialised ``ShapesPipeline`` (the shipped architecture unless configs override it).

    Args:
        transformer_config: overrides of :data:`SHAPES_TRANSFORMER_CONFIG`.
        text_encoder_config: overrides of :data:`SHAPES_TEXT_ENCODER_CONFIG`.
        seed: seeds the initialisation (``None`` leaves the global RNG alone).
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from accelkit.zoo.shapes.data import VOCABULARY
    from accelkit.zoo.shapes.pipeline import ShapesPipeline
    from accelkit.zoo.shapes.text_encoder import ShapesTextEncoder

    if seed is not None:
        torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**{**SHAPES_TRANSFORMER_CONFIG, **(transformer_config or {})})
    text_encoder = ShapesTextEncoder(
        vocabulary=list(VOCABULARY), **{**SHAPES_TEXT_ENCODER_CONFIG, **(text_encoder_config or {})}
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**SHAPES_SCHEDULER_CONFIG)
    # eval(), like from_pretrained: nn.TransformerEncoder takes a different (fused) path in eval mode,
    # so a fresh pipeline and its saved-and-reloaded copy only match exactly if both are in eval.
    transformer.eval()
    text_encoder.eval()
    return ShapesPipeline(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)
