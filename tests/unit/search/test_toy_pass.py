"""Adding a pass is one file plus its test: a toy pass registered here, with an order constraint and
hooks, is ordered, parsed, seeded, searched and described without any accelkit file naming it."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import optuna
import pytest

from accelkit.capture.graph import capture
from accelkit.passes import base
from accelkit.passes.base import FloatRange, PassConfig, PassResult, Program, pass_order, register_pass
from accelkit.passes.hooks import Ablation, PassHooks, Seed, SeedRequest
from accelkit.passes.steps import StepsConfig
from accelkit.search.optimize import _plan_ablations, describe_plan, parse_passes
from accelkit.search.space import default_trials, suggest_configs
from tests.fixtures.tiny_models import tiny_denoiser


@dataclass(frozen=True, kw_only=True)
class ToyConfig(PassConfig):
    """Claims a speedup it records in its stats (the graph is left alone).

    Args:
        strength: 0 is the no-op.
    """

    strength: float = 0.0
    SEARCH_SPACE: ClassVar = {"strength": FloatRange(0.0, 0.8)}


def toy(program: Program, config: ToyConfig, calib: Any) -> PassResult:
    return PassResult(program, modified=False, stats={"strength": config.strength})


def _describe(resolved: Mapping[str, Any], stats: Mapping[str, Any]) -> str | None:
    return f"toy at strength {stats['strength']:.2f}" if stats["strength"] else None


def _seeds(request: SeedRequest) -> list[Seed]:
    return [Seed({"strength": min(0.8, 1 - 1 / request.target)}, priority=0)]


def _ablations(resolved: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Ablation]:
    return {"toy_half": Ablation({**resolved, "strength": resolved["strength"] / 2}, "same plan, half the toy")}


@pytest.fixture
def toy_pass():
    """Register 'toy' between quant and sparse from this test module; restore the registry after."""
    base.registered_passes()
    saved = dict(base._REGISTRY), dict(base._BY_NAME), set(base._ORDER_EDGES)
    register_pass(ToyConfig, name="toy", after=("quant",), before=("sparse",),
                  hooks=PassHooks(describe=_describe, seeds=_seeds, ablations=_ablations))(toy)
    try:
        yield
    finally:
        for registry, snapshot in zip((base._REGISTRY, base._BY_NAME, base._ORDER_EDGES), saved, strict=True):
            registry.clear()
            registry.update(snapshot)


@functools.cache
def _program() -> Program:
    model, kwargs = tiny_denoiser("dit")
    return Program.from_graph(capture(model, kwargs), 4)


def test_the_toy_pass_takes_its_declared_place_in_the_order(toy_pass):
    assert pass_order() == ("steps", "prune", "quant", "toy", "sparse", "cache")
    assert base.PASS_ORDER == pass_order()  # the derived constant
    assert parse_passes("cache,toy,steps") == ("steps", "toy", "cache")


def test_the_toy_pass_is_seeded_searched_and_described(toy_pass):
    names = ("steps", "toy")
    seeds = default_trials(names, (2.0,), num_steps=4)
    toy_seeds = [s for s in seeds if s["toy.strength"] != 0.0]
    assert toy_seeds and toy_seeds[0]["toy.strength"] == pytest.approx(0.5)
    assert all(set(s) == {"steps.fraction", "steps.placement", "steps.blend", "toy.strength"} for s in seeds)
    # The seed is enqueued and searched like any trial: the sampled configs run through the passes.
    study = optuna.create_study(directions=["minimize", "maximize"])
    study.enqueue_trial(toy_seeds[0])
    trial = study.ask()
    configs = suggest_configs(trial, names)
    assert [type(c) for c in configs] == [StepsConfig, ToyConfig] and configs[1].strength == pytest.approx(0.5)
    program, _ = base.run_passes(_program(), configs)
    assert program.applied == names and describe_plan(program) == "toy at strength 0.50"
    ablation = _plan_ablations(program)["toy_half"]
    assert ablation.config["strength"] == pytest.approx(0.25)


def test_a_pass_out_of_its_declared_order_is_refused(toy_pass):
    from accelkit.errors import InputError
    from accelkit.passes.quant import QuantConfig

    with pytest.raises(InputError, match="out of order"):
        base.run_passes(_program(), [ToyConfig(strength=0.1), QuantConfig()])


def test_the_registry_forgets_the_toy_pass_after_the_fixture():
    assert "toy" not in pass_order()
