"""The calibration interface passes see (accelkit/calibrate/source.py) and the Calibrator behind it."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from accelkit.calibrate import CalibrationSource, Calibrator, SchedulerFacts
from accelkit.passes.quant import RecordedInputs


class _Denoiser(torch.nn.Module):
    def forward(self, hidden_states, timestep):
        return hidden_states * 0.5


class _Pipe:
    """A pipeline stand-in: ``steps`` denoiser calls per generation, the latent passed positionally."""

    def __init__(self, steps: int = 5):
        self.transformer = _Denoiser()
        self.steps = steps

    def __call__(self, *, prompt, generator, **kwargs):
        latent = torch.randn(1, 2, generator=generator)
        for step in range(self.steps):
            latent = self.transformer(latent, timestep=torch.tensor([float(step)]))
        return types.SimpleNamespace(images=torch.zeros(1, 3, 2, 2))


class _Running:
    """What ``run_program`` returns: runs the pipe, reporting one made-up state per denoiser call."""

    def __init__(self, pipe, program, *, observer=None):
        self.pipe, self.observer, self.restored = pipe, observer, False
        self.variant_calls = {"full": 0}

    def __call__(self, **kwargs):
        for step in range(self.pipe.steps):
            self.variant_calls["full"] += 1
            if self.observer is not None:
                self.observer(step, 0, {"x": torch.tensor([float(step)])})
        return self.pipe(**kwargs)

    def restore(self):
        self.restored = True


def _program():
    graph = types.SimpleNamespace(flat_inputs=lambda kwargs: [kwargs["hidden_states"], kwargs["timestep"]])
    return types.SimpleNamespace(graph=graph)


def _calibrator(pipe=None, prompts=("a", "b"), **kwargs):
    return Calibrator(pipe if pipe is not None else _Pipe(), list(prompts), 8, 8, 1.0, run_program=_Running,
                      **kwargs)


def test_the_calibrator_and_recorded_inputs_speak_the_protocol():
    assert isinstance(_calibrator(), CalibrationSource)
    # RecordedInputs answers only what quant asks (denoiser inputs, measurements): not a full source.
    assert not isinstance(RecordedInputs([]), CalibrationSource)


def test_generate_records_states_per_prompt_and_feeds_the_observer():
    seen = []
    generation = _calibrator().generate(_program(), record_states=True, observer=lambda *r: seen.append(r))
    assert [[step for step, _, _ in log] for log in generation.state_logs] == [list(range(5))] * 2
    assert len(seen) == 10 and seen[7][0] == 2
    assert generation.variant_calls == {"full": 10} and generation.images.shape == (2, 3, 2, 2)
    assert _calibrator().generate(_program()).state_logs == []  # nothing recorded unless asked


def test_generate_needs_a_program_runner():
    calibrator = Calibrator(_Pipe(), ["a"], 8, 8, 1.0)
    with pytest.raises(ValueError, match="run_program"):
        calibrator.generate(_program())


def test_denoiser_inputs_spread_over_the_generations_and_leave_no_hook():
    pipe = _Pipe(steps=5)
    calls = _calibrator(pipe).denoiser_inputs(_program(), 3)  # 10 calls recorded: keep 0, 4 or 5, 9
    timesteps = [float(inputs[1]) for inputs in calls]
    assert timesteps[0] == 0.0 and timesteps[-1] == 4.0 and len(calls) == 3
    assert all(inputs[0].shape == (1, 2) for inputs in calls)  # the positional latent, bound by name
    assert not pipe.transformer._forward_pre_hooks
    assert len(_calibrator(pipe).denoiser_inputs(_program(), 100)) == 10


def test_cached_keys_on_kind_program_and_parts():
    program = types.SimpleNamespace(num_steps=4, sigmas=None, resolved={}, applied=())
    calibrator = _calibrator()
    counts = {"n": 0}

    def compute():
        counts["n"] += 1
        return np.arange(3.0)

    calibrator.cached("k", program, compute, span=[0, 2])
    calibrator.cached("k", program, compute, span=[0, 2])
    assert counts["n"] == 1
    calibrator.cached("k", program, compute, span=[0, 3])
    calibrator.cached("other", program, compute, span=[0, 2])
    assert counts["n"] == 3
    assert calibrator.cache_key("k", program, span=[0, 2]) in calibrator._memory


def test_cfg_batch_follows_guidance_and_images_per_prompt():
    assert _calibrator().cfg_batch is None  # guidance 1.0: no CFG
    guided = Calibrator(_Pipe(), ["a"], 8, 8, 4.5, extra_call_kwargs={"num_images_per_prompt": 2})
    assert guided.cfg_batch == 2


def test_scheduler_facts_describe_without_handing_out_the_scheduler():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    live = FlowMatchEulerDiscreteScheduler(shift=3.0)
    facts = SchedulerFacts.of(live)
    assert facts.class_name == "FlowMatchEulerDiscreteScheduler"
    assert facts.custom_arguments[0] == "sigmas" and facts.config["shift"] == 3.0
    with pytest.raises(TypeError):
        facts.config["shift"] = 1.0  # read-only
    sigmas = facts.effective_sigmas("sigmas", np.array([1.0, 0.5]), {})
    assert sigmas.size == 3 and sigmas[-1] == 0.0
    assert live.sigmas is None or len(live.sigmas) != 3  # the live scheduler was not set
    assert SchedulerFacts.of(DDIMScheduler()).custom_arguments == ()
    assert SchedulerFacts.of(None).custom_arguments == ()


def test_pipeline_schedule_unwraps_the_scheduler_and_runs_no_denoiser_step():
    from tests.fixtures.tiny_models import tiny_pipeline

    pipe = tiny_pipeline("flux")
    ran = []
    pipe.transformer.register_forward_hook(lambda *a: ran.append(1))
    short = {"max_sequence_length": 16}
    calibrator = Calibrator(pipe, ["a red circle"], 64, 64, 3.5, extra_call_kwargs=short)
    schedule = calibrator.pipeline_schedule(3)
    assert schedule.sigmas.size == 4 and np.all(np.diff(schedule.sigmas) < 0)
    assert "mu" in schedule.set_timesteps_kwargs  # Flux shifts by resolution: the pipeline's own argument
    assert "set_timesteps" not in vars(pipe.scheduler) and not ran
    assert len(pipe.transformer._forward_pre_hooks) == 0
