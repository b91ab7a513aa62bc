"""``accelkit optimize``: tune the passes together so each budget is met at the best fidelity.

One Optuna study per run (SQLite in ``OUT`` unless ``storage`` names another database), two
objectives (cost down, PSNR up on calibration prompts), the lowest budget as a constraint. The first
trials are guaranteed candidates: per budget, the most sampler steps alone that meet it (default
spacing, then at the other spacing where the scheduler takes custom steps), then splits of a budget
between two passes, from the passes' seed hooks (:func:`accelkit.search.space.default_trials`), so
``--trials`` >= the number of budgets meets every budget fewer steps can reach.

Three disjoint prompt sets (:func:`_prompt_sets`): trials are scored on calibration prompts; per budget
the best :data:`VALIDATION_TOP` feasible trials are re-scored on validation prompts, and one is chosen
only if its per-prompt gain over the fewer-steps plan meeting the same budget is significant there
(:class:`PairedGain`); otherwise the plan *is* that fewer-steps plan and the report says in words why.
The chosen plan becomes ``OUT/plans/<budget>/`` and is evaluated on the evaluation prompts (used for
nothing else) against the baseline and the fewer-steps reference; everything goes into ``OUT/report/``.

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
from accelkit.passes.base import (
    PassConfig,
    PassFailedError,
    Program,
    config_from_dict,
    pass_order,
    registered_passes,
    run_passes,
)
from accelkit.passes.hooks import ProbeContext
from accelkit.passes.steps import fewer_steps_for
from accelkit.search.space import BUDGET_TOLERANCE

SPEEDUP_TOLERANCE = BUDGET_TOLERANCE
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
    available = registered_passes()
    order = pass_order()
    unknown = [n for n in names if n not in order]
    if unknown:
        raise InputError(f"unknown pass(es) {unknown}: choose from {', '.join(order)}")
    missing = [n for n in names if n not in available]
    if missing:
        raise InputError(
            f"pass(es) {missing} are not available in this version of accelkit; available: {', '.join(available)}"
        )
    if not names:
        raise InputError("--passes is empty: name at least one of " + ", ".join(available))
    return tuple(sorted(set(names), key=order.index))


@dataclass
class OptimizeSettings:
    """Everything ``accelkit optimize`` takes (see ``accelkit optimize --help``)."""

    model: str | None = None
    budgets: tuple[str, ...] = ("2x",)
    passes: tuple[str, ...] = DEFAULT_PASSES
    trials: int = 12
    steps: int = 28
    num_prompts: int = 8
    num_eval_prompts: int = 8
    #: Prompts the best few trials per budget are re-scored on before one is chosen.
    num_val_prompts: int = 8
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
    #: Frames per video (video pipelines only); None: the pipeline's default.
    num_frames: int | None = None
    #: Extra pipeline call arguments (``--call-arg KEY=VALUE``), on top of those the model family needs.
    call_args: dict[str, Any] = field(default_factory=dict)
    export: str | None = None
    #: Reuse an OUT made for another model or other budgets, removing its stale plans and report.
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    #: Heartbeat of running trials in seconds; a trial silent for ``grace_period`` (default 3x) is
    #: marked FAIL by the next process that asks the study for a trial, and retried.
    heartbeat: int = 10
    grace_period: int | None = None
    #: Explicit prompt lists (they win over files and counts); a report rebuilt from a study uses them.
    calibration_prompts: tuple[str, ...] | None = None
    evaluation_prompts: tuple[str, ...] | None = None
    validation_prompts: tuple[str, ...] | None = None


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
    from accelkit._io import read_prompt_file

    return read_prompt_file(path)


GENERIC_PROMPTS = (
    "a red circle", "a blue square on a white background", "a green triangle", "a yellow star at night",
    "a small house by a lake", "a cat sitting on a chair", "a mountain landscape at sunset", "a bowl of fruit",
    "a city street in the rain", "a portrait of an old man", "a sailing boat on the sea", "a forest in autumn",
)


@dataclass(frozen=True)
class PromptSets:
    """Three disjoint prompt sets: trials score on calibration, the choice is made on validation,
    the report measures on evaluation. ``warning`` is one line when a user's file was too small."""

    calibration: list[str]
    validation: list[str]
    evaluation: list[str]
    warning: str | None = None


