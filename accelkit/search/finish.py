"""The end of a search: per budget, the plan chosen on validation prompts (:func:`_choose`, significant
gains only: :class:`PairedGain`), evaluated on held-out prompts with its ablations, written to
``OUT/plans/<budget>/``, and the report."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from accelkit.errors import InputError
from accelkit.passes.base import Program, config_from_dict, registered_passes
from accelkit.passes.steps import fewer_steps_for
from accelkit.search.objective import Evaluator, _probe_facts, _program_from_resolved
from accelkit.search.settings import SPEEDUP_TOLERANCE, BudgetOutcome, OptimizeSettings, budget_name
from accelkit.search.study import SearchSession

#: Feasible trials per budget re-scored on the validation prompts (best calibration PSNR first).
VALIDATION_TOP = 3
VALIDATION_SEED_OFFSET = 5_000
#: A plan replaces the fewer-steps plan only if its mean per-prompt PSNR gain on the validation
#: prompts exceeds this many standard errors of that gain (paired: same prompts and seeds), ...
SIGNIFICANCE_STANDARD_ERRORS = 2.0
#: ... measured on at least this many validation prompts (fewer cannot estimate the spread).
MIN_VALIDATION_PROMPTS = 4


class _Validation:
    """Per-prompt PSNR on the validation prompts (seeds apart from calibration and evaluation), per plan."""

    def __init__(self, evaluator: Evaluator, prompts: list[str]) -> None:
        self.evaluator, self.prompts = evaluator, prompts
        self._baseline: torch.Tensor | None = None
        self._programs: dict[str, Program] = {}
        self._scores: dict[tuple, list[float]] = {}

    def program(self, resolved: dict[str, Any]) -> Program:
        key = json.dumps(resolved, sort_keys=True, default=repr)
        if key not in self._programs:
            self._programs[key] = _program_from_resolved(self.evaluator, resolved)
        return self._programs[key]

    def signature(self, resolved: dict[str, Any]) -> tuple:
        """What the plan runs; two configs with one signature make the same images (e.g. a no-op cache)."""
        program = self.program(resolved)
        acting = {name: data for name, data in resolved.items()
                  if name != "steps" and not config_from_dict(name, data).is_noop()}
        return (program.num_steps, program.sigmas, program.timestep_kind, program.schedule,
                json.dumps(dict(program.scheduler_overrides), sort_keys=True, default=repr),
                json.dumps(acting, sort_keys=True, default=repr))

    def per_prompt(self, resolved: dict[str, Any]) -> list[float]:
        """PSNR of each validation prompt, in prompt order."""
        key = self.signature(resolved)
        if key not in self._scores:
            if self._baseline is None:
                self._baseline = self.evaluator.calib.generate(
                    self.evaluator.base, self.prompts, seed_offset=VALIDATION_SEED_OFFSET).images
            metrics, _ = self.evaluator.fidelity(self.program(resolved), self.prompts, self._baseline,
                                                 VALIDATION_SEED_OFFSET)
            self._scores[key] = [float(v) for v in metrics["per_image"]["psnr"]]
        return self._scores[key]

    def psnr(self, resolved: dict[str, Any]) -> float:
        return _mean(self.per_prompt(resolved))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


@dataclass(frozen=True)
class PairedGain:
    """A plan's per-prompt PSNR gain over the fewer-steps plan on the same validation prompts and seeds."""

    mean: float
    standard_error: float | None  # None with a single prompt
    prompts: int

    @classmethod
    def of(cls, candidate: Sequence[float], reference: Sequence[float]) -> PairedGain:
        gains = [a - b for a, b in zip(candidate, reference, strict=True)]
        mean = _mean(gains)
        if len(gains) < 2:
            return cls(mean, None, len(gains))
        variance = sum((g - mean) ** 2 for g in gains) / (len(gains) - 1)
        return cls(mean, math.sqrt(variance / len(gains)), len(gains))

    def rejection(self) -> str | None:
        """Why this gain does not show the plan is better (None: it does)."""
        if self.mean <= 0:
            return f"it scores {self.mean:+.2f} dB per prompt there"
        if self.prompts < MIN_VALIDATION_PROMPTS or self.standard_error is None:
            return (f"{self.prompts} validation prompt(s) cannot tell a {self.mean:+.2f} dB gain from noise "
                    f"(at least {MIN_VALIDATION_PROMPTS} needed; raise --num-val-prompts)")
        if self.mean <= SIGNIFICANCE_STANDARD_ERRORS * self.standard_error:
            return (f"its gain of {self.mean:+.2f} ± {self.standard_error:.2f} dB (standard error over "
                    f"{self.prompts} prompts) is within {SIGNIFICANCE_STANDARD_ERRORS:g} standard errors of zero")
        return None

    def describe(self) -> str:
        spread = "" if self.standard_error is None else f" ± {self.standard_error:.2f}"
        return f"{self.mean:+.2f}{spread} dB per prompt over {self.prompts} validation prompts"


