"""Dead-code elimination of captured graphs: in-place writes into dead storage go, live ones stay."""

from __future__ import annotations

import torch
from torch import fx

from accelkit.capture import capture
from accelkit.capture.graph import eliminate_dead_nodes


class SliceWrite(torch.nn.Module):
    """CogView4-style: rotate part of ``q`` and write it back into a slice of ``q`` in place."""

    def forward(self, x, buffer):
        q = x * 2
        q[:, 1:] = q[:, 1:].sin()
        buffer[:, :1] += 1  # writes a graph input: a side effect
        return (q.sum(-1), x + 1)


def _graph() -> fx.GraphModule:
    return capture(SliceWrite(), {"x": torch.randn(2, 3), "buffer": torch.zeros(2, 3)}).module


def _count(module: fx.GraphModule, name: str) -> int:
    return sum(1 for n in module.graph.nodes if n.op == "call_function" and name in str(n.target))


def test_captured_graph_keeps_live_in_place_writes_and_stays_exact():
    module = _graph()
    assert _count(module, "copy_") >= 1
    x, buffer = torch.randn(2, 3), torch.zeros(2, 3)
    expected_q = (x * 2)
    expected_q[:, 1:] = expected_q[:, 1:].sin()
    out = module(x, buffer)
    assert torch.allclose(out[0], expected_q.sum(-1))


def test_in_place_write_into_dead_storage_is_removed():
    module = _graph()
    output = next(n for n in module.graph.nodes if n.op == "output")
    # Keep only x + 1: q, its slice write and the sin become dead; the write into the input stays.
    output.args = ((output.args[0][1],),)
    removed = eliminate_dead_nodes(module.graph)
    module.recompile()
    assert removed > 0
    assert not any("sin" in str(n.target) for n in module.graph.nodes)
    assert _count(module, "add_") + _count(module, "copy_") >= 1  # buffer[:, :1] += 1 is kept
    x, buffer = torch.randn(2, 3), torch.zeros(2, 3)
    assert torch.equal(module(x, buffer)[0], x + 1)
    assert buffer[:, 0].eq(1).all() and buffer[:, 1:].eq(0).all()
