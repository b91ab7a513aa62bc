"""ONNX preparation rewrites masked_fill of bool tensors (onnxruntime has no bool Where on CPU)."""

from __future__ import annotations

import torch

from accelkit.capture.graph import capture
from accelkit.export.onnx import _prepare_module


class _ClearPadding(torch.nn.Module):
    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.ones_like(pad, dtype=torch.bool)
        cleared = mask.masked_fill(pad, False)
        setting = torch.zeros_like(pad, dtype=torch.bool).masked_fill(pad, True)
        return x * cleared.float(), x * setting.float()


def test_bool_masked_fill_becomes_logic_with_the_same_values():
    pad = torch.tensor([[False, True, True], [False, False, True]])
    x = torch.randn(2, 3)
    graph = capture(_ClearPadding().eval(), {"x": x, "pad": pad})
    prepared = _prepare_module(graph.module)
    targets = {n.target for n in prepared.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.masked_fill.Scalar not in targets
    assert torch.ops.aten.logical_and.default in targets and torch.ops.aten.logical_or.default in targets
    for got, want in zip(prepared(x, pad), graph.module(x, pad), strict=True):
        assert torch.equal(got, want)