def _split_prompts(prompts: list[str], sizes: Sequence[int], source: str) -> tuple[list[list[str]], str | None]:
    """``prompts`` cut into consecutive disjoint parts of ``sizes``; shrunk in proportion when too few."""
    wanted = sum(sizes)
    if len(prompts) >= wanted:
        parts, start = [], 0
        for size in sizes:
            parts.append(prompts[start : start + size])
            start += size
        return parts, None
    if len(prompts) < len(sizes):
        # Too few to keep the sets apart: every set reuses all prompts.
        return [list(prompts) for _ in sizes], (
            f"warning: {source} holds {len(prompts)} prompt(s), fewer than the {len(sizes)} disjoint sets need; "
            "all sets use the same prompts, so the scores are not held out")
    shares = [max(1, math.floor(len(prompts) * size / wanted)) for size in sizes]
    shares[0] += len(prompts) - sum(shares)
    parts, start = [], 0
    for size in shares:
        parts.append(prompts[start : start + size])
        start += size
    return parts, (f"warning: {source} holds {len(prompts)} prompts, fewer than the {wanted} asked for; split "
                   f"{'/'.join(map(str, shares))} into calibration/validation/evaluation")


def _prompt_sets(settings: OptimizeSettings, source: str) -> PromptSets:
    n_cal, n_val, n_eval = max(1, settings.num_prompts), max(1, settings.num_val_prompts), settings.num_eval_prompts
    if settings.calibration_prompts is not None and settings.evaluation_prompts is not None:
        validation = settings.validation_prompts
        return PromptSets(list(settings.calibration_prompts),
                          list(validation if validation else settings.calibration_prompts),
                          list(settings.evaluation_prompts))
    evaluation = _read_prompts(settings.eval_prompts_file)[: max(1, n_eval)] if settings.eval_prompts_file else None
    warning = None
    if settings.prompts_file:
        # The user's prompts are split, never mixed with generic ones.
        mine = [p for p in dict.fromkeys(_read_prompts(settings.prompts_file)) if p not in set(evaluation or ())]
        sizes = [n_cal, n_val] + ([] if evaluation is not None else [n_eval])
        parts, warning = _split_prompts(mine, sizes, f"--prompts {settings.prompts_file}")
        calibration, validation = parts[0], parts[1]
        evaluation = evaluation if evaluation is not None else parts[2]
    elif source == "zoo":
        from accelkit.zoo import calibration_prompts, evaluation_prompts

        pool = list(calibration_prompts())
        calibration, validation = pool[:n_cal], pool[n_cal : n_cal + n_val] or pool[-n_val:]
        evaluation = evaluation if evaluation is not None else list(evaluation_prompts(n_eval))
    else:
        pool = [p for p in GENERIC_PROMPTS if p not in set(evaluation or ())]
        sizes = [n_cal, n_val] + ([] if evaluation is not None else [n_eval])
        parts, _ = _split_prompts(pool, [min(s, max(1, len(pool) // len(sizes))) for s in sizes], "generic prompts")
        calibration, validation = parts[0], parts[1]
        evaluation = evaluation if evaluation is not None else parts[2]
    return PromptSets(calibration, validation, evaluation, warning)


def _generation_defaults(pipe: Any, settings: OptimizeSettings, source: str) -> dict[str, Any]:
    from accelkit.pipeline_io import generation_defaults, with_call_arguments

    if source == "zoo":
        from accelkit.zoo import ZOO_MODELS

        info = ZOO_MODELS[(settings.model or "zoo:shapes").removeprefix("zoo:")]
        defaults = {"height": info.height, "width": info.width, "guidance_scale": info.guidance_scale}
    else:
        defaults = generation_defaults(pipe)
    for key in ("height", "width", "guidance_scale", "num_frames"):
        if getattr(settings, key) is not None:
            defaults[key] = getattr(settings, key)
    return with_call_arguments(pipe, defaults, settings.call_args)


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

    def __init__(self, *, base: Program, calib: Any, spec: Any, baseline_images: torch.Tensor | None = None,
                 latency_inputs: dict[str, Any] | None = None) -> None:
        self.base = base
        self.calib = calib
        self.spec = spec
        # With latency inputs (one recorded denoiser call) costs are measured, not modelled.
        self.latency_inputs = latency_inputs
        self._baseline_images = baseline_images
        self.base_cost = self.cost(base)
        #: what the passes' probes measured, per (passes, steps, budgets)
        self.probe_facts: dict[tuple, dict[str, Any]] = {}

    def cost(self, program: Program) -> Any:
        from accelkit.search.cost import measured_program_cost, program_cost

        if self.latency_inputs is not None:
            return measured_program_cost(program, self.latency_inputs)
        return program_cost(program, self.spec)

    def roofline_speedup(self, program: Program) -> float:
        from accelkit.search.cost import program_cost

        return program_cost(self.base, self.spec).seconds / program_cost(program, self.spec).seconds

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
        cost = self.cost(program)
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


SETTINGS_ATTR = "accelkit.settings"
SETTINGS_FORMAT = 1
#: Fields a process must share with the study to join it, per role. Workers share everything the
#: search depends on; ``optimize`` may re-finish a study for other budgets or held-out prompts (the
#: report is chosen at the end), and a report may use other budgets and a local copy of the model.
_BASELINE_FIELDS = ("weights_hash", "passes", "steps", "seed", "generation", "calibration_prompts", "cost",
                    "cost_target")
COMPARED_FIELDS = {
    "optimize": _BASELINE_FIELDS + ("device",),
    # Heartbeat settings too: a worker judges the others' trials dead by its own grace period.
    "worker": _BASELINE_FIELDS + ("device", "budgets", "evaluation_prompts", "validation_prompts", "heartbeat",
                                  "grace_period"),
    "report": _BASELINE_FIELDS,
}
MAX_RETRY = 2


def validate_settings(settings: OptimizeSettings, *, min_trials: int = 1) -> list[float]:
    """Check what can be checked without loading anything; returns the budget targets, ascending."""
    targets = sorted({parse_budget(b) for b in settings.budgets})
    if settings.trials < min_trials:
        raise InputError(f"--trials must be at least {min_trials}, got {settings.trials}")
    if settings.steps < 2:
        raise InputError(f"--steps must be at least 2, got {settings.steps}")
    if settings.num_prompts < 1 or settings.num_eval_prompts < 1 or settings.num_val_prompts < 1:
        raise InputError("--num-prompts, --num-eval-prompts and --num-val-prompts must be at least 1")
    for name in ("height", "width"):
        value = getattr(settings, name)
        if value is not None and (value < 8 or value % 8):
            raise InputError(f"--{name} {value} is not a positive multiple of 8: pass e.g. --{name} {max(8, value // 8 * 8)}")
    if settings.cost not in ("roofline", "latency"):
        raise InputError(f"--cost must be 'roofline' or 'latency', got {settings.cost!r}")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if settings.heartbeat < 1:
        raise InputError(f"--heartbeat must be at least 1 second, got {settings.heartbeat}")
    if settings.grace_period is not None and settings.grace_period <= settings.heartbeat:
        raise InputError(f"--grace-period ({settings.grace_period} s) must exceed --heartbeat ({settings.heartbeat} s)")
    return targets


def open_storage(url: str, settings: OptimizeSettings | None = None) -> Any:
    """An Optuna RDBStorage for ``url`` with heartbeats and retry of heartbeat-stale trials.

    A trial whose process stops sending heartbeats for the grace period is marked FAIL by the next
    process that asks the study for a trial, and re-enqueued with the same parameters (at most
    ``MAX_RETRY`` times; the copies carry ``retry_history`` in their system attrs). SQLite works too.
    """
    import warnings

    import optuna

    url = storage_url(url)
    heartbeat = settings.heartbeat if settings is not None else 10
    grace = (settings.grace_period if settings is not None else None) or 3 * heartbeat
    retry_type = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}  # the heartbeat thread writes beside the trial
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if retry_type is not None:  # optuna >= 4.9
            callback = retry_type(max_retry=MAX_RETRY)
            kwargs: dict[str, Any] = {"heartbeat_stale_trial_callback": callback}
        else:  # pragma: no cover - older optuna
            kwargs = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRY)}
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                              grace_period=grace, **kwargs)
        except Exception as error:  # noqa: BLE001 - bad URLs, unreachable databases, missing drivers
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"cannot open the study storage '{_redact(url)}': {first}") from error


