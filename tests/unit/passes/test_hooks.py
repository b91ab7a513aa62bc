"""The hooks the built-in passes register (accelkit/passes/hooks.py) and the variant roles they declare."""

from __future__ import annotations

import dataclasses
import functools

import pytest

from accelkit.capture.graph import capture
from accelkit.errors import InputError
from accelkit.passes.base import Program, registered_passes, run_passes
from accelkit.passes.cache import CacheConfig, cache
from accelkit.passes.hooks import DENSE, WRITES_CACHE_STATE, ProbeContext, SeedRequest
from accelkit.search.cost import device_spec, program_cost
from tests.fixtures.tiny_models import tiny_denoiser


@functools.cache
def _program(steps: int = 6) -> Program:
    model, kwargs = tiny_denoiser("dit")
    return Program.from_graph(capture(model, kwargs), steps)


def _with_leading(variant_roles: frozenset[str], name: str = "other_form") -> Program:
    program = _program()
    full = program.variants["full"]
    other = dataclasses.replace(full, roles=variant_roles)
    return program.replace(variants={"full": full, name: other}, schedule=(name,) * 2 + ("full",) * 4)


def test_cache_keeps_leading_dense_variants_full_by_their_role_not_their_name():
    config = CacheConfig(full_fraction=0.5, schedule="uniform")
    result = cache(_with_leading(frozenset({DENSE})), config, None)
    assert result.program.schedule[:2] == ("other_form", "other_form") and "cached" in result.program.schedule
    writers = [n for n, v in result.program.variants.items() if WRITES_CACHE_STATE in v.roles]
    assert sorted(writers) == ["full", "other_form"]
    assert DENSE in result.program.variants["other_form"].roles  # roles survive the rewrite
    with pytest.raises(InputError, match="can cache only 'full' steps"):
        cache(_with_leading(frozenset()), config, None)  # the same variant without the role


def test_every_builtin_pass_describes_itself_and_the_order_comes_from_constraints():
    passes = registered_passes()
    assert tuple(passes) == ("steps", "prune", "quant", "sparse", "cache")
    assert all(entry.hooks.describe is not None for entry in passes.values())


def test_cache_ablation_hook_proposes_the_uniform_schedule_with_as_many_full_steps():
    resolved = CacheConfig(schedule="dp", full_step_mask=(0, 2, 5)).to_dict()
    ablations = registered_passes()["cache"].hooks.ablations(resolved, {"span_blocks": [1, 3], "num_steps": 6})
    uniform = ablations["uniform_cache"]
    assert uniform.config["schedule"] == "uniform" and uniform.config["full_step_mask"] is None
    assert uniform.config["full_fraction"] == pytest.approx(0.5) and uniform.info == {"full_steps": 3}
    assert CacheConfig.from_dict(uniform.config).full_steps(6) == 3
    assert registered_passes()["cache"].hooks.ablations(resolved, {"num_steps": 6}) == {}  # cache did nothing


def test_quant_precision_hook_claims_fp8_only_for_w4a8():
    precision = registered_passes()["quant"].hooks.precision
    assert precision({"act_mode": "w4a8"}).fp8 and precision({"act_mode": "w4a8"}).int4_weights
    assert not precision({"act_mode": "w4a16"}).fp8


def test_cache_probe_measures_the_cached_step_cost_and_its_seeds_use_it():
    program = _program()
    spec = device_spec("cpu")
    context = ProbeContext(base=program, calib=None, cost=lambda p: program_cost(p, spec).seconds,
                           num_steps=program.num_steps, targets=(2.0,))
    hooks = registered_passes()["cache"].hooks
    facts = hooks.probe(context)
    uniform, _ = run_passes(program, [CacheConfig(full_fraction=0.5, schedule="uniform")])
    per_step = program_cost(program, spec).seconds / 6
    full, cached = 3, 3  # full_fraction 0.5 of 6 steps
    # Full steps counted at the baseline's cost; what the uniform program costs beyond them is the cached steps'.
    assert facts["cached_cost"] == pytest.approx((program_cost(uniform, spec).seconds / per_step - full) / cached)
    # ... close to the cached variant's own share (the full steps also pay for writing the cache state).
    cached_share = program_cost(uniform, spec).per_variant["cached"] / per_step
    assert 0.01 < facts["cached_cost"] < 0.95 and facts["cached_cost"] == pytest.approx(cached_share, abs=0.05)
    cheap, dear = (hooks.seeds(SeedRequest(2.0, 28, {"cached_cost": c}))[0].params["full_fraction"]
                   for c in (0.1, 0.4))
    assert cheap > dear  # a cheaper cached step leaves room for more full steps


def test_steps_shares_and_cache_complete_split_a_budget():
    steps, cache_hooks = registered_passes()["steps"].hooks, registered_passes()["cache"].hooks
    share = next(iter(steps.shares(SeedRequest(3.0, 28))))
    rest = cache_hooks.complete(SeedRequest(3.0 / share.speedup, share.num_steps, {"cached_cost": 0.2}))
    count = share.num_steps
    full = round(rest["full_fraction"] * count)
    assert 2 <= full < count and 28 / (full + (count - full) * 0.2) >= 3.0 * 0.98
