"""Distributed search: workers that share one Optuna study in a database, and the report at the end.

::

    # once, anywhere: create the study (stores its settings, seeds the first trials)
    accelkit search --worker --storage postgresql://u:pw@db/accelkit --study flux-2x zoo:shapes --budget 2x --trials 0
    # on every machine, as often as wanted: run N trials each
    accelkit search --worker --storage postgresql://u:pw@db/accelkit --study flux-2x zoo:shapes --budget 2x --trials 8
    # when the workers are done: plans and report from the shared study
    accelkit report out/ --storage postgresql://u:pw@db/accelkit --study flux-2x

Every worker derives the same baseline: the study stores the settings it was created with (seeds,
prompts, resolution, weights hash, ...) and a worker whose settings differ refuses to join with an
InputError naming the differing fields. A killed worker's RUNNING trial stops sending heartbeats;
after the grace period the next worker to ask for a trial marks it FAIL and runs it again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from accelkit.errors import InputError
from accelkit.search.finish import finish
from accelkit.search.settings import OptimizeResult, OptimizeSettings
from accelkit.search.study import open_storage, prepare_search, stored_settings


@dataclass
class WorkerResult:
    study_name: str
    storage: str
    ran: int
    states: dict[str, int]
    exit_code: int


def run_worker(settings: OptimizeSettings, *, console: Any = None, progress: bool = True) -> WorkerResult:
    """Run ``settings.trials`` trials (in this process) against the shared study; no report.

    ``--trials 0`` only creates the study (settings stored, seed trials enqueued) or checks that it
    could join it. Exit code 0, or 130 when interrupted (the running trial is then FAIL, reason
    'interrupted').
    """
    session = prepare_search(settings, role="worker", console=console)
    say = console.print if console is not None else (lambda *_: None)
    say(f"study '{session.study_name}' ({'created' if session.created else 'joined'}), "
        f"{len(session.study.trials)} trial(s) so far; running {settings.trials}")
    interrupted = False
    if settings.trials:
        interrupted = session.run_trials(settings.trials, progress=progress, console=console)
    numbers = set(session.current["numbers"])
    mine = [t for t in session.study.trials if t.number in numbers and t.state.is_finished()]
    states = dict(Counter(t.state.name for t in mine))
    return WorkerResult(session.study_name, session.storage_url, len(mine), states, 130 if interrupted else 0)


def resolve_study_name(storage_url: str, study: str | None) -> str:
    """``study``, or the only study in the storage."""
    import optuna

    if study:
        return study
    try:
        names = optuna.get_all_study_names(open_storage(storage_url))
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001
        raise InputError(f"cannot read the studies in '{storage_url}': {error}") from error
    if len(names) != 1:
        raise InputError(f"--study is needed: the storage holds {len(names)} studies"
                         + (f" ({', '.join(names)})" if names else ""))
    return names[0]


def settings_from_study(storage_url: str, study_name: str, *, out: str, model: str | None = None,
                        budgets: Sequence[str] | None = None, min_psnr: float | None = None,
                        device: str | None = None) -> OptimizeSettings:
    """The settings a study was created with, for a report on this machine."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    except KeyError:
        names = optuna.get_all_study_names(open_storage(storage_url))
        raise InputError(f"no study '{study_name}' in the storage; it holds: {', '.join(names) or 'no studies'}"
                         ) from None
    stored = stored_settings(study)
    if stored is None:
        raise InputError(f"study '{study_name}' holds no accelkit settings: it was not made by "
                         "`accelkit optimize` or `accelkit search --worker`")
    generation = stored["generation"]
    return OptimizeSettings(
        model=model or stored["model"], budgets=tuple(budgets or stored["budgets"]), passes=tuple(stored["passes"]),
        trials=0, steps=stored["steps"], num_prompts=len(stored["calibration_prompts"]),
        num_eval_prompts=len(stored["evaluation_prompts"]), seed=stored["seed"],
        device=device or stored.get("device", "cpu"), cost=stored["cost"], cost_target=stored["cost_target"],
        min_psnr=min_psnr if min_psnr is not None else stored.get("min_psnr"), storage=storage_url,
        study=study_name, out=out, height=generation["height"], width=generation["width"],
        guidance_scale=generation["guidance_scale"], call_args=dict(generation.get("call_arguments", {})),
        calibration_prompts=tuple(stored["calibration_prompts"]),
        evaluation_prompts=tuple(stored["evaluation_prompts"]),
        validation_prompts=tuple(stored.get("validation_prompts") or ()) or None)


def report_from_study(out: str, storage_url: str, study: str | None = None, *, model: str | None = None,
                      budgets: Sequence[str] | None = None, min_psnr: float | None = None,
                      device: str | None = None, console: Any = None) -> OptimizeResult:
    """Write ``OUT/plans/`` and ``OUT/report/`` from a shared study once the workers are done.

    The model, prompts and generation settings come from the study; ``model`` (a local copy; its
    weights must hash the same), ``budgets``, ``min_psnr`` and ``device`` may override them.
    Exit code 0 when every budget is met, 3 otherwise (as ``accelkit optimize``).
    """
    name = resolve_study_name(storage_url, study)
    settings = settings_from_study(storage_url, name, out=out, model=model, budgets=budgets, min_psnr=min_psnr,
                                   device=device)
    session = prepare_search(settings, role="report", console=console)
    unfinished = [t.number for t in session.study.trials if not t.state.is_finished()]
    if unfinished and console is not None:
        console.print(f"note: {len(unfinished)} trial(s) still running or waiting; reporting what finished")
    outcomes, report_path = finish(session, console)
    exit_code = 0 if all(o.met for o in outcomes) else 3
    return OptimizeResult(session.out, outcomes, report_path, exit_code, name)  # type: ignore[arg-type]


__all__ = ["WorkerResult", "report_from_study", "resolve_study_name", "run_worker", "settings_from_study"]
