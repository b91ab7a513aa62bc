"""Step-dependent settings re-derived for another step count (accelkit/runtime/rederive.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from accelkit.errors import InputError
from accelkit.passes import _cache_schedule as schedules
from accelkit.passes.cache import CacheConfig
from accelkit.passes.sparse import SparseConfig
from accelkit.passes.steps import StepsConfig
from accelkit.runtime.rederive import (
    cache_mask_for_steps,
    interpolate_gap_costs,
    interpolate_prior,
    interpolate_sigmas,
    rescale_step_configs,
)


def _prior(steps: int = 12, intervals: int = 6) -> np.ndarray:
    """A smooth prior: error grows with the interval and is largest early in sampling."""
    t, k = np.indices((steps, intervals + 1)).astype(float)
    prior = k * (1.5 - t / (steps - 1)) * 0.1
    prior[t < k] = 0.0
    prior[:, 0] = 0.0
    return prior


def test_prior_at_its_own_step_count_is_unchanged():
    prior = _prior()
    assert np.array_equal(interpolate_prior(prior, 12), prior)


def test_prior_resampled_keeps_its_shape_in_normalized_time():
    prior = _prior(12, 6)
    finer = interpolate_prior(prior, 23)  # one new step = half an old step
    assert finer.shape == (23, 7)
    # A lag of 2 new steps is 1 old step, at the same normalized time.
    assert finer[22, 2] == pytest.approx(prior[11, 1])
    assert finer[10, 4] == pytest.approx(prior[5, 2])
    assert finer[5, 1] == pytest.approx(0.5 * 0.5 * (prior[2, 1] + prior[3, 1]))  # half a step, mid-row
    coarser = interpolate_prior(prior, 6)
    assert coarser.shape == (6, 6)
    assert coarser[5, 5] == pytest.approx(prior[11, 6] * 11 / 6)  # beyond the profile: linear in the lag


def test_dp_mask_is_reproduced_at_the_plan_step_count_and_rederived_fast_for_others():
    prior = _prior()
    mask = schedules.dp_schedule(prior, 5, weighting="quadratic")
    config = CacheConfig(full_fraction=5 / 12, schedule="dp", full_step_mask=tuple(np.flatnonzero(mask).tolist()),
                         schedule_prior=tuple(map(tuple, prior.tolist())))
    assert cache_mask_for_steps(config, 12, 12, 0) == config.full_step_mask
    start = time.perf_counter()
    derived = cache_mask_for_steps(config, 12, 30, 0)
    assert time.perf_counter() - start < 0.5
    assert len(derived) == round(5 / 12 * 30) and derived[0] == 0 and derived[-1] == 29
    # The prior says early steps change most: the DP puts more full steps in the first half.
    assert sum(i < 15 for i in derived) > sum(i >= 15 for i in derived)
    assert cache_mask_for_steps(config, 12, 30, 3)[:3] == (0, 1, 2)  # forced dense steps stay full


def test_uniform_or_priorless_masks_are_spread_evenly():
    config = CacheConfig(full_fraction=0.5, schedule="uniform", full_step_mask=(0, 3, 5))
    assert cache_mask_for_steps(config, 6, 12, 0) == tuple(np.flatnonzero(schedules.uniform_schedule(12, 6)))
    assert cache_mask_for_steps(config, 6, 2, 0) == (0, 1)


def test_end_to_end_costs_resample_and_keep_forbidden_gaps():
    costs = np.full((6, 6), -1.0)
    for a in range(6):
        for b in range(a + 1, min(6, a + 4)):
            costs[a, b] = 0.0 if b == a + 1 else float(b - a)
    assert np.array_equal(interpolate_gap_costs(costs, 6), np.where(costs < 0, np.inf, costs))
    finer = interpolate_gap_costs(costs, 11)
    assert finer[0, 1] == 0.0 and finer[0, 4] == pytest.approx(costs[0, 2])
    assert np.isinf(finer[0, 10])  # a gap the plan forbade stays forbidden
    config = CacheConfig(full_fraction=0.5, prior="end_to_end", full_step_mask=(0, 2, 5),
                         schedule_prior=tuple(map(tuple, costs.tolist())))
    mask = cache_mask_for_steps(config, 6, 11, 0)
    assert mask[0] == 0 and mask[-1] == 10 and max(np.diff(mask)) <= 6


def test_sigmas_resample_monotone_and_keep_the_ends():
    sigmas = (1.0, 0.9, 0.6, 0.3, 0.1)
    assert interpolate_sigmas(sigmas, 5) == pytest.approx(sigmas)
    nine = interpolate_sigmas(sigmas, 9)
    assert len(nine) == 9 and nine[0] == 1.0 and nine[-1] == pytest.approx(0.1)
    assert nine[2] == pytest.approx(0.9) and all(np.diff(nine) < 0)
    with pytest.raises(InputError, match="distinct sigmas"):
        interpolate_sigmas((1.0, 1.0 - 1e-9), 50)


def test_rescaled_configs_run_the_new_step_count():
    configs = [StepsConfig(placement="equalized", num_steps=4, sigmas=(1.0, 0.7, 0.4, 0.1)),
               SparseConfig(l1_budget=0.05, dense_steps=1, taus=(0.9,)), CacheConfig(full_fraction=0.5)]
    adapted, cache = rescale_step_configs(configs, 4, 8)
    assert cache is configs[2]
    assert adapted[0].num_steps == 8 and len(adapted[0].sigmas) == 8
    assert adapted[1].dense_steps == 2 and adapted[1].taus == (0.9,)