def storage_url(url: str) -> str:
    """``url`` with a PostgreSQL driver that is installed.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; accelkit's ``[postgres]`` extra
    installs psycopg2, so a bare URL is pointed at whichever of the two is importable.
    """
    import importlib.util

    if url.startswith(("postgresql://", "postgres://")):
        rest = url.split("://", 1)[1]
        for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
            if importlib.util.find_spec(module) is not None:
                return f"postgresql+{driver}://{rest}"
        raise InputError("a postgresql:// storage needs a driver: pip install 'accelkit[postgres]' (psycopg2)")
    return url


def _redact(url: str) -> str:
    """``url`` without its password."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def study_settings(settings: OptimizeSettings, *, model_id: str, weights_hash: str, generation: dict,
                   calibration_prompts: Sequence[str], evaluation_prompts: Sequence[str], cost_target: str,
                   targets: Sequence[float], validation_prompts: Sequence[str] = ()) -> dict[str, Any]:
    """What a study was created with: everything the baseline and the search depend on."""
    import accelkit

    return {
        "format": SETTINGS_FORMAT,
        "model": model_id,
        "weights_hash": weights_hash,
        "passes": list(settings.passes),
        "budgets": [budget_name(t) for t in targets],
        "steps": settings.steps,
        "seed": settings.seed,
        "generation": {k: generation[k] for k in ("height", "width", "guidance_scale", "num_frames", "call_arguments")
                       if k in generation},
        "calibration_prompts": list(calibration_prompts),
        "evaluation_prompts": list(evaluation_prompts),
        "validation_prompts": list(validation_prompts),
        "cost": settings.cost,
        "cost_target": cost_target,
        "device": settings.device.split(":")[0],
        "min_psnr": settings.min_psnr,
        "heartbeat": settings.heartbeat,
        "grace_period": settings.grace_period or 3 * settings.heartbeat,
        "versions": {"accelkit": accelkit.__version__, "torch": torch.__version__.split("+")[0]},
    }


def stored_settings(study: Any) -> dict[str, Any] | None:
    """The settings a study was created with (None for a study made before they were stored)."""
    text = study.user_attrs.get(SETTINGS_ATTR)
    if text is None:
        return None
    return json.loads(text) if isinstance(text, str) else dict(text)


def settings_differences(stored: dict[str, Any], mine: dict[str, Any], fields: Sequence[str]) -> list[str]:
    """``field (study: X, here: Y)`` for each compared field that differs."""
    def short(value: Any) -> str:
        text = json.dumps(value, sort_keys=True)
        return text if len(text) <= 60 else text[:57] + "..."

    diffs = []
    for key in fields:
        if json.dumps(stored.get(key), sort_keys=True) != json.dumps(mine.get(key), sort_keys=True):
            diffs.append(f"{key} (study: {short(stored.get(key))}, here: {short(mine.get(key))})")
    return diffs


def _check_or_store_settings(study: Any, mine: dict[str, Any], role: str, created: bool) -> dict[str, Any]:
    import time

    stored = stored_settings(study)
    if stored is None and not created and role == "worker" and not study.trials:
        # Another worker created the study a moment ago and is about to store its settings.
        for _ in range(20):
            time.sleep(0.5)
            stored = stored_settings(study)  # user_attrs reads the storage each time
            if stored is not None:
                break
    if stored is None:
        if role == "report":
            raise InputError(f"study '{study.study_name}' holds no accelkit settings: it was not made by "
                             "`accelkit optimize` or `accelkit search --worker` of this version")
        study.set_user_attr(SETTINGS_ATTR, json.dumps(mine, sort_keys=True))
        return mine
    diffs = settings_differences(stored, mine, COMPARED_FIELDS[role])
    if diffs:
        raise InputError(f"study '{study.study_name}' was created with other settings, refusing to join it: "
                         + "; ".join(diffs) + " (pass the study's settings, or use another --study)")
    return stored


@dataclass
class SearchSession:
    """Everything a search process shares between trials: the model, baseline, evaluator and study."""

    settings: OptimizeSettings
    loaded: Any
    graph: Any
    weights_hash: str
    generation: dict[str, Any]
    calibration_prompts: list[str]
    evaluation_prompts: list[str]
    targets: list[float]
    cost_target: str
    spec: Any
    evaluator: Evaluator
    storage_url: str
    study: Any
    study_name: str
    created: bool
    stored: dict[str, Any]
    out: Path | None
    validation_prompts: list[str] = field(default_factory=list)

    def objective(self) -> Callable[[Any], tuple[float, float]]:
        """The trial function: build the program, check the speed, measure fidelity."""
        import optuna

        from accelkit.search.space import suggest_configs

        evaluator, passes, lowest = self.evaluator, self.settings.passes, self.targets[0]
        current = self.current

        def objective(trial: Any) -> tuple[float, float]:
            current["trial_id"] = trial._trial_id
            current["numbers"].append(trial.number)
            configs = suggest_configs(trial, passes)
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
            except (InputError, PassFailedError) as error:
                if isinstance(error, PassFailedError) and not isinstance(error.__cause__, InputError):
                    trial.set_user_attr("error", f"PassFailedError: {str(error).splitlines()[0]}")
                    raise
                # A sampled combination the passes reject (e.g. warm-up longer than the full steps allow).
                trial.set_user_attr("error", str(error))
                raise optuna.TrialPruned(str(error)) from None
            except KeyboardInterrupt:
                _note_interrupted(trial)
                raise  # optuna marks the trial FAIL and re-raises
            except Exception as error:  # noqa: BLE001 - a failing trial must not end the search
                trial.set_user_attr("error", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                raise

        return objective

    def __post_init__(self) -> None:
        #: the trial this process runs now, and the numbers of all it ran
        self.current: dict[str, Any] = {"trial_id": None, "numbers": []}

    def run_trials(self, count: int, *, progress: bool, console: Any) -> bool:
        """Run ``count`` trials; returns True when interrupted (the running trial is then FAIL)."""
        interrupted = _run_trials(self.study, self.objective(), count, self.targets, progress, console)
        if interrupted:
            mark_interrupted(self.study, self.current.get("trial_id"))
        return interrupted


def _note_interrupted(trial: Any) -> None:
    try:
        trial.set_user_attr("error", "interrupted")
    except BaseException:  # noqa: BLE001 - a second Ctrl-C or a finished trial: mark_interrupted follows
        pass


def mark_interrupted(study: Any, trial_id: int | None) -> None:
    """Leave the trial this process was running FAIL with the reason 'interrupted' (idempotent)."""
    from optuna.trial import TrialState

    if trial_id is None:
        return
    storage = study._storage
    try:
        trial = storage.get_trial(trial_id)
        if trial.state in (TrialState.RUNNING, TrialState.WAITING):
            if trial.user_attrs.get("error") is None:
                storage.set_trial_user_attr(trial_id, "error", "interrupted")
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except Exception:  # noqa: BLE001 - finished meanwhile, or the database went away: heartbeats cover it
        pass


def _seed_trials(settings: OptimizeSettings, evaluator: Evaluator, targets: Sequence[float]) -> list[dict[str, Any]]:
    """The guaranteed candidates (see :func:`accelkit.search.space.default_trials`) for this model."""
    from accelkit.search.space import default_trials

    return default_trials(settings.passes, targets, num_steps=settings.steps,
                          facts=_probe_facts(settings, evaluator, targets))


def _probe_facts(settings: OptimizeSettings, evaluator: Evaluator, targets: Sequence[float]) -> dict[str, Any]:
    """What the searched passes' probes measure on this model (memoised: seeds and notes both read it)."""
    from accelkit.search.space import probe_facts

    key = (tuple(settings.passes), settings.steps, tuple(targets))
    if key not in evaluator.probe_facts:
        def seconds(program: Program) -> float:  # the baseline's cost is known (and measured once)
            return (evaluator.base_cost if program is evaluator.base else evaluator.cost(program)).seconds

        context = ProbeContext(base=evaluator.base, calib=evaluator.calib, cost=seconds,
                               num_steps=settings.steps, targets=tuple(targets))
        evaluator.probe_facts[key] = probe_facts(settings.passes, context)
    return evaluator.probe_facts[key]


