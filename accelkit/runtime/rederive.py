"""Re-derive a plan's step-dependent settings for another number of denoising steps, without calibration.

A plan's schedules were chosen for its own step count ``T``. What they were chosen from is stored with
them: the cache pass's error prior e(t, k) (or its end-to-end gap costs) in
``CacheConfig.schedule_prior``, the step placement as the plan's own sigmas. For ``N`` steps each is
read as a function of normalized time ``u = t / (T - 1)`` and resampled at ``t' / (N - 1)``; the cache
DP then runs again on the resampled prior with the same full-step share, weighting and warm-up. All of
it is numpy on arrays of a few hundred values: milliseconds.

The fidelity a plan reports was measured at ``T`` steps only; nothing here measures it at ``N``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from accelkit.errors import InputError
from accelkit.passes import _cache_schedule as schedules
from accelkit.passes.base import PassConfig

__all__ = [
    "cache_mask_for_steps",
    "interpolate_gap_costs",
    "interpolate_prior",
    "interpolate_sigmas",
    "rescale_step_configs",
]


def _to_new_grid(num_steps: int, plan_steps: int) -> float:
    """Old step indices per new step index (both grids span normalized time [0, 1])."""
    return (plan_steps - 1) / max(num_steps - 1, 1)


def _column_at(prior: np.ndarray, row: float, column: int) -> float:
    """e(row, column) linear in the row; rows before ``column`` are undefined (t - k < 0) and clamped."""
    last = prior.shape[0] - 1
    row = min(max(row, float(column)), float(last))
    low = int(np.floor(row))
    high = min(low + 1, last)
    weight = row - low
    return float((1 - weight) * prior[low, column] + weight * prior[high, column])


def _prior_value(prior: np.ndarray, row: float, lag: float) -> float:
    """e at fractional step ``row`` and fractional interval ``lag`` (both in the plan's step units).

    Between profiled intervals the error is linear in the lag; below one step it falls linearly to 0
    (no interval, no error); beyond the last profiled interval it grows linearly, as the DP assumes.
    """
    profiled = prior.shape[1] - 1
    if lag <= 1.0:
        return lag * _column_at(prior, row, 1)
    if lag > profiled:
        return _column_at(prior, row, profiled) * lag / profiled
    low = int(np.floor(lag))
    weight = lag - low
    if weight == 0.0:
        return _column_at(prior, row, low)
    return (1 - weight) * _column_at(prior, row, low) + weight * _column_at(prior, row, low + 1)


def interpolate_prior(prior: np.ndarray, num_steps: int) -> np.ndarray:
    """The error prior e(t, k) of a ``(T, K + 1)`` profile resampled for ``num_steps`` steps.

    Returns:
        A ``(num_steps, K' + 1)`` array with ``K' = min(num_steps - 1, K)``; column 0 and entries with
        ``t - k < 0`` are 0, as the profiler leaves them.
    """
    prior = np.asarray(prior, dtype=np.float64)
    plan_steps, columns = prior.shape
    if plan_steps < 2 or columns < 2:
        raise InputError(f"a cache prior of shape {prior.shape} cannot be resampled to another step count")
    scale = _to_new_grid(num_steps, plan_steps)
    intervals = min(num_steps - 1, columns - 1)
    resampled = np.zeros((num_steps, intervals + 1))
    for t in range(num_steps):
        for k in range(1, min(intervals, t) + 1):
            resampled[t, k] = _prior_value(prior, t * scale, k * scale)
    return resampled


def interpolate_gap_costs(costs: np.ndarray, num_steps: int) -> np.ndarray:
    """A ``(T, T)`` end-to-end gap cost matrix (negative = forbidden) resampled to ``num_steps``.

    Bilinear over the normalized positions of both full steps; a gap any of whose neighbouring plan
    gaps is forbidden stays forbidden (``inf``); gaps of one step cost 0.
    """
    costs = np.asarray(costs, dtype=np.float64)
    plan_steps = costs.shape[0]
    scale = _to_new_grid(num_steps, plan_steps)
    finite = np.where(costs < 0, np.inf, costs)
    resampled = np.full((num_steps, num_steps), np.inf)
    for a in range(num_steps):
        if a + 1 < num_steps:
            resampled[a, a + 1] = 0.0
        for b in range(a + 2, num_steps):
            x, y = a * scale, b * scale
            x0, y0 = int(np.floor(x)), int(np.floor(y))
            x1, y1 = min(x0 + 1, plan_steps - 1), min(y0 + 1, plan_steps - 1)
            wx, wy = x - x0, y - y0
            corners = np.array([finite[x0, y0], finite[x0, y1], finite[x1, y0], finite[x1, y1]])
            weights = np.array([(1 - wx) * (1 - wy), (1 - wx) * wy, wx * (1 - wy), wx * wy])
            used = weights > 0
            # Corners on or below the diagonal are gaps of < 1 plan step: cost 0.
            below = np.array([y0 <= x0, y1 <= x0, y0 <= x1, y1 <= x1])
            corners = np.where(below, 0.0, corners)
            if np.isinf(corners[used]).any():
                continue
            resampled[a, b] = float((corners[used] * weights[used]).sum())
    return resampled


def interpolate_sigmas(sigmas: Sequence[float], num_steps: int) -> tuple[float, ...]:
    """The plan's step placement (sigma against normalized step index) resampled at ``num_steps`` points.

    The first and last sigma stay where they are; values in between keep the placement's density,
    so an equalized placement stays equalized to the extent its density is smooth.
    """
    values = np.asarray(sigmas, dtype=np.float64)
    if num_steps == 1:
        return (float(values[0]),)
    if values.size == 1:
        raise InputError(f"a one-step plan's sigma cannot be spread over {num_steps} steps")
    old = np.linspace(0.0, 1.0, values.size)
    new = np.linspace(0.0, 1.0, num_steps)
    resampled = np.interp(new, old, values)
    # The scheduler takes float32 sigmas and needs them strictly decreasing.
    resampled = resampled.astype(np.float32).astype(np.float64)
    if not np.all(np.diff(resampled) < 0):
        raise InputError(f"cannot place {num_steps} distinct sigmas in the plan's range; use fewer steps")
    return tuple(float(v) for v in resampled)


def cache_mask_for_steps(config: PassConfig, plan_steps: int, num_steps: int, forced: int) -> tuple[int, ...]:
    """The full steps of a resolved cache config for ``num_steps`` steps.

    Keeps the plan's share of full steps; a DP schedule is re-solved on the resampled prior, a uniform
    one (or a DP one from a plan that stored no prior) is spread evenly.

    Args:
        config: the plan's resolved :class:`accelkit.passes.cache.CacheConfig`.
        plan_steps: the step count the plan's schedule was chosen for.
        num_steps: the step count to derive a schedule for.
        forced: leading steps that must stay full (another pass's dense steps).
    """
    plan_full = config.full_steps(plan_steps)  # the mask's length when the config is resolved
    full_steps = min(num_steps, max(2 if num_steps > 1 else 1, round(plan_full / plan_steps * num_steps)))
    warmup = max(config.warmup, forced)
    if full_steps >= num_steps:
        return tuple(range(num_steps))
    from accelkit.passes.cache import _apply_weighting as apply_weighting

    stored = config.schedule_prior
    try:
        if config.schedule == "dp" and stored is not None and config.prior == "end_to_end":
            costs = interpolate_gap_costs(np.asarray(stored), num_steps)
            weighted = apply_weighting(costs, config.weighting)
            mask = schedules.dp_schedule_from_costs(weighted, full_steps, warmup=warmup)
        elif config.schedule == "dp" and stored is not None:
            prior = interpolate_prior(np.asarray(stored), num_steps)
            mask = schedules.dp_schedule(prior, full_steps, weighting=config.weighting,
                                         max_gap=config.max_gap, warmup=warmup)
        else:
            mask = schedules.uniform_schedule(num_steps, full_steps)
            mask[:warmup] = True
    except ValueError as error:
        raise InputError(f"cannot derive a cache schedule for {num_steps} steps: {error}") from None
    return tuple(int(i) for i in np.flatnonzero(mask))


def rescale_step_configs(
    configs: Sequence[PassConfig], plan_steps: int, num_steps: int
) -> tuple[list[PassConfig], PassConfig | None]:
    """The configs of a plan made for ``plan_steps`` steps, adapted to run ``num_steps`` steps.

    The ``steps`` pass runs ``num_steps`` (its sigmas resampled), sparse dense steps keep their share.
    The cache config comes back separately: its mask depends on the program the other passes make
    (their leading dense steps), so the caller derives it with :func:`cache_mask_for_steps` after them.

    Returns:
        (the configs other than cache, the plan's cache config or None).
    """
    from accelkit.passes.cache import CacheConfig
    from accelkit.passes.sparse import SparseConfig
    from accelkit.passes.steps import StepsConfig

    adapted: list[PassConfig] = []
    cache_config = None
    for config in configs:
        if isinstance(config, CacheConfig):
            cache_config = config
        elif isinstance(config, StepsConfig):
            sigmas = None if config.sigmas is None else interpolate_sigmas(config.sigmas, num_steps)
            adapted.append(dataclasses.replace(config, num_steps=num_steps, sigmas=sigmas))
        elif isinstance(config, SparseConfig) and config.dense_steps:
            dense = max(1, round(config.dense_steps / plan_steps * num_steps))
            adapted.append(dataclasses.replace(config, dense_steps=min(dense, num_steps - 1)))
        else:
            adapted.append(config)
    return adapted, cache_config