@dataclass
class _Choice:
    """The plan chosen for one budget and why."""

    resolved: dict[str, Any] | None
    trial: int | None
    is_fewer_steps: bool
    best_other: float | None  # validation PSNR of the best trial that is not the fewer-steps plan
    fewer_steps_psnr: float | None  # validation PSNR of the fewer-steps plan
    log: str
    #: The chosen (or, when the plan is fewer steps, the best rejected) plan's paired gain on validation.
    gain: PairedGain | None = None
    #: Why the best other plan was not taken over the fewer-steps plan.
    rejection: str | None = None

    def verdict(self, scheduler: str, fewer: int, total: int, psnr: float, fewer_psnr: float) -> str:
        """The choice in words, for the report."""
        if self.is_fewer_steps:
            if self.best_other is None:
                other = " (no other plan met this budget)"
            else:
                why = f": {self.rejection}" if self.rejection else ""
                other = (f" (best other plan {self.best_other:.1f} dB vs {self.fewer_steps_psnr:.1f} dB on "
                         f"validation prompts{why})")
            if self.gain is not None and self.gain.mean > 0:
                return (f"No other plan beat running {fewer} of {total} steps with {scheduler} by more than the "
                        f"validation noise, so it is the plan{other}.")
            return (f"The other passes did not help on this model with {scheduler}: running {fewer} of {total} "
                    f"steps is the plan{other}.")
        chosen = ("" if self.fewer_steps_psnr is None else
                  f"chosen on validation prompts, {self.best_other:.1f} vs {self.fewer_steps_psnr:.1f} dB"
                  + (f", {self.gain.describe()}" if self.gain is not None else ""))
        gain = psnr - fewer_psnr
        if gain >= 0:
            return (f"Beats running {fewer} of {total} steps with {scheduler} by {gain:+.1f} dB on held-out prompts "
                    f"({psnr:.1f} vs {fewer_psnr:.1f} dB; {chosen or 'fewer steps cannot reach this budget'}).")
        return (f"Beat running {fewer} of {total} steps with {scheduler} on validation prompts "
                f"({chosen.removeprefix('chosen on validation prompts, ')}) but not on held-out prompts "
                f"({psnr:.1f} vs {fewer_psnr:.1f} dB, {gain:+.1f} dB): the difference does not generalize; "
                "more validation prompts would tell them apart.")


def _choose(evaluator: Evaluator, feasible: Sequence[Any], fewer_steps: dict[str, Any] | None,
            validation: _Validation) -> _Choice:
    """The best of the top feasible trials on validation prompts, never below the fewer-steps plan.

    ``fewer_steps`` is the resolved plan of the most sampler steps alone meeting the budget (None
    when fewer steps cannot reach it). Trials that run the same program as it do not take a place
    among the :data:`VALIDATION_TOP` re-scored. A trial replaces the fewer-steps plan only if its
    per-prompt gain over it on validation is significant (:meth:`PairedGain.rejection`: positive,
    above :data:`SIGNIFICANCE_STANDARD_ERRORS` standard errors, on at least
    :data:`MIN_VALIDATION_PROMPTS` prompts); among those that pass, the largest mean gain wins.
    Otherwise the plan is the fewer-steps plan itself, and ``rejection`` says why the best other lost.
    """
    reference = validation.signature(fewer_steps) if fewer_steps is not None else None
    others = [t for t in feasible if reference is None or validation.signature(t.user_attrs["passes"]) != reference]
    ranked = sorted(others, key=lambda t: t.values[1], reverse=True)[:VALIDATION_TOP]
    scored = [(validation.psnr(t.user_attrs["passes"]), t) for t in ranked]
    best_other = max(scored, key=lambda pair: pair[0]) if scored else None
    if fewer_steps is None:
        if best_other is None:
            return _Choice(None, None, False, None, None, "validation: no feasible trial")
        score, trial = best_other
        return _Choice(trial.user_attrs["passes"], trial.number, False, score, None,
                       f"validation: trial #{trial.number} {score:.2f} dB (fewer steps cannot reach the budget)")
    fewer_prompts = validation.per_prompt(fewer_steps)
    fewer_score = _mean(fewer_prompts)
    gains = [(PairedGain.of(validation.per_prompt(t.user_attrs["passes"]), fewer_prompts), score, t)
             for score, t in scored]
    line = ", ".join(f"#{t.number} {score:.2f} dB ({gain.describe()})" for gain, score, t in gains)
    log = f"validation: fewer steps {fewer_score:.2f} dB; top other trials {line or 'none'}"
    significant = [entry for entry in gains if entry[0].rejection() is None]
    if significant:
        gain, score, trial = max(significant, key=lambda entry: entry[0].mean)
        return _Choice(trial.user_attrs["passes"], trial.number, False, score, fewer_score, log, gain)
    same = next((t for t in feasible if validation.signature(t.user_attrs["passes"]) == reference), None)
    best = max(gains, key=lambda entry: entry[1], default=None)
    return _Choice(fewer_steps, same.number if same is not None else None, True,
                   best[1] if best else None, fewer_score, log,
                   best[0] if best else None, best[0].rejection() if best else None)


