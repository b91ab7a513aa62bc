"""Tests of the ``steps`` pass (accelkit/passes/steps.py) on the tiny FluxPipeline (FlowMatch scheduler)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from accelkit.calibrate import Calibrator, SchedulerFacts
from accelkit.capture.graph import capture
from accelkit.errors import InputError
from accelkit.loading import record_denoiser_calls
from accelkit.passes.base import GraphVariant, Program, run_passes
from accelkit.passes.steps import (
    _STATE,
    StepsConfig,
    error_density,
    placement_unavailable,
    solver_order,
    steps,
)
from accelkit.runtime.pipeline import AcceleratedPipeline
from tests.fixtures.tiny_models import pipeline_call_kwargs, tiny_pipeline

T = 4


@pytest.fixture(scope="module")
def flux():
    """Own pipeline (the tests wrap its denoiser), its capture and the identity program of T steps."""
    pipe = tiny_pipeline("flux")
    calls = record_denoiser_calls(pipe, **pipeline_call_kwargs("flux"))
    graph = capture(pipe.transformer, calls[0])
    return pipe, Program.from_graph(graph, T)


@pytest.fixture(scope="module")
def calib(flux):
    pipe, _ = flux
    return Calibrator(pipe, ["a red circle", "a blue square"], 64, 64, 3.5, run_program=AcceleratedPipeline)


def _run(pipe, program, **overrides):
    """Accelerated output, the scheduler's timesteps and sigmas seen at the first denoiser call, variant calls."""
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("timesteps", pipe.scheduler.timesteps.clone())
        seen.setdefault("sigmas", pipe.scheduler.sigmas.clone())

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    accelerated = AcceleratedPipeline(pipe, program)
    try:
        kwargs = pipeline_call_kwargs("flux")
        kwargs.pop("num_inference_steps")
        image = accelerated(**kwargs, **overrides)[0]
    finally:
        accelerated.restore()
        handle.remove()
    return image, seen, accelerated.variant_calls


def _plain(pipe, **overrides):
    return pipe(**{**pipeline_call_kwargs("flux"), **overrides})[0]


def _snapshot(program):
    return (
        program.schedule,
        program.sigmas,
        program.timestep_kind,
        dict(program.variants),
        dict(program.step_scalars),
        program.applied,
    )


# ---------------------------------------------------------------- config


def test_config_json_round_trip():
    for config in (
        StepsConfig(),
        StepsConfig(fraction=0.5, placement="equalized", blend=0.25),
        StepsConfig(num_steps=3, sigmas=(1.0, 0.5, 0.25)),
    ):
        again = StepsConfig.from_dict(json.loads(config.to_json()))
        assert again == config
        assert again.sigmas is None or isinstance(again.sigmas, tuple)


def test_noop_and_step_count():
    assert StepsConfig().is_noop()
    assert not StepsConfig(fraction=0.5).is_noop()
    assert not StepsConfig(placement="equalized").is_noop()
    assert not StepsConfig(num_steps=28).is_noop()
    assert StepsConfig(fraction=0.5).resolve_num_steps(28) == 14
    assert StepsConfig(fraction=0.25).resolve_num_steps(28) == 7
    assert StepsConfig(fraction=0.2).resolve_num_steps(4) == 2  # at least 2
    assert StepsConfig(num_steps=9, fraction=0.2).resolve_num_steps(28) == 9
    assert StepsConfig(sigmas=(1.0, 0.5)).resolve_num_steps(28) == 2
    assert set(StepsConfig.SEARCH_SPACE) == {"fraction", "placement", "blend"}


