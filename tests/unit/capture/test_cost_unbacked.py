"""FLOP counting with data-dependent sizes (capture/cost.py): Mochi keeps valid text tokens via nonzero."""

from __future__ import annotations

import torch

from accelkit.capture.cost import concrete_size
from accelkit.capture.graph import capture


class _ValidTokensAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        valid = x[0][mask[0].nonzero().flatten()]  # (u0, 8): u0 only known at run time
        h = self.proj(valid).unsqueeze(0)
        out = torch.nn.functional.scaled_dot_product_attention(h, h, h)
        return x + out.mean()


def test_unbacked_sizes_count_at_their_upper_bound():
    x, mask = torch.randn(1, 6, 8), torch.tensor([[1, 1, 1, 0, 0, 0]])
    model = _ValidTokensAttention().eval()
    graph = capture(model, {"x": x, "mask": mask})
    with torch.no_grad():
        assert torch.equal(graph.module(x, mask)[0], model(x, mask))
    linear = next(n for n in graph.module.graph.nodes if n.target is torch.ops.aten.linear.default)
    rows = linear.args[0].meta["val"].shape[0]
    assert not isinstance(rows, int)  # a symbol, not a number
    assert concrete_size(rows) == 6  # bounded by the mask length
    assert graph.costs[linear.name].flops == 2.0 * 6 * 8 * 8
    assert graph.total_flops() > 0
    assert concrete_size(5) == 5
