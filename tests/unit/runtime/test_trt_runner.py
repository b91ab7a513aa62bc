"""Tests of the TensorRT runner (accelkit/runtime/trt_runner.py).

The runner's schedule, state and feeding logic runs for real against an engine backend made of
onnxruntime sessions (the fake toolchain's "engines" are the ONNX files), so the same code path as
with TensorRT is exercised and its images must match the onnxruntime backend's. The ``trt``-marked
test runs real engines and skips where TensorRT is not installed.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from accelkit.capture import capture
from accelkit.export.onnx import export_program_onnx
from accelkit.export.tensorrt import EngineBuild, TensorRTExportError, build_engines, plan_weight_names
from accelkit.passes.base import Program, run_passes
from accelkit.passes.cache import CacheConfig
from accelkit.runtime.executor import ProgramExecutor
from accelkit.runtime.ort_runner import OrtProgramRunner, ScheduleReplayRunner, apply_onnx
from accelkit.runtime.trt_runner import TrtProgramRunner, apply_tensorrt
from tests.fixtures.tiny_models import pipeline_call_kwargs, tiny_denoiser, tiny_pipeline

ort = pytest.importorskip("onnxruntime")


class FakeToolchain:
    def environment(self):
        return {"tensorrt": "10.13.0", "device": "Fake H100", "compute_capability": "9.0"}

    def build(self, onnx_path, profile, config, timing_cache):
        return EngineBuild(engine=onnx_path.read_bytes(), timing_cache=None)


class OrtEngineBackend:
    """An engine backend whose engines are onnxruntime sessions over the (ONNX) engine files.

    Records the variant of every call and the very tensor objects it was fed, so tests can check
    which variant each step ran and that state is passed on without copies.
    """

    def __init__(self, directory, device="cpu"):
        self.directory = directory
        self.device = torch.device(device)
        self.sessions = {}
        self.calls = []

    def execute(self, variant, input_names, feeds, output_names):
        session = self.sessions.get(variant)
        if session is None:
            data = (self.directory / f"{variant}.engine").read_bytes()
            session = self.sessions[variant] = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        assert list(feeds) == list(input_names)
        assert all(isinstance(v, torch.Tensor) and v.device == self.device for v in feeds.values())
        outputs = session.run(list(output_names), {k: v.numpy() for k, v in feeds.items()})
        tensors = [torch.from_numpy(np.ascontiguousarray(o)) for o in outputs]
        self.calls.append((variant, dict(feeds), dict(zip(output_names, tensors, strict=True))))
        return tensors


@functools.cache
def _flux_taylor_program():
    # Taylor reads "@prev" state and a step scalar: the richest calling convention.
    model, kwargs = tiny_denoiser("flux")
    graph = capture(model, kwargs)
    config = CacheConfig(full_fraction=0.5, schedule="uniform", approximation="taylor")
    program, _ = run_passes(Program.from_graph(graph, 6), [config])
    return program, kwargs


@pytest.fixture(scope="module")
def flux_engines(tmp_path_factory):
    program, kwargs = _flux_taylor_program()
    root = tmp_path_factory.mktemp("flux")
    export_program_onnx(program, root / "onnx", dynamic_batch=False, optimize=False)
    build_engines(root / "onnx", root / "engines", toolchain=FakeToolchain(), weight_names=plan_weight_names(program))
    return program, kwargs, root


def _step_kwargs(kwargs, step: int, branch: int) -> dict:
    step_kwargs = dict(kwargs)
    step_kwargs["hidden_states"] = kwargs["hidden_states"] * (1.0 - 0.1 * step) + 0.05 * branch
    step_kwargs["timestep"] = kwargs["timestep"] * (1.0 - step / 6)
    return step_kwargs


def test_runner_runs_the_scheduled_variant_and_keeps_state_per_branch(flux_engines):
    program, kwargs, root = flux_engines
    backend = OrtEngineBackend(root / "engines")
    runner = TrtProgramRunner(root / "engines", program, backend=backend)
    assert isinstance(runner, ScheduleReplayRunner)
    executor = ProgramExecutor(program)
    for step in range(program.num_steps):
        for branch in (0, 1):
            step_kwargs = _step_kwargs(kwargs, step, branch)
            expected = executor.run(step, branch, step_kwargs, False)
            actual = runner.run(step, branch, step_kwargs, False)
            for got, want in zip(actual, expected, strict=True):
                assert got.shape == want.shape and got.dtype == want.dtype
                assert float((got - want).norm() / want.norm()) < 1e-4, (step, branch)
    # One engine call per step and branch, of the variant the schedule names.
    assert [call[0] for call in backend.calls] == [v for v in program.schedule for _ in (0, 1)]
    assert runner.variant_calls == executor.variant_calls
    # State stays a device tensor per branch, and a reader is fed the very tensor a writer produced.
    assert set(runner.states) == {0, 1}
    history = runner.states[1]["cache.r0"]
    assert len(history) == 2 and all(isinstance(t, torch.Tensor) and t.device == backend.device for t in history)
    cached_step = program.schedule.index("cached")
    assert program.schedule[cached_step - 1] == "full"
    _, _, written = backend.calls[2 * (cached_step - 1) + 1]  # the full step before, branch 1
    variant, feeds, _ = backend.calls[2 * cached_step + 1]
    assert variant == "cached" and feeds["cache_r0"] is written["cache_r0"]
    # Step scalars are made once per step on the device, not per call.
    scalar_feeds = [call[1]["cache_taylor_coef"] for call in backend.calls if call[0] == "cached"]
    assert scalar_feeds[0] is scalar_feeds[1]
    runner.reset()
    assert runner.states == {}


def test_runner_matches_the_onnxruntime_runner_from_the_manifest_alone(flux_engines):
    program, kwargs, root = flux_engines
    bare = TrtProgramRunner(root / "engines", backend=OrtEngineBackend(root / "engines"))
    ort_runner = OrtProgramRunner(root / "onnx")
    for step in range(program.num_steps):
        (got,) = bare.run(step, 0, _step_kwargs(kwargs, step, 0), False)
        (want,) = ort_runner.run(step, 0, _step_kwargs(kwargs, step, 0), False)
        assert torch.equal(got, want)


def test_runner_refuses_tampered_engines_and_other_programs(flux_engines, tmp_path):
    import shutil

    from accelkit.errors import PlanMismatchError

    program, _, root = flux_engines
    copy = tmp_path / "engines"
    shutil.copytree(root / "engines", copy)
    (copy / "cached.engine").write_bytes(b"not an engine")
    with pytest.raises(TensorRTExportError, match="does not match the sha256"):
        TrtProgramRunner(copy, program, backend=OrtEngineBackend(copy))
    other = program.replace(schedule=tuple("full" for _ in program.schedule))
    with pytest.raises(PlanMismatchError, match="another program"):
        TrtProgramRunner(root / "engines", other, backend=OrtEngineBackend(root / "engines"))


def test_pipeline_images_match_the_onnxruntime_backend(tmp_path):
    from accelkit.loading import record_denoiser_calls
    from accelkit.runtime.pipeline import find_denoiser

    pipe = tiny_pipeline("pixart")
    call = pipeline_call_kwargs("pixart")
    calls = record_denoiser_calls(pipe, **call)
    graph = capture(find_denoiser(pipe)[1], calls[0])
    config = CacheConfig(full_fraction=0.5, schedule="uniform", approximation="taylor")
    program, _ = run_passes(Program.from_graph(graph, call["num_inference_steps"]), [config])
    export_program_onnx(program, tmp_path / "onnx", dynamic_batch=False, optimize=False)
    build_engines(tmp_path / "onnx", tmp_path / "engines", toolchain=FakeToolchain())

    onnx_pipe = apply_onnx(pipe, program, tmp_path / "onnx")
    try:
        expected = onnx_pipe(**pipeline_call_kwargs("pixart")).images
        onnx_calls = onnx_pipe.variant_calls
    finally:
        onnx_pipe.restore()
    backend = OrtEngineBackend(tmp_path / "engines")
    trt_pipe = apply_tensorrt(pipe, program, tmp_path / "engines", backend=backend)
    try:
        actual = trt_pipe(**pipeline_call_kwargs("pixart")).images
        assert trt_pipe.variant_calls == onnx_calls
        assert set(onnx_calls) == {"full", "cached"}
    finally:
        trt_pipe.restore()
    assert np.array_equal(np.asarray(actual), np.asarray(expected))
    # The denoiser is the user's module again after restore.
    assert "forward" not in find_denoiser(pipe)[1].__dict__


@pytest.mark.trt
def test_real_engines_in_the_pipeline_match_onnxruntime(tmp_path):
    from accelkit.loading import record_denoiser_calls
    from accelkit.runtime.pipeline import find_denoiser

    pipe = tiny_pipeline("pixart")
    call = pipeline_call_kwargs("pixart")
    graph = capture(find_denoiser(pipe)[1], record_denoiser_calls(pipe, **call)[0])
    config = CacheConfig(full_fraction=0.5, schedule="uniform", approximation="taylor")
    program, _ = run_passes(Program.from_graph(graph, call["num_inference_steps"]), [config])
    export_program_onnx(program, tmp_path / "onnx", dynamic_batch=False, optimize=False)
    build_engines(tmp_path / "onnx", tmp_path / "engines", weight_names=plan_weight_names(program))
    onnx_pipe = apply_onnx(pipe, program, tmp_path / "onnx")
    expected = onnx_pipe(**pipeline_call_kwargs("pixart")).images
    onnx_pipe.restore()
    trt_pipe = apply_tensorrt(pipe, program, tmp_path / "engines")
    actual = trt_pipe(**pipeline_call_kwargs("pixart")).images
    trt_pipe.restore()
    error = np.linalg.norm(np.asarray(actual) - np.asarray(expected)) / np.linalg.norm(np.asarray(expected))
    assert error < 1e-2


# ---------------------------------------------------------------- plan.json engine section


def test_plan_json_engine_section_verifies_every_file(flux_engines, tmp_path):
    import json
    import shutil

    from accelkit.errors import InputError
    from accelkit.export.onnx import read_manifest
    from accelkit.export.tensorrt import read_engine_manifest
    from accelkit.runtime.plan import PLAN_SCHEMA, engine_section, verify_exports

    _, _, root = flux_engines
    plan_dir = tmp_path / "out" / "plans" / "2x"
    shutil.copytree(root / "onnx", plan_dir / "onnx")
    shutil.copytree(root / "engines", plan_dir / "engines")
    engines = read_engine_manifest(plan_dir / "engines")
    section = engine_section(engines)
    assert section["tensorrt"] == "10.13.0" and section["compute_capability"] == "9.0"
    assert [m["variant"] for m in section["models"]] == ["full", "cached"]
    for model in section["models"]:
        assert model["file"] == f"{model['variant']}.engine" and model["precision"] == "fp32"
        assert all({"min", "opt", "max"} <= set(p) for p in model["profile"].values())
    assert {f["path"] for f in section["files"]} == {"full.engine", "cached.engine"}
    data = {
        "schema": PLAN_SCHEMA,
        "budget": "2x",
        "engines": {
            "target": "tensorrt",
            "directory": "engines",
            "manifest": section,
            "onnx": {"directory": "onnx", "manifest": read_manifest(plan_dir / "onnx")},
        },
    }
    (plan_dir / "plan.json").write_text(json.dumps(data))
    checked = verify_exports(tmp_path / "out")
    assert "engines/full.engine" in checked and "onnx/cached.onnx" in checked
    (plan_dir / "onnx" / "cached.onnx").write_bytes(b"tampered")
    with pytest.raises(InputError, match="cached.onnx does not match the sha256"):
        verify_exports(tmp_path / "out")
    data.pop("engines")
    (plan_dir / "plan.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="lists no export"):
        verify_exports(tmp_path / "out", "2x")