def program_weights_bytes(program: Program) -> int:
    """Bytes of the weights the program's graph variants read (4-bit tensors at their packed size)."""
    from accelkit.capture.cost import weights_bytes

    return weights_bytes(variant.module for variant in program.variants.values())


def describe_plan(program: Program) -> str:
    """The plan in words: each applied pass's ``describe`` hook, in order."""
    passes = registered_passes()
    parts = []
    for name in program.applied:
        describe = passes[name].hooks.describe if name in passes else None
        text = describe(program.resolved[name], program.stats.get(name, {})) if describe else None
        if text:
            parts.append(text)
    return "; ".join(parts) or "no change (the baseline)"


def _proposed(program: Program) -> dict[str, tuple[str, Any]]:
    """Per ablation key, the pass proposing it and its :class:`~accelkit.passes.hooks.Ablation`."""
    passes = registered_passes()
    proposed: dict[str, tuple[str, Any]] = {}
    for name in program.applied:
        hook = passes[name].hooks.ablations if name in passes else None
        if hook is not None:
            proposed.update({key: (name, ablation)
                             for key, ablation in hook(program.resolved[name], program.stats.get(name, {})).items()})
    return proposed


def _plan_ablations(program: Program) -> dict[str, Any]:
    """Per ablation key, the :class:`~accelkit.passes.hooks.Ablation` the applied passes propose."""
    return {key: ablation for key, (_, ablation) in _proposed(program).items()}


def _ablations(evaluator: Evaluator, program: Program, resolved: dict, prompts: Sequence[str],
               baseline: torch.Tensor, seed_offset: int) -> dict[str, Any]:
    """What each part of the chosen plan buys: the passes' proposed variants, and each pass alone."""
    result: dict[str, Any] = {}
    proposed = _proposed(program)
    plans = {key: {**resolved, name: dict(ablation.config)} for key, (name, ablation) in proposed.items()}
    if len(resolved) > 1:
        plans.update({f"{name}_alone": {name: resolved[name]} for name in resolved})
    infos = {key: dict(ablation.info) for key, (_, ablation) in proposed.items()}
    for key, plan in plans.items():
        try:
            variant = _program_from_resolved(evaluator, plan)
            speed, _ = evaluator.speedup(variant)
            metrics, _ = evaluator.fidelity(variant, prompts, baseline, seed_offset)
            result[key] = {"speedup": speed, "psnr": metrics["psnr"], "ssim": metrics["ssim"], **infos.get(key, {})}
        except Exception as error:  # noqa: BLE001 - an ablation failing must not lose the plan
            result[key] = {"error": str(error)}
    return result


#: Evaluation seeds differ from calibration (0) and validation seeds.
EVALUATION_SEED_OFFSET = 10_000


def finish(session: SearchSession, console: Any = None) -> tuple[list[BudgetOutcome], Path | None]:
    """Plans and report for ``session``'s study, written to ``session.out``.

    Per budget (ascending): the fewer-steps reference, the plan chosen on validation prompts
    (:func:`_choose`), and, for a met budget, its evaluation, ablations and ``OUT/plans/<budget>/``
    (:func:`_finish_budget`); then the report over all budgets (:func:`_write_report`).
    """
    if session.out is None:
        raise InputError("an output directory is needed for the report")
    context = _Finishing.of(session, console)
    results = [_finish_budget(context, target) for target in session.targets]
    outcomes = [result.outcome for result in results]
    return outcomes, _write_report(context, results)


