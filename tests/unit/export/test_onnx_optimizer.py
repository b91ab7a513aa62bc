"""The ONNX graph optimizer keeps every epsilon (accelkit/export/onnx_optimizer.py).

onnxscript's no-op rules take ``x + 1e-15`` for ``x + 0``; a division guarded by that epsilon then gives
0/0 = NaN in onnxruntime where PyTorch gives 0 (Sana's linear attention, issue 20).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accelkit.capture import capture
from accelkit.export.onnx import export_program_onnx
from accelkit.export.onnx_optimizer import optimize_model, result_changing_rules
from accelkit.passes.base import Program

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ir = pytest.importorskip("onnx_ir")


def _guarded_division():
    """``y = num / (den + 1e-15)`` as an onnx_ir model."""
    from onnx import TensorProto, helper, numpy_helper

    epsilon = numpy_helper.from_array(np.array(1e-15, dtype=np.float32), name="epsilon")
    nodes = [
        helper.make_node("Add", ["den", "epsilon"], ["guarded"]),
        helper.make_node("Div", ["num", "guarded"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("num", "den")]
    graph = helper.make_graph(
        nodes,
        "guarded",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        initializer=[epsilon],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _run(model) -> np.ndarray:
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    zeros = np.zeros(3, dtype=np.float32)
    (y,) = session.run(["y"], {"num": zeros, "den": zeros})
    return y


def test_optimizer_keeps_the_epsilon_of_a_guarded_division():
    import onnxscript.optimizer
    import onnxscript.rewriter

    rules_before = onnxscript.rewriter._DEFAULT_REWRITE_RULES
    # onnxscript's own optimizer drops it (when this fails, onnxscript fixed the matcher and
    # accelkit/export/onnx_optimizer.py can go)
    upstream = _guarded_division()
    onnxscript.optimizer.optimize_ir(upstream, inline=False)
    assert np.isnan(_run(upstream)).all()
    ours = _guarded_division()
    optimize_model(ours)
    assert np.array_equal(_run(ours), np.zeros(3, dtype=np.float32))
    assert [n.op_type for n in ours.graph] == ["Add", "Div"]
    assert result_changing_rules() and onnxscript.rewriter._DEFAULT_REWRITE_RULES is rules_before


class _LinearAttention(torch.nn.Module):
    """Sana's linear attention: ReLU kernels, a ones row appended to the values, division by that row."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        query, key = torch.relu(query), torch.relu(key).transpose(1, 2)
        value = torch.nn.functional.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
        hidden = torch.matmul(torch.matmul(value, key), query)
        return hidden[:, :-1] / (hidden[:, -1:] + 1e-15)


def test_linear_attention_with_an_all_zero_query_exports_without_nan(tmp_path):
    generator = torch.Generator().manual_seed(0)
    kwargs = {name: torch.randn(2, 8, 6, generator=generator) for name in ("query", "key", "value")}
    kwargs["query"][:, :, 0] = -kwargs["query"][:, :, 0].abs() - 0.1  # token 0: every ReLU feature is 0
    graph = capture(_LinearAttention().eval(), kwargs)
    with torch.no_grad():
        (expected,) = graph.module(*graph.flat_inputs(kwargs))
    assert torch.isfinite(expected).all() and (expected[:, :, 0] == 0).all()
    manifest = export_program_onnx(
        Program.from_graph(graph, 2),
        tmp_path / "onnx",
        dynamic_batch=False,
        inputs=dict(zip(graph.input_names, graph.flat_inputs(kwargs), strict=True)),
    )
    assert manifest["models"][0]["verification"]["max_relative_error"] < 1e-5
    session = ort.InferenceSession(str(tmp_path / "onnx" / "full.onnx"), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["out0"], {name: value.numpy() for name, value in kwargs.items()})
    assert np.isfinite(actual).all()
    np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-5, atol=1e-6)
