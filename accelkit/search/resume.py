"""Resuming a study: trials lost to an interruption or a killed process run again; failures are counted.

A trial the user interrupted (Ctrl-C, SIGTERM) is FAIL with the error ``interrupted``; one whose process
was killed is still RUNNING (within the heartbeat grace period) or FAIL without an error (after it).
None of them says anything about its parameters, so each is re-enqueued once with the same parameters
and does not count towards ``--trials``. The copies carry optuna's ``failed_trial`` system attr, as
heartbeat retries do, so a trial optuna already retried is not enqueued twice.
"""

from __future__ import annotations

from typing import Any

LOST_ERRORS = ("interrupted", "killed")


def _is_lost(trial: Any, exclusive: bool) -> bool:
    from optuna.trial import TrialState

    if trial.state == TrialState.RUNNING:
        return exclusive
    return trial.state == TrialState.FAIL and trial.user_attrs.get("error") in (None, *LOST_ERRORS)


def requeue_lost_trials(study: Any, *, exclusive: bool) -> set[int]:
    """Re-enqueue each lost trial once; returns the numbers of all lost trials.

    Args:
        study: the study about to be resumed.
        exclusive: no other process can be running this study's trials (a local study under OUT's lock),
            so a RUNNING trial belongs to a dead process: it is marked FAIL ``killed`` at once instead of
            after the heartbeat grace period.
    """
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    lost = set()
    for trial in trials:
        if not _is_lost(trial, exclusive):
            continue
        lost.add(trial.number)
        if trial.state == TrialState.RUNNING:
            storage.set_trial_user_attr(trial._trial_id, "error", "killed")
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        if trial.number in retried or not trial.distributions:
            continue
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=trial.params,
                                            distributions=trial.distributions,
                                            system_attrs={"failed_trial": trial.number, "retry_history": history}))
    return lost


def failed_trials(study: Any) -> list[Any]:
    """Trials that raised (recorded with their error), not counting interrupted or killed ones."""
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == "FAIL" and not _is_lost(t, False)]
