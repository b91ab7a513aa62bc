"""Caption encoder of ``zoo:shapes``: whitespace tokenizer over a fixed vocabulary + a small transformer.

It plays the role T5/CLIP play for Flux: ``encoder_hidden_states`` (B, T, joint_attention_dim) for the
joint attention and ``pooled_projections`` (B, pooled_dim) for the adaLN conditioning. It is a
diffusers ``ModelMixin``/``ConfigMixin`` so the vocabulary lives in ``config.json`` and the weights
in safetensors, and ``DiffusionPipeline.save_pretrained``/``from_pretrained`` handle it.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["PAD", "UNK", "BOS", "ShapesTextEncoder"]

PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"


class ShapesTextEncoder(ModelMixin, ConfigMixin):
    """Token embedding + position embedding + pre-norm transformer encoder.

    Every caption is ``[BOS, words..., PAD...]``; the empty caption (the unconditional one for
    classifier-free guidance) is just ``[BOS, PAD...]``. No attention mask is used: padding is a learned
    token, which keeps the all-padding unconditional caption well defined.

    Args:
        vocabulary: the known words; ids 0-2 are reserved for PAD, UNK and BOS.
        max_length: token count T of every encoded caption (longer captions are truncated).
        hidden_dim: width of the encoder.
        num_layers: transformer encoder layers.
        num_heads: attention heads per layer.
        joint_attention_dim: width of ``encoder_hidden_states`` (the denoiser's ``joint_attention_dim``).
        pooled_dim: width of ``pooled_projections`` (the denoiser's ``pooled_projection_dim``).
    """

    @register_to_config
    def __init__(
        self,
        vocabulary: list[str] | tuple[str, ...] = (),
        max_length: int = 16,
        hidden_dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        joint_attention_dim: int = 128,
        pooled_dim: int = 128,
    ) -> None:
        super().__init__()
        self._tokens = [PAD, UNK, BOS, *vocabulary]
        self._ids = {word: i for i, word in enumerate(self._tokens)}
        self.token_embedding = nn.Embedding(len(self._tokens), hidden_dim)
        self.position_embedding = nn.Parameter(torch.randn(max_length, hidden_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            hidden_dim,
            num_heads,
            dim_feedforward=2 * hidden_dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # enable_nested_tensor only matters with padding masks, which we do not use.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_dim)
        self.hidden_proj = nn.Linear(hidden_dim, joint_attention_dim)
        self.pooled_proj = nn.Linear(hidden_dim, pooled_dim)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (vocabulary + PAD, UNK, BOS)."""
        return len(self._tokens)

    def tokenize(self, captions: list[str] | str) -> torch.LongTensor:
        """Lower-case, split on whitespace (a comma is its own word), map to ids, pad to ``max_length``.

        Args:
            captions: one caption or a list; unknown words become UNK, ``""`` is the unconditional one.

        Returns:
            (B, max_length) int64 ids on the module's device.
        """
        if isinstance(captions, str):
            captions = [captions]
        length = self.config.max_length
        rows = []
        for caption in captions:
            words = caption.lower().replace(",", " , ").split()
            ids = [self._ids[BOS], *(self._ids.get(w, self._ids[UNK]) for w in words)][:length]
            rows.append(ids + [self._ids[PAD]] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.token_embedding.weight.device)

    def forward(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode token ids.

        Args:
            input_ids: (B, T) ids from :meth:`tokenize`.

        Returns:
            ``(encoder_hidden_states (B, T, joint_attention_dim), pooled_projections (B, pooled_dim))``;
            the pooled vector is read at the BOS position, which attends to the whole caption.
        """
        x = self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]
        x = self.norm(self.encoder(x))
        return self.hidden_proj(x), self.pooled_proj(x[:, 0])

    def encode(self, captions: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and encode captions in one call (see :meth:`forward`)."""
        return self(self.tokenize(captions))