@pytest.mark.parametrize(
    "fields",
    [
        {"fraction": 0.0},
        {"fraction": 1.5},
        {"fraction": float("nan")},
        {"placement": "karras"},
        {"blend": -0.1},
        {"blend": 1.5},
        {"num_steps": 0},
        {"num_steps": 2.5},
        {"sigmas": ()},
        {"sigmas": (0.5, 1.0)},
        {"sigmas": (1.0, 0.0)},
        {"sigmas": (1.0, 0.5), "num_steps": 3},
    ],
)
def test_invalid_configs_raise_input_error(fields):
    with pytest.raises(InputError, match="steps."):
        StepsConfig(**fields)


def test_unknown_field_raises_input_error():
    with pytest.raises(InputError, match="unknown field"):
        StepsConfig.from_dict({"fraction": 0.5, "steps": 3})


# ---------------------------------------------------------------- the pass on a real pipeline


def test_noop_returns_the_same_program_and_bit_identical_outputs(flux):
    pipe, program = flux
    result = steps(program, StepsConfig(), None)
    assert result.program is program and not result.modified
    image, _, calls = _run(pipe, result.program)
    assert calls == {"full": T}
    np.testing.assert_array_equal(image, _plain(pipe))


def test_original_step_count_at_default_spacing_reproduces_baseline(flux):
    pipe, program = flux
    result = steps(program, StepsConfig(num_steps=T), None)
    assert not result.modified and result.program is program
    assert result.resolved_config == StepsConfig(num_steps=T)
    np.testing.assert_array_equal(_run(pipe, result.program)[0], _plain(pipe))


