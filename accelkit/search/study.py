"""The study and its storage: Optuna RDBStorage with heartbeats, the settings a study was created with
(stored, compared on join), the :class:`SearchSession` one process shares between trials, and
:func:`prepare_search`, the setup of ``optimize``, distributed workers and reports from a study."""

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
from accelkit.passes.base import Program
from accelkit.search.objective import Evaluator, _seed_trials, trial_objective
from accelkit.search.settings import (
    SPEEDUP_TOLERANCE,
    OptimizeSettings,
    _generation_defaults,
    _prompt_sets,
    budget_name,
    validate_settings,
)


def study_name_for(settings: OptimizeSettings, model_id: str, weights_hash: str, generation: dict) -> str:
    if settings.study:
        return settings.study
    payload = json.dumps({"model": model_id, "weights": weights_hash, "passes": settings.passes,
                          "steps": settings.steps, "generation": generation, "seed": settings.seed,
                          "prompts": settings.num_prompts, "cost": [settings.cost, settings.cost_target]},
                         sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model_id).strip("-")[-40:]
    return f"accelkit-{slug}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


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
        return trial_objective(self.evaluator, self.settings.passes, self.targets[0], self.current)

    def __post_init__(self) -> None:
        #: the trial this process runs now, and the numbers of all it ran
        self.current: dict[str, Any] = {"trial_id": None, "numbers": []}

    def run_trials(self, count: int, *, progress: bool, console: Any) -> bool:
        """Run ``count`` trials; returns True when interrupted (the running trial is then FAIL)."""
        interrupted = _run_trials(self.study, self.objective(), count, self.targets, progress, console)
        if interrupted:
            mark_interrupted(self.study, self.current.get("trial_id"))
        return interrupted


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

    say: Callable[[str], None] = (console.print if console is not None else (lambda *_: None))
    targets, out = _check_role(settings, role)
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
    study, created = _open_study(storage, storage_url, study_name, role, settings.seed)
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
    _enqueue_seeds(study, settings, evaluator, targets, role, created)
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


def _check_role(settings: OptimizeSettings, role: str) -> tuple[list[float], Path | None]:
    """(the budget targets, OUT) once what ``role`` needs is there; nothing is loaded or written."""
    if role not in COMPARED_FIELDS:
        raise ValueError(f"unknown role {role!r}")
    targets = validate_settings(settings, min_trials={"optimize": 1, "worker": 0, "report": 0}[role])
    out = Path(settings.out) if settings.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file: pass a directory")
    if role != "optimize" and not settings.storage:
        raise InputError("--storage is required: the URL of the shared study, e.g. postgresql://user:pw@host/db "
                         "or sqlite:///path/study.db")
    if role == "optimize" and out is None:
        raise InputError("--out is required")
    return targets, out


def _open_study(storage: Any, storage_url: str, study_name: str, role: str, seed: int) -> tuple[Any, bool]:
    """(the study, whether this call created it); a report only loads an existing one."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=4)
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
    return study, created


def _enqueue_seeds(study: Any, settings: OptimizeSettings, evaluator: Evaluator, targets: Sequence[float],
                   role: str, created: bool) -> None:
    """Enqueue the guaranteed candidates once per study (see :func:`accelkit.search.objective._seed_trials`)."""
    if role == "optimize" and not any(t.state.is_finished() for t in study.trials) or role == "worker" and created:
        # Only the worker that created the study seeds it (workers racing would enqueue twice); optimize
        # enqueues no more seeds than trials: leftovers would sit in the study as waiting trials.
        seeds = _seed_trials(settings, evaluator, targets)
        for params in seeds[: settings.trials] if role == "optimize" else seeds:
            study.enqueue_trial(params, skip_if_exists=True)


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