@dataclass
class _Finishing:
    """What every budget's finish shares: the session, the completed trials and the evaluation baseline."""

    session: SearchSession
    say: Any
    #: completed trials that ran to the end (not skipped as too slow)
    completed: list[Any]
    #: the baseline on the evaluation prompts, with the evaluation seeds
    baseline_images: torch.Tensor
    validation: _Validation
    #: bytes of the baseline's weights
    weights_bytes: int

    @classmethod
    def of(cls, session: SearchSession, console: Any) -> _Finishing:
        evaluator = session.evaluator
        completed = [t for t in session.study.trials if t.state.name == "COMPLETE" and t.values is not None
                     and "skipped" not in t.user_attrs]
        baseline = evaluator.calib.generate(evaluator.base, session.evaluation_prompts,
                                            seed_offset=EVALUATION_SEED_OFFSET).images
        validation = _Validation(evaluator, list(session.validation_prompts or session.calibration_prompts))
        return cls(session=session, say=console.print if console is not None else (lambda *_: None),
                   completed=completed, baseline_images=baseline, validation=validation,
                   weights_bytes=program_weights_bytes(evaluator.base))

    @property
    def settings(self) -> OptimizeSettings:
        return self.session.settings

    @property
    def evaluator(self) -> Evaluator:
        return self.session.evaluator

    def evaluate(self, program: Program) -> tuple[dict, torch.Tensor]:
        """Fidelity of ``program`` on the evaluation prompts against the baseline, and its images."""
        return self.evaluator.fidelity(program, self.session.evaluation_prompts, self.baseline_images,
                                       EVALUATION_SEED_OFFSET)


@dataclass
class _FewerSteps:
    """The fewer-steps plan for one budget: the reference every chosen plan is compared with."""

    #: the most steps meeting the budget, None when fewer steps alone cannot reach it (then 2 steps are measured)
    reachable: int | None
    steps: int
    resolved: dict[str, Any]
    speedup: float
    psnr: float
    point: Any  # ReferencePoint
    #: the program and its metrics on the evaluation prompts (reused when it is the chosen plan)
    program: Program
    metrics: dict[str, Any]


def _fewer_steps(context: _Finishing, target: float) -> _FewerSteps:
    from accelkit.passes.steps import StepsConfig
    from accelkit.report.schema import ReferencePoint

    reachable = fewer_steps_for(context.settings.steps, target)
    steps = reachable or 2
    program, resolved = context.evaluator.build([StepsConfig(num_steps=steps)])
    speedup, _ = context.evaluator.speedup(program)
    metrics, images = context.evaluate(program)
    point = ReferencePoint(
        speedup=speedup, psnr=metrics["psnr"], ssim=metrics["ssim"], lpips=metrics["lpips"],
        description=(f"{steps} of {context.settings.steps} sampler steps, default spacing"
                     + ("" if reachable else " (fewer steps alone cannot reach this budget)")),
        images=images)
    return _FewerSteps(reachable=reachable, steps=steps, resolved=resolved, speedup=speedup, psnr=metrics["psnr"],
                       point=point, program=program, metrics=metrics)


@dataclass
class _BudgetResult:
    outcome: BudgetOutcome
    report: Any  # BudgetReport
    #: the roofline model's speedup of the chosen plan (None when the budget has no plan)
    roofline_speedup: float | None = None


def _finish_budget(context: _Finishing, target: float) -> _BudgetResult:
    """Choose, evaluate and write the plan for one budget (or say why there is none)."""
    name = budget_name(target)
    feasible = [t for t in context.completed if t.user_attrs.get("speedup", 0) >= target * (1 - SPEEDUP_TOLERANCE)]
    fewer = _fewer_steps(context, target)
    choice = _choose(context.evaluator, feasible, fewer.resolved if fewer.reachable else None, context.validation)
    context.say(choice.log)
    if choice.resolved is None:
        return _unmet(context, name, target, {"fewer_steps": fewer.point})
    return _chosen(context, name, target, choice, fewer)