def prepare_search(settings: OptimizeSettings, *, role: str = "optimize", console: Any = None) -> SearchSession:
    """The setup shared by ``optimize``, workers and reports from a study.

    Loads the model and prompts, opens (``optimize``/``worker``: creates if missing) the study,
    checks the settings it was created with, captures the denoiser and builds the evaluator. Workers
    on other machines derive the same baseline: seeds, prompts and generation settings are stored
    in the study and compared (:data:`COMPARED_FIELDS`).

    Args:
        settings: the run's settings.
        role: ``"optimize"``, ``"worker"`` or ``"report"`` (loads an existing study only).
        console: a rich console for messages, or None.
    """
    import warnings

    import optuna

    from accelkit.calibrate import Calibrator
    from accelkit.loading import load_pipeline, weights_fingerprint
    from accelkit.pipeline_io import probe_and_capture
    from accelkit.search.cost import device_spec
    if role not in COMPARED_FIELDS:
        raise ValueError(f"unknown role {role!r}")
    say: Callable[[str], None] = (console.print if console is not None else (lambda *_: None))
    targets = validate_settings(settings, min_trials={"optimize": 1, "worker": 0, "report": 0}[role])
    out = Path(settings.out) if settings.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file: pass a directory")
    if role != "optimize" and not settings.storage:
        raise InputError("--storage is required: the URL of the shared study, e.g. postgresql://user:pw@host/db "
                         "or sqlite:///path/study.db")
    if role == "optimize" and out is None:
        raise InputError("--out is required")

    loaded = load_pipeline(settings.model, device=settings.device)
    pipe = loaded.pipe
    prompt_sets = _prompt_sets(settings, loaded.source)
    if prompt_sets.warning:
        say(prompt_sets.warning)
    calibration_prompts, evaluation_prompts = prompt_sets.calibration, prompt_sets.evaluation
    generation = _generation_defaults(pipe, settings, loaded.source)
    say(f"[bold]model[/] {loaded.model_id} ({type(loaded.denoiser).__name__}); {settings.steps} steps, "
        f"{generation['height']}x{generation['width']}, guidance {generation['guidance_scale']}")
    weights_hash = weights_fingerprint(loaded.denoiser)
    cost_target = settings.cost_target or ("h100" if settings.device.startswith("cuda") else "cpu")
    mine = study_settings(settings, model_id=loaded.model_id, weights_hash=weights_hash, generation=generation,
                          calibration_prompts=calibration_prompts, evaluation_prompts=evaluation_prompts,
                          cost_target=cost_target, targets=targets, validation_prompts=prompt_sets.validation)

    # The study first: a worker with other settings should fail before the costly capture and baseline.
    study_name = study_name_for(settings, loaded.model_id, weights_hash, generation)
    # A shared storage must answer before OUT is created; the default one lives in OUT.
    shared = open_storage(settings.storage, settings) if settings.storage else None
    if out is not None:
        _claim_out(out, role, settings, loaded.model_id, weights_hash, study_name, targets)
    storage_url = settings.storage or f"sqlite:///{(out / 'study.db').resolve()}"  # type: ignore[operator]
    # Failed trials are recorded with their reason in the study and the report's notes, not as tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = shared or open_storage(storage_url, settings)
    sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, n_startup_trials=4)
    created = False
    try:
        if role == "report":
            try:
                study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
            except KeyError:
                names = optuna.get_all_study_names(storage)
                raise InputError(f"no study '{study_name}' in '{_redact(storage_url)}'; it holds: "
                                 + (", ".join(names) or "no studies")) from None
        else:
            try:
                study = optuna.create_study(storage=storage, study_name=study_name,
                                            directions=["minimize", "maximize"], sampler=sampler)
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - unreachable databases, wrong credentials, schema trouble
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot open the study storage '{_redact(storage_url)}': {first}") from error
    if len(study.directions) != 2:
        raise InputError(f"study '{study_name}' is not an accelkit study (it has {len(study.directions)} objective(s))")
    stored = _check_or_store_settings(study, mine, role, created)
    if role != "report":
        study.set_metric_names(["cost", "psnr"])
    calls, graph = probe_and_capture(pipe, generation, prompt=calibration_prompts[0])
    base = Program.from_graph(graph, settings.steps)
    spec = device_spec(cost_target)
    calib = Calibrator(pipe, calibration_prompts, height=generation["height"], width=generation["width"],
                       guidance_scale=generation["guidance_scale"], seed=settings.seed,
                       num_frames=generation.get("num_frames"), weights_hash=weights_hash,
                       cache_dir=out / "calibration" if out is not None else None,
                       extra_call_kwargs=dict(generation.get("call_arguments", {})))
    evaluator = Evaluator(base=base, calib=calib, spec=spec,
                          latency_inputs=calls[0] if settings.cost == "latency" else None)
    if role == "optimize" and not any(t.state.is_finished() for t in study.trials) or role == "worker" and created:
        # Only the worker that created the study seeds it (workers racing would enqueue twice); optimize
        # enqueues no more seeds than trials: leftovers would sit in the study as waiting trials.
        seeds = _seed_trials(settings, evaluator, targets)
        for params in seeds[: settings.trials] if role == "optimize" else seeds:
            study.enqueue_trial(params, skip_if_exists=True)
    if role != "report":
        say(f"baseline: {len(calibration_prompts)} calibration, {len(prompt_sets.validation)} validation and "
            f"{len(evaluation_prompts)} evaluation prompts")
        evaluator.baseline_images  # noqa: B018 - generate it now, not inside the first trial
    return SearchSession(settings=settings, loaded=loaded, graph=graph, weights_hash=weights_hash,
                         generation=generation, calibration_prompts=calibration_prompts,
                         evaluation_prompts=evaluation_prompts, targets=targets, cost_target=cost_target,
                         validation_prompts=prompt_sets.validation,
                         spec=spec, evaluator=evaluator, storage_url=storage_url, study=study,
                         study_name=study_name, created=created, stored=stored, out=out)


