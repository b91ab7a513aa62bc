"""A loaded plan is a drop-in pipeline: other batches, resolutions, step counts and call arguments.

Two plans on zoo:shapes, written the way ``accelkit optimize`` writes them and loaded with
``accelkit.load``: steps (equalized placement) + cache (DP schedule), and prune + cache (uniform).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from accelkit.calibrate import Calibrator
from accelkit.capture import capture
from accelkit.loading import load_pipeline, record_denoiser_calls, weights_fingerprint
from accelkit.passes.base import Program, run_passes
from accelkit.passes.cache import CacheConfig
from accelkit.passes.prune import PruneConfig
from accelkit.passes.steps import StepsConfig
from accelkit.runtime.pipeline import AcceleratedPipeline, find_denoiser, min_psnr
from accelkit.runtime.plan import load, write_plan

BASELINE_STEPS = 6
GENERATION = {"height": 32, "width": 32, "guidance_scale": 3.0}
PLANS = {
    "steps+cache": [StepsConfig(placement="equalized", num_steps=5), CacheConfig(full_fraction=0.6, schedule="dp")],
    "prune+cache": [PruneConfig(fraction=0.3, score="last"), CacheConfig(full_fraction=0.5, schedule="uniform")],
}


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline("zoo:shapes").pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _write(pipe, directory, configs):
    calib = Calibrator(pipe, ["a red circle"], seed=0, run_program=AcceleratedPipeline, **GENERATION)
    _, denoiser = find_denoiser(pipe)
    calls = record_denoiser_calls(pipe, prompt="a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                                  output_type="latent", **GENERATION)
    program, _ = run_passes(Program.from_graph(capture(denoiser, calls[0]), BASELINE_STEPS), configs, calib)
    write_plan(directory, budget="2x", program=program,
               model={"id": "zoo:shapes", "family": program.graph.family, "weights_hash": weights_fingerprint(denoiser)},
               pipe=pipe, generation={**GENERATION, "probe_prompt": "a photo"}, baseline_steps=BASELINE_STEPS,
               cost={}, fidelity={})
    return program


@pytest.fixture(scope="module", params=sorted(PLANS))
def plan(request, pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param.replace("+", "-"))
    program = _write(pipe, out / "plans" / "2x", PLANS[request.param])
    fast = load(out, pipe, "2x")
    # The plan's own call, before anything else ran: what "bit-identical to before" compares with.
    own = fast(prompt="a red circle", generator=torch.Generator().manual_seed(1), output_type="np").images
    reference = _baseline(pipe, fast, prompt="a red circle", num_inference_steps=BASELINE_STEPS, generator=_seeded(),
                          output_type="np")
    # Derived programs are held to the plan's own fidelity (less a margin), not to an absolute floor.
    floor = min_psnr(own, reference) - 6.0
    yield SimpleNamespace(name=request.param, out=out, fast=fast, program=program, own=own, floor=floor)
    fast.restore()


def _seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _baseline(pipe, fast, **kwargs):
    """The original pipeline for the same call (the accelerated one runs ``fast.program``'s step count)."""
    fast.restore()
    try:
        return pipe(**{**GENERATION, **kwargs}).images
    finally:
        fast.denoiser.forward = fast.forward


def test_plan_settings_run_the_plan_program_bit_identically(plan):
    fast = plan.fast
    assert fast.executor.program is fast.program and fast.family.derivations == []
    assert fast.program.schedule == plan.program.schedule and "cached" in fast.program.schedule
    again = fast(prompt="a red circle", generator=_seeded(), output_type="np").images
    assert np.array_equal(again, plan.own)


def test_batches_of_prompts_images_and_generators(plan, pipe):
    fast = plan.fast
    single = fast(prompt="a blue square", generator=_seeded(2), output_type="pt").images
    pair = fast(prompt=["a red circle", "a blue square"], generator=[_seeded(1), _seeded(2)], output_type="pt").images
    assert pair.shape == _baseline(pipe, fast, prompt=["a red circle"] * 2, num_inference_steps=fast.program.num_steps,
                                   generator=_seeded(), output_type="pt").shape
    # Each image of the batch is what its prompt and generator give alone (the derived program is per-row).
    torch.testing.assert_close(pair[1:], single, atol=1e-4, rtol=0)
    torch.testing.assert_close(pair[:1], torch.as_tensor(plan.own).permute(0, 3, 1, 2), atol=1e-4, rtol=0)
    per_prompt = fast(prompt="a red circle", num_images_per_prompt=2, generator=_seeded(), output_type="np").images
    assert per_prompt.shape == (2, 32, 32, 3)
    assert np.array_equal(fast(prompt="a red circle", generator=_seeded(), output_type="np").images, plan.own)


def test_twice_the_resolution(plan, pipe):
    fast = plan.fast
    images = fast(prompt="a red circle", height=64, width=64, generator=_seeded(), output_type="pt").images
    reference = _baseline(pipe, fast, prompt="a red circle", height=64, width=64, generator=_seeded(),
                          num_inference_steps=fast.program.num_steps, sigmas=fast.program.sigmas, output_type="pt")
    assert images.shape == reference.shape == (1, 3, 64, 64)
    assert min_psnr(images, reference) > plan.floor
    captured = [what for what, _ in fast.family.derivations if what.startswith("capture")]
    assert any("[2, 1024, 12]" in what for what in captured)  # CFG batch 2, 32 x 32 tokens


def test_another_step_count_rederives_the_schedule_once(plan, pipe, caplog):
    fast = plan.fast
    steps = fast.program.num_steps + 3
    with caplog.at_level(logging.WARNING, logger="accelkit.runtime.family"):
        images = fast(prompt="a red circle", num_inference_steps=steps, generator=_seeded(), output_type="pt").images
        fast(prompt="a red circle", num_inference_steps=steps, generator=_seeded(), output_type="pt")
    notes = [r.getMessage() for r in caplog.records if "re-derived" in r.getMessage()]
    assert len(notes) == 1 and f"{fast.program.num_steps} steps" in notes[0]
    derived = fast.family.for_steps(steps)
    assert derived.num_steps == steps and fast.executor.variant_calls
    full = derived.schedule.count("full")
    plan_share = fast.program.schedule.count("full") / fast.program.num_steps
    assert full == round(plan_share * steps) and "cached" in derived.schedule
    seconds = dict(fast.family.derivations)[f"program at {steps} steps"]
    assert seconds < 2.0  # replaying configs on the memoized capture: no calibration, no capture
    baseline_steps = round(steps * BASELINE_STEPS / fast.program.num_steps)
    reference = _baseline(pipe, fast, prompt="a red circle", num_inference_steps=baseline_steps,
                          generator=_seeded(), output_type="pt")
    assert images.shape == reference.shape and min_psnr(images, reference) > plan.floor
    assert np.array_equal(fast(prompt="a red circle", generator=_seeded(), output_type="np").images, plan.own)


def test_strict_steps_keeps_the_refusal(plan, pipe):
    from accelkit.errors import PlanMismatchError

    plan.fast.restore()  # a second load captures the original denoiser, not the first load's forward
    strict = load(plan.out, pipe, "2x", strict_steps=True)
    try:
        with pytest.raises(PlanMismatchError, match="strict-steps"):
            strict(prompt="a red circle", num_inference_steps=strict.program.num_steps + 1)
    finally:
        strict.restore()
        plan.fast.denoiser.forward = plan.fast.forward


def test_callbacks_output_types_and_return_dict(plan, pipe):
    fast = plan.fast
    steps_seen = []

    def callback(pipeline, step, timestep, tensors):
        steps_seen.append(step)
        return {}

    latent = fast(prompt="a red circle", generator=_seeded(), output_type="latent", callback_on_step_end=callback).images
    assert steps_seen == list(range(fast.program.num_steps))
    assert latent.shape == (1, 256, 12)
    pil = fast(prompt="a red circle", generator=_seeded(), output_type="pil").images
    assert pil[0].size == (32, 32)
    assert np.array_equal(np.asarray(pil[0]), (plan.own[0] * 255).round().astype(np.uint8))
    as_tuple = fast(prompt="a red circle", generator=_seeded(), output_type="np", return_dict=False)
    assert isinstance(as_tuple, tuple) and np.array_equal(as_tuple[0], plan.own)


def test_check_reports_the_psnr_against_the_original(plan):
    value = plan.fast.check("a red circle", seed=1)
    assert value == pytest.approx(plan.floor + 6.0, abs=1e-6)
    assert np.array_equal(plan.fast(prompt="a red circle", generator=_seeded(), output_type="np").images, plan.own)


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["steps+cache"], indirect=True)
def test_onnx_runner_serves_other_batches_resolutions_and_step_counts(plan, pipe):
    from accelkit.runtime.plan import export_plan, load_onnx

    manifest = export_plan(plan.out, pipe, "2x")
    assert (manifest / "manifest.json").is_file()
    fast = plan.fast
    onnx = load_onnx(plan.out, pipe, "2x")
    try:
        calls = {
            "own": {"prompt": "a red circle"},
            "batch": {"prompt": ["a red circle", "a blue square"], "num_images_per_prompt": 2},
            "resolution": {"prompt": "a red circle", "height": 64, "width": 64},
            "steps": {"prompt": "a red circle", "num_inference_steps": fast.program.num_steps + 2},
        }
        results = {}
        for label, call in calls.items():
            results[label] = onnx(**call, generator=_seeded(), output_type="pt").images
    finally:
        onnx.restore()
        fast.denoiser.forward = fast.forward
    runner = onnx.executor
    assert len(runner._extra_exports) == 1  # only the new resolution needed another export
    for label, call in calls.items():
        reference = fast(**call, generator=_seeded(), output_type="pt").images
        assert results[label].shape == reference.shape, label
        assert min_psnr(results[label], reference) >= 40.0, label


@pytest.mark.parametrize("plan", ["steps+cache"], indirect=True)
def test_cli_run_check_steps_and_images(plan, tmp_path, capsys):
    from accelkit.cli.main import main

    output = tmp_path / "image.png"
    steps = str(plan.fast.program.num_steps + 1)
    rc = main(["run", str(plan.out), "--prompt", "a red circle", "--steps", steps, "--num-images", "2", "--check",
               "--output", str(output)])
    printed = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert printed[0].startswith("check: PSNR ") and printed[0].endswith(" dB against the original pipeline")
    assert float(printed[0].split()[2]) > plan.floor
    assert printed[1:] == [str(tmp_path / "image-0.png"), str(tmp_path / "image-1.png")]
    rc = main(["run", str(plan.out), "--prompt", "a red circle", "--steps", steps, "--strict-steps",
               "--output", str(tmp_path / "strict.png")])
    error = capsys.readouterr().err.strip()
    assert rc == 2 and "strict-steps" in error and "\n" not in error
    assert not (tmp_path / "strict.png").exists()