def _unmet(context: _Finishing, name: str, target: float, references: dict[str, Any]) -> _BudgetResult:
    from accelkit.report.schema import BudgetReport, FidelityMetrics

    best_speed = max((t.user_attrs.get("speedup", 0.0) for t in context.session.study.trials), default=0.0)
    message = f"budget {name} not met: the fastest trial reached {best_speed:.2f}x"
    context.say(f"[red]{message}[/]")
    report = BudgetReport(
        budget=name, target_speedup=target, met=False, speedup=best_speed,
        fidelity=FidelityMetrics(psnr=float("nan"), ssim=float("nan")), weights_bytes=context.weights_bytes,
        references=references, plan_summary=message, eval_prompts=tuple(context.session.evaluation_prompts))
    return _BudgetResult(BudgetOutcome(name, target, False, best_speed, None, None, None, message), report)


def _chosen(context: _Finishing, name: str, target: float, choice: _Choice, fewer: _FewerSteps) -> _BudgetResult:
    """Evaluate the chosen plan on held-out prompts with its ablations, write it, and say how it compares."""
    from accelkit.report.schema import BudgetReport, FidelityMetrics

    settings, evaluator, prompts = context.settings, context.evaluator, context.session.evaluation_prompts
    resolved = choice.resolved
    if choice.is_fewer_steps:  # measured above: same program, prompts and seeds (no second generation)
        program, metrics, images = fewer.program, fewer.metrics, fewer.point.images
    else:
        program = _program_from_resolved(evaluator, resolved)
        metrics, images = context.evaluate(program)
    speedup, cost = evaluator.speedup(program)
    ablations = _ablations(evaluator, program, resolved, prompts, context.baseline_images, EVALUATION_SEED_OFFSET)
    references = {"fewer_steps": fewer.point, **_ablation_references(program, ablations)}
    floor_ok = settings.min_psnr is None or metrics["psnr"] >= settings.min_psnr
    met = speedup >= target * (1 - SPEEDUP_TOLERANCE) and floor_ok
    roofline = evaluator.roofline_speedup(program)
    plan_dir = _write_plan(context, name, program, cost, speedup, roofline, metrics)
    summary = describe_plan(program)
    scheduler_name = type(getattr(evaluator.calib.pipe, "scheduler", None)).__name__
    verdict = choice.verdict(scheduler_name, fewer.steps, settings.steps, metrics["psnr"], fewer.psnr)
    message = (f"budget {name}: {speedup:.2f}x, PSNR {metrics['psnr']:.2f} dB on held-out prompts "
               f"(fewer steps: {fewer.psnr:.2f} dB at {fewer.speedup:.2f}x) - {summary}")
    if not floor_ok:
        message += f"; below --min-psnr {settings.min_psnr}"
    context.say(("[green]" if met else "[red]") + message + "[/]")
    report = BudgetReport(
        budget=name, target_speedup=target, met=met, speedup=speedup,
        fidelity=FidelityMetrics.from_metrics(metrics), weights_bytes=program_weights_bytes(program),
        passes=resolved, references=references, ablations=ablations, plan_summary=summary, verdict=verdict,
        eval_prompts=tuple(prompts), prompts=tuple(prompts),
        baseline_images=context.baseline_images, accelerated_images=images)
    outcome = BudgetOutcome(name, target, met, speedup, metrics["psnr"], choice.trial, plan_dir, message)
    return _BudgetResult(outcome, report, roofline)


def _ablation_references(program: Program, ablations: dict[str, Any]) -> dict[str, Any]:
    """The measured ablations the passes describe, as reference points of the report's chart."""
    from accelkit.report.schema import ReferencePoint

    references = {}
    for key, ablation in _plan_ablations(program).items():
        if key in ablations and "error" not in ablations[key]:
            measured = ablations[key]
            references[key] = ReferencePoint(speedup=measured["speedup"], psnr=measured["psnr"],
                                             ssim=measured["ssim"], description=ablation.description)
    return references


def _write_plan(context: _Finishing, name: str, program: Program, cost: Any, speedup: float, roofline: float,
                metrics: dict[str, Any]) -> Path:
    from accelkit.runtime.plan import write_plan

    session, settings = context.session, context.settings
    plan_dir = session.out / "plans" / name  # type: ignore[operator]
    write_plan(plan_dir, budget=name, program=program,
               model={"id": session.loaded.model_id, "family": session.graph.family,
                      "weights_hash": session.weights_hash},
               pipe=session.loaded.pipe, generation={**session.generation, "probe_prompt": "a photo"},
               baseline_steps=settings.steps,
               cost={"kind": settings.cost, "target": session.cost_target, "seconds": cost.seconds,
                     "flops": cost.flops, "roofline_speedup": roofline, "speedup": speedup},
               fidelity={k: metrics[k] for k in ("psnr", "ssim", "lpips")})
    return plan_dir


