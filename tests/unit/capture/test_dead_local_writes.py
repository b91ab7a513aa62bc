"""Dead-code elimination through in-place writes into graph-allocated buffers (capture/graph.py)."""

from __future__ import annotations

import torch

from accelkit.capture.graph import capture, eliminate_dead_nodes


class _RotaryLike(torch.nn.Module):
    """Writes a fresh buffer slice by slice, as Wan's and CogView4's rotary embeddings do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.proj(x)
        out = torch.empty_like(h)
        out[..., 0::2] = h[..., 0::2] * 2
        out[..., 1::2] = h[..., 1::2] + 1
        return x * 3, out


def _drop_second_output(graph: torch.fx.Graph) -> None:
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0][0],),)


def test_writes_into_a_dead_local_buffer_are_removed():
    graph = capture(_RotaryLike().eval(), {"x": torch.randn(2, 8)})
    module = graph.module
    assert sum(n.target is torch.ops.aten.copy_.default for n in module.graph.nodes) == 2
    _drop_second_output(module.graph)
    eliminate_dead_nodes(module.graph)
    targets = {n.target for n in module.graph.nodes if n.op == "call_function"}
    # Everything that only fed the buffer is gone, the linear included.
    assert torch.ops.aten.copy_.default not in targets
    assert torch.ops.aten.linear.default not in targets
    module.recompile()
    x = torch.randn(2, 8)
    assert torch.equal(module(x)[0], x * 3)


def test_live_local_buffer_and_writes_into_inputs_stay():
    model = _RotaryLike().eval()
    graph = capture(model, {"x": torch.randn(2, 8)})
    before = len(graph.module.graph.nodes)
    assert eliminate_dead_nodes(graph.module.graph) == 0
    assert len(graph.module.graph.nodes) == before

    g = torch.fx.Graph()
    x = g.placeholder("x")
    view = g.call_function(torch.ops.aten.slice.Tensor, (x, 1, 0, 4))
    g.call_function(torch.ops.aten.copy_.default, (view, view))
    g.output((x,))
    # The write lands in the caller's tensor: it is observable and must stay.
    assert eliminate_dead_nodes(g) == 0
    assert any(n.target is torch.ops.aten.copy_.default for n in g.nodes)
