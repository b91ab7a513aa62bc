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


def test_conversion_error_line_names_the_op_that_failed():
    # torch.onnx's ConversionError opens with generic next steps; the failing op is in its summary.
    from accelkit.export.onnx import _first_line

    error = RuntimeError(
        "Failed to convert the exported program to an ONNX model. This is step 3/3 of exporting the model.\n"
        "- If there is a missing ONNX function, implement it and register it to the registry.\n"
        "## Exception summary\n"
        "<class 'torch.onnx._internal.exporter._errors.DispatchError'>: No ONNX function found for "
        "<OpOverload(op='aten.split_with_sizes', overload='default')>. Failure message: complex-valued input\n"
        "(Refer to the full stack trace above for more information.)")
    line = _first_line(error)
    assert line.startswith("Failed to convert the exported program to an ONNX model: No ONNX function found")
    assert "aten.split_with_sizes" in line and "complex-valued" in line
