"""Tests of the CEM-style full-step DP (accelkit/passes/_cache_schedule.py)."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from accelkit.passes._cache_schedule import (
    WEIGHTINGS,
    cem_gap_window,
    describe_schedule,
    dp_schedule,
    dp_schedule_from_costs,
    gap_cost,
    gap_cost_matrix,
    gaps_of,
    schedule_objective,
    uniform_schedule,
)


def _random_prior(rng: np.random.Generator, T: int, K: int) -> np.ndarray:
    # Error grows with the lag k, as 1 - cos does, with per-step noise.
    base = rng.random((T, 1)) + 0.05
    p = base * np.arange(K + 1)[None, :] * (0.5 + rng.random((T, K + 1)))
    p[:, 0] = 0.0
    return p


def _brute_force(T, N, cost_of_mask, *, min_gap=1, max_gap=None, warmup=0):
    """Best objective over all masks with first/last full, exactly N full, window and warm-up."""
    max_gap = T - 1 if max_gap is None else max_gap
    best = np.inf
    for inner in itertools.combinations(range(1, T - 1), N - 2):
        full = (0, *inner, T - 1)
        if any(i not in full for i in range(min(warmup, T))):
            continue
        ok = True
        for a, b in zip(full[:-1], full[1:], strict=True):
            if b <= warmup - 1:  # gaps inside the warm-up are exempt from the window
                continue
            if not (min_gap <= b - a <= max_gap):
                ok = False
                break
        if not ok:
            continue
        mask = np.zeros(T, dtype=bool)
        mask[list(full)] = True
        best = min(best, cost_of_mask(mask))
    return best


def _mask_is_valid(mask, T, N, *, min_gap=1, max_gap=None, warmup=0):
    max_gap = T - 1 if max_gap is None else max_gap
    full = np.flatnonzero(mask)
    assert mask.dtype == bool and mask.shape == (T,)
    assert mask[0] and mask[-1] and full.size == N
    assert mask[: min(warmup, T)].all()
    for a, b in zip(full[:-1], full[1:], strict=True):
        if b > warmup - 1:
            assert min_gap <= b - a <= max_gap


# ------------------------------------------------------------------------------------------- gap_cost


def test_gap_cost_definition_and_extrapolation():
    T, K = 10, 3
    p = np.arange(T * (K + 1), dtype=float).reshape(T, K + 1)
    assert gap_cost(p, 2, 3, "quadratic") == 0.0
    # gap 3 from 2: cached steps 3 (k=1) and 4 (k=2)
    raw = p[3, 1] + p[4, 2]
    assert gap_cost(p, 2, 5, "none") == pytest.approx(raw)
    assert gap_cost(p, 2, 5, "linear") == pytest.approx(2 * raw)
    assert gap_cost(p, 2, 5, "quadratic") == pytest.approx(4 * raw)
    # gap 6 from 1: k = 1..5, columns 4 and 5 extrapolated from column K=3 linearly in k
    raw = p[2, 1] + p[3, 2] + p[4, 3] + p[5, 3] * 4 / 3 + p[6, 3] * 5 / 3
    assert gap_cost(p, 1, 7, "none") == pytest.approx(raw)
    with pytest.raises(ValueError, match="weighting"):
        gap_cost(p, 0, 2, "cubic")
    with pytest.raises(ValueError):
        gap_cost(p, 3, 3)


def test_gap_cost_matrix_matches_gap_cost():
    rng = np.random.default_rng(1)
    p = _random_prior(rng, 15, 4)
    for w in WEIGHTINGS:
        c = gap_cost_matrix(p, weighting=w, min_gap=2, max_gap=7)
        for a in range(15):
            for b in range(15):
                if 2 <= b - a <= 7:
                    assert c[a, b] == pytest.approx(gap_cost(p, a, b, w))
                else:
                    assert c[a, b] == np.inf


# ------------------------------------------------------------------------------------------- DP = brute force


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_dp_equals_brute_force(weighting):
    rng = np.random.default_rng(0)
    for T in range(2, 13):
        p = _random_prior(rng, T, K=int(rng.integers(1, 6)))
        for N in range(2, T + 1):
            mask = dp_schedule(p, N, weighting=weighting)
            _mask_is_valid(mask, T, N)
            got = schedule_objective(p, mask, weighting)
            want = _brute_force(T, N, lambda m, p=p: schedule_objective(p, m, weighting))
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12), (T, N)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_dp_equals_brute_force_with_window_and_warmup(weighting):
    rng = np.random.default_rng(7)
    checked = 0
    for T in range(4, 13):
        p = _random_prior(rng, T, K=4)
        for N in range(2, T + 1):
            for min_gap, max_gap, warmup in [(1, 3, 0), (2, 4, 0), (1, 2, 3), (2, None, 2), (1, None, 4)]:
                want = _brute_force(
                    T,
                    N,
                    lambda m, p=p: schedule_objective(p, m, weighting),
                    min_gap=min_gap,
                    max_gap=max_gap,
                    warmup=warmup,
                )
                kw = dict(weighting=weighting, min_gap=min_gap, max_gap=max_gap, warmup=warmup)
                if not np.isfinite(want):
                    with pytest.raises(ValueError):
                        dp_schedule(p, N, **kw)
                    continue
                mask = dp_schedule(p, N, **kw)
                _mask_is_valid(mask, T, N, min_gap=min_gap, max_gap=max_gap, warmup=warmup)
                got = schedule_objective(p, mask, weighting)
                assert got == pytest.approx(want, rel=1e-12, abs=1e-12), (T, N, min_gap, max_gap, warmup)
                checked += 1
    assert checked > 100


def test_dp_from_costs_equals_brute_force_on_arbitrary_matrix():
    # An end-to-end prior is any (T, T) matrix, not additive in steps.
    rng = np.random.default_rng(3)
    for T in range(2, 11):
        costs = rng.random((T, T))
        costs[rng.random((T, T)) < 0.15] = np.inf
        for N in range(2, T + 1):

            def obj(m, costs=costs):
                f = np.flatnonzero(m)
                return float(sum(costs[a, b] for a, b in zip(f[:-1], f[1:], strict=True)))

            want = _brute_force(T, N, obj)
            if not np.isfinite(want):
                with pytest.raises(ValueError, match="no schedule"):
                    dp_schedule_from_costs(costs, N)
                continue
            mask = dp_schedule_from_costs(costs, N)
            assert mask.sum() == N and mask[0] and mask[-1]
            assert obj(mask) == pytest.approx(want)


def test_dp_not_worse_than_uniform():
    rng = np.random.default_rng(11)
    for T, N in [(20, 5), (28, 10), (50, 19), (50, 2), (50, 50), (37, 36)]:
        p = _random_prior(rng, T, K=9)
        for w in WEIGHTINGS:
            dp = schedule_objective(p, dp_schedule(p, N, weighting=w), w)
            uni = schedule_objective(p, uniform_schedule(T, N), w)
            assert dp <= uni + 1e-12


def test_cem_window_feasible_and_not_worse_than_uniform_when_uniform_fits():
    rng = np.random.default_rng(5)
    for T, N in [(50, 19), (50, 2), (50, 50), (28, 10), (20, 3), (100, 11)]:
        lo, hi = cem_gap_window(T, N)
        assert 1 <= lo <= hi
        p = _random_prior(rng, T, K=9)
        mask = dp_schedule(p, N, min_gap=lo, max_gap=hi)
        _mask_is_valid(mask, T, N, min_gap=lo, max_gap=hi)
        uni = uniform_schedule(T, N)
        if all(lo <= g <= hi for g in gaps_of(uni)):
            assert schedule_objective(p, mask) <= schedule_objective(p, uni) + 1e-12
    assert cem_gap_window(50, 19) == (2, 4)  # round(50/19) = 3, +-1


# ------------------------------------------------------------------------------------------- edge cases


def test_full_steps_equal_T_is_all_full():
    rng = np.random.default_rng(2)
    for T in (1, 2, 5, 30):
        p = _random_prior(rng, T, K=3)
        for w in WEIGHTINGS:
            assert dp_schedule(p, T, weighting=w).all()
        assert uniform_schedule(T, T).all()


def test_T_equal_one():
    p = np.zeros((1, 4))
    assert dp_schedule(p, 1).tolist() == [True]
    with pytest.raises(ValueError):
        dp_schedule(p, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(full_steps=1), "full_steps"),
        (dict(full_steps=0), "full_steps"),
        (dict(full_steps=11), "full_steps"),
        (dict(full_steps=3, max_gap=2), "no schedule"),  # 2 gaps of <= 2 cannot span 9
        (dict(full_steps=9, min_gap=2), "no schedule"),  # 8 gaps of >= 2 exceed 9
        (dict(full_steps=4, warmup=5), "warmup"),
        (dict(full_steps=4, min_gap=3, max_gap=2), "max_gap"),
        (dict(full_steps=4, min_gap=0), "min_gap"),
        (dict(full_steps=4, weighting="cubic"), "weighting"),
    ],
)
def test_infeasible_inputs_raise(kwargs, match):
    p = _random_prior(np.random.default_rng(0), 10, K=3)
    with pytest.raises(ValueError, match=match):
        dp_schedule(p, **kwargs)


def test_bad_prior_and_costs_raise():
    with pytest.raises(ValueError, match="shape"):
        dp_schedule(np.zeros(10), 3)
    with pytest.raises(ValueError, match="profiled"):
        dp_schedule(np.zeros((10, 1)), 3)
    p = np.ones((6, 3))
    p[4, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dp_schedule(p, 3)
    p = np.ones((6, 3))
    p[0, 2] = np.nan  # undefined entry (t - k < 0): ignored
    dp_schedule(p, 3)
    with pytest.raises(ValueError, match="square"):
        dp_schedule_from_costs(np.zeros((3, 4)), 2)
    with pytest.raises(ValueError, match="NaN"):
        dp_schedule_from_costs(np.full((3, 3), np.nan), 2)


def test_inputs_not_mutated():
    rng = np.random.default_rng(4)
    p = _random_prior(rng, 12, 4)
    c = gap_cost_matrix(p)
    p0, c0 = p.copy(), c.copy()
    dp_schedule(p, 5, warmup=2)
    dp_schedule_from_costs(c, 5, warmup=3)
    np.testing.assert_array_equal(p, p0)
    np.testing.assert_array_equal(c, c0)


def test_runtime_T50_N19():
    p = _random_prior(np.random.default_rng(0), 50, K=9)
    dp_schedule(p, 19)  # warm numpy
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        dp_schedule(p, 19)
        best = min(best, time.perf_counter() - t0)
    assert best < 0.05, f"dp_schedule(T=50, N=19) took {best * 1e3:.1f} ms"


# ------------------------------------------------------------------------------------------- baselines / helpers


def test_uniform_schedule():
    for T in range(2, 60):
        for N in range(2, T + 1):
            m = uniform_schedule(T, N)
            assert m.sum() == N and m[0] and m[-1]
    np.testing.assert_array_equal(
        np.flatnonzero(uniform_schedule(28, 10)), np.round(np.linspace(0, 27, 10)).astype(int)
    )
    with pytest.raises(ValueError):
        uniform_schedule(10, 1)
    with pytest.raises(ValueError):
        uniform_schedule(10, 11)


def test_gaps_and_describe():
    m = np.zeros(12, dtype=bool)
    m[[0, 1, 2, 5, 8, 11]] = True
    assert gaps_of(m).tolist() == [1, 1, 3, 3, 3]
    assert describe_schedule(m) == "6/12 full: 0,1,2,5,8,11"
    with pytest.raises(ValueError, match="first and last"):
        bad = m.copy()
        bad[0] = False
        schedule_objective(np.ones((12, 3)), bad)


# ------------------------------------------------------------------------------------------- weighting shape


def test_weighting_changes_schedule_shape():
    """Observation: the weighting sets how much the DP evens out the gaps.

    Prior e(t, k) = b(t) * k with b small early and large late (as CEM's local feature prior on
    DiT). With this cost (each cached step charged its own lag), every weighting puts the long
    gaps where the prior is small (early) and the short ones late; stronger weighting shrinks
    the longest gap and spreads the gaps more evenly. T=30, N=10 gives gaps
    none [9 5 3 3 2 2 2 2 1], linear [6 5 4 3 3 2 2 2 2], quadratic [6 4 4 3 3 3 2 2 2].
    (CEM's reference cost, a prefix sum over the trajectory, reports the shape flipping instead.)
    """
    T, K, N = 30, 9, 10
    t = np.arange(T)[:, None]
    p = (0.01 + (t / (T - 1)) ** 3) * np.arange(K + 1)[None, :] * np.ones((T, K + 1))
    gaps = {w: gaps_of(dp_schedule(p, N, weighting=w)) for w in WEIGHTINGS}
    assert gaps["none"].tolist() == [9, 5, 3, 3, 2, 2, 2, 2, 1]
    assert gaps["quadratic"].tolist() == [6, 4, 4, 3, 3, 3, 2, 2, 2]
    for g in gaps.values():
        assert g[0] > g[-1]  # long gaps early, where the prior is small
    assert gaps["none"].max() > gaps["linear"].max() >= gaps["quadratic"].max()
    assert gaps["none"].std() > gaps["linear"].std() > gaps["quadratic"].std()
    assert len({tuple(g) for g in gaps.values()}) == 3
