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
from accelkit.passes.base import (
    PASS_ORDER,
    PassConfig,
    PassFailedError,
    Program,
    config_from_dict,
    run_passes,
)

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
    num_prompts: int = 8
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
    #: Frames per video (video pipelines only); None: the pipeline's default.
    num_frames: int | None = None
    #: Extra pipeline call arguments (``--call-arg KEY=VALUE``), on top of those the model family needs.
    call_args: dict[str, Any] = field(default_factory=dict)
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
    "worker": _BASELINE_FIELDS + ("device", "budgets", "evaluation_prompts", "heartbeat", "grace_period"),
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
    if settings.num_prompts < 1 or settings.num_eval_prompts < 1:
        raise InputError("--num-prompts and --num-eval-prompts must be at least 1")
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
                   targets: Sequence[float]) -> dict[str, Any]:
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
    from accelkit.search.space import default_trials

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
    calibration_prompts, evaluation_prompts = _prompt_sets(settings, loaded.source)
    generation = _generation_defaults(pipe, settings, loaded.source)
    say(f"[bold]model[/] {loaded.model_id} ({type(loaded.denoiser).__name__}); {settings.steps} steps, "
        f"{generation['height']}x{generation['width']}, guidance {generation['guidance_scale']}")
    weights_hash = weights_fingerprint(loaded.denoiser)
    cost_target = settings.cost_target or ("h100" if settings.device.startswith("cuda") else "cpu")
    mine = study_settings(settings, model_id=loaded.model_id, weights_hash=weights_hash, generation=generation,
                          calibration_prompts=calibration_prompts, evaluation_prompts=evaluation_prompts,
                          cost_target=cost_target, targets=targets)

    # The study first: a worker with other settings should fail before the costly capture and baseline.
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    storage_url = settings.storage or f"sqlite:///{(out / 'study.db').resolve()}"  # type: ignore[operator]
    study_name = study_name_for(settings, loaded.model_id, weights_hash, generation)
    # Failed trials are recorded with their reason in the study and the report's notes, not as tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = open_storage(storage_url, settings)
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
        if role == "optimize":
            if not any(t.state.is_finished() for t in study.trials):
                # Enqueue no more seeds than trials: leftovers would sit in the study as waiting trials.
                for params in default_trials(settings.passes, targets)[: settings.trials]:
                    study.enqueue_trial(params, skip_if_exists=True)
        elif created:
            # Only the worker that created the study seeds it (workers racing would enqueue twice).
            for params in default_trials(settings.passes, targets):
                study.enqueue_trial(params, skip_if_exists=True)

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
    if role != "report":
        say(f"baseline: {len(calibration_prompts)} calibration and {len(evaluation_prompts)} evaluation prompts")
        evaluator.baseline_images  # noqa: B018 - generate it now, not inside the first trial
    return SearchSession(settings=settings, loaded=loaded, graph=graph, weights_hash=weights_hash,
                         generation=generation, calibration_prompts=calibration_prompts,
                         evaluation_prompts=evaluation_prompts, targets=targets, cost_target=cost_target,
                         spec=spec, evaluator=evaluator, storage_url=storage_url, study=study,
                         study_name=study_name, created=created, stored=stored, out=out)


def finish(session: SearchSession, console: Any = None) -> tuple[list[BudgetOutcome], Path | None]:
    """Plans and report for ``session``'s study, written to ``session.out``."""
    if session.out is None:
        raise InputError("an output directory is needed for the report")
    return _finish(session.settings, session.study, session.evaluator, session.targets, session.evaluation_prompts,
                   session.generation, session.loaded, session.weights_hash, session.graph, session.spec,
                   session.cost_target, session.out, console)


