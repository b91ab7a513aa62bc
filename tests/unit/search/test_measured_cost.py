"""Measured latency as the cost: every scheduled variant is timed, cached steps cost less."""

from __future__ import annotations

from accelkit.capture import capture
from accelkit.passes.base import Program, run_passes
from accelkit.passes.cache import CacheConfig
from accelkit.search.cost import measure_variant_latency, measured_program_cost
from tests.fixtures.tiny_models import tiny_denoiser


def test_measured_cost_times_each_variant_and_sums_the_schedule():
    model, kwargs = tiny_denoiser("flux")
    base = Program.from_graph(capture(model, kwargs), 6)
    cached, _ = run_passes(base, [CacheConfig(full_fraction=0.5, schedule="uniform", approximation="taylor")])
    latency = measure_variant_latency(cached, kwargs, warmup=1, repeats=3)
    assert set(latency) == {"full", "cached"}
    assert all(value > 0 for value in latency.values())
    # The cached variant skips all but the first block; even on a noisy CPU it is clearly cheaper.
    assert latency["cached"] < latency["full"]
    cost = measured_program_cost(cached, kwargs, warmup=1, repeats=3)
    counts = {name: cached.schedule.count(name) for name in ("full", "cached")}
    assert abs(cost.seconds - sum(cost.per_variant[n] * c for n, c in counts.items())) < 1e-12


def test_optimize_with_measured_latency_reports_it(tmp_path):
    import json

    from accelkit.search.optimize import OptimizeSettings, optimize

    settings = OptimizeSettings(model="zoo:shapes", budgets=("1.5x",), passes=("steps",), trials=2, steps=4,
                                num_prompts=1, num_eval_prompts=1, height=8, width=8, cost="latency",
                                out=str(tmp_path / "out"))
    result = optimize(settings)
    assert result.exit_code in (0, 3)  # CPU timings are noisy: meeting 1.5x is not guaranteed
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert report["settings"]["cost_kind"] == "latency"
    assert report["baseline"]["latency_ms"] > 0
    assert report["notes"][0].startswith("Cost: measured denoiser latency")
