"""``accelkit optimize``: tune the passes together so each budget is met at the best fidelity.

One Optuna study per run (SQLite in ``OUT`` unless ``storage`` names another database), two
objectives (cost down, PSNR up on calibration prompts), the lowest budget as a constraint. Per
budget the feasible trial with the best calibration PSNR becomes ``OUT/plans/<budget>/``; it is then
evaluated on held-out prompts against the baseline and against the trivial way to be N× faster
(the sampler with N× fewer steps), and everything goes into ``OUT/report/``.

The setup (model, prompts, capture, calibrator, baseline, evaluator, study) is :func:`prepare_search`,
shared by ``accelkit optimize`` and by distributed workers (``accelkit search --worker``, see
:mod:`accelkit.search.worker`). The study stores the settings it was created with as the user attr
``accelkit.settings`` (JSON); a run whose settings differ refuses to join it. Storage is always an
Optuna ``RDBStorage`` with heartbeats, so the RUNNING trial of a killed process is marked FAIL and
retried by the next process that asks the study for a trial.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from accelkit.errors import InputError
from accelkit.passes.base import PASS_ORDER, PassConfig, Program, config_from_dict, run_passes

SPEEDUP_TOLERANCE = 0.02
DEFAULT_PASSES = ("steps", "cache")


def parse_budget(text: str) -> float:
    """``"2x"``, ``"2.5x"`` or ``"2"`` -> 2.0; anything else is an InputError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[xX]?\s*", str(text))
    if not match or float(match.group(1)) < 1.0:
        raise InputError(f"invalid budget '{text}': write a speedup of at least 1, such as 2x or 3.5x")
    return float(match.group(1))


def budget_name(target: float) -> str:
    return f"{target:g}x"


def parse_passes(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """Comma-separated pass names, validated and put in canonical order."""
    if text is None:
        return DEFAULT_PASSES
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    from accelkit.passes.base import registered_passes

    available = registered_passes()
    unknown = [n for n in names if n not in PASS_ORDER]
    if unknown:
        raise InputError(f"unknown pass(es) {unknown}: choose from {', '.join(PASS_ORDER)}")
    missing = [n for n in names if n not in available]
    if missing:
        raise InputError(
            f"pass(es) {missing} are not available in this version of accelkit; available: {', '.join(available)}"
        )
    if not names:
        raise InputError("--passes is empty: name at least one of " + ", ".join(available))
    return tuple(sorted(set(names), key=PASS_ORDER.index))


@dataclass
class OptimizeSettings:
    """Everything ``accelkit optimize`` takes (see ``accelkit optimize --help``)."""

    model: str | None = None
    budgets: tuple[str, ...] = ("2x",)
    passes: tuple[str, ...] = DEFAULT_PASSES
    trials: int = 12
    steps: int = 28
    num_prompts: int = 4
    num_eval_prompts: int = 8
    prompts_file: str | None = None
    eval_prompts_file: str | None = None
    seed: int = 0
    device: str = "cpu"
    cost: str = "roofline"
    cost_target: str | None = None
    min_psnr: float | None = None
    storage: str | None = None
    study: str | None = None
    out: str = "accelkit-out"
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    export: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Heartbeat of running trials in seconds; a trial silent for ``grace_period`` (default 3x) is
    #: marked FAIL by the next process that asks the study for a trial, and retried.
    heartbeat: int = 10
    grace_period: int | None = None
    #: Explicit prompt lists (they win over files and counts); a report rebuilt from a study uses them.
    calibration_prompts: tuple[str, ...] | None = None
    evaluation_prompts: tuple[str, ...] | None = None


@dataclass
class BudgetOutcome:
    budget: str
    target: float
    met: bool
    speedup: float
    psnr: float | None
    trial: int | None
    plan_dir: Path | None
    message: str


@dataclass
class OptimizeResult:
    out: Path
    outcomes: list[BudgetOutcome]
    report_path: Path | None
    exit_code: int
    study_name: str


def _read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"prompt file '{path}' does not exist: pass a text file with one prompt per line")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompt file '{path}' holds no prompts: write one prompt per line")
    return prompts


