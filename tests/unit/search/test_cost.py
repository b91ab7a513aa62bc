"""Tests of the roofline cost model (accelkit/search/cost.py)."""

from __future__ import annotations

import pytest
import torch

from accelkit.capture import capture
from accelkit.errors import InputError
from accelkit.passes.base import Program, run_passes
from accelkit.passes.cache import CacheConfig
from accelkit.search.cost import DEVICES, device_spec, module_cost, module_flops, program_cost
from tests.fixtures.tiny_models import tiny_denoiser

STEPS = 8


@pytest.fixture(scope="module")
def flux_graph():
    model, kwargs = tiny_denoiser("flux")
    return capture(model, kwargs)


@pytest.fixture(scope="module")
def cache_program(flux_graph):
    base = Program.from_graph(flux_graph, STEPS)
    program, _ = run_passes(base, [CacheConfig(full_fraction=0.5, schedule="uniform", first_blocks=1,
                                               last_blocks=1)])
    assert "cached" in program.variants
    assert program.schedule.count("cached") >= 2
    return program


@pytest.mark.parametrize("target", sorted(DEVICES))
def test_cache_program_costs_less_than_baseline(flux_graph, cache_program, target):
    spec = device_spec(target)
    base = Program.from_graph(flux_graph, STEPS)
    base_cost = program_cost(base, spec)
    cached_cost = program_cost(cache_program, spec)
    assert base_cost.seconds > 0 and base_cost.flops > 0
    assert cached_cost.seconds < base_cost.seconds
    assert cached_cost.flops < base_cost.flops
    # A cached step computes only the first/last blocks: cheaper than a full step.
    assert cached_cost.per_variant["cached"] < cached_cost.per_variant["full"]


def test_program_cost_is_sum_of_variant_costs_over_schedule(cache_program):
    spec = device_spec("cpu")
    cost = program_cost(cache_program, spec)
    per_variant = {name: module_cost(v.module, spec) for name, v in cache_program.variants.items()}
    assert cost.per_variant == pytest.approx(per_variant)
    hand_seconds = 0.0
    hand_flops = 0.0
    for name in cache_program.schedule:
        hand_seconds += module_cost(cache_program.variants[name].module, spec)
        hand_flops += module_flops(cache_program.variants[name].module)
    assert cost.seconds == pytest.approx(hand_seconds, rel=1e-12)
    assert cost.flops == pytest.approx(hand_flops, rel=1e-12)
    n_full = cache_program.schedule.count("full")
    n_cached = cache_program.schedule.count("cached")
    assert n_full + n_cached == STEPS
    assert cost.seconds == pytest.approx(n_full * per_variant["full"] + n_cached * per_variant["cached"])


def test_baseline_cost_scales_with_steps(flux_graph):
    spec = device_spec("cpu")
    one = program_cost(Program.from_graph(flux_graph, 1), spec)
    many = program_cost(Program.from_graph(flux_graph, 5), spec)
    assert many.seconds == pytest.approx(5 * one.seconds)
    assert many.flops == pytest.approx(5 * one.flops)


@pytest.mark.parametrize("name", ["tpu", "", "H100", "cuda"])
def test_unknown_cost_target_is_input_error(name):
    with pytest.raises(InputError, match="unknown cost target"):
        device_spec(name)


def _export(module: torch.nn.Module, *args: torch.Tensor) -> torch.fx.GraphModule:
    return torch.export.export(module, args).module()


class _OnlyViews(torch.nn.Module):
    def forward(self, x):
        y = x.reshape(256, 4096).view(64, 4, 4096)
        return y.permute(2, 0, 1).unsqueeze(0).transpose(1, 2)


class _OneAdd(torch.nn.Module):
    def forward(self, x):
        return x + 1.0


def test_view_ops_cost_nothing():
    x = torch.randn(1024, 1024)  # 4 MiB: moving it would cost far more than a launch
    spec = device_spec("cpu")
    views = _export(_OnlyViews(), x)
    calls = [n for n in views.graph.nodes if n.op == "call_function"]
    assert calls, "the exported graph should contain the reshape/permute nodes"
    cost = module_cost(views, spec)
    assert cost <= len(calls) * spec.launch_overhead + 1e-12
    # Sanity: one elementwise op over the same tensor pays for its bytes.
    add_cost = module_cost(_export(_OneAdd(), x), spec)
    assert add_cost >= 2 * x.numel() * 4 / spec.bandwidth
    assert cost < add_cost / 10
