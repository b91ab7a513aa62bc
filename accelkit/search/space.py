"""Turn the passes' declared search spaces into Optuna suggestions (the only place that does)."""

from __future__ import annotations

import math
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


#: Speedups within this share below a budget count as meeting it (as ``optimize`` judges plans).
BUDGET_TOLERANCE = 0.02


def fewer_steps_for(num_steps: int, target: float) -> int | None:
    """The most sampler steps (of ``num_steps``) that alone meet ``target``; None when 2 steps do not.

    Cost is linear in the step count, so ``n`` steps are ``num_steps / n`` times faster.
    """
    count = min(num_steps, math.floor(num_steps / (target * (1 - BUDGET_TOLERANCE)) + 1e-9))
    return count if count >= 2 else None


def default_trials(pass_names: Sequence[str], targets: Sequence[float], *, num_steps: int | None = None,
                   placements: Sequence[str] = ("default", "equalized"), cached_cost: float = 0.2
                   ) -> list[dict[str, Any]]:
    """Seed parameters, guaranteed candidates first, so any ``len(targets)`` trials meet every budget.

    In order: per budget, fewer steps alone at the default spacing (the most steps that meet it);
    per budget, the same step count at each other placement; per budget, fewer steps and the cache
    sharing the speedup (full-step count chosen so the budget is met with a cached step costing
    ``cached_cost`` of a full one); then the cache alone. Without ``num_steps`` the step share is
    ``1 / target`` (it may miss a budget by rounding).
    """
    has_steps, has_cache = "steps" in pass_names, "cache" in pass_names
    waves: list[list[dict[str, Any]]] = [[], [], [], []]
    for target in targets:
        steps_share = _steps_share(num_steps, target)
        if has_steps and steps_share is not None:
            for wave, placement in enumerate(placements[:2]):
                waves[wave].append({"steps.fraction": steps_share, "steps.placement": placement, "steps.blend": 1.0,
                                    **({"cache.full_fraction": 1.0} if has_cache else {})})
        if has_steps and has_cache and target > 1.5:
            split = _split(num_steps, target, cached_cost)
            if split is not None:
                steps_fraction, full_share = split
                waves[2].append({"steps.fraction": steps_fraction, "steps.placement": "default", "steps.blend": 1.0,
                                 "cache.full_fraction": full_share, "cache.first_blocks": 1,
                                 "cache.last_blocks": 0, "cache.approximation": "taylor", "cache.schedule": "dp",
                                 "cache.prior": "residual", "cache.weighting": "quadratic", "cache.warmup": 0})
        if has_cache:
            seed = {"cache.full_fraction": cache_fraction_for(target, cached_cost), "cache.first_blocks": 1,
                    "cache.last_blocks": 0, "cache.approximation": "residual", "cache.schedule": "dp",
                    "cache.prior": "residual", "cache.weighting": "quadratic", "cache.warmup": 1}
            if has_steps:
                seed.update({"steps.fraction": 1.0, "steps.placement": "default", "steps.blend": 1.0})
            waves[3].append(seed)
    return [clamp_to_spaces(with_noop_defaults(seed, pass_names), pass_names) for wave in waves for seed in wave]


def _steps_share(num_steps: int | None, target: float) -> float | None:
    if num_steps is None:
        return min(1.0, 1.0 / target)
    count = fewer_steps_for(num_steps, target)
    return None if count is None else count / num_steps


def _split(num_steps: int | None, target: float, cached_cost: float) -> tuple[float, float] | None:
    """(steps share, full-step share) meeting ``target`` with the speedup shared about evenly."""
    if num_steps is None:
        share = target ** 0.5
        return min(1.0, 1.0 / share), cache_fraction_for(share, cached_cost)
    needed = num_steps / (target * (1 - BUDGET_TOLERANCE))  # full-step equivalents allowed
    low = fewer_steps_for(num_steps, target) or 2
    for count in range(min(num_steps, round(num_steps / target ** 0.5)), low, -1):
        # F full + (count - F) cached steps: F + (count - F) * c <= needed.
        full = math.floor((needed - count * cached_cost) / (1 - cached_cost) + 1e-9)
        # The cache pass rounds full_fraction * count and the space floors the share at 0.15.
        if full >= max(2, math.ceil(0.15 * count)) and full < count:
            return count / num_steps, full / count
    return None


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
