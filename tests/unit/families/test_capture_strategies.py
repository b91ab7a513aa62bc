"""Family capture strategies compute what the module they stand in for computes."""

from __future__ import annotations

import torch

from accelkit.families.hidream import dense_expert_mixture, dense_expert_routing


def test_dense_expert_routing_equals_hidream_sparse_routing():
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    torch.manual_seed(0)
    moe = MOEFeedForwardSwiGLU(dim=16, hidden_dim=32, num_routed_experts=4, num_activated_experts=2).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        sparse = moe(x)
        indices, weights, _ = moe.gate(x)
        dense = dense_expert_mixture(moe, x.view(-1, 16), indices.view(-1), weights.view(-1, 1))
        with dense_expert_routing(moe, {}):
            routed = moe(x)
            exported = torch.export.export(moe, (x,), strict=False)  # sparse routing: ".numpy()" fails here
    assert torch.allclose(routed, sparse, atol=1e-6)
    assert torch.allclose(dense + moe.shared_experts(x).view(-1, 16), sparse.view(-1, 16), atol=1e-6)
    assert torch.allclose(exported.module()(x), sparse, atol=1e-6)
    assert "moe_infer" not in vars(moe)  # the class's sparse routing is back
