"""The trial objective samples each pass's space as its probe facts shape it (accelkit/search/objective.py)."""

from __future__ import annotations

import optuna

from accelkit.errors import InputError
from accelkit.search.objective import trial_objective


class _RecordingEvaluator:
    """Records the configs a trial builds, then rejects them (the trial is pruned before any generation)."""

    def __init__(self) -> None:
        self.built = []

    def build(self, configs):
        self.built.append(list(configs))
        raise InputError("recorded")


def _run(facts, params):
    evaluator = _RecordingEvaluator()
    study = optuna.create_study(directions=["minimize", "maximize"])
    study.enqueue_trial(params)
    objective = trial_objective(evaluator, ("steps",), 2.0, {"trial_id": None, "numbers": []}, facts)
    study.optimize(objective, n_trials=1)
    return evaluator.built[0][0], study.trials[0].params


def test_probe_facts_add_the_knob_to_the_sampled_space():
    facts = {"steps": {"solver_order": 2, "solver_orders": (1, 3), "lower_order_final": True}}
    config, params = _run(lambda: facts, {"steps.fraction": 0.5, "steps.solver_order": 1})
    assert config.solver_order == 1 and params["steps.solver_order"] == 1
    assert "steps.lower_order_final" in params


def test_without_the_facts_the_knob_is_not_sampled():
    config, params = _run(None, {"steps.fraction": 0.5})
    assert config.solver_order is None and not any("order" in key for key in params)
