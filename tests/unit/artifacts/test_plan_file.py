"""The typed plan record (accelkit/artifacts/plan_file.py) and the signal helpers (accelkit/_signals.py)."""

from __future__ import annotations

import os
import signal

import pytest

from accelkit._signals import deferred_interrupts, last_signal, terminate_as_interrupt
from accelkit.artifacts.plan_file import PLAN_SCHEMA, parse_plan, seal_plan
from accelkit.errors import Interrupted, PlanMismatchError


def _plan(**change):
    data = {"schema": PLAN_SCHEMA, "budget": "2x", "model": {"id": "zoo:shapes", "weights_hash": "ab", "family": "F"},
            "scheduler": {"class": "FlowMatchEulerDiscreteScheduler"},
            "generation": {"height": 8, "width": 8, "guidance_scale": 3.0, "probe_prompt": "a photo"},
            "baseline_steps": 4, "num_steps": 2, "passes": {"steps": {"version": 1}}, "weights_file": None,
            "files": {}}
    return {**data, **change}


def test_parse_plan_gives_typed_checked_fields(tmp_path):
    plan = parse_plan(seal_plan(tmp_path, _plan()), tmp_path / "plan.json")
    assert plan.schema == PLAN_SCHEMA and plan.budget == "2x" and plan.model.weights_hash == "ab"
    assert plan.generation.height == 8 and plan.generation.guidance_scale == 3.0
    assert plan.scheduler_class == "FlowMatchEulerDiscreteScheduler" and plan.files == {} and plan.weights == {}


def test_parse_plan_keeps_a_pipelines_none_guidance(tmp_path):
    # Qwen-Image's own default is guidance_scale=None (it guides with true_cfg_scale)
    plan = _plan(generation={"height": 8, "width": 8, "guidance_scale": None})
    assert parse_plan(seal_plan(tmp_path, plan), tmp_path / "plan.json").generation.guidance_scale is None


@pytest.mark.parametrize(("change", "words"), [
    ({"generation": {"height": 8, "width": 8, "guidance_scale": float("nan")}}, "guidance_scale"),
    ({"generation": {"height": "8", "width": 8, "guidance_scale": 1.0}}, "generation.height"),
    ({"baseline_steps": 0}, "baseline_steps"),
    ({"passes": []}, "passes"),
    ({"files": None}, "no files section"),
    ({"weights_file": "w.safetensors"}, "has no sha256"),
    ({"model": {"id": "zoo:shapes", "weights_hash": ""}}, "no model weights hash"),
])
def test_parse_plan_refuses_wrong_shapes(tmp_path, change, words):
    with pytest.raises(PlanMismatchError, match=words):
        parse_plan(_plan(**change), tmp_path / "plan.json")


def test_deferred_interrupts_hold_the_first_signal_and_abort_on_the_second(capsys):
    with deferred_interrupts("finishing") as deferred:
        os.kill(os.getpid(), signal.SIGINT)
        assert deferred.signum == signal.SIGINT  # held: the block goes on
    assert "finishing; send the signal again" in capsys.readouterr().err
    with pytest.raises(Interrupted), deferred_interrupts("finishing"):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    assert last_signal() == signal.SIGTERM


def test_sigterm_raises_interrupted_like_ctrl_c():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as info, terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
    assert isinstance(info.value, Interrupted) and info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