def _claim_out(out: Path, role: str, settings: OptimizeSettings, model_id: str, weights_hash: str,
               study_name: str, targets: Sequence[float]) -> None:
    """Lock OUT and check it belongs to this model and study (workers only keep a cache there)."""
    from accelkit.artifacts.outdir import OutIdentity, check_writable_dir, claim_out_dir

    if role == "worker":
        check_writable_dir(out, "--out")
        out.mkdir(parents=True, exist_ok=True)
        return
    identity = OutIdentity(model=model_id, weights_hash=weights_hash, study=study_name,
                           budgets=tuple(budget_name(t) for t in targets))
    claim_out_dir(out, identity, overwrite=settings.overwrite)


def finish(session: SearchSession, console: Any = None) -> tuple[list[BudgetOutcome], Path | None]:
    """Plans and report for ``session``'s study, written to ``session.out``."""
    if session.out is None:
        raise InputError("an output directory is needed for the report")
    return _finish(session.settings, session.study, session.evaluator, session.targets, session.evaluation_prompts,
                   session.generation, session.loaded, session.weights_hash, session.graph, session.spec,
                   session.cost_target, session.out, console,
                   validation_prompts=session.validation_prompts or session.calibration_prompts)


def optimize(settings: OptimizeSettings, *, console: Any = None, progress: bool = True) -> OptimizeResult:
    """Run the whole optimization described by ``settings``; see the module docstring."""
    from accelkit._signals import deferred_interrupts
    from accelkit.artifacts.outdir import release_out_dir
    from accelkit.search.resume import failed_trials, requeue_lost_trials

    session = prepare_search(settings, role="optimize", console=console)
    # Trials lost to Ctrl-C or kill -9 run again and do not count; OUT's lock makes a local study ours alone.
    lost = requeue_lost_trials(session.study, exclusive=settings.storage is None)
    finished = [t for t in session.study.trials if t.state.is_finished() and t.number not in lost]
    remaining = max(0, settings.trials - len(finished))
    interrupted = False
    if remaining:
        interrupted = session.run_trials(remaining, progress=progress, console=console)
    with deferred_interrupts("interrupted: finishing the plans and report first") as deferred:
        outcomes, report_path = finish(session, console)
    exit_code = 0 if all(o.met for o in outcomes) else 3
    if exit_code == 0 and failed_trials(session.study):
        exit_code = 4  # the plans stand, but a trial raised: CI should look at the report's notes
    if interrupted or deferred.signum is not None:
        exit_code = 130
    release_out_dir(session.out)
    return OptimizeResult(session.out, outcomes, report_path, exit_code, session.study_name)  # type: ignore[arg-type]


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
            task = bar.add_task("trials", total=count, best=best_line() if progress else "")
            for _ in range(count):
                study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
                bar.update(task, advance=1, best=best_line() if progress else "")
    except KeyboardInterrupt:
        return True
    return False


