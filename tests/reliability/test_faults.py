"""Fault injection: signals, kill -9, two processes on one OUT, a full disk, a trial that raises.

Every case ends with :func:`assert_consistent`: no half-written file, every plan verifies, and the
plans and the report come from one study. The subprocess cases slow a trial or the finish down with
tests/reliability/_runner.py so that the fault lands where it is meant to.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import optuna
import pytest

from accelkit.cli.main import main
from accelkit.runtime.plan import read_plan
from tests.reliability.helpers import cli, one_line_error, optimize_args, spawn, tmpfs, wait_for


def _study(storage: str) -> optuna.Study:
    names = optuna.get_all_study_names(storage)
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


def _local(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def assert_consistent(out: Path) -> None:
    """Nothing half-written; each plan verifies and is a budget of the report."""
    leftovers = [str(p) for p in out.rglob("*") if ".tmp" in p.name or ".stale-" in p.name or p.name.endswith(".old")]
    assert not leftovers, leftovers
    report_file = out / "report" / "report.json"
    report_budgets = None
    if report_file.exists():
        report_budgets = {b["budget"]: b["met"] for b in json.loads(report_file.read_text())["budgets"]}
    for plan_dir in sorted((out / "plans").glob("*")) if (out / "plans").is_dir() else []:
        plan = read_plan(out, plan_dir.name)  # strict: schema, hashes recorded, files inside
        from accelkit.artifacts.plan_file import verify_plan_files

        verify_plan_files(plan.file, plan.path)
        if report_budgets is not None:
            assert plan.budget in report_budgets, (plan.budget, report_budgets)


def _resume_retries_the_first_trial(out: Path, error: str) -> None:
    """Resume with --trials 3: trial 0 (lost) ran again with its parameters and three trials count."""
    assert main(optimize_args(out, trials=3)) in (0, 3)
    trials = _study(_local(out)).get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL and trials[0].user_attrs["error"] == error
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1 and retries[0].state.is_finished(), [(t.number, t.state) for t in trials]
    assert retries[0].params == trials[0].params
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert len([t for t in trials if t.state.is_finished() and t.number != 0]) == 3  # none lost
    assert_consistent(out)


# ------------------------------------------------------------------ a trial that raises (in process)


def test_trial_that_raises_is_recorded_search_continues_exit_4(out_copy, monkeypatch):
    from accelkit.search.optimize import Evaluator

    original, calls = Evaluator.build, {"n": 0}

    def raises_once(self, configs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom from a fault test")
        return original(self, configs)

    monkeypatch.setattr(Evaluator, "build", raises_once)
    assert main(optimize_args(out_copy, trials=4)) == 4
    trials = _study(_local(out_copy)).trials
    assert len(trials) == 4
    assert trials[2].state == optuna.trial.TrialState.FAIL and "boom from a fault test" in trials[2].user_attrs["error"]
    assert trials[3].state != optuna.trial.TrialState.FAIL  # the search went on
    notes = " ".join(json.loads((out_copy / "report" / "report.json").read_text())["notes"])
    assert "boom from a fault test" in notes
    assert_consistent(out_copy)


# ------------------------------------------------------------------ a full disk


def test_disk_full_stubbed_writer_leaves_old_plan_intact(out_copy, monkeypatch, capsys):
    import accelkit._io

    before = (out_copy / "plans" / "2x" / "plan.json").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelkit._io.os, "fsync", full)
    assert main(optimize_args(out_copy)) == 2  # no new trials: finish rewrites the plan and fails
    line = one_line_error(capsys.readouterr().err)
    assert "disk is full" in line
    monkeypatch.undo()
    assert (out_copy / "plans" / "2x" / "plan.json").read_bytes() == before
    assert_consistent(out_copy)


@pytest.mark.slow
def test_disk_full_on_a_small_tmpfs(tmp_path):
    with tmpfs(tmp_path / "small", "48k") as mount:
        out = mount / "out"
        storage = f"sqlite:///{tmp_path / 'study.db'}"  # the study elsewhere: the artifacts fill the disk
        result = cli(*optimize_args(out, "--storage", storage))
        assert result.returncode == 2, result.stderr
        assert "disk is full" in one_line_error(result.stderr)
        assert_consistent(out)


# ------------------------------------------------------------------ signals and kill -9 (subprocesses)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_trial_then_resume_retries_it(tmp_path, signum, code):
    out = tmp_path / "out"
    process = spawn(*optimize_args(out, trials=3), slow_trial=30)
    wait_for(process, "TRIAL-RUNNING")
    process.send_signal(signum)
    _, err = process.communicate(timeout=180)
    assert process.returncode == code, err
    assert "Traceback" not in err
    study = _study(_local(out))
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    assert study.trials[0].user_attrs["error"] == "interrupted"
    assert (out / "report" / "report.json").is_file()  # the finish ran: plans and report agree
    assert_consistent(out)

    _resume_retries_the_first_trial(out, "interrupted")


@pytest.mark.slow
def test_sigint_during_finish_still_writes_plans_and_report(tmp_path):
    out = tmp_path / "out"
    process = spawn(*optimize_args(out, trials=1), slow_finish=5)
    wait_for(process, "FINISHING")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 130, err
    assert "finishing the plans and report first" in err
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["budgets"][0]["budget"] == "2x"
    assert_consistent(out)


@pytest.mark.slow
def test_kill_9_during_trial_then_resume_within_grace_period(tmp_path):
    out = tmp_path / "out"
    process = spawn(*optimize_args(out, trials=3), slow_trial=60)
    wait_for(process, "TRIAL-RUNNING")
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert _study(_local(out)).trials[0].state == optuna.trial.TrialState.RUNNING
    # At once, well within the 30 s grace period: OUT's lock says no one else runs this study.
    _resume_retries_the_first_trial(out, "killed")


@pytest.mark.slow
def test_second_optimize_on_the_same_out_refuses(tmp_path):
    out = tmp_path / "out"
    # One long trial: the second process loads its model and reaches the lock well within it.
    first = spawn(*optimize_args(out, trials=1), slow_trial=20)
    wait_for(first, "TRIAL-RUNNING")
    second = cli(*optimize_args(out, trials=1))
    assert second.returncode == 2
    assert f"--out '{out}' is in use by another accelkit process (pid {first.pid})" in one_line_error(second.stderr)
    _, err = first.communicate(timeout=300)
    assert first.returncode in (0, 3), err
    assert len(_study(_local(out)).trials) == 1
    assert_consistent(out)


# ------------------------------------------------------------------ ownership end to end


@pytest.mark.slow
def test_optimize_out_dot_in_a_project_keeps_its_report_folder(tmp_path):
    project = tmp_path / "project"
    (project / "report").mkdir(parents=True)
    (project / "report" / "thesis.tex").write_text("my thesis")
    result = cli("optimize", "zoo:shapes", "--trials", "1", "--quiet", "--out", ".", cwd=project)
    assert result.returncode == 2
    assert "accelkit did not write" in one_line_error(result.stderr)
    assert sorted(p.name for p in project.rglob("*")) == ["report", "thesis.tex"]
    assert (project / "report" / "thesis.tex").read_text() == "my thesis"


@pytest.mark.slow
def test_other_budgets_refused_then_overwrite_replaces_stale_plans(out_copy, capsys):
    assert main(optimize_args(out_copy, budget="1.5x")) == 2
    assert "--overwrite" in one_line_error(capsys.readouterr().err)
    assert (out_copy / "plans" / "2x").is_dir()
    assert main(optimize_args(out_copy, "--overwrite", budget="1.5x")) in (0, 3)
    assert sorted(p.name for p in (out_copy / "plans").iterdir()) in ([], ["1.5x"])
    report = json.loads((out_copy / "report" / "report.json").read_text())
    assert [b["budget"] for b in report["budgets"]] == ["1.5x"]
    assert_consistent(out_copy)
