"""Tests of the ONNX export (accelkit/export/onnx.py) and the onnxruntime runner (accelkit/runtime/ort_runner.py)."""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np
import pytest
import torch

import accelkit.export.lowerings as lowerings
import accelkit.export.onnx as onnx_export
from accelkit.capture import capture, clone_graph_module
from accelkit.errors import PlanMismatchError
from accelkit.export.onnx import (
    MANIFEST_NAME,
    OnnxExportError,
    export_program_onnx,
    register_onnx_lowering,
    sanitize_name,
)
from accelkit.passes.base import GraphVariant, Program, run_passes
from accelkit.passes.cache import CacheConfig
from accelkit.runtime.executor import ProgramExecutor
from accelkit.runtime.ort_runner import OrtProgramRunner, apply_onnx
from tests.fixtures.tiny_models import (
    pipeline_call_kwargs,
    tiny_denoiser,
    tiny_denoiser_inputs,
    tiny_pipeline,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOLERANCE = 1e-4


def _rel(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@functools.cache
def _captured(family: str):
    model, kwargs = tiny_denoiser(family)
    return model, kwargs, capture(model, kwargs)


def _inputs(graph, kwargs) -> dict[str, torch.Tensor]:
    return {name: kwargs[name] for name in graph.input_names}


# ---------------------------------------------------------------- the five families


def _check_against_real_inputs(path, graph, kwargs) -> None:
    """The model on the pipeline's real inputs (valid ids, masks, labels) matches the captured graph."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: value.numpy() for name, value in _inputs(graph, kwargs).items()}
    names = [f"out{i}" for i in range(graph.num_user_outputs)]
    actual = session.run(names, feeds)
    with torch.no_grad():
        expected = graph.module(*graph.flat_inputs(kwargs))
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == tuple(want.shape)
        assert _rel(got, want.numpy()) < TOLERANCE


# Flux is covered by the cache-program tests below: its "full" variant there is the full graph plus the
# span-residual output, and its user output is checked against the captured graph the same way.
@pytest.mark.parametrize("family", [pytest.param("unet", marks=pytest.mark.slow), "sd3", "pixart", "dit"])
def test_full_variant_exports_checks_and_matches(family, tmp_path, monkeypatch):
    _, kwargs, graph = _captured(family)
    program = Program.from_graph(graph, 2)
    before = str(program.variants["full"].module.graph)
    out = tmp_path / "onnx"
    # dit also asks for a dynamic batch; the others take the (cheaper) static path directly.
    manifest = export_program_onnx(program, out, dynamic_batch=family == "dit")

    (entry,) = manifest["models"]
    assert entry["variant"] == "full" and entry["file"] == "full.onnx"
    assert entry["verification"]["max_relative_error"] < TOLERANCE
    assert [i["name"] for i in entry["inputs"]] == list(graph.input_names)
    assert [o["name"] for o in entry["outputs"]] == [f"out{i}" for i in range(graph.num_user_outputs)]
    onnx.checker.check_model(str(out / "full.onnx"))
    _check_against_real_inputs(out / "full.onnx", graph, kwargs)
    # pixart's graph holds the no-op squeeze the exporter rewrites: on a clone, never on the program.
    assert str(program.variants["full"].module.graph) == before

    if family == "dit":
        # The capture bakes the batch into view sizes; the export reads it from the input again, so one
        # model serves the CFG batch and a single prompt alike.
        model = onnx.load(str(out / "full.onnx"))
        first = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert manifest["dynamic_batch_requested"] is True and manifest["dynamic_batch"] is True
        assert entry["dynamic_batch"] is True and first.HasField("dim_param")
        assert entry["dynamic_batch_note"] is None and entry["inputs"][0]["shape"][0] == "batch"
        assert entry["verification"]["checked_batches"] == [1, 2, 3]
        denoiser, _, _ = _captured(family)
        session = ort.InferenceSession(str(out / "full.onnx"), providers=["CPUExecutionProvider"])
        for batch in (1, 2, 3):
            batch_kwargs = tiny_denoiser_inputs(family, batch=batch, seed=batch)
            feeds = {name: batch_kwargs[name].numpy() for name in graph.input_names}
            (actual,) = session.run(["out0"], feeds)
            with torch.no_grad():
                expected = denoiser(**batch_kwargs)[0]
            assert actual.shape == tuple(expected.shape) and actual.shape[0] == batch
            assert _rel(actual, expected.numpy()) < TOLERANCE, batch
        # A model that disagrees with PyTorch is refused, and the earlier export stays in place whole.
        before_files = {p.name: p.read_bytes() for p in out.iterdir()}
        monkeypatch.setattr(onnx_export, "FP32_TOLERANCE", 0.0)
        with pytest.raises(OnnxExportError, match="disagrees with PyTorch"):
            export_program_onnx(program, out, dynamic_batch=False)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before_files
        assert not [p for p in tmp_path.iterdir() if p.name != "onnx"]  # no temporary folder left behind


# ---------------------------------------------------------------- Flux cache program


@pytest.fixture(scope="module", params=["residual", "taylor"])
def flux_cache(request, tmp_path_factory):
    _, kwargs, graph = _captured("flux")
    config = CacheConfig(full_fraction=0.5, schedule="uniform", approximation=request.param)
    program, _ = run_passes(Program.from_graph(graph, 6), [config])
    assert set(program.schedule) == {"full", "cached"}
    out = tmp_path_factory.mktemp(f"flux-{request.param}") / "onnx"
    manifest = export_program_onnx(program, out, dynamic_batch=False)
    return request.param, program, kwargs, out, manifest


@pytest.mark.slow
def test_flux_cache_variants_export_and_match(flux_cache):
    approximation, program, _, out, manifest = flux_cache
    entries = {m["variant"]: m for m in manifest["models"]}
    assert set(entries) == {"full", "cached"}
    for entry in entries.values():
        onnx.checker.check_model(str(out / entry["file"]))
        assert entry["verification"]["max_relative_error"] < TOLERANCE, entry["verification"]
    user = list(program.graph.input_names)
    assert [o["name"] for o in entries["full"]["outputs"]] == ["out0", "cache_r0"]
    cached_inputs = [i["name"] for i in entries["cached"]["inputs"]]
    if approximation == "taylor":
        assert cached_inputs == [*user, "cache_r0", "cache_r0_prev", "cache_taylor_coef"]
        scalar = entries["cached"]["inputs"][-1]
        assert scalar["role"] == "scalar" and scalar["shape"] == [] and scalar["dtype"] == "float32"
    else:
        assert cached_inputs == [*user, "cache_r0"]
    state = next(i for i in entries["cached"]["inputs"] if i["name"] == "cache_r0")
    assert state["source"] == "cache.r0" and state["role"] == "state"
    # The flux family check: the full model's user output on the real inputs matches the captured graph.
    _, kwargs, graph = _captured("flux")
    _check_against_real_inputs(out / "full.onnx", graph, kwargs)


def _step_kwargs(kwargs, step: int, branch: int) -> dict:
    step_kwargs = dict(kwargs)
    step_kwargs["hidden_states"] = kwargs["hidden_states"] * (1.0 - 0.1 * step) + 0.05 * branch
    step_kwargs["timestep"] = kwargs["timestep"] * (1.0 - step / 6)
    return step_kwargs


@pytest.mark.slow
def test_ort_runner_replays_schedule_like_program_executor(flux_cache):
    _, program, kwargs, out, _ = flux_cache
    executor = ProgramExecutor(program)
    runner = OrtProgramRunner(out, program)
    # Two CFG branches called separately: each keeps its own state, in both runners.
    for step in range(program.num_steps):
        for branch in (0, 1):
            step_kwargs = _step_kwargs(kwargs, step, branch)
            expected = executor.run(step, branch, step_kwargs, False)
            actual = runner.run(step, branch, step_kwargs, False)
            assert type(actual) is type(expected) and len(actual) == len(expected)
            for got, want in zip(actual, expected, strict=True):
                assert isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype
                assert _rel(got.numpy(), want.numpy()) < TOLERANCE, (step, branch)
    assert runner.variant_calls == executor.variant_calls
    assert runner.variant_calls["cached"] == 2 * program.schedule.count("cached")
    # From the manifest alone (no PyTorch program), outputs come back as a flat tuple.
    bare = OrtProgramRunner(out)
    for step in range(program.num_steps):
        (got,) = bare.run(step, 0, _step_kwargs(kwargs, step, 0), False)
        assert got.shape == tuple(program.graph.input_specs[0].shape)


@pytest.mark.slow
def test_manifest_lists_every_file_with_its_sha256(flux_cache):
    _, _, _, out, manifest = flux_cache
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.name for p in out.iterdir() if p.is_file()} - {MANIFEST_NAME}
    assert set(listed) == on_disk and {"full.onnx", "cached.onnx"} <= on_disk
    for name, item in listed.items():
        data = (out / name).read_bytes()
        assert item["sha256"] == hashlib.sha256(data).hexdigest() and item["bytes"] == len(data)
    for entry in manifest["models"]:
        assert entry["opset"] == manifest["opset"]
        assert entry["dynamic_batch"] in (True, False)
        for io in entry["inputs"] + entry["outputs"]:
            assert {"name", "shape", "dtype", "role"} <= set(io)


@pytest.mark.slow
def test_ort_runner_refuses_an_export_of_another_program(flux_cache):
    approximation, _, _, out, _ = flux_cache
    _, _, graph = _captured("flux")
    other = "taylor" if approximation == "residual" else "residual"
    config = CacheConfig(full_fraction=0.5, schedule="uniform", approximation=other)
    program, _ = run_passes(Program.from_graph(graph, 6), [config])
    with pytest.raises(PlanMismatchError, match="another program"):
        OrtProgramRunner(out, program)
    # Inputs of another shape are refused like ProgramExecutor refuses them, naming the input.
    _, kwargs, _ = _captured("flux")
    runner = OrtProgramRunner(out, flux_cache[1])
    wrong = dict(kwargs, hidden_states=kwargs["hidden_states"][:1])
    with pytest.raises(PlanMismatchError, match="hidden_states"):
        runner.run(0, 0, wrong, False)


# ---------------------------------------------------------------- custom-op lowerings


@torch.library.custom_op("accelkit::onnx_test_unlowered", mutates_args=())
def _unlowered(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_unlowered.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("accelkit::onnx_test_double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _(x):
    return torch.empty_like(x)


def _with_custom_op(graph, op) -> Program:
    """The dit program with ``op`` applied to its first output."""
    module = clone_graph_module(graph.module)
    output = next(n for n in module.graph.nodes if n.op == "output")
    first = output.args[0][0]
    with module.graph.inserting_before(output):
        node = module.graph.call_function(op, (first,))
    node.meta["val"] = first.meta["val"]
    output.args = ((node, *output.args[0][1:]),)
    module.recompile()
    return Program.from_graph(graph, 2).replace(variants={"full": GraphVariant(module)})


def test_unknown_custom_op_is_refused_before_writing(tmp_path):
    _, _, graph = _captured("dit")
    program = _with_custom_op(graph, torch.ops.accelkit.onnx_test_unlowered.default)
    with pytest.raises(OnnxExportError, match="no ONNX lowering for accelkit::onnx_test_unlowered"):
        export_program_onnx(program, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_registered_lowering_is_used(tmp_path, monkeypatch):
    from onnxscript import opset18 as op

    monkeypatch.setattr(lowerings, "_LOWERINGS", {})  # the registration ends with this test

    def lower_double(x):
        return op.Mul(x, op.CastLike(op.Constant(value_float=2.0), x))

    register_onnx_lowering("accelkit::onnx_test_double", lower_double)
    _, _, graph = _captured("dit")
    program = _with_custom_op(graph, torch.ops.accelkit.onnx_test_double.default)
    manifest = export_program_onnx(program, tmp_path / "onnx", dynamic_batch=False)
    assert manifest["models"][0]["verification"]["max_relative_error"] < TOLERANCE
    assert "accelkit::onnx_test_double" in onnx_export.onnx_lowerings()


def test_sanitize_name():
    assert sanitize_name("cache.r0") == "cache_r0"
    assert sanitize_name("cache.r0@prev") == "cache_r0_prev"
    assert sanitize_name("cache.taylor_coef") == "cache_taylor_coef"


# ---------------------------------------------------------------- a real pipeline


@pytest.mark.slow
def test_apply_onnx_runs_the_pipeline_like_pytorch(tmp_path):
    from accelkit.loading import record_denoiser_calls
    from accelkit.runtime.pipeline import AcceleratedPipeline, find_denoiser

    pipe = tiny_pipeline("pixart")
    call = pipeline_call_kwargs("pixart")
    calls = record_denoiser_calls(pipe, **call)
    graph = capture(find_denoiser(pipe)[1], calls[0])
    config = CacheConfig(full_fraction=0.5, schedule="uniform", approximation="taylor")
    program, _ = run_passes(Program.from_graph(graph, call["num_inference_steps"]), [config])
    # optimize=False: the optimizer is covered above; this test is about the runner inside the pipeline.
    export_program_onnx(program, tmp_path / "onnx", dynamic_batch=False, optimize=False)

    torch_pipe = AcceleratedPipeline(pipe, program)
    expected = torch_pipe(**pipeline_call_kwargs("pixart")).images
    calls_torch = torch_pipe.variant_calls
    torch_pipe.restore()
    onnx_pipe = apply_onnx(pipe, program, tmp_path / "onnx")
    try:
        actual = onnx_pipe(**pipeline_call_kwargs("pixart")).images
        assert onnx_pipe.variant_calls == calls_torch
    finally:
        onnx_pipe.restore()
    assert _rel(actual, expected) < 1e-3


class _Scale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x * 2.0 + 1.0,)


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_a_model_onnxruntime_refuses_is_a_one_line_export_error(tmp_path, monkeypatch, dynamic_batch):
    """onnxruntime's load failure (HiDream's float/double Einsum was one) names the variant and the reason."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    reason = "Type Error: Type parameter (T) of Optype (Einsum) bound to different types"

    def refuse(path, *args, **kwargs):
        raise Fail(f"[ONNXRuntimeError] : 1 : FAIL : Load model from {path} failed:{reason}\nmore detail")

    graph = capture(_Scale().eval(), {"x": torch.randn(2, 3)})
    monkeypatch.setattr(ort, "InferenceSession", refuse)
    out = tmp_path / "onnx"
    with pytest.raises(OnnxExportError) as raised:
        export_program_onnx(Program.from_graph(graph, 1), out, dynamic_batch=dynamic_batch)
    message = str(raised.value)
    assert message.startswith("onnxruntime refuses the exported model of variant 'full': ")
    assert reason in message and "\n" not in message and ".tmp" not in message  # no temporary path
    assert not out.exists()  # nothing half-written
