"""End-to-end and unit tests of ``accelkit optimize`` (accelkit/search/optimize.py, space.py).

The end-to-end runs use zoo:shapes at tiny settings (4 steps, 3 trials, 1+1 prompts, 8x8 pixels).
One optimize run is shared by the module; tests that need another run resume a copy of its OUT.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import optuna
import pytest
import torch

from accelkit.cli.main import main
from accelkit.errors import InputError, PlanMismatchError
from accelkit.passes.base import (
    PASS_ORDER,
    Choice,
    FloatRange,
    IntRange,
    RegisteredPass,
    registered_passes,
)
from accelkit.search.optimize import DEFAULT_PASSES, parse_budget, parse_passes
from accelkit.search.space import default_trials, suggest_configs

TINY = ["--steps", "4", "--num-prompts", "1", "--num-eval-prompts", "1", "--height", "8", "--width", "8",
        "--quiet"]


def _optimize(out: Path, *extra: str, budget: str = "2x", trials: int = 3) -> int:
    return main(["optimize", "zoo:shapes", "--budget", budget, "--trials", str(trials), *TINY,
                 "--out", str(out), *extra])


def _study(out: Path) -> optuna.Study:
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    names = optuna.get_all_study_names(storage)
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("optimize") / "out"
    rc = _optimize(out)
    return out, rc


@pytest.fixture
def run_copy(base_run, tmp_path):
    out, _ = base_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return copy


# ------------------------------------------------------------------ end to end


def test_optimize_writes_plan_report_and_study(base_run):
    out, rc = base_run
    assert rc == 0
    assert (out / "plans" / "2x" / "plan.json").is_file()
    assert (out / "report" / "index.html").is_file()
    assert (out / "report" / "report.json").is_file()
    assert (out / "study.db").is_file()
    plan = json.loads((out / "plans" / "2x" / "plan.json").read_text())
    assert plan["budget"] == "2x" and plan["baseline_steps"] == 4
    assert plan["model"]["id"] == "zoo:shapes" and plan["model"]["weights_hash"]
    assert plan["cost"]["speedup"] >= 2 * 0.98
    assert len(plan["schedule"]) == plan["num_steps"]


def test_report_json_has_required_keys(base_run):
    out, _ = base_run
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["schema"] == 1
    assert report["model"]["id"] == "zoo:shapes"
    assert report["model"]["family"] == "FluxTransformer2DModel"
    assert report["model"]["params"] > 0
    settings = report["settings"]
    for key in ("steps", "num_prompts", "seed", "device", "cost_kind"):
        assert key in settings
    assert settings["steps"] == 4 and settings["seed"] == 0 and settings["device"] == "cpu"
    # Loaded plans re-derive schedules for other step counts: the report says what it measured.
    assert any(note.startswith("Step count: fidelity was measured at each plan's own step count (baseline 4")
               for note in report["notes"])
    baseline = report["baseline"]
    for key in ("cost", "latency_ms", "flops", "weights_bytes"):
        assert key in baseline
    assert baseline["cost"] > 0 and baseline["flops"] > 0 and baseline["weights_bytes"] > 0
    assert len(report["budgets"]) == 1
    budget = report["budgets"][0]
    for key in ("budget", "target_speedup", "met", "speedup", "fidelity", "weights_bytes", "passes",
                "references", "ablations"):
        assert key in budget, key
    assert budget["budget"] == "2x" and budget["target_speedup"] == 2.0 and budget["met"] is True
    assert budget["speedup"] >= 2 * 0.98
    for key in ("psnr", "ssim", "lpips"):
        assert key in budget["fidelity"]
    assert math.isfinite(budget["fidelity"]["psnr"])
    fewer = budget["references"]["fewer_steps"]
    for key in ("speedup", "psnr", "ssim"):
        assert key in fewer
    assert set(budget["passes"]) <= set(PASS_ORDER) and budget["passes"]
    assert isinstance(budget["ablations"], dict)
    assert report["floor_met"] is True


def test_study_records_every_trial(base_run):
    out, _ = base_run
    study = _study(out)
    assert len(study.trials) == 3
    assert all(t.state.is_finished() for t in study.trials)


@pytest.fixture(scope="module")
def unmet_run(base_run, tmp_path_factory):
    """The base study re-finished (no new trials) for 2x with an unreachable floor and for 50x."""
    out = tmp_path_factory.mktemp("unmet") / "out"
    shutil.copytree(base_run[0], out)
    rc = main(["optimize", "zoo:shapes", "--budget", "2x", "--budget", "50x", "--min-psnr", "200", "--trials", "3",
               *TINY, "--out", str(out)])
    return out, rc


def test_unmet_budget_or_floor_exits_3(unmet_run):
    _, rc = unmet_run
    assert rc == 3


def test_unreachable_budget_still_writes_report(unmet_run):
    out, _ = unmet_run
    report = json.loads((out / "report" / "report.json").read_text())
    assert [b["budget"] for b in report["budgets"]] == ["2x", "50x"]
    fifty = report["budgets"][1]
    assert fifty["met"] is False and fifty["speedup"] < 50
    assert report["floor_met"] is False
    assert (out / "report" / "index.html").is_file()
    assert not (out / "plans" / "50x").exists()
    assert len(_study(out).trials) == 3  # --trials 3 again: nothing new to run


def test_min_psnr_floor_marks_budget_unmet(unmet_run):
    out, _ = unmet_run
    two = json.loads((out / "report" / "report.json").read_text())["budgets"][0]
    assert two["speedup"] >= 2 * 0.98  # fast enough ...
    assert two["fidelity"]["psnr"] < 200
    assert two["met"] is False  # ... but below the floor


def test_rerun_resumes_study_and_survives_a_failing_trial(run_copy, monkeypatch):
    from accelkit.passes import base

    before = _study(run_copy)
    old = [(t.number, t.params, t.state) for t in before.trials]
    assert len(old) == 3

    # The first pass call of the resumed search raises: that trial must be recorded as FAIL.
    entry = registered_passes()["steps"]
    calls = {"n": 0}

    def flaky(program, config, calib):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom from a test")
        return entry.function(program, config, calib)

    patched = RegisteredPass(entry.name, entry.config_type, flaky)
    monkeypatch.setitem(base._REGISTRY, entry.config_type, patched)
    monkeypatch.setitem(base._BY_NAME, entry.name, patched)
    rc = _optimize(run_copy, trials=5)
    assert rc == 4  # the 2x plan from the first run still stands, but a trial raised (exit 4, not 0)

    after = _study(run_copy)
    assert len(after.trials) == 5  # grew to the new total, not 3 + 5, not restarted
    assert [(t.number, t.params, t.state) for t in after.trials[:3]] == old
    failed = after.trials[3]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert "boom from a test" in failed.user_attrs["error"]
    assert after.trials[4].state != optuna.trial.TrialState.FAIL  # the search went on
    assert calls["n"] > 1
    assert (run_copy / "report" / "report.json").is_file()


# ------------------------------------------------------------------ plans: load and run


def _fresh_pipe():
    from accelkit.loading import load_pipeline

    return load_pipeline("zoo:shapes").pipe


def test_load_plan_generates_same_images_as_program(base_run):
    from accelkit.capture import capture
    from accelkit.loading import record_denoiser_calls
    from accelkit.passes.base import Program, config_from_dict, run_passes
    from accelkit.runtime.pipeline import AcceleratedPipeline
    from accelkit.runtime.plan import load, read_plan

    out, _ = base_run
    plan = read_plan(out, "2x")
    pipe = _fresh_pipe()
    fast = load(out, pipe, budget="2x")
    assert fast.program.schedule == tuple(plan.data["schedule"])
    got = fast(prompt="a red circle", generator=torch.Generator("cpu").manual_seed(3), output_type="pt").images
    assert sum(fast.variant_calls.values()) >= plan.data["num_steps"]
    fast.restore()

    gen = plan.data["generation"]
    calls = record_denoiser_calls(pipe, prompt="a photo", num_inference_steps=2, height=gen["height"],
                                  width=gen["width"], guidance_scale=gen["guidance_scale"],
                                  generator=torch.Generator("cpu").manual_seed(0), output_type="latent")
    program = Program.from_graph(capture(pipe.transformer, calls[0]), plan.data["baseline_steps"])
    program, _ = run_passes(program, [config_from_dict(n, c) for n, c in plan.data["passes"].items()])
    direct = AcceleratedPipeline(pipe, program, call_defaults=plan.call_defaults)
    want = direct(prompt="a red circle", generator=torch.Generator("cpu").manual_seed(3), output_type="pt").images
    direct.restore()
    assert got.shape[-2:] == (gen["height"], gen["width"])
    torch.testing.assert_close(got, want)


def test_load_refuses_other_weights(base_run):
    from accelkit.runtime.plan import load

    out, _ = base_run
    pipe = _fresh_pipe()
    with torch.no_grad():
        next(pipe.transformer.parameters()).view(-1)[0] += 1e-3
    with pytest.raises(PlanMismatchError, match="other weights"):
        load(out, pipe, budget="2x")


def test_load_refuses_other_scheduler(base_run):
    from diffusers import EulerDiscreteScheduler

    from accelkit.runtime.plan import load

    out, _ = base_run
    pipe = _fresh_pipe()
    pipe.scheduler = EulerDiscreteScheduler()
    with pytest.raises(PlanMismatchError, match="EulerDiscreteScheduler"):
        load(out, pipe, budget="2x")


def test_load_unknown_budget_is_input_error(base_run):
    from accelkit.runtime.plan import load

    out, _ = base_run
    with pytest.raises(InputError, match="no plan for budget 3x"):
        load(out, object(), budget="3x")


def test_cli_run_writes_png(base_run, tmp_path, capsys):
    from PIL import Image

    out, _ = base_run
    target = tmp_path / "x.png"
    rc = main(["run", str(out), "--budget", "2x", "--prompt", "a red circle", "--output", str(target)])
    assert rc == 0
    assert target.is_file()
    with Image.open(target) as image:
        assert image.format == "PNG"
        assert image.size == (8, 8)
    assert str(target) in capsys.readouterr().out


def test_cli_report_rerenders(run_copy, capsys):
    before = json.loads((run_copy / "report" / "report.json").read_text())
    (run_copy / "report" / "index.html").unlink()
    rc = main(["report", str(run_copy)])
    assert rc == 0
    assert (run_copy / "report" / "index.html").is_file()
    after = json.loads((run_copy / "report" / "report.json").read_text())
    assert after["budgets"][0]["budget"] == before["budgets"][0]["budget"]
    assert after["budgets"][0]["speedup"] == pytest.approx(before["budgets"][0]["speedup"])
    assert "index.html" in capsys.readouterr().out


# ------------------------------------------------------------------ parse_budget / parse_passes


@pytest.mark.parametrize(("text", "value"), [("2x", 2.0), ("2.5x", 2.5), ("2", 2.0), ("3X", 3.0), (" 4x ", 4.0),
                                             ("1x", 1.0), ("10.25x", 10.25)])
def test_parse_budget_valid(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("text", ["fast", "0.5x", "0x", "", "x", "-2x", "2xx", "2x3", "1e3", "2,5x", "nanx"])
def test_parse_budget_invalid(text):
    with pytest.raises(InputError, match="invalid budget"):
        parse_budget(text)


def test_parse_passes_default_and_order():
    assert parse_passes(None) == DEFAULT_PASSES
    assert parse_passes("cache,steps") == ("steps", "cache")
    assert parse_passes(" steps , cache ,steps") == ("steps", "cache")
    assert parse_passes(["cache"]) == ("cache",)


@pytest.mark.parametrize("text", ["foo", "steps,foo", "Steps"])
def test_parse_passes_unknown(text):
    with pytest.raises(InputError, match="unknown pass"):
        parse_passes(text)


def test_parse_passes_not_available():
    missing = [n for n in PASS_ORDER if n not in registered_passes()]
    if not missing:
        pytest.skip("every pass is registered")
    with pytest.raises(InputError, match="not available"):
        parse_passes(f"steps,{missing[0]}")


@pytest.mark.parametrize("text", ["", " , ", []])
def test_parse_passes_empty(text):
    with pytest.raises(InputError, match="empty"):
        parse_passes(text)


# ------------------------------------------------------------------ search space


def _check_in_domain(params: dict, pass_names) -> None:
    passes = registered_passes()
    for key, value in params.items():
        name, field = key.split(".", 1)
        assert name in pass_names, key
        domain = passes[name].config_type.SEARCH_SPACE[field]
        if isinstance(domain, FloatRange):
            assert domain.low <= value <= domain.high, (key, value, domain)
        elif isinstance(domain, IntRange):
            assert isinstance(value, int) and domain.low <= value <= domain.high, (key, value, domain)
            assert (value - domain.low) % domain.step == 0, (key, value, domain)
        elif isinstance(domain, Choice):
            assert value in domain.options, (key, value, domain)
        else:  # pragma: no cover
            raise AssertionError(f"unknown domain {domain!r}")


PASS_SETS = [("steps",), ("cache",), ("steps", "cache"), ("steps", "prune", "quant", "sparse", "cache")]
@pytest.mark.parametrize("passes", PASS_SETS)
@pytest.mark.parametrize("targets", [(1.0,), (1.5,), (2.0,), (2.0, 3.0), (5.0,), (8.0,), (50.0,)])
def test_default_trials_lie_in_search_space(passes, targets):
    seeds = default_trials(passes, targets)
    assert seeds
    for params in seeds:
        _check_in_domain(params, passes)


def test_default_trials_complete_seeds_build_configs():
    for params in default_trials(("steps", "cache"), (2.0,)):
        keys = {k.split(".", 1)[0] for k in params}
        if keys != {"steps", "cache"}:
            continue
        space = {f"{n}.{f}" for n in ("steps", "cache") for f in registered_passes()[n].config_type.SEARCH_SPACE}
        if set(params) != space:
            continue
        configs = suggest_configs(optuna.trial.FixedTrial(params), ("steps", "cache"))
        assert [type(c).__name__ for c in configs] == ["StepsConfig", "CacheConfig"]


def test_default_trials_with_every_pass_leave_the_unseeded_passes_as_no_ops():
    names = ("steps", "prune", "quant", "sparse", "cache")
    seeds = default_trials(names, (2.0,))
    assert seeds
    for params in seeds:
        space = {f"{n}.{f}" for n in names for f in registered_passes()[n].config_type.SEARCH_SPACE}
        assert set(params) == space  # every field fixed: nothing left to the sampler
        configs = suggest_configs(optuna.trial.FixedTrial(params), names)
        by_name = dict(zip(names, configs, strict=True))
        assert by_name["prune"].is_noop() and by_name["quant"].is_noop() and by_name["sparse"].is_noop()
        assert not (by_name["steps"].is_noop() and by_name["cache"].is_noop())


def test_suggest_configs_with_fixed_trial():
    params = {
        "steps.fraction": 0.5, "steps.placement": "default", "steps.blend": 0.75,
        "cache.full_fraction": 0.4, "cache.first_blocks": 2, "cache.last_blocks": 1,
        "cache.approximation": "taylor", "cache.schedule": "uniform", "cache.prior": "feature",
        "cache.weighting": "linear", "cache.warmup": 2,
    }
    steps, cache = suggest_configs(optuna.trial.FixedTrial(params), ("steps", "cache"))
    assert (steps.fraction, steps.placement, steps.blend) == (0.5, "default", 0.75)
    assert (cache.full_fraction, cache.first_blocks, cache.last_blocks) == (0.4, 2, 1)
    assert (cache.approximation, cache.schedule, cache.prior, cache.weighting, cache.warmup) == (
        "taylor", "uniform", "feature", "linear", 2)
    # fixed values override the trial (and need no trial parameter)
    partial = {k: v for k, v in params.items() if k != "cache.warmup"}
    _, cache = suggest_configs(optuna.trial.FixedTrial(partial), ("steps", "cache"), fixed={"cache": {"warmup": 0}})
    assert cache.warmup == 0


def test_suggest_configs_names_params_pass_dot_field():
    study = optuna.create_study(directions=["minimize", "maximize"])
    trial = study.ask()
    configs = suggest_configs(trial, ("steps", "cache"))
    assert len(configs) == 2
    expected = {f"{n}.{f}" for n in ("steps", "cache") for f in registered_passes()[n].config_type.SEARCH_SPACE}
    assert set(trial.params) == expected
    _check_in_domain(trial.params, ("steps", "cache"))