def _finish(settings: OptimizeSettings, study: Any, evaluator: Evaluator, targets: Sequence[float],
            evaluation_prompts: Sequence[str], generation: dict, loaded: Any, weights_hash: str, graph: Any,
            spec: Any, cost_target: str, out: Path, console: Any, *, validation_prompts: Sequence[str]
            ) -> tuple[list[BudgetOutcome], Path | None]:
    """Choose a plan per budget (on validation prompts), evaluate it on held-out prompts, write plans and report."""
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
    validation = _Validation(evaluator, list(validation_prompts))
    params = sum(p.numel() for p in loaded.denoiser.parameters())
    weights_bytes = program_weights_bytes(evaluator.base)
    outcomes: list[BudgetOutcome] = []
    roofline_predictions: list[tuple[BudgetOutcome, float]] = []
    budget_reports = []
    for target in targets:
        name = budget_name(target)
        feasible = [t for t in completed if t.user_attrs.get("speedup", 0) >= target * (1 - SPEEDUP_TOLERANCE)]
        reachable = fewer_steps_for(settings.steps, target)
        fewer_steps = reachable or 2
        reference_program, fewer_resolved = evaluator.build([StepsConfig(num_steps=fewer_steps)])
        reference_speedup, _ = evaluator.speedup(reference_program)
        reference_metrics, reference_images = evaluator.fidelity(reference_program, evaluation_prompts,
                                                                 baseline_eval, seed_offset)
        references = {"fewer_steps": ReferencePoint(
            speedup=reference_speedup, psnr=reference_metrics["psnr"], ssim=reference_metrics["ssim"],
            lpips=reference_metrics["lpips"],
            description=(f"{fewer_steps} of {settings.steps} sampler steps, default spacing"
                         + ("" if reachable else " (fewer steps alone cannot reach this budget)")),
            images=reference_images)}
        choice = _choose(evaluator, feasible, fewer_resolved if reachable else None, validation)
        say(choice.log)
        if choice.resolved is None:
            best_speed = max((t.user_attrs.get("speedup", 0.0) for t in study.trials), default=0.0)
            message = f"budget {name} not met: the fastest trial reached {best_speed:.2f}x"
            outcomes.append(BudgetOutcome(name, target, False, best_speed, None, None, None, message))
            budget_reports.append(BudgetReport(
                budget=name, target_speedup=target, met=False, speedup=best_speed,
                fidelity=FidelityMetrics(psnr=float("nan"), ssim=float("nan")), weights_bytes=weights_bytes,
                references=references, plan_summary=message, eval_prompts=tuple(evaluation_prompts)))
            say(f"[red]{message}[/]")
            continue
        resolved = choice.resolved
        if choice.is_fewer_steps:  # the reference above: same program, prompts and seeds (no second generation)
            program, metrics, images = reference_program, reference_metrics, reference_images
        else:
            program = _program_from_resolved(evaluator, resolved)
            metrics, images = evaluator.fidelity(program, evaluation_prompts, baseline_eval, seed_offset)
        speedup, cost = evaluator.speedup(program)
        ablations = _ablations(evaluator, program, resolved, evaluation_prompts, baseline_eval, seed_offset)
        for key, ablation in _plan_ablations(program).items():
            if key in ablations and "error" not in ablations[key]:
                measured = ablations[key]
                references[key] = ReferencePoint(speedup=measured["speedup"], psnr=measured["psnr"],
                                                 ssim=measured["ssim"], description=ablation.description)
        floor_ok = settings.min_psnr is None or metrics["psnr"] >= settings.min_psnr
        met = speedup >= target * (1 - SPEEDUP_TOLERANCE) and floor_ok
        plan_dir = out / "plans" / name
        write_plan(plan_dir, budget=name, program=program,
                   model={"id": loaded.model_id, "family": graph.family, "weights_hash": weights_hash},
                   pipe=loaded.pipe, generation={**generation, "probe_prompt": "a photo"},
                   baseline_steps=settings.steps,
                   cost={"kind": settings.cost, "target": cost_target, "seconds": cost.seconds, "flops": cost.flops,
                         "roofline_speedup": evaluator.roofline_speedup(program),
                         "speedup": speedup},
                   fidelity={k: metrics[k] for k in ("psnr", "ssim", "lpips")})
        summary = describe_plan(program)
        scheduler_name = type(getattr(evaluator.calib.pipe, "scheduler", None)).__name__
        verdict = choice.verdict(scheduler_name, fewer_steps, settings.steps,
                                 metrics["psnr"], reference_metrics["psnr"])
        message = (f"budget {name}: {speedup:.2f}x, PSNR {metrics['psnr']:.2f} dB on held-out prompts "
                   f"(fewer steps: {reference_metrics['psnr']:.2f} dB at {reference_speedup:.2f}x) - {summary}")
        if not floor_ok:
            message += f"; below --min-psnr {settings.min_psnr}"
        outcomes.append(BudgetOutcome(name, target, met, speedup, metrics["psnr"], choice.trial, plan_dir, message))
        roofline_predictions.append((outcomes[-1], evaluator.roofline_speedup(program)))
        say(("[green]" if met else "[red]") + message + "[/]")
        budget_reports.append(BudgetReport(
            budget=name, target_speedup=target, met=met, speedup=speedup,
            fidelity=FidelityMetrics.from_metrics(metrics), weights_bytes=program_weights_bytes(program),
            passes=resolved, references=references, ablations=ablations, plan_summary=summary, verdict=verdict,
            eval_prompts=tuple(evaluation_prompts), prompts=tuple(evaluation_prompts),
            baseline_images=baseline_eval, accelerated_images=images))
    trials = [TrialPoint(trial=t.number, cost=t.values[0], speedup=t.user_attrs.get("speedup", 0.0),
                         psnr=t.values[1], feasible=t.user_attrs.get("speedup", 0) >= targets[0] * 0.98,
                         passes=t.user_attrs.get("passes", {}), ssim=t.user_attrs.get("ssim"))
              for t in completed]
    failed = [t for t in study.trials if t.state.name in ("FAIL", "PRUNED")]
    notes = [
        (f"Cost: measured denoiser latency on {settings.device} (median of repeats per graph variant, warm-up "
         f"excluded, summed over the schedule); the roofline model on the '{cost_target}' table predicted "
         + ", ".join(f"{o.budget}: {r:.2f}x" for o, r in roofline_predictions)
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
    notes.extend(facts["note"] for facts in _probe_facts(settings, evaluator, targets).values() if facts.get("note"))
    notes.append(f"Selection: the best {VALIDATION_TOP} feasible trials per budget were re-scored on "
                 f"{len(validation_prompts)} validation prompts (disjoint from calibration and evaluation); a plan "
                 "replaces the fewer-steps plan meeting the same budget only if its per-prompt PSNR gain over it "
                 f"there exceeds {SIGNIFICANCE_STANDARD_ERRORS:g} standard errors, on at least "
                 f"{MIN_VALIDATION_PROMPTS} prompts.")
    if failed:
        notes.append(f"{len(failed)} trial(s) failed or were pruned: "
                     + "; ".join(f"#{t.number}: {t.user_attrs.get('error', t.state.name)}" for t in failed[:5]))
    data = ReportData(
        model=ModelInfo(id=loaded.model_id, family=graph.family, params=int(params)),
        settings=Settings(steps=settings.steps, num_prompts=len(evaluation_prompts), seed=settings.seed,
                          device=settings.device, cost_kind="latency" if settings.cost == "latency" else "flops"),
        baseline=BaselineCost(cost=evaluator.base_cost.seconds,
                              latency_ms=evaluator.base_cost.seconds * 1e3 if settings.cost == "latency" else None, flops=evaluator.base_cost.flops,
                              weights_bytes=weights_bytes),
        budgets=tuple(budget_reports), floor_met=all(o.met for o in outcomes), trials=tuple(trials),
        notes=tuple(notes), cost_model=f"roofline:{cost_target}", min_psnr=settings.min_psnr)
    report_path = render.write_report(out, data)
    return outcomes, report_path


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