def optimize(settings: OptimizeSettings, *, console: Any = None, progress: bool = True) -> OptimizeResult:
    """Run the whole optimization described by ``settings``; see the module docstring."""
    session = prepare_search(settings, role="optimize", console=console)
    finished = [t for t in session.study.trials if t.state.is_finished()]
    remaining = max(0, settings.trials - len(finished))
    interrupted = False
    if remaining:
        interrupted = session.run_trials(remaining, progress=progress, console=console)
    outcomes, report_path = finish(session, console)
    exit_code = 0 if all(o.met for o in outcomes) else 3
    if interrupted:
        exit_code = 130
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
    weights_bytes = program_weights_bytes(evaluator.base)
    outcomes: list[BudgetOutcome] = []
    roofline_predictions: list[tuple[BudgetOutcome, float]] = []
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
                   cost={"kind": settings.cost, "target": cost_target, "seconds": cost.seconds, "flops": cost.flops,
                         "roofline_speedup": evaluator.roofline_speedup(program),
                         "speedup": speedup},
                   fidelity={k: metrics[k] for k in ("psnr", "ssim", "lpips")})
        summary = describe_plan(program, settings.steps)
        message = (f"budget {name}: {speedup:.2f}x, PSNR {metrics['psnr']:.2f} dB on held-out prompts "
                   f"(fewer steps: {reference_metrics['psnr']:.2f} dB at {reference_speedup:.2f}x) - {summary}")
        if not floor_ok:
            message += f"; below --min-psnr {settings.min_psnr}"
        outcomes.append(BudgetOutcome(name, target, met, speedup, metrics["psnr"], best.number, plan_dir, message))
        roofline_predictions.append((outcomes[-1], evaluator.roofline_speedup(program)))
        say(("[green]" if met else "[red]") + message + "[/]")
        budget_reports.append(BudgetReport(
            budget=name, target_speedup=target, met=met, speedup=speedup,
            fidelity=FidelityMetrics.from_metrics(metrics), weights_bytes=program_weights_bytes(program),
            passes=resolved, references=references, ablations=ablations, plan_summary=summary,
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
    ]
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


def program_weights_bytes(program: Program) -> int:
    """Bytes of the weights the program's graph variants read (4-bit tensors at their packed size)."""
    from accelkit.capture.cost import weights_bytes

    return weights_bytes(variant.module for variant in program.variants.values())


def describe_plan(program: Program, baseline_steps: int) -> str:
    """The plan in words."""
    parts = []
    if "steps" in program.applied and program.num_steps != baseline_steps:
        placement = "equalized-error" if program.sigmas is not None else "default"
        parts.append(f"run {program.num_steps} of {baseline_steps} sampler steps ({placement} spacing)")
    removed = program.stats.get("prune", {}).get("removed_blocks") or []
    if "prune" in program.applied and removed:
        fraction = program.stats["prune"].get("removed_flops_fraction", 0.0)
        parts.append(f"remove {len(removed)} block(s) ({', '.join(map(str, removed))}; "
                     f"{fraction:.0%} of block FLOPs)")
    quantized = program.stats.get("quant", {}).get("quantized") or []
    if "quant" in program.applied and quantized:
        resolved = program.resolved["quant"]
        kept = program.stats["quant"].get("kept_16bit") or []
        branch = f"rank-{resolved['rank']} 16-bit branch" if resolved.get("low_rank", True) else "no low-rank branch"
        parts.append(f"quantize {len(quantized)} linear layers to 4 bits ({resolved['act_mode'].upper()}, "
                     f"group {resolved['group_size']}, {branch}"
                     + (f"; {len(kept)} most sensitive kept 16-bit" if kept else "") + ")")
    sparse_stats = program.stats.get("sparse", {})
    if "sparse" in program.applied and sparse_stats.get("sparse_sites"):
        kept_share = sparse_stats.get("mean_kept_fraction")
        dense = sparse_stats.get("dense_steps", 0)
        parts.append(f"block-sparse attention at {len(sparse_stats['sparse_sites'])} site(s)"
                     + (f", keeping {kept_share:.0%} of attention FLOPs" if kept_share is not None else "")
                     + (f" (first {dense} steps dense)" if dense else ""))
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
