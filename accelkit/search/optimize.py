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

The run is split over four modules, re-exported here: :mod:`~accelkit.search.settings` (what a run
takes, prompt sets), :mod:`~accelkit.search.study` (storage, study settings, the session),
:mod:`~accelkit.search.objective` (the evaluator and the trial objective) and
:mod:`~accelkit.search.finish` (choice, evaluation, plans and report).

The setup (model, prompts, capture, calibrator, baseline, evaluator, study) is :func:`prepare_search`,
shared by ``accelkit optimize`` and by distributed workers (``accelkit search --worker``, see
:mod:`accelkit.search.worker`). The study stores the settings it was created with as the user attr
``accelkit.settings`` (JSON); a run whose settings differ refuses to join it. Storage is always an
Optuna ``RDBStorage`` with heartbeats, so the RUNNING trial of a killed process is marked FAIL and
retried by the next process that asks the study for a trial.
"""

from __future__ import annotations

from typing import Any

from accelkit.search.finish import (
    MIN_VALIDATION_PROMPTS,
    VALIDATION_SEED_OFFSET,
    VALIDATION_TOP,
    PairedGain,
    _ablations,
    _choose,
    _plan_ablations,
    describe_plan,
    finish,
    program_weights_bytes,
)
from accelkit.search.objective import Evaluator, trial_objective
from accelkit.search.settings import (
    DEFAULT_PASSES,
    GENERIC_PROMPTS,
    SPEEDUP_TOLERANCE,
    BudgetOutcome,
    OptimizeResult,
    OptimizeSettings,
    PromptSets,
    _generation_defaults,
    _prompt_sets,
    budget_name,
    parse_budget,
    parse_passes,
    validate_settings,
)
from accelkit.search.study import (
    COMPARED_FIELDS,
    SETTINGS_ATTR,
    SearchSession,
    mark_interrupted,
    open_storage,
    prepare_search,
    settings_differences,
    storage_url,
    stored_settings,
    study_name_for,
    study_settings,
)

# SIGNIFICANCE_STANDARD_ERRORS is not re-exported: accelkit.search.finish reads it, so patch it there.
__all__ = [
    "COMPARED_FIELDS", "DEFAULT_PASSES", "GENERIC_PROMPTS", "MIN_VALIDATION_PROMPTS", "SETTINGS_ATTR",
    "SPEEDUP_TOLERANCE", "VALIDATION_SEED_OFFSET", "VALIDATION_TOP", "BudgetOutcome",
    "Evaluator", "OptimizeResult", "OptimizeSettings", "PairedGain", "PromptSets", "SearchSession", "_ablations",
    "_choose", "_generation_defaults", "_plan_ablations", "_prompt_sets", "budget_name", "describe_plan", "finish",
    "mark_interrupted", "open_storage", "optimize", "parse_budget", "parse_passes", "prepare_search",
    "program_weights_bytes", "settings_differences", "storage_url", "stored_settings", "study_name_for",
    "study_settings", "trial_objective", "validate_settings",
]


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
