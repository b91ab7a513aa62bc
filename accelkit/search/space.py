"""Turn the passes' declared search spaces into Optuna suggestions (the only place that does)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from accelkit.passes.base import Choice, FloatRange, IntRange, PassConfig, registered_passes


def suggest_configs(trial: Any, pass_names: Sequence[str], fixed: Mapping[str, Mapping[str, Any]] | None = None
                    ) -> list[PassConfig]:
    """Sample one config per pass from its ``SEARCH_SPACE``; parameters are named ``<pass>.<field>``.

    Args:
        trial: an ``optuna.Trial``.
        pass_names: the passes to configure, in canonical order.
        fixed: per pass, field values that override the search (not sampled).
    """
    passes = registered_passes()
    configs: list[PassConfig] = []
    for name in pass_names:
        config_type = passes[name].config_type
        values: dict[str, Any] = {}
        for field, domain in config_type.SEARCH_SPACE.items():
            key = f"{name}.{field}"
            if fixed and field in fixed.get(name, {}):
                values[field] = fixed[name][field]
            elif isinstance(domain, IntRange):
                values[field] = trial.suggest_int(key, domain.low, domain.high, step=domain.step, log=domain.log)
            elif isinstance(domain, FloatRange):
                values[field] = trial.suggest_float(key, domain.low, domain.high, log=domain.log)
            elif isinstance(domain, Choice):
                values[field] = trial.suggest_categorical(key, list(domain.options))
            else:
                raise TypeError(f"{name}.{field}: unsupported search domain {domain!r}")
        configs.append(config_type(**values))
    return configs


def default_trials(pass_names: Sequence[str], targets: Sequence[float]) -> list[dict[str, Any]]:
    """Seed parameters per budget, so a handful of trials already gives usable plans.

    For each target speedup: the step count alone, the cache alone, and both sharing the speedup.
    """
    seeds: list[dict[str, Any]] = []
    has_steps, has_cache = "steps" in pass_names, "cache" in pass_names
    for target in targets:
        if has_steps:
            # Both spacings: equal-local-error placement won by 4-6 dB on the zoo model (BENCHMARKS.md).
            for placement in ("default", "equalized"):
                seeds.append({"steps.fraction": min(1.0, 1.0 / target), "steps.placement": placement,
                              "steps.blend": 1.0, **({"cache.full_fraction": 1.0} if has_cache else {})})
        if has_cache:
            seed = {"cache.full_fraction": cache_fraction_for(target), "cache.first_blocks": 1,
                    "cache.last_blocks": 0, "cache.approximation": "residual", "cache.schedule": "dp",
                    "cache.prior": "residual", "cache.weighting": "quadratic", "cache.warmup": 1}
            if has_steps:
                seed.update({"steps.fraction": 1.0, "steps.placement": "default", "steps.blend": 1.0})
            seeds.append(seed)
        if has_steps and has_cache and target > 1.5:
            share = target ** 0.5
            seeds.append({"steps.fraction": min(1.0, 1.0 / share), "steps.placement": "default", "steps.blend": 1.0,
                          "cache.full_fraction": cache_fraction_for(share), "cache.first_blocks": 1,
                          "cache.last_blocks": 0, "cache.approximation": "taylor", "cache.schedule": "uniform",
                          "cache.prior": "residual", "cache.weighting": "quadratic", "cache.warmup": 0})
    return [clamp_to_spaces(with_noop_defaults(seed, pass_names), pass_names) for seed in seeds]


def with_noop_defaults(params: dict[str, Any], pass_names: Sequence[str]) -> dict[str, Any]:
    """``params`` completed with each pass's default value for every searched field it leaves out.

    Every pass's default config is its no-op, so a seed that names only steps and cache runs the other
    passes as no-ops instead of leaving their fields to the sampler: with all five passes, randomly
    sampled pruning and quantization had spoiled every seed (a 2x search chose an 18.8 dB plan where
    fewer steps gave 38.9 dB).
    """
    passes = registered_passes()
    completed = dict(params)
    for name in pass_names:
        if name not in passes:
            continue
        config_type = passes[name].config_type
        default = config_type()
        for field in config_type.SEARCH_SPACE:
            completed.setdefault(f"{name}.{field}", getattr(default, field))
    return completed


def cache_fraction_for(target: float, cached_cost: float = 0.2) -> float:
    """Full-step share meeting ``target`` when a cached step costs ``cached_cost`` of a full one.

    A cached step still runs the blocks outside the span (and the embedders), about a fifth of a full
    step on the zoo model; the search corrects the guess.
    """
    return max(0.15, min(1.0, (1.0 / target - cached_cost) / (1.0 - cached_cost)))


def clamp_to_spaces(params: dict[str, Any], pass_names: Sequence[str]) -> dict[str, Any]:
    """Clamp seeded values into their passes' declared ranges (Optuna rejects values outside them)."""
    passes = registered_passes()
    clamped = dict(params)
    for key, value in params.items():
        name, _, field = key.partition(".")
        if name not in pass_names or name not in passes:
            clamped.pop(key)
            continue
        domain = passes[name].config_type.SEARCH_SPACE.get(field)
        if isinstance(domain, IntRange | FloatRange):
            clamped[key] = type(value)(min(domain.high, max(domain.low, value)))
    return clamped