GENERIC_PROMPTS = (
    "a red circle", "a blue square on a white background", "a green triangle", "a yellow star at night",
    "a small house by a lake", "a cat sitting on a chair", "a mountain landscape at sunset", "a bowl of fruit",
    "a city street in the rain", "a portrait of an old man", "a sailing boat on the sea", "a forest in autumn",
)


def _prompt_sets(settings: OptimizeSettings, source: str) -> tuple[list[str], list[str]]:
    if settings.calibration_prompts is not None and settings.evaluation_prompts is not None:
        return list(settings.calibration_prompts), list(settings.evaluation_prompts)
    if settings.prompts_file:
        calibration = _read_prompts(settings.prompts_file)[: max(1, settings.num_prompts)]
    elif source == "zoo":
        from accelkit.zoo import calibration_prompts

        calibration = list(calibration_prompts(settings.num_prompts))
    else:
        calibration = list(GENERIC_PROMPTS[: settings.num_prompts])
    if settings.eval_prompts_file:
        evaluation = _read_prompts(settings.eval_prompts_file)[: max(1, settings.num_eval_prompts)]
    elif source == "zoo":
        from accelkit.zoo import evaluation_prompts

        evaluation = list(evaluation_prompts(settings.num_eval_prompts))
    else:
        evaluation = list(GENERIC_PROMPTS[::-1][: settings.num_eval_prompts])
    overlap = set(calibration) & set(evaluation)
    if overlap and not settings.eval_prompts_file:
        evaluation = [p for p in evaluation if p not in overlap] or evaluation
    return calibration, evaluation


def _generation_defaults(pipe: Any, settings: OptimizeSettings, source: str) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    if source == "zoo":
        from accelkit.zoo import ZOO_MODELS

        info = ZOO_MODELS[(settings.model or "zoo:shapes").removeprefix("zoo:")]
        defaults = {"height": info.height, "width": info.width, "guidance_scale": info.guidance_scale}
    else:
        denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        sample = getattr(denoiser.config, "sample_size", 64) if denoiser is not None else 64
        scale = getattr(pipe, "vae_scale_factor", 8)
        size = int(sample) * int(scale) if isinstance(sample, int) else 512
        defaults = {"height": size, "width": size, "guidance_scale": 4.5}
    for key in ("height", "width", "guidance_scale"):
        if getattr(settings, key) is not None:
            defaults[key] = getattr(settings, key)
    return defaults


def study_name_for(settings: OptimizeSettings, model_id: str, weights_hash: str, generation: dict) -> str:
    if settings.study:
        return settings.study
    payload = json.dumps({"model": model_id, "weights": weights_hash, "passes": settings.passes,
                          "steps": settings.steps, "generation": generation, "seed": settings.seed,
                          "prompts": settings.num_prompts, "cost": [settings.cost, settings.cost_target]},
                         sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model_id).strip("-")[-40:]
    return f"accelkit-{slug}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


class Evaluator:
    """Builds programs from configs and measures their cost and fidelity; shared by trials."""

    def __init__(self, *, base: Program, calib: Any, spec: Any, baseline_images: torch.Tensor | None = None) -> None:
        from accelkit.search.cost import program_cost

        self.base = base
        self.calib = calib
        self.spec = spec
        self._baseline_images = baseline_images
        self.base_cost = program_cost(base, spec)

    @property
    def baseline_images(self) -> torch.Tensor:
        """The baseline on the calibration prompts (generated on first use)."""
        if self._baseline_images is None:
            self._baseline_images = self.calib.generate(self.base).images
        return self._baseline_images

    def build(self, configs: Sequence[PassConfig]) -> tuple[Program, dict[str, Any]]:
        program, _ = run_passes(self.base, list(configs), self.calib)
        return program, {name: program.resolved[name] for name in program.applied}

    def speedup(self, program: Program) -> tuple[float, Any]:
        from accelkit.search.cost import program_cost

        cost = program_cost(program, self.spec)
        return self.base_cost.seconds / cost.seconds, cost

    def fidelity(self, program: Program, prompts: Sequence[str] | None = None,
                 baseline: torch.Tensor | None = None, seed_offset: int = 0) -> tuple[dict, torch.Tensor]:
        from accelkit.report.metrics import fidelity

        images = self.calib.generate(program, prompts, seed_offset=seed_offset).images
        reference = self.baseline_images if baseline is None else baseline
        return fidelity(images, reference), images


