"""Tests of the runtime (accelkit/runtime): AcceleratedPipeline, StepAwareForward, StepLocator, executor."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from accelkit.capture import capture
from accelkit.errors import InputError, PlanMismatchError
from accelkit.loading import record_denoiser_calls
from accelkit.passes.base import Program
from accelkit.passes.cache import CacheConfig, cache
from accelkit.runtime.executor import ProgramExecutor
from accelkit.runtime.pipeline import AcceleratedPipeline, StepAwareForward, StepLocator, apply, find_denoiser
from tests.fixtures.tiny_models import PIPELINE_KINDS, pipeline_call_kwargs, tiny_denoiser, tiny_pipeline


def _count_forward_calls(monkeypatch, denoiser: torch.nn.Module) -> dict[str, int]:
    """Wrap the class forward so every call of the original denoiser forward is counted."""
    counter = {"calls": 0}
    original = type(denoiser).forward

    @functools.wraps(original)
    def counting(self, *args, **kwargs):
        counter["calls"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(denoiser), "forward", counting)
    return counter


@pytest.fixture(scope="module", params=PIPELINE_KINDS)
def setup(request):
    """A fresh tiny pipeline (this module patches it), its baseline images and its identity program."""
    kind = request.param
    pipe = tiny_pipeline(kind)
    reference = pipe(**pipeline_call_kwargs(kind)).images
    calls = record_denoiser_calls(pipe, **pipeline_call_kwargs(kind))
    steps = pipeline_call_kwargs(kind)["num_inference_steps"]
    _, denoiser = find_denoiser(pipe)
    graph = capture(denoiser, calls[0])
    return SimpleNamespace(kind=kind, pipe=pipe, reference=reference, calls=calls, steps=steps, graph=graph)


def test_recorded_calls(setup):
    # Batched CFG (pixart) and guidance-distilled flux both call the denoiser once per step.
    assert len(setup.calls) == setup.steps
    first = setup.calls[0]
    assert isinstance(first["hidden_states"], torch.Tensor)  # pixart passes it positionally
    expected_batch = 2 if setup.kind == "pixart" else 1
    assert first["hidden_states"].shape[0] == expected_batch
    assert first["return_dict"] is False


def test_identity_program_is_bit_exact_and_runs_the_graph(setup, monkeypatch):
    pipe = setup.pipe
    _, denoiser = find_denoiser(pipe)
    counter = _count_forward_calls(monkeypatch, denoiser)
    program = Program.from_graph(setup.graph, setup.steps)
    accelerated = AcceleratedPipeline(pipe, program)
    located: list[int] = []
    locate = accelerated.forward.locator.locate
    monkeypatch.setattr(
        accelerated.forward.locator, "locate", lambda t: located.append(locate(t)) or located[-1]
    )
    try:
        first = accelerated(**pipeline_call_kwargs(setup.kind)).images
        second = accelerated(**pipeline_call_kwargs(setup.kind)).images
    finally:
        accelerated.restore()
    assert np.array_equal(first, setup.reference)
    assert np.array_equal(second, setup.reference)
    assert counter["calls"] == 0, "the original denoiser forward ran while accelerated"
    calls_per_generation = len(setup.calls)
    assert accelerated.variant_calls == {"full": 2 * setup.steps * (calls_per_generation // setup.steps)}
    assert accelerated.variant_calls["full"] == 2 * calls_per_generation
    assert accelerated.forward.calls == 2 * calls_per_generation
    assert located == list(range(setup.steps)) * 2


def test_wrong_step_count_is_plan_mismatch_when_strict(setup):
    accelerated = AcceleratedPipeline(setup.pipe, Program.from_graph(setup.graph, setup.steps), strict_steps=True)
    try:
        kwargs = pipeline_call_kwargs(setup.kind)
        kwargs["num_inference_steps"] = setup.steps + 2
        with pytest.raises(PlanMismatchError) as info:
            accelerated(**kwargs)
        assert str(setup.steps) in str(info.value) and "\n" not in str(info.value)
        # Calling the patched pipeline directly is caught by the step-aware forward.
        with pytest.raises(PlanMismatchError, match=f"made for {setup.steps} denoising steps"):
            setup.pipe(**kwargs)
    finally:
        accelerated.restore()


def test_other_step_count_and_resolution_run_a_derived_program(setup):
    def kwargs():
        call = pipeline_call_kwargs(setup.kind)
        return dict(call, num_inference_steps=setup.steps + 2, height=2 * call.get("height", 32),
                    width=2 * call.get("width", 32))

    reference = setup.pipe(**kwargs()).images
    accelerated = AcceleratedPipeline(setup.pipe, Program.from_graph(setup.graph, setup.steps))
    try:
        images = accelerated(**kwargs()).images
        # The plan's own settings still run the plan's own program.
        own = accelerated(**pipeline_call_kwargs(setup.kind)).images
    finally:
        accelerated.restore()
    assert images.shape == reference.shape
    # An identity plan derived for other inputs is the original denoiser at those inputs.
    np.testing.assert_allclose(images, reference, atol=1e-5)
    assert np.array_equal(own, setup.reference)
    assert [what for what, _ in accelerated.family.derivations][-1] == f"program at {setup.steps + 2} steps"


def test_executor_without_family_names_the_shapes(setup):
    program = Program.from_graph(setup.graph, setup.steps)
    kwargs = dict(setup.calls[0])
    first = next(iter(kwargs))
    kwargs[first] = torch.cat([kwargs[first], kwargs[first]])
    with pytest.raises(PlanMismatchError) as info:
        ProgramExecutor(program).run(0, 0, kwargs, False)
    message = str(info.value)
    expected = list(setup.graph.input_specs[0].shape)
    assert setup.graph.input_names[0] in message
    assert str(expected) in message
    assert "\n" not in message


def test_restore_puts_the_original_forward_back(setup, monkeypatch):
    pipe = setup.pipe
    _, denoiser = find_denoiser(pipe)
    assert "forward" not in denoiser.__dict__
    accelerated = apply(pipe, Program.from_graph(setup.graph, setup.steps))
    assert isinstance(denoiser.forward, StepAwareForward)
    assert accelerated.restore() is pipe
    assert "forward" not in denoiser.__dict__
    counter = _count_forward_calls(monkeypatch, denoiser)
    images = pipe(**pipeline_call_kwargs(setup.kind)).images
    assert counter["calls"] == len(setup.calls)
    assert np.array_equal(images, setup.reference)


def test_cache_program_on_real_pipeline_follows_schedule(setup):
    program = cache(
        Program.from_graph(setup.graph, setup.steps), CacheConfig(full_fraction=0.5, schedule="uniform"), None
    ).program
    assert program.schedule == ("full", "cached", "cached", "full")
    accelerated = AcceleratedPipeline(setup.pipe, program)
    try:
        images = accelerated(**pipeline_call_kwargs(setup.kind)).images
        again = accelerated(**pipeline_call_kwargs(setup.kind)).images
    finally:
        accelerated.restore()
    per_step = len(setup.calls) // setup.steps
    assert accelerated.variant_calls == {"full": 4 * per_step, "cached": 4 * per_step}
    assert images.shape == setup.reference.shape and np.isfinite(images).all()
    assert np.array_equal(images, again)  # state is reset between generations


def test_apply_rejects_non_program(setup):
    with pytest.raises(InputError, match="Program"):
        apply(setup.pipe, object())


# ---------------------------------------------------------------- step identification


def _fake_pipe(timesteps, denoiser=None):
    return SimpleNamespace(scheduler=SimpleNamespace(timesteps=timesteps), transformer=denoiser)


def test_step_locator_both_scales():
    timesteps = torch.tensor([999.0, 749.0, 500.0, 250.0])
    locator = StepLocator(_fake_pipe(timesteps))
    for index, t in enumerate(timesteps.tolist()):
        assert locator.locate(torch.tensor(t)) == index  # SD3/PixArt/UNet: as is
        assert locator.locate(torch.tensor([t / 1000] * 2)) == index  # Flux: divided by 1000, batched
        assert locator.locate(torch.tensor(int(t), dtype=torch.int64)) == index
    with pytest.raises(RuntimeError, match="matches none"):
        locator.locate(torch.tensor(100.0))


def test_step_locator_follows_new_timesteps():
    pipe = _fake_pipe(torch.tensor([999.0, 500.0]))
    locator = StepLocator(pipe)
    assert locator.locate(500.0) == 1
    pipe.scheduler.timesteps = torch.tensor([999.0, 749.0, 500.0, 250.0])
    assert locator.locate(500.0) == 2
    assert len(locator.timesteps()) == 4
    with pytest.raises(RuntimeError, match="set_timesteps"):
        StepLocator(_fake_pipe(None)).timesteps()


@pytest.fixture(scope="module")
def dit_cache():
    model, kwargs = tiny_denoiser("dit", batch=1)
    graph = capture(model, kwargs)
    result = cache(
        Program.from_graph(graph, 4), CacheConfig(full_fraction=0.5, schedule="uniform", first_blocks=1), None
    )
    assert result.program.schedule == ("full", "cached", "cached", "full")
    return model, kwargs, result.program


def _branch_kwargs(kwargs, step_timestep, label):
    return dict(
        kwargs,
        timestep=torch.full((1,), int(step_timestep), dtype=torch.int64),
        class_labels=torch.full((1,), label, dtype=torch.int64),
    )


def test_separate_cfg_calls_keep_state_per_branch(dit_cache):
    model, kwargs, program = dit_cache
    timesteps = torch.tensor([999, 749, 500, 250])
    executor = ProgramExecutor(program)
    forward = StepAwareForward(_fake_pipe(timesteps, model), executor)
    reference = ProgramExecutor(program)
    labels = (207, 1000)  # conditional, then unconditional: two calls per step with the same timestep
    for step, t in enumerate(timesteps.tolist()):
        for branch, label in enumerate(labels):
            call = _branch_kwargs(kwargs, t, label)
            out = forward(**call)[0]
            assert forward._branch == branch
            expected = reference.run(step, branch, call, False)[0]
            assert torch.equal(out, expected)
            if program.schedule[step] == "full":
                with torch.no_grad():
                    assert (out - model(**call)[0]).abs().max().item() < 1e-5
    assert set(executor.states) == {0, 1}
    assert executor.variant_calls == {"full": 4, "cached": 4}
    # The branches really hold different state: the cached step with the other branch's residual differs.
    r0, r1 = executor.states[0]["cache.r0"][-1], executor.states[1]["cache.r0"][-1]
    assert not torch.allclose(r0, r1)
    swapped = ProgramExecutor(program)
    swapped.run(0, 0, _branch_kwargs(kwargs, 999, labels[1]), False)  # uncond residual under branch 0
    mixed = swapped.run(1, 0, _branch_kwargs(kwargs, 749, labels[0]), False)[0]
    fresh = ProgramExecutor(program)
    fresh.run(0, 0, _branch_kwargs(kwargs, 999, labels[0]), False)
    correct = fresh.run(1, 0, _branch_kwargs(kwargs, 749, labels[0]), False)[0]
    assert not torch.allclose(mixed, correct)


def test_new_generation_resets_state(dit_cache):
    model, kwargs, program = dit_cache
    timesteps = torch.tensor([999, 749, 500, 250])
    executor = ProgramExecutor(program)
    forward = StepAwareForward(_fake_pipe(timesteps, model), executor)
    first = [forward(**_branch_kwargs(kwargs, t, 207))[0] for t in timesteps.tolist()]
    assert set(executor.states) == {0}
    # Step goes back to 0: a new generation; the old residual must be forgotten (history restarts).
    second = [forward(**_branch_kwargs(kwargs, t, 207))[0] for t in timesteps.tolist()]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert len(executor.states[0]["cache.r0"]) <= 2


def test_step_aware_forward_binds_positional_latent(dit_cache):
    model, kwargs, program = dit_cache
    forward = StepAwareForward(
        _fake_pipe(torch.tensor([999, 749, 500, 250]), model), ProgramExecutor(program)
    )
    call = _branch_kwargs(kwargs, 999, 207)
    hidden = call.pop("hidden_states")
    positional = forward(hidden, **call)[0]
    with torch.no_grad():
        expected = model(hidden_states=hidden, **call)[0]
    assert (positional - expected).abs().max().item() < 1e-5


def test_executor_refuses_cached_step_without_state(dit_cache):
    _, kwargs, program = dit_cache
    executor = ProgramExecutor(program)
    with pytest.raises(RuntimeError, match="no earlier step wrote"):
        executor.run(1, 0, _branch_kwargs(kwargs, 749, 207), False)


def test_executor_checks_signature(dit_cache):
    _, kwargs, program = dit_cache
    executor = ProgramExecutor(program)
    bigger = dict(kwargs, hidden_states=torch.randn(1, 4, 16, 16))
    with pytest.raises(PlanMismatchError, match=r"hidden_states is \[1, 4, 16, 16\]"):
        executor.run(0, 0, bigger, False)
    with pytest.raises(PlanMismatchError, match="return_dict"):
        executor.run(0, 0, dict(kwargs, return_dict=True), False)