def _notes(context: _Finishing, results: Sequence[_BudgetResult], failed: Sequence[Any]) -> list[str]:
    """The report's notes: how cost and fidelity were measured, what the probes found, how plans were chosen."""
    settings, session = context.settings, context.session
    cost_target = session.cost_target
    predictions = [(r.outcome, r.roofline_speedup) for r in results if r.roofline_speedup is not None]
    notes = [
        (f"Cost: measured denoiser latency on {settings.device} (median of repeats per graph variant, warm-up "
         f"excluded, summed over the schedule); the roofline model on the '{cost_target}' table predicted "
         + ", ".join(f"{o.budget}: {r:.2f}x" for o, r in predictions)
         + " for the chosen plans (measured speedups above)."
         if settings.cost == "latency" else
         f"Cost: roofline model of the denoiser graphs on the '{cost_target}' device table "
         "(max of FLOPs/peak and bytes/bandwidth per node); wall-clock time on a shared CPU is noise."),
        "Fidelity: PSNR/SSIM in float against the full-step baseline with the same seeds, on held-out prompts; "
        "the search itself used the calibration prompts.",
        # Loaded plans serve other step counts by re-deriving their schedules; nothing here measured those.
        f"Step count: fidelity was measured at each plan's own step count (baseline {settings.steps} steps); "
        "a call with another num_inference_steps re-derives the schedule unmeasured: check it with "
        "`accelkit run --check` or `fast.check(prompt)`.",
    ]
    probed = _probe_facts(settings, context.evaluator, session.targets).values()
    notes.extend(facts["note"] for facts in probed if facts.get("note"))
    notes.append(f"Selection: the best {VALIDATION_TOP} feasible trials per budget were re-scored on "
                 f"{len(context.validation.prompts)} validation prompts (disjoint from calibration and evaluation); "
                 "a plan replaces the fewer-steps plan meeting the same budget only if its per-prompt PSNR gain over "
                 f"it there exceeds {SIGNIFICANCE_STANDARD_ERRORS:g} standard errors, on at least "
                 f"{MIN_VALIDATION_PROMPTS} prompts.")
    if failed:
        notes.append(f"{len(failed)} trial(s) failed or were pruned: "
                     + "; ".join(f"#{t.number}: {t.user_attrs.get('error', t.state.name)}" for t in failed[:5]))
    return notes


def _write_report(context: _Finishing, results: Sequence[_BudgetResult]) -> Path:
    from accelkit.report import render
    from accelkit.report.schema import BaselineCost, ModelInfo, ReportData, Settings, TrialPoint

    session, settings, evaluator = context.session, context.settings, context.evaluator
    targets = session.targets
    trials = [TrialPoint(trial=t.number, cost=t.values[0], speedup=t.user_attrs.get("speedup", 0.0),
                         psnr=t.values[1], feasible=t.user_attrs.get("speedup", 0) >= targets[0] * 0.98,
                         passes=t.user_attrs.get("passes", {}), ssim=t.user_attrs.get("ssim"))
              for t in context.completed]
    failed = [t for t in session.study.trials if t.state.name in ("FAIL", "PRUNED")]
    latency = settings.cost == "latency"
    params = sum(p.numel() for p in session.loaded.denoiser.parameters())
    data = ReportData(
        model=ModelInfo(id=session.loaded.model_id, family=session.graph.family, params=int(params)),
        settings=Settings(steps=settings.steps, num_prompts=len(session.evaluation_prompts), seed=settings.seed,
                          device=settings.device, cost_kind="latency" if latency else "flops"),
        baseline=BaselineCost(cost=evaluator.base_cost.seconds,
                              latency_ms=evaluator.base_cost.seconds * 1e3 if latency else None,
                              flops=evaluator.base_cost.flops, weights_bytes=context.weights_bytes),
        budgets=tuple(r.report for r in results), floor_met=all(r.outcome.met for r in results),
        trials=tuple(trials), notes=tuple(_notes(context, results, failed)),
        cost_model=f"roofline:{session.cost_target}", min_psnr=settings.min_psnr)
    return render.write_report(session.out, data)
