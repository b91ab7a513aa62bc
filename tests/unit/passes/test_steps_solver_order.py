"""The solver order as a knob of the ``steps`` pass (accelkit/passes/steps.py), on zoo:shapes.

The pipeline's scheduler is DPM-Solver++ 2M with flow sigmas (the flow-matching configuration the
issue 18 tables use); the order reaches the sampler through ``Program.scheduler_overrides``.
"""

from __future__ import annotations

import optuna
import pytest
import torch

from accelkit.calibrate import Calibrator
from accelkit.calibrate.source import SchedulerFacts
from accelkit.capture import capture
from accelkit.errors import InputError
from accelkit.loading import load_pipeline, record_denoiser_calls, weights_fingerprint
from accelkit.passes.base import Program, registered_passes, run_passes
from accelkit.passes.steps import StepsConfig, describe, solver_order_facts
from accelkit.runtime.pipeline import AcceleratedPipeline, find_denoiser
from accelkit.runtime.plan import build_program, load, read_plan, write_plan
from accelkit.search.space import default_trials, search_space, suggest_configs

STEPS = 6
GENERATION = {"height": 32, "width": 32, "guidance_scale": 3.0}
DPM_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "solver_order": 2,
            "algorithm_type": "dpmsolver++"}


@pytest.fixture(scope="module")
def shapes():
    """zoo:shapes with DPM-Solver++ 2M (flow sigmas), its calibrator and the 6-step identity program."""
    from diffusers import DPMSolverMultistepScheduler

    pipe = load_pipeline("zoo:shapes").pipe
    pipe.set_progress_bar_config(disable=True)
    flow_match_config = dict(pipe.scheduler.config)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **DPM_FLOW)
    _, denoiser = find_denoiser(pipe)
    calls = record_denoiser_calls(pipe, prompt="a photo", num_inference_steps=2, output_type="latent",
                                  generator=torch.Generator().manual_seed(0), **GENERATION)
    program = Program.from_graph(capture(denoiser, calls[0]), STEPS)
    calib = Calibrator(pipe, ["a red circle", "a blue square"], seed=0, **GENERATION, run_program=AcceleratedPipeline)
    return pipe, program, calib, flow_match_config


def _orders_seen(pipe, run):
    """``run()``'s images and the scheduler's (class, solver_order) at each denoiser call."""
    seen = []
    _, denoiser = find_denoiser(pipe)

    def hook(module, args, kwargs):
        seen.append((type(pipe.scheduler).__name__, pipe.scheduler.config.solver_order))

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        images = run()
    finally:
        handle.remove()
    return images, seen


def test_order_changes_the_generation_and_leaves_the_pipeline_scheduler_alone(shapes):
    pipe, base, calib, _ = shapes
    scheduler, config = pipe.scheduler, dict(pipe.scheduler.config)
    first, _ = run_passes(base, [StepsConfig(num_steps=4, solver_order=1)], calib)
    second, _ = run_passes(base, [StepsConfig(num_steps=4)], calib)
    assert first.scheduler_overrides == {"solver_order": 1} and second.scheduler_overrides == {}
    images_1, seen_1 = _orders_seen(pipe, lambda: calib.generate(first).images)
    images_2, seen_2 = _orders_seen(pipe, lambda: calib.generate(second).images)
    # Calibration generations run the program's order, on a copy of the scheduler.
    assert {order for _, order in seen_1} == {1} and {order for _, order in seen_2} == {2}
    assert seen_1[0][0] == "DPMSolverMultistepScheduler"
    assert (images_1 - images_2).abs().max() > 1e-3  # first order is another sampler
    assert pipe.scheduler is scheduler and dict(pipe.scheduler.config) == config
    # Same order and steps again: the same images (the override is the only difference above).
    again, _ = _orders_seen(pipe, lambda: calib.generate(first).images)
    torch.testing.assert_close(again, images_1)


def test_the_scheduler_is_restored_when_the_generation_fails(shapes):
    pipe, base, calib, _ = shapes
    scheduler = pipe.scheduler
    program, _ = run_passes(base, [StepsConfig(num_steps=4, solver_order=3)], calib)
    seen = []

    def fail_at_second_step(module, args, kwargs):
        seen.append(pipe.scheduler)
        if len(seen) == 2:
            raise RuntimeError("stopped mid-generation")

    _, denoiser = find_denoiser(pipe)
    handle = denoiser.register_forward_pre_hook(fail_at_second_step, with_kwargs=True)
    accelerated = AcceleratedPipeline(pipe, program)
    try:
        with pytest.raises(RuntimeError, match="mid-generation"):
            accelerated(prompt="a red circle", **GENERATION)
    finally:
        handle.remove()
        accelerated.restore()
    assert seen[0] is not scheduler and seen[0].config.solver_order == 3  # the copy ran
    assert pipe.scheduler is scheduler and pipe.scheduler.config.solver_order == 2


def test_lower_order_final_is_an_override_too(shapes):
    pipe, base, calib, _ = shapes
    program, results = run_passes(base, [StepsConfig(num_steps=4, solver_order=3, lower_order_final=False)], calib)
    overrides = {"solver_order": 3, "lower_order_final": False}
    assert program.scheduler_overrides == overrides and results["steps"].stats["scheduler_overrides"] == overrides
    plain, _ = run_passes(base, [StepsConfig(num_steps=4, solver_order=3)], calib)
    # Below 15 steps DPM-Solver++ 3 drops to second order at the last-but-one step unless lower_order_final=False
    # (its last step is first order anyway with final_sigmas_type='zero').
    assert (calib.generate(program).images - calib.generate(plain).images).abs().max() > 1e-4
    assert pipe.scheduler.config.lower_order_final is True


