"""Mixed-dtype einsum operands get explicit casts, so onnxruntime loads the model (HiDream's rotary table)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accelkit.capture.graph import capture
from accelkit.export.onnx import _prepare_module, export_program_onnx
from accelkit.passes.base import Program

ort = pytest.importorskip("onnxruntime")
aten = torch.ops.aten


class _Float64Rope(torch.nn.Module):
    """diffusers' HiDream ``rope``: float64 frequencies einsummed with float32 positions (torch promotes)."""

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor]:
        scale = torch.arange(0, 8, 2, dtype=torch.float64) / 8
        omega = 1.0 / (10000.0**scale)
        angles = torch.einsum("...n,d->...nd", positions, omega)  # float64
        table = torch.cat([angles.cos(), angles.sin()], dim=-1).float()
        return (hidden_states * table.sum(-1),)


def _captured():
    inputs = {"hidden_states": torch.randn(2, 5), "positions": torch.arange(10.0).view(2, 5) * 7.5}
    return capture(_Float64Rope().eval(), inputs), inputs


def _einsum_operand_dtypes(module: torch.fx.GraphModule) -> list[list[torch.dtype]]:
    return [[o.meta["val"].dtype for o in n.args[1]]
            for n in module.graph.nodes if n.op == "call_function" and n.target is aten.einsum.default]


def test_einsum_operands_are_cast_to_the_promoted_dtype_on_a_clone():
    graph, inputs = _captured()
    assert _einsum_operand_dtypes(graph.module) == [[torch.float32, torch.float64]]
    prepared = _prepare_module(graph.module)
    # float64 stays float64: the float32 positions are cast up, as PyTorch's promotion computes.
    assert _einsum_operand_dtypes(prepared) == [[torch.float64, torch.float64]]
    assert _einsum_operand_dtypes(graph.module) == [[torch.float32, torch.float64]]  # caller's graph untouched
    args = graph.flat_inputs(inputs)
    assert torch.equal(prepared(*args)[0], graph.module(*args)[0])


def test_mixed_dtype_einsum_exports_and_matches_in_onnxruntime(tmp_path):
    graph, inputs = _captured()
    out = tmp_path / "onnx"
    manifest = export_program_onnx(Program.from_graph(graph, 1), out, inputs=inputs, dynamic_batch=False)
    assert manifest["models"][0]["verification"]["max_relative_error"] < 1e-5
    session = ort.InferenceSession(str(out / "full.onnx"), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["out0"], {name: value.numpy() for name, value in inputs.items()})
    with torch.no_grad():
        expected = graph.module(*graph.flat_inputs(inputs))[0].numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
