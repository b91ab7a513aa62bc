"""The executor reports every call's written states to an observer (accelkit/runtime/executor.py)."""

from __future__ import annotations

import torch

from accelkit.capture import capture
from accelkit.passes.base import Program, run_passes
from accelkit.passes.cache import CacheConfig
from accelkit.runtime.executor import ProgramExecutor
from tests.fixtures.tiny_models import tiny_denoiser


def test_observer_sees_each_step_and_the_states_its_variant_wrote():
    model, kwargs = tiny_denoiser("dit")
    config = CacheConfig(full_fraction=0.5, schedule="uniform")
    program, _ = run_passes(Program.from_graph(capture(model, kwargs), 4), [config], None)
    records = []
    executor = ProgramExecutor(program, observer=lambda *record: records.append(record))
    for branch in (0, 1):
        for step in range(program.num_steps):
            executor.run(step, branch, kwargs, False)
    assert [(s, b) for s, b, _ in records] == [(s, b) for b in (0, 1) for s in range(4)]
    for step, _, states in records:
        variant = program.variants[program.schedule[step]]
        assert set(states) == set(variant.state_outputs)
        assert all(isinstance(v, torch.Tensor) for v in states.values())
    assert any(records[i][2] for i in range(4))  # full steps write the cache state: the check is not vacuous


def test_without_observer_nothing_is_kept():
    model, kwargs = tiny_denoiser("dit")
    executor = ProgramExecutor(Program.from_graph(capture(model, kwargs), 2))
    executor.run(0, 0, kwargs, False)
    assert not hasattr(executor, "state_log")