def test_plan_round_trips_the_order_and_a_loaded_plan_applies_it(shapes, tmp_path):
    pipe, base, calib, _ = shapes
    program, _ = run_passes(base, [StepsConfig(num_steps=4, solver_order=1)], calib)
    _, denoiser = find_denoiser(pipe)
    directory = tmp_path / "plans" / "2x"
    write_plan(directory, budget="2x", program=program,
               model={"id": "zoo:shapes", "family": program.graph.family, "weights_hash": weights_fingerprint(denoiser)},
               pipe=pipe, generation={**GENERATION, "probe_prompt": "a photo"}, baseline_steps=STEPS,
               cost={}, fidelity={})
    plan = read_plan(tmp_path, "2x")
    assert plan.passes["steps"]["solver_order"] == 1
    assert build_program(plan, pipe).scheduler_overrides == {"solver_order": 1}
    expected = calib.generate(program, calib.prompts[:1]).images
    fast = load(tmp_path, pipe, "2x")
    try:
        kwargs = calib.call_kwargs(calib.prompts[0], 0)
        kwargs.pop("num_inference_steps", None)
        images, seen = _orders_seen(pipe, lambda: fast(**kwargs).images)
        # Another step count re-derives the program; it keeps the order.
        _, derived = _orders_seen(pipe, lambda: fast(**{**kwargs, "num_inference_steps": 3}).images)
    finally:
        fast.restore()
    assert {order for _, order in seen} == {1} and {order for _, order in derived} == {1} and len(derived) == 3
    torch.testing.assert_close(images, expected)
    assert pipe.scheduler.config.solver_order == 2


def test_the_knob_is_searched_for_dpm_solver_and_absent_for_flow_match_euler(shapes):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe, *_, flow_match_config = shapes
    facts = solver_order_facts(SchedulerFacts.of(pipe.scheduler))
    assert facts == {"solver_order": 2, "solver_orders": (1, 3), "lower_order_final": True}
    dpm = search_space("steps", {"steps": facts})
    assert dpm["solver_order"].options == (None, 1, 3) and dpm["lower_order_final"].options == (None, False)
    euler = FlowMatchEulerDiscreteScheduler.from_config(flow_match_config)
    assert solver_order_facts(SchedulerFacts.of(euler)) == {}
    assert set(search_space("steps", {"steps": solver_order_facts(SchedulerFacts.of(euler))})) == set(StepsConfig.SEARCH_SPACE)
    assert "solver_order" not in search_space("steps")  # no probe, no knob
    # A sampled trial carries the knob; the seeds try each other order at the fewer-steps count.
    trial = optuna.trial.FixedTrial({"steps.fraction": 0.5, "steps.placement": "default", "steps.blend": 1.0,
                                     "steps.solver_order": 3, "steps.lower_order_final": None})
    (config,) = suggest_configs(trial, ("steps",), facts={"steps": facts})
    assert config.solver_order == 3 and config.lower_order_final is None
    seeds = default_trials(("steps",), (2.0,), num_steps=20, facts={"steps": {**facts, "placements": ("default",)}})
    assert seeds[0]["steps.solver_order"] is None  # the guaranteed candidate: the scheduler's own order
    orders = [(s["steps.solver_order"], s["steps.lower_order_final"]) for s in seeds]
    assert orders == [(None, None), (1, None), (3, None)]
    assert {s["steps.fraction"] for s in seeds} == {0.5}


def test_describe_names_the_order(shapes):
    _, base, calib, _ = shapes
    _, results = run_passes(base, [StepsConfig(num_steps=3, solver_order=1)], calib)
    hook = registered_passes()["steps"].hooks.describe
    text = hook(results["steps"].resolved_config.to_dict(), results["steps"].stats)
    assert text == "run 3 of 6 sampler steps (default spacing, solver order 1)"
    assert describe({"lower_order_final": False}, {"steps_before": 6, "steps_after": 6}) == (
        "run 6 of 6 sampler steps (default spacing, full order to the last step)")


def test_bad_orders_are_one_line_input_errors(shapes):
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, base, _, flow_match_config = shapes
    with pytest.raises(InputError, match="solver_order must be 1, 2, 3"):
        StepsConfig(solver_order=4)
    with pytest.raises(InputError, match="lower_order_final must be"):
        StepsConfig(lower_order_final="yes")
    euler_pipe = load_pipeline("zoo:shapes").pipe
    euler_pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(flow_match_config)
    euler_calib = Calibrator(euler_pipe, ["a red circle"], seed=0, **GENERATION, run_program=AcceleratedPipeline)
    with pytest.raises(Exception, match="has no such setting") as error:
        run_passes(base, [StepsConfig(num_steps=3, solver_order=1)], euler_calib)
    assert isinstance(error.value.__cause__, InputError)
    # A program with an order, run on a scheduler without one: the runtime says so.
    program, _ = run_passes(base, [StepsConfig(num_steps=3, solver_order=1)], None)
    with pytest.raises(InputError, match="has no solver_order setting"):
        euler_calib.generate(program)
    assert isinstance(euler_pipe.scheduler, FlowMatchEulerDiscreteScheduler)