def _program_from_resolved(evaluator: Evaluator, resolved: dict[str, dict[str, Any]]) -> Program:
    configs = [config_from_dict(name, data) for name, data in resolved.items()]
    program, _ = run_passes(evaluator.base, configs, evaluator.calib)
    return program


def optimize(settings: OptimizeSettings, *, console: Any = None, progress: bool = True) -> OptimizeResult:
    """Run the whole optimization described by ``settings``; see the module docstring."""
    import optuna

    from accelkit.calibrate import Calibrator
    from accelkit.capture import capture
    from accelkit.loading import load_pipeline, record_denoiser_calls, weights_fingerprint
    from accelkit.search.cost import device_spec
    from accelkit.search.space import default_trials, suggest_configs

    say: Callable[[str], None] = (console.print if console is not None else (lambda *_: None))
    targets = sorted({parse_budget(b) for b in settings.budgets})
    if settings.trials < 1:
        raise InputError(f"--trials must be at least 1, got {settings.trials}")
    if settings.steps < 2:
        raise InputError(f"--steps must be at least 2, got {settings.steps}")
    if settings.num_prompts < 1 or settings.num_eval_prompts < 1:
        raise InputError("--num-prompts and --num-eval-prompts must be at least 1")
    for name in ("height", "width"):
        value = getattr(settings, name)
        if value is not None and (value < 8 or value % 8):
            raise InputError(f"--{name} {value} is not a positive multiple of 8: pass e.g. --{name} {max(8, value // 8 * 8)}")
    if settings.cost not in ("roofline", "latency"):
        raise InputError(f"--cost must be 'roofline' or 'latency', got {settings.cost!r}")
    if settings.cost == "latency":
        raise InputError("--cost latency is not available yet in this version; use --cost roofline (the default)")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file: pass a directory")

    loaded = load_pipeline(settings.model, device=settings.device)
    pipe = loaded.pipe
    calibration_prompts, evaluation_prompts = _prompt_sets(settings, loaded.source)
    generation = _generation_defaults(pipe, settings, loaded.source)
    say(f"[bold]model[/] {loaded.model_id} ({type(loaded.denoiser).__name__}); {settings.steps} steps, "
        f"{generation['height']}x{generation['width']}, guidance {generation['guidance_scale']}")

    calls = record_denoiser_calls(pipe, prompt=calibration_prompts[0], num_inference_steps=2,
                                  generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
                                  **generation)
    graph = capture(loaded.denoiser, calls[0])
    base = Program.from_graph(graph, settings.steps)
    weights_hash = weights_fingerprint(loaded.denoiser)
    cost_target = settings.cost_target or ("h100" if settings.device.startswith("cuda") else "cpu")
    spec = device_spec(cost_target)
    out.mkdir(parents=True, exist_ok=True)
    calib = Calibrator(pipe, calibration_prompts, height=generation["height"], width=generation["width"],
                       guidance_scale=generation["guidance_scale"], seed=settings.seed,
                       weights_hash=weights_hash, cache_dir=out / "calibration")
    say(f"baseline: {len(calibration_prompts)} calibration and {len(evaluation_prompts)} evaluation prompts")
    baseline_images = calib.generate(base).images
    evaluator = Evaluator(base=base, calib=calib, spec=spec, baseline_images=baseline_images)

    storage = settings.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study_name = study_name_for(settings, loaded.model_id, weights_hash, generation)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, n_startup_trials=4)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=["minimize", "maximize"],
                                    sampler=sampler, load_if_exists=True)
    except Exception as error:  # noqa: BLE001 - bad URLs, unreachable databases
        raise InputError(f"cannot open the study storage '{storage}': {str(error).splitlines()[0]}") from error
    study.set_metric_names(["cost", "psnr"])
    finished = [t for t in study.trials if t.state.is_finished()]
    if not finished:
        # Enqueue no more seeds than trials: leftovers would sit in the study as waiting trials.
        for params in default_trials(settings.passes, targets)[: settings.trials]:
            study.enqueue_trial(params, skip_if_exists=True)
    remaining = max(0, settings.trials - len(finished))
    lowest = targets[0]

    def objective(trial: Any) -> tuple[float, float]:
        configs = suggest_configs(trial, settings.passes)
        try:
            program, resolved = evaluator.build(configs)
            speedup, cost = evaluator.speedup(program)
            trial.set_user_attr("passes", resolved)
            trial.set_user_attr("speedup", speedup)
            trial.set_user_attr("flops", cost.flops)
            trial.set_constraint("lowest_budget", lowest * (1 - SPEEDUP_TOLERANCE) - speedup)
            if speedup < lowest * (1 - SPEEDUP_TOLERANCE):
                # Too slow for any budget: skip the costly generation, record why.
                trial.set_user_attr("skipped", "slower than the lowest budget")
                raise optuna.TrialPruned(f"{speedup:.2f}x is below the lowest budget")
            metrics, _ = evaluator.fidelity(program)
            trial.set_user_attr("ssim", metrics["ssim"])
            return cost.seconds, float(metrics["psnr"])
        except optuna.TrialPruned:
            raise
        except InputError as error:
            trial.set_user_attr("error", str(error))
            raise optuna.TrialPruned(str(error)) from None
        except Exception as error:  # noqa: BLE001 - a failing trial must not end the search
            trial.set_user_attr("error", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            raise

    interrupted = False
    if remaining:
        interrupted = _run_trials(study, objective, remaining, targets, progress, console)
    outcomes, report_path = _finish(settings, study, evaluator, targets, evaluation_prompts, generation,
                                    loaded, weights_hash, graph, spec, cost_target, out, console)
    exit_code = 0 if all(o.met for o in outcomes) else 3
    if interrupted:
        exit_code = 130
    return OptimizeResult(out, outcomes, report_path, exit_code, study_name)


def _run_trials(study: Any, objective: Any, count: int, targets: Sequence[float], progress: bool,
                console: Any) -> bool:
    """Run ``count`` trials with a live progress bar; returns True when interrupted (Ctrl-C)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    def best_line() -> str:
        parts = []
        for target in targets:
            best = None
            for t in study.trials:
                if t.values is None or t.state.name != "COMPLETE":
                    continue
                if t.user_attrs.get("speedup", 0) >= target * (1 - SPEEDUP_TOLERANCE) and "skipped" not in t.user_attrs:
                    best = max(best or -math.inf, t.values[1])
            parts.append(f"{target:g}x: {best:.1f} dB" if best is not None else f"{target:g}x: -")
        return "  ".join(parts)

    bar = Progress(TextColumn("search"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[best]}"), TimeElapsedColumn(), console=console,
                   disable=not progress, transient=False)
    try:
        with bar:
            task = bar.add_task("trials", total=count, best=best_line())
            for _ in range(count):
                study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
                bar.update(task, advance=1, best=best_line())
    except KeyboardInterrupt:
        return True
    return False


def _finish(settings: OptimizeSettings, study: Any, evaluator: Evaluator, targets: Sequence[float],
            evaluation_prompts: Sequence[str], generation: dict, loaded: Any, weights_hash: str, graph: Any,
            spec: Any, cost_target: str, out: Path, console: Any) -> tuple[list[BudgetOutcome], Path | None]:
    """Choose a plan per budget, evaluate it on held-out prompts, write plans and the report."""
    from accelkit.passes.steps import StepsConfig
    from accelkit.report import render
    from accelkit.report.schema import (
        BaselineCost,
        BudgetReport,
        FidelityMetrics,
        ModelInfo,
        ReferencePoint,
        ReportData,
        Settings,
        TrialPoint,
    )
    from accelkit.runtime.plan import write_plan

    say = console.print if console is not None else (lambda *_: None)
    completed = [t for t in study.trials if t.state.name == "COMPLETE" and t.values is not None
                 and "skipped" not in t.user_attrs]
    seed_offset = 10_000  # evaluation seeds differ from calibration seeds
    baseline_eval = evaluator.calib.generate(evaluator.base, evaluation_prompts, seed_offset=seed_offset).images
    params = sum(p.numel() for p in loaded.denoiser.parameters())
    weights_bytes = sum(p.numel() * p.element_size() for p in loaded.denoiser.parameters())
    outcomes: list[BudgetOutcome] = []
    budget_reports = []
    for target in targets:
        name = budget_name(target)
        feasible = [t for t in completed if t.user_attrs.get("speedup", 0) >= target * (1 - SPEEDUP_TOLERANCE)]
        fewer_steps = max(2, round(settings.steps / target))
        reference_program, _ = run_passes(evaluator.base, [StepsConfig(num_steps=fewer_steps)], None)
        reference_speedup, _ = evaluator.speedup(reference_program)
        reference_metrics, reference_images = evaluator.fidelity(reference_program, evaluation_prompts,
                                                                 baseline_eval, seed_offset)
        references = {"fewer_steps": ReferencePoint(
            speedup=reference_speedup, psnr=reference_metrics["psnr"], ssim=reference_metrics["ssim"],
            lpips=reference_metrics["lpips"],
            description=f"{fewer_steps} of {settings.steps} sampler steps, default spacing",
            images=reference_images)}
        if not feasible:
            best_speed = max((t.user_attrs.get("speedup", 0.0) for t in study.trials), default=0.0)
            message = f"budget {name} not met: the fastest trial reached {best_speed:.2f}x"
            outcomes.append(BudgetOutcome(name, target, False, best_speed, None, None, None, message))
            budget_reports.append(BudgetReport(
                budget=name, target_speedup=target, met=False, speedup=best_speed,
                fidelity=FidelityMetrics(psnr=float("nan"), ssim=float("nan")), weights_bytes=weights_bytes,
                references=references, plan_summary=message, eval_prompts=tuple(evaluation_prompts)))
            say(f"[red]{message}[/]")
            continue
        best = max(feasible, key=lambda t: t.values[1])
        resolved = best.user_attrs["passes"]
        program = _program_from_resolved(evaluator, resolved)
        speedup, cost = evaluator.speedup(program)
        metrics, images = evaluator.fidelity(program, evaluation_prompts, baseline_eval, seed_offset)
        ablations = _ablations(evaluator, program, resolved, evaluation_prompts, baseline_eval, seed_offset)
        if "uniform_cache" in ablations and "error" not in ablations["uniform_cache"]:
            uniform = ablations["uniform_cache"]
            references["uniform_cache"] = ReferencePoint(
                speedup=uniform["speedup"], psnr=uniform["psnr"], ssim=uniform["ssim"],
                description="same plan with a uniform cache schedule")
        floor_ok = settings.min_psnr is None or metrics["psnr"] >= settings.min_psnr
        met = speedup >= target * (1 - SPEEDUP_TOLERANCE) and floor_ok
        plan_dir = out / "plans" / name
        write_plan(plan_dir, budget=name, program=program,
                   model={"id": loaded.model_id, "family": graph.family, "weights_hash": weights_hash},
                   pipe=loaded.pipe, generation={**generation, "probe_prompt": "a photo"},
                   baseline_steps=settings.steps,
                   cost={"kind": "roofline", "target": cost_target, "seconds": cost.seconds, "flops": cost.flops,
                         "speedup": speedup},
                   fidelity={k: metrics[k] for k in ("psnr", "ssim", "lpips")})
        summary = describe_plan(program, settings.steps)
        message = (f"budget {name}: {speedup:.2f}x, PSNR {metrics['psnr']:.2f} dB on held-out prompts "
                   f"(fewer steps: {reference_metrics['psnr']:.2f} dB at {reference_speedup:.2f}x) - {summary}")
        if not floor_ok:
            message += f"; below --min-psnr {settings.min_psnr}"
        outcomes.append(BudgetOutcome(name, target, met, speedup, metrics["psnr"], best.number, plan_dir, message))
        say(("[green]" if met else "[red]") + message + "[/]")
        budget_reports.append(BudgetReport(
            budget=name, target_speedup=target, met=met, speedup=speedup,
            fidelity=FidelityMetrics.from_metrics(metrics), weights_bytes=weights_bytes,
            passes=resolved, references=references, ablations=ablations, plan_summary=summary,
            eval_prompts=tuple(evaluation_prompts), prompts=tuple(evaluation_prompts),
            baseline_images=baseline_eval, accelerated_images=images))
    trials = [TrialPoint(trial=t.number, cost=t.values[0], speedup=t.user_attrs.get("speedup", 0.0),
                         psnr=t.values[1], feasible=t.user_attrs.get("speedup", 0) >= targets[0] * 0.98,
                         passes=t.user_attrs.get("passes", {}), ssim=t.user_attrs.get("ssim"))
              for t in completed]
    failed = [t for t in study.trials if t.state.name in ("FAIL", "PRUNED")]
    notes = [
        f"Cost: roofline model of the denoiser graphs on the '{cost_target}' device table "
        "(max of FLOPs/peak and bytes/bandwidth per node); wall-clock time on a shared CPU is noise.",
        "Fidelity: PSNR/SSIM in float against the full-step baseline with the same seeds, on held-out prompts; "
        "the search itself used the calibration prompts.",
    ]
    if failed:
        notes.append(f"{len(failed)} trial(s) failed or were pruned: "
                     + "; ".join(f"#{t.number}: {t.user_attrs.get('error', t.state.name)}" for t in failed[:5]))
    data = ReportData(
        model=ModelInfo(id=loaded.model_id, family=graph.family, params=int(params)),
        settings=Settings(steps=settings.steps, num_prompts=len(evaluation_prompts), seed=settings.seed,
                          device=settings.device, cost_kind="flops"),
        baseline=BaselineCost(cost=evaluator.base_cost.seconds, latency_ms=None, flops=evaluator.base_cost.flops,
                              weights_bytes=weights_bytes),
        budgets=tuple(budget_reports), floor_met=all(o.met for o in outcomes), trials=tuple(trials),
        notes=tuple(notes), cost_model=f"roofline:{cost_target}", min_psnr=settings.min_psnr)
    report_path = render.write_report(out, data)
    return outcomes, report_path


def describe_plan(program: Program, baseline_steps: int) -> str:
    """The plan in words."""
    parts = []
    if "steps" in program.applied and program.num_steps != baseline_steps:
        placement = "equalized-error" if program.sigmas is not None else "default"
        parts.append(f"run {program.num_steps} of {baseline_steps} sampler steps ({placement} spacing)")
    if "cache" in program.applied and "cached" in program.variants:
        stats = program.stats.get("cache", {})
        resolved = program.resolved["cache"]
        full = sum(1 for s in program.schedule if s == "full")
        span = stats.get("span_blocks", ["?", "?"])
        parts.append(f"compute {full} of {program.num_steps} steps fully; on the others reuse the "
                     f"{resolved['approximation']} of blocks {span[0]}..{int(span[1]) - 1} "
                     f"({resolved['schedule']} schedule)")
    return "; ".join(parts) or "no change (the baseline)"


def _ablations(evaluator: Evaluator, program: Program, resolved: dict, prompts: Sequence[str],
               baseline: torch.Tensor, seed_offset: int) -> dict[str, Any]:
    """What each part of the chosen plan buys: each pass alone, and DP vs uniform cache schedule."""
    result: dict[str, Any] = {}
    if "cache" in resolved and "cached" in program.variants and resolved["cache"].get("schedule") == "dp":
        uniform = dict(resolved)
        cache = dict(uniform["cache"])
        full_steps = len(cache["full_step_mask"])
        cache.update(schedule="uniform", full_step_mask=None, full_fraction=full_steps / program.num_steps)
        uniform["cache"] = cache
        try:
            uniform_program = _program_from_resolved(evaluator, uniform)
            speed, _ = evaluator.speedup(uniform_program)
            metrics, _ = evaluator.fidelity(uniform_program, prompts, baseline, seed_offset)
            result["uniform_cache"] = {"speedup": speed, "psnr": metrics["psnr"], "ssim": metrics["ssim"],
                                       "full_steps": full_steps}
        except Exception as error:  # noqa: BLE001 - an ablation failing must not lose the plan
            result["uniform_cache"] = {"error": str(error)}
    if len(resolved) > 1:
        for name in resolved:
            try:
                alone = _program_from_resolved(evaluator, {name: resolved[name]})
                speed, _ = evaluator.speedup(alone)
                metrics, _ = evaluator.fidelity(alone, prompts, baseline, seed_offset)
                result[f"{name}_alone"] = {"speedup": speed, "psnr": metrics["psnr"], "ssim": metrics["ssim"]}
            except Exception as error:  # noqa: BLE001
                result[f"{name}_alone"] = {"error": str(error)}
    return result
