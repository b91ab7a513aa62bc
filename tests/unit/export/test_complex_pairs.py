"""Complex tensors as real pairs for ONNX (accelkit/export/complex_pairs.py): toy graphs, real pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accelkit.capture import capture
from accelkit.export.complex_pairs import complex_as_real_pairs, holds_complex
from accelkit.export.onnx import OnnxExportError, export_program_onnx
from accelkit.passes.base import Program

ort = pytest.importorskip("onnxruntime")


class _Rotary(torch.nn.Module):
    """A rotary embedding as Z-Image and Qwen-Image write theirs: every complex op they use."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        angles = torch.randn(64, 4, generator=generator)
        self.register_buffer("table", torch.polar(torch.ones_like(angles), angles), persistent=False)
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(positions.float(), torch.arange(4.0)) * 0.1
        local = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)  # (S, 4)
        first, second = self.table[positions].split([2, 2], dim=-1)  # index and split of a complex buffer
        freqs = torch.cat([second, first], dim=-1) * local
        x = self.proj(hidden_states)
        with torch.autocast("cuda", enabled=False):  # a higher-order op whose body takes the table
            rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(0)
            return torch.view_as_real(rotated).flatten(2)


def _rotary_graph():
    kwargs = {"hidden_states": torch.randn(2, 5, 16), "positions": torch.tensor([0, 3, 7, 9, 12])}
    return capture(_Rotary().eval(), kwargs), kwargs


def _complex_nodes(module) -> list[str]:
    return [
        n.name
        for n in module.graph.nodes
        if isinstance(v := n.meta.get("val"), torch.Tensor) and v.is_complex()
    ]


def test_rotary_graph_carries_pairs_and_computes_the_same():
    graph, kwargs = _rotary_graph()
    before = str(graph.module.graph)
    assert holds_complex(graph.module)
    rewritten = complex_as_real_pairs(graph.module)
    assert not holds_complex(rewritten) and not _complex_nodes(rewritten)
    assert not any(b.is_complex() for b in rewritten.buffers())
    args = graph.flat_inputs(kwargs)
    with torch.no_grad():
        (want,), (got,) = graph.module(*args), rewritten(*args)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()
    assert str(graph.module.graph) == before  # the caller's graph is never edited


def test_rotary_program_exports_and_matches_in_onnxruntime(tmp_path):
    graph, kwargs = _rotary_graph()
    manifest = export_program_onnx(Program.from_graph(graph, 2), tmp_path / "onnx", dynamic_batch=False)
    (entry,) = manifest["models"]
    assert entry["verification"]["max_relative_error"] < 1e-6
    session = ort.InferenceSession(str(tmp_path / "onnx" / "full.onnx"), providers=["CPUExecutionProvider"])
    feeds = {
        name: value.numpy() for name, value in zip(graph.input_names, graph.flat_inputs(kwargs), strict=True)
    }
    (actual,) = session.run(["out0"], feeds)
    with torch.no_grad():
        (expected,) = graph.module(*graph.flat_inputs(kwargs))
    np.testing.assert_allclose(actual, expected.numpy(), rtol=0, atol=1e-5)


class _Arithmetic(torch.nn.Module):
    """Complex arithmetic and element moves beyond the rotary pattern, each checked against PyTorch."""

    def forward(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor,
                order: torch.Tensor):
        z = torch.complex(a, b)  # (2, 3, 4)
        w = torch.polar(scale.abs() + 0.5, b)
        mixed = (z + w) * (z - 2.0) / (w + 1j) - z / scale + z * 3.0 - z.conj() * scale
        moved = mixed.permute(2, 0, 1).reshape(4, 6).transpose(0, 1).unsqueeze(0).expand(2, 6, 4)
        moved = torch.flip(moved, dims=[-1]).roll(1, dims=1)
        picked = torch.where(keep.unsqueeze(-1), z, w)
        halves = torch.stack(z.chunk(2, dim=-1), dim=0).mean(dim=-1)
        table = torch.zeros(2, 5, 4, dtype=torch.complex64)  # filled in place, as Lumina2 fills its rotary
        table[:, :3] = z
        return (
            torch.view_as_real(moved),
            z.abs(),
            z.angle(),
            picked.real,
            picked.imag,
            torch.view_as_real(halves),
            torch.view_as_real(z.sum(dim=1)),
            torch.view_as_real(torch.gather(table, -2, order)),  # Lumina2 gathers its rotary table
        )


def test_arithmetic_and_moves_match_pytorch():
    generator = torch.Generator().manual_seed(1)
    kwargs = {
        "a": torch.randn(2, 3, 4, generator=generator),
        "b": torch.randn(2, 3, 4, generator=generator),
        "scale": torch.rand(2, 3, 4, generator=generator) + 0.5,
        "keep": torch.rand(2, 3, generator=generator) > 0.5,
        "order": torch.randint(0, 5, (2, 5, 4), generator=generator),
    }
    graph = capture(_Arithmetic().eval(), kwargs)
    assert _complex_nodes(graph.module)
    rewritten = complex_as_real_pairs(graph.module)
    assert not holds_complex(rewritten)
    args = graph.flat_inputs(kwargs)
    with torch.no_grad():
        expected, actual = graph.module(*args), rewritten(*args)
    for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5), index


def test_graph_without_complex_values_is_returned_as_is():
    graph = capture(torch.nn.Linear(4, 4).eval(), {"input": torch.randn(2, 4)})
    assert not holds_complex(graph.module) and complex_as_real_pairs(graph.module) is graph.module


class _ComplexOutput(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.polar(torch.ones_like(x), x)


class _NoRule(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(torch.exp(torch.polar(torch.ones_like(x), x)))


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (_ComplexOutput(), "the graph returns a complex tensor"),
        (_NoRule(), "cannot export aten.exp.default on a complex value"),
    ],
)
def test_what_has_no_real_form_is_refused_in_one_line(module, message):
    graph = capture(module, {"x": torch.randn(3)})
    with pytest.raises(OnnxExportError, match=message) as error:
        complex_as_real_pairs(graph.module)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- the real pipelines


@pytest.mark.slow
@pytest.mark.parametrize("family", ["zimage", "qwenimage"])
def test_complex_rotary_families_export_and_run_in_onnxruntime(family, tmp_path):
    """Z-Image (torch.polar in the graph, rotary inside autocast) and Qwen-Image (complex buffers)."""
    from accelkit.pipeline_io import generation_defaults, probe_and_capture, with_call_arguments
    from tests.fixtures.families import FAMILY_CALL, build_family_pipeline

    pipe = build_family_pipeline(family)
    call = FAMILY_CALL[family]
    generation = with_call_arguments(
        pipe,
        {**generation_defaults(pipe), "height": call["height"], "width": call["width"]},
        call["call_args"],
    )
    calls, graph = probe_and_capture(pipe, generation)
    assert holds_complex(graph.module)
    inputs = dict(zip(graph.input_names, graph.flat_inputs(calls[0]), strict=True))
    manifest = export_program_onnx(Program.from_graph(graph, 2), tmp_path / "onnx", inputs=inputs)
    assert manifest["models"][0]["verification"]["max_relative_error"] < 1e-5
    session = ort.InferenceSession(str(tmp_path / "onnx" / "full.onnx"), providers=["CPUExecutionProvider"])
    outputs = [f"out{i}" for i in range(graph.num_user_outputs)]
    actual = session.run(outputs, {name: value.numpy() for name, value in inputs.items()})
    with torch.no_grad():
        expected = graph.module(*inputs.values())
    for got, want in zip(actual, expected, strict=True):
        want = want.numpy()
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