def test_fraction_half_runs_half_the_steps(flux):
    pipe, program = flux
    before = _snapshot(program)
    result = steps(program, StepsConfig(fraction=0.5), None)
    assert result.modified
    assert result.program.schedule == ("full",) * (T // 2) and result.program.sigmas is None
    assert result.stats["steps_before"] == T and result.stats["steps_after"] == T // 2
    assert result.resolved_config.num_steps == T // 2
    image, seen, calls = _run(pipe, result.program)
    assert calls == {"full": T // 2}
    assert len(seen["timesteps"]) == T // 2
    np.testing.assert_array_equal(image, _plain(pipe, num_inference_steps=T // 2))
    assert _snapshot(program) == before


def test_custom_sigmas_reach_the_pipeline(flux):
    pipe, program = flux
    custom = (1.0, 0.55, 0.2)
    result = steps(program, StepsConfig(sigmas=custom), None)
    assert result.program.sigmas == custom and result.program.timestep_kind == "sigmas"
    assert result.program.num_steps == 3
    image, seen, calls = _run(pipe, result.program)
    assert calls == {"full": 3}
    # The scheduler shifts the sigmas argument (Flux: dynamic shifting with the pipeline's mu);
    # the plain pipeline given the same argument must set the same timesteps and make the same image.
    reference = {}

    def hook(module, args, kwargs):
        reference.setdefault("timesteps", pipe.scheduler.timesteps.clone())

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        expected = _plain(pipe, num_inference_steps=3, sigmas=list(custom))
    finally:
        handle.remove()
    torch.testing.assert_close(seen["timesteps"], reference["timesteps"], rtol=0, atol=0)
    default_3 = _run(pipe, steps(program, StepsConfig(num_steps=3), None).program)[1]["timesteps"]
    assert not torch.allclose(seen["timesteps"], default_3)
    np.testing.assert_array_equal(image, expected)


def test_schedule_must_be_all_full(flux):
    _, program = flux
    mixed = program.replace(
        variants={**program.variants, "cached": GraphVariant(program.graph.module)},
        schedule=("full", "cached") + ("full",) * (T - 2),
    )
    with pytest.raises(InputError, match="full denoiser at every step"):
        steps(mixed, StepsConfig(fraction=0.5), None)


def test_run_passes_records_resolved_config(flux):
    _, program = flux
    final, results = run_passes(program, [StepsConfig(fraction=0.5)])
    assert final.applied == ("steps",) and results["steps"].modified
    assert final.resolved["steps"]["num_steps"] == T // 2
    assert StepsConfig.from_dict(final.resolved["steps"]).resolve_num_steps(T) == T // 2


# ---------------------------------------------------------------- equalized placement


def test_equalized_placement_on_flow_matching(flux, calib):
    pipe, program = flux
    before = _snapshot(program)
    generate = calib.generate
    runs = []
    calib.generate = lambda *a, **k: runs.append(1) or generate(*a, **k)
    try:
        result = steps(program, StepsConfig(fraction=0.75, placement="equalized"), calib)
        again = steps(program, StepsConfig(fraction=0.75, placement="equalized", blend=0.5), calib)
    finally:
        del calib.generate
    assert len(runs) == 1  # the density is cached; the second call only re-places the steps
    assert result.modified and result.program.num_steps == 3
    sigmas = np.asarray(result.program.sigmas)
    assert sigmas.shape == (3,) and np.all(np.diff(sigmas) < 0) and sigmas[0] == 1.0
    assert np.all(np.asarray(result.stats["density"]) > 0)
    effective = np.asarray(result.stats["effective_sigmas"])
    assert effective[0] == 1.0 and effective[-1] == 0.0
    # The scheduler turns the stored arguments into the effective sigmas the pass chose.
    image, seen, calls = _run(pipe, result.program)
    assert calls == {"full": 3} and image.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(seen["sigmas"].double().numpy(), effective, rtol=1e-5, atol=1e-6)
    assert again.program.sigmas != result.program.sigmas
    # The resolved config reproduces the program without calibration.
    replay = steps(program, result.resolved_config, None)
    assert replay.program.sigmas == result.program.sigmas
    assert _snapshot(program) == before


def test_equalized_blend_zero_is_the_default_spacing(flux, calib):
    pipe, program = flux
    result = steps(program, StepsConfig(num_steps=3, placement="equalized", blend=0.0), calib)
    default = calib.pipeline_schedule(3).sigmas
    np.testing.assert_allclose(result.stats["effective_sigmas"], default, rtol=1e-6, atol=1e-7)
    seen = _run(pipe, result.program)[1]
    np.testing.assert_allclose(seen["sigmas"].double().numpy(), default, rtol=1e-6, atol=1e-7)


def test_equalized_needs_calibration(flux):
    _, program = flux
    with pytest.raises(InputError, match="calibration"):
        steps(program, StepsConfig(fraction=0.5, placement="equalized"), None)


def test_placement_unavailable_names_schedulers_without_custom_steps():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    def facts(scheduler):
        return SchedulerFacts.of(scheduler)

    assert "accepts no custom timesteps or sigmas" in placement_unavailable(facts(DDIMScheduler()))
    assert "accepts no custom" in placement_unavailable(facts(EulerAncestralDiscreteScheduler()))
    assert placement_unavailable(facts(DPMSolverMultistepScheduler())) is None
    karras = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    assert "use_karras_sigmas" in placement_unavailable(facts(karras))
    assert solver_order(facts(DPMSolverMultistepScheduler(solver_order=3))) == 3


# (scheduler class, config overrides, pipeline argument the placement goes through or None: default spacing)
_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
SCHEDULERS = [
    ("DPMSolverMultistepScheduler", {}, "timesteps"),
    pytest.param("DPMSolverMultistepScheduler", {"solver_order": 3}, "timesteps", marks=pytest.mark.slow),
    # diffusers 0.42: the flow-sigmas branch ignores custom timesteps (recomputes from num_inference_steps).
    pytest.param("DPMSolverMultistepScheduler", _FLOW, None, marks=pytest.mark.slow),
    ("DDIMScheduler", {}, None),  # set_timesteps takes neither
    pytest.param("EulerDiscreteScheduler", {}, "timesteps", marks=pytest.mark.slow),
    pytest.param("EulerAncestralDiscreteScheduler", {}, None, marks=pytest.mark.slow),
    pytest.param("UniPCMultistepScheduler", _FLOW, "sigmas", marks=pytest.mark.slow),
    # Heun runs 2n - 1 sigmas for n steps: placement falls back (and the runtime cannot run Heun yet).
    pytest.param("HeunDiscreteScheduler", {}, None, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "overrides", "kind"), SCHEDULERS)
def test_equalized_placement_on_each_scheduler(name, overrides, kind):
    """PixArt tiny pipeline with the scheduler swapped: placement runs, or keeps default spacing and says why."""
    import diffusers

    from tests.fixtures.tiny_models import PIPELINE_CALL_KWARGS

    pipe = tiny_pipeline("pixart")
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
    call = pipeline_call_kwargs("pixart")
    graph = capture(pipe.transformer, record_denoiser_calls(pipe, **call)[0])
    extra = {k: PIPELINE_CALL_KWARGS["pixart"][k] for k in ("use_resolution_binning", "clean_caption")}
    calib = Calibrator(pipe, ["a red circle"], 64, 64, call["guidance_scale"], extra_call_kwargs=extra,
                       run_program=AcceleratedPipeline)
    program = Program.from_graph(graph, 6)
    result = steps(program, StepsConfig(num_steps=3, placement="equalized"), calib)
    assert result.program.num_steps == 3
    if kind is None:
        assert result.program.sigmas is None and result.resolved_config.placement == "default"
        assert result.stats["placement_note"].startswith("default spacing: ")
        return
    assert result.program.timestep_kind == kind and len(result.program.sigmas) == 3
    assert result.stats["solver_order"] == overrides.get("solver_order", 1 if name.startswith("Euler") else 2)
    effective = np.asarray(result.stats["effective_sigmas"])
    assert np.all(np.diff(effective) < 0)
    default = calib.pipeline_schedule(3).sigmas
    assert not np.allclose(effective, default)  # the steps moved
    if name.startswith("Heun"):
        return
    # The pipeline runs the placed steps: the scheduler's sigmas at the first call are the effective ones.
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("sigmas", pipe.scheduler.sigmas.clone())

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        images = calib.generate(result.program).images
    finally:
        handle.remove()
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    np.testing.assert_allclose(seen["sigmas"].double().numpy(), effective, rtol=1e-5, atol=1e-5)
    replay = steps(program, result.resolved_config, None)  # plans replay without calibration
    assert replay.program.sigmas == result.program.sigmas and replay.program.timestep_kind == kind


def test_error_density_from_predictions():
    # v = a * sigma^2 + b: dv/dsigma = 2 a sigma; the density interpolates the midpoint values.
    sigmas = np.array([1.0, 0.75, 0.5, 0.25, 0.0])
    field = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(0))
    log = [(i, 0, {_STATE: field * float(s) ** 2 + 1.0}) for i, s in enumerate(sigmas[:-1])]
    rms = float(field.double().pow(2).mean().sqrt())
    density = error_density([log, log], sigmas)
    midpoint_values = rms * np.array(
        [1.75, 1.25, 0.75]
    )  # |s_i^2 - s_{i+1}^2| / |s_i - s_{i+1}| = s_i + s_{i+1}
    expected = np.interp(sigmas[1:4], [0.375, 0.625, 0.875], midpoint_values[::-1])
    np.testing.assert_allclose(density[1:4], expected, rtol=1e-6)
    assert density[0] == pytest.approx(midpoint_values[0], rel=1e-6)
    assert density[-1] == pytest.approx(midpoint_values[-1], rel=1e-6)
    # Batched CFG: [uncond, cond] combine to u + g (c - u) before differencing.
    cfg_log = [
        (i, 0, {_STATE: torch.cat([torch.zeros_like(field), field * float(s)])})
        for i, s in enumerate(sigmas[:-1])
    ]
    combined = error_density([cfg_log], sigmas, guidance_scale=3.0, cfg_batch=1)
    np.testing.assert_allclose(combined, 3.0 * rms, rtol=1e-6)
