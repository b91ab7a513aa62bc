"""Distributed, resumable search: ``accelkit search --worker`` and ``accelkit report --storage``.

The SQLite tests always run (in process, zoo:shapes at the tiny settings of test_optimize.py). The
PostgreSQL test runs worker processes concurrently against one study, kills one mid-trial and checks
that its trial is failed and retried; it needs ``ACCELKIT_TEST_POSTGRES_URL`` (``bash .ci/run``
starts a throwaway server on 127.0.0.1 and sets it) and skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from accelkit.cli.main import main
from accelkit.search.optimize import SETTINGS_ATTR, open_storage

TINY = ["--steps", "4", "--num-prompts", "1", "--num-eval-prompts", "1", "--height", "8", "--width", "8",
        "--quiet"]
POSTGRES_URL = os.environ.get("ACCELKIT_TEST_POSTGRES_URL")
POSTGRES_SKIP = os.environ.get("ACCELKIT_TEST_POSTGRES_SKIP_REASON") or (
    "needs PostgreSQL: set ACCELKIT_TEST_POSTGRES_URL=postgresql://user:pw@127.0.0.1:PORT/DB "
    "(bash .ci/run starts a throwaway server and sets it)")


def _worker_args(storage: str, study: str, trials: int, *extra: str) -> list[str]:
    return ["search", "--worker", "--storage", storage, "--study", study, "zoo:shapes", "--budget", "2x", *TINY,
            "--trials", str(trials), *extra]


def _load(storage: str, study: str) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=open_storage(storage))


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state.is_finished()]


# ------------------------------------------------------------------ SQLite (always runs)


def test_sqlite_workers_add_up_interrupt_cleanly_and_report(tmp_path, capsys, monkeypatch):
    from accelkit.search import optimize as module

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    assert main(_worker_args(storage, "w", 2, "--json")) == 0
    first = json.loads(capsys.readouterr().out)
    assert first == {"study": "w", "ran": 2, "states": first["states"], "exit_code": 0}
    assert sum(first["states"].values()) == 2

    # The second worker is interrupted (Ctrl-C) in its third trial.
    calls = {"n": 0}
    build = module.Evaluator.build

    def interrupting(self, configs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return build(self, configs)

    monkeypatch.setattr(module.Evaluator, "build", interrupting)
    assert main(_worker_args(storage, "w", 3)) == 130
    monkeypatch.undo()

    study = _load(storage, "w")
    finished = _finished(study)
    assert len(finished) == 5  # 2 + 2 + the interrupted one
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["error"] == "interrupted"
    stored = json.loads(study.user_attrs[SETTINGS_ATTR])
    assert stored["steps"] == 4 and stored["budgets"] == ["2x"] and stored["generation"]["height"] == 8
    assert stored["calibration_prompts"] and stored["evaluation_prompts"] and stored["weights_hash"]

    out = tmp_path / "out"
    assert main(["report", str(out), "--storage", storage]) == 0  # the only study: no --study needed
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["settings"]["steps"] == 4
    assert report["budgets"][0]["budget"] == "2x" and report["budgets"][0]["met"] is True
    assert (out / "plans" / "2x" / "plan.json").is_file()
    assert len(report["trials"]) >= 1


def test_worker_refuses_a_study_made_with_other_settings(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    assert main(_worker_args(storage, "w", 0)) == 0  # creates the study: settings stored, seeds enqueued
    study = _load(storage, "w")
    assert study.trials and all(t.state == TrialState.WAITING for t in study.trials)
    capsys.readouterr()
    args = _worker_args(storage, "w", 1)
    args[args.index("--steps") + 1] = "6"
    assert main([*args, "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "steps (study: 4, here: 6)" in err and "seed (study: 0, here: 3)" in err
    assert len(_load(storage, "w").trials) == len(study.trials)  # nothing ran


def test_interrupted_optimize_marks_trial_and_still_reports(tmp_path, monkeypatch):
    from accelkit.search import optimize as module

    calls = {"n": 0}
    build = module.Evaluator.build

    def interrupting(self, configs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return build(self, configs)

    monkeypatch.setattr(module.Evaluator, "build", interrupting)
    out = tmp_path / "out"
    rc = main(["optimize", "zoo:shapes", "--budget", "2x", "--trials", "3", *TINY, "--out", str(out)])
    assert rc == 130
    assert (out / "report" / "report.json").is_file()  # a report of what finished
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    study = _load(storage, optuna.get_all_study_names(storage)[0])
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["error"] == "interrupted"


# ------------------------------------------------------------------ PostgreSQL


# Every worker of one study agrees on these (they are stored in the study and compared).
HEARTBEAT = ["--heartbeat", "1", "--grace-period", "3"]
# A worker whose trials hang: stands in for a process that dies mid-trial.
HANGING = ("import sys, time; import accelkit.search.optimize as o; "
           "o.Evaluator.build = lambda self, configs: time.sleep(600); "
           "from accelkit.cli.main import main; sys.exit(main(sys.argv[1:]))")


def _spawn(args: list[str], cwd: Path, *, hang: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-c", HANGING, *args] if hang else [sys.executable, "-m", "accelkit.cli.main", *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.mark.skipif(not POSTGRES_URL, reason=POSTGRES_SKIP)
def test_postgres_concurrent_workers_and_a_killed_one(tmp_path):
    storage = POSTGRES_URL
    name = f"accelkit-test-{uuid.uuid4().hex[:10]}"
    try:
        # Create the study once (settings stored, seed trials enqueued), as the README says.
        assert main(_worker_args(storage, name, 0, *HEARTBEAT)) == 0

        # Two workers with 2 trials each, and a third whose trial hangs, all at once.
        a = _spawn(_worker_args(storage, name, 2, *HEARTBEAT, "--json"), tmp_path)
        b = _spawn(_worker_args(storage, name, 2, *HEARTBEAT, "--json"), tmp_path)
        k = _spawn(_worker_args(storage, name, 1, *HEARTBEAT), tmp_path, hang=True)
        for worker in (a, b):
            rc, out, err = _wait(worker)
            assert rc == 0, err
            summary = json.loads(out)
            assert summary["ran"] == 2 and sum(summary["states"].values()) == 2, summary

        deadline = time.monotonic() + 180
        while True:
            running = _load(storage, name).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if running:
                break
            assert k.poll() is None, k.communicate()[1]
            assert time.monotonic() < deadline, "the hanging worker never started a trial"
            time.sleep(0.3)
        assert len(running) == 1
        killed = running[0]
        time.sleep(1.0)
        k.send_signal(signal.SIGKILL)
        k.communicate(timeout=30)
        killed_at = time.monotonic()

        study = _load(storage, name)
        by_worker = [t for t in study.trials if t.number != killed.number and t.state.is_finished()]
        assert len(by_worker) == 4  # the two workers' trials add up
        numbers = [t.number for t in study.trials]
        assert len(numbers) == len(set(numbers))
        assert study.trials[killed.number].state == TrialState.RUNNING  # nobody failed it yet

        # Another worker: after the grace period the dead trial is failed and retried, first thing.
        time.sleep(max(0.0, 3.5 - (time.monotonic() - killed_at)))
        rc, out, err = _wait(_spawn(_worker_args(storage, name, 1, *HEARTBEAT), tmp_path))
        assert rc == 0, err

        study = _load(storage, name)
        assert study.trials[killed.number].state == TrialState.FAIL
        retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
        assert len(retries) == 1, [(t.number, t.state, t.system_attrs) for t in study.trials]
        retry = retries[0]
        assert retry.params == killed.params
        assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
        assert optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(retry) == [killed.number]
        numbers = [t.number for t in study.trials]
        assert len(numbers) == len(set(numbers))
        assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))

        # The study is usable: plans and report from it.
        out = tmp_path / "out"
        assert main(["report", str(out), "--storage", storage, "--study", name]) == 0
        report = json.loads((out / "report" / "report.json").read_text())
        assert report["budgets"][0]["met"] is True
        assert (out / "plans" / "2x" / "plan.json").is_file()
    finally:
        for process in [p for p in locals().values() if isinstance(p, subprocess.Popen)]:
            if process.poll() is None:
                process.kill()
                process.communicate()
        try:
            optuna.delete_study(study_name=name, storage=open_storage(storage))
        except Exception:  # noqa: BLE001 - the study may not exist if creating it failed
            pass
