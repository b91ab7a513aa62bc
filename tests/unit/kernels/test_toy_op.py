"""A new op is one registration: a test-only toy op, registered from this module and no accelkit file,
is costed by capture/cost.py, priced by search/cost.py at its declared precision, refused or lowered by
the ONNX export (its lowering lives here too) and checked in onnxruntime.

The toy op ``accelkit_toy::scaled_square(x, scale, mode) = scale * x * x`` has a cost formula with a
distinctive FLOP count (7168 per element, kind "matmul"), a precision fact (``mode="fp8"`` computes in
float8) and an ONNX lowering with a refusal (``mode="unsupported"``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accelkit.capture import capture
from accelkit.capture.cost import graph_costs, node_flops
from accelkit.kernels.registry import (
    LoweringError,
    OnnxLowering,
    OpCall,
    OpFlops,
    OpSpec,
    PrecisionFacts,
    register_op,
    registered_ops,
    unregister_op,
)
from accelkit.passes.base import Program
from accelkit.search.cost import device_spec, module_cost

TOY = "accelkit_toy::scaled_square"
# Distinctive, and high enough that the op is compute-bound on the h100 table in float32 and float8.
FLOPS_PER_ELEMENT = 7168.0


@torch.library.custom_op(TOY, mutates_args=())
def _scaled_square(x: torch.Tensor, scale: float, mode: str) -> torch.Tensor:
    return x * x * scale


@_scaled_square.register_fake
def _(x, scale, mode):
    return torch.empty_like(x)


# ---------------------------------------------------------------- the op's registration (all of it)


def toy_flops(call: OpCall) -> OpFlops:
    return OpFlops(flops=FLOPS_PER_ELEMENT * call.numel("x"), kind="matmul")


def toy_compute_dtype(call: OpCall) -> str | None:
    return "float8" if call.arg("mode") == "fp8" else None


def toy_refusal(call: OpCall) -> str | None:
    return "scaled_square: mode='unsupported' has no ONNX form" if call.arg("mode") == "unsupported" else None


def lower_toy(x, scale, mode):
    """The ONNX lowering (onnxscript is imported only when an export loads this function)."""
    from onnxscript import opset21 as op

    return op.Mul(op.Mul(x, x), op.CastLike(op.Constant(value_float=float(scale)), x))


def finalize_toy(model) -> dict[str, int]:
    calls = sum(1 for n in model.graph.all_nodes() if n.op_type == "Mul")
    return {"toy_multiplies": calls}


TOY_SPEC = OpSpec(
    name=TOY,
    flops=toy_flops,
    precision=PrecisionFacts(compute_dtype=toy_compute_dtype),
    onnx=OnnxLowering(module=__name__, function="lower_toy", finalize="finalize_toy", refuse=toy_refusal),
)


@pytest.fixture
def toy_registered():
    register_op(TOY_SPEC)
    yield TOY_SPEC
    unregister_op(TOY)


class _Toy(nn.Module):
    def __init__(self, mode: str = "fp32"):
        super().__init__()
        self.mode = mode

    def forward(self, hidden_states):
        return (torch.ops.accelkit_toy.scaled_square(hidden_states, 0.5, self.mode) + 1.0,)


def _graph(mode: str = "fp32", shape=(2, 96, 64)):
    return capture(_Toy(mode), {"hidden_states": torch.randn(*shape)})


def _toy_node(module):
    (node,) = [n for n in module.graph.nodes if n.op == "call_function" and "scaled_square" in str(n.target)]
    return node


def test_the_registration_is_all_the_registry_knows_and_it_is_removable(toy_registered):
    assert registered_ops()[TOY] is toy_registered
    unregister_op(TOY)
    assert TOY not in registered_ops()
    register_op(TOY_SPEC)


def test_capture_cost_uses_the_registered_formula(toy_registered):
    graph = _graph()
    node = _toy_node(graph.module)
    elements = 2 * 96 * 64
    assert node_flops(node) == (FLOPS_PER_ELEMENT * elements, "matmul")
    cost = graph_costs(graph.module)[node.name]
    assert cost.flops == FLOPS_PER_ELEMENT * elements and cost.kind == "matmul"
    assert cost.bytes == 2 * elements * 4  # read x, write the output (float32)


def test_without_its_registration_the_op_is_only_memory(toy_registered):
    graph = _graph()
    unregister_op(TOY)
    try:
        assert node_flops(_toy_node(graph.module)) == (float(2 * 96 * 64), "memory")
    finally:
        register_op(TOY_SPEC)


def test_search_cost_prices_the_declared_precision(toy_registered):
    spec = device_spec("h100")
    # Compute-bound: the op's FLOPs over the peak of the dtype its registration declares.
    fp32, fp8 = _graph("fp32"), _graph("fp8")
    flops = FLOPS_PER_ELEMENT * 2 * 96 * 64
    rest = module_cost(fp32.module, spec) - flops / spec.flops["float32"]
    assert module_cost(fp8.module, spec) == pytest.approx(rest + flops / spec.flops["float8"], rel=1e-6)
    assert module_cost(fp8.module, spec) < module_cost(fp32.module, spec)


def test_onnx_export_lowers_it_and_onnxruntime_agrees(toy_registered, tmp_path):
    pytest.importorskip("onnxruntime")
    from accelkit.export.onnx import export_program_onnx

    graph = _graph()
    manifest = export_program_onnx(Program.from_graph(graph, 2), tmp_path / "onnx", dynamic_batch=False)
    (entry,) = manifest["models"]
    assert entry["verification"]["max_relative_error"] < 1e-5
    assert entry["toy_multiplies"] >= 1  # the finalizer ran and its stats reached the manifest
    assert entry["verification"]["tolerance"] == pytest.approx(1e-4)


def test_fp8_precision_loosens_the_onnx_tolerance(toy_registered, tmp_path):
    pytest.importorskip("onnxruntime")
    from accelkit.export.onnx import export_program_onnx

    manifest = export_program_onnx(Program.from_graph(_graph("fp8"), 2), tmp_path / "onnx", dynamic_batch=False)
    assert manifest["models"][0]["verification"]["tolerance"] == pytest.approx(1e-2)


def test_onnx_export_refuses_what_its_registration_refuses(toy_registered, tmp_path):
    from accelkit.export.onnx import OnnxExportError, export_program_onnx

    with pytest.raises(OnnxExportError, match="mode='unsupported' has no ONNX form"):
        export_program_onnx(Program.from_graph(_graph("unsupported"), 2), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_an_unregistered_toy_op_is_refused_for_lack_of_a_lowering(toy_registered, tmp_path):
    from accelkit.export.onnx import OnnxExportError, export_program_onnx

    graph = _graph()
    register_op(OpSpec(name=TOY, flops=toy_flops))  # no ONNX lowering
    try:
        with pytest.raises(OnnxExportError, match=f"no ONNX lowering for {TOY}"):
            export_program_onnx(Program.from_graph(graph, 2), tmp_path / "onnx")
    finally:
        register_op(TOY_SPEC)


def test_a_lowering_error_becomes_an_export_error(toy_registered, tmp_path, monkeypatch):
    from accelkit.export.onnx import OnnxExportError, export_program_onnx

    def failing(x, scale, mode):
        raise LoweringError("scaled_square needs a static size")

    monkeypatch.setattr(__import__(__name__, fromlist=["_"]), "lower_toy", failing)
    with pytest.raises(OnnxExportError, match="scaled_square needs a static size"):
        export_program_onnx(Program.from_graph(_graph(), 2), tmp_path / "onnx", dynamic_batch=False)
