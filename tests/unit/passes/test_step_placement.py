"""Tests of equal-local-error timestep placement (accelkit/passes/_step_placement.py)."""

from __future__ import annotations

import numpy as np
import pytest

from accelkit.passes._step_placement import (
    default_flow_sigmas,
    equalize_local_error,
    step_doubling_error,
)

GRID = np.linspace(1.0, 0.0, 4001)


def _check_boundaries(out, n, grid=GRID):
    assert out.shape == (n + 1,)
    assert out[0] == grid[0] and out[-1] == grid[-1]
    assert np.all(np.diff(out) < 0)


def test_constant_density_gives_uniform_spacing():
    for n in (1, 4, 28):
        out = equalize_local_error(GRID, np.full_like(GRID, 3.7), n)
        _check_boundaries(out, n)
        np.testing.assert_allclose(out, np.linspace(1, 0, n + 1), atol=1e-12)


def test_density_near_zero_crowds_steps_near_zero():
    d = np.exp(-GRID / 0.05)  # error concentrated near sigma = 0
    out = equalize_local_error(GRID, d, 10)
    _check_boundaries(out, 10)
    steps = -np.diff(out)
    assert steps[-1] < steps[0] / 5
    assert np.all(np.diff(steps) <= 1e-12)  # step sizes shrink monotonically towards 0
    assert (out < 0.25).sum() >= 5


def test_blend_zero_is_uniform_and_blend_interpolates():
    d = np.exp(-GRID / 0.05)
    np.testing.assert_allclose(equalize_local_error(GRID, d, 8, blend=0.0), np.linspace(1, 0, 9))
    full = equalize_local_error(GRID, d, 8, blend=1.0)
    half = equalize_local_error(GRID, d, 8, blend=0.5)
    _check_boundaries(half, 8)
    np.testing.assert_allclose(half, 0.5 * full + 0.5 * np.linspace(1, 0, 9))


def test_blend_against_reference_placement():
    ref = default_flow_sigmas(10, shift=3.0)
    grid = np.linspace(1.0, 0.0, 2001)
    d = np.ones_like(grid)
    np.testing.assert_allclose(equalize_local_error(grid, d, 10, blend=0.0, reference=ref), ref)
    with pytest.raises(ValueError, match="reference"):
        equalize_local_error(grid, d, 10, reference=ref[:-1])


@pytest.mark.parametrize("order, exponent", [(1, 1.0 / 2.0), (3, 2.0 / 3.0)])
def test_order_sets_the_exponent(order, exponent):
    # D = sigma^2: m = sigma^(2/(p+1)); integral_sigma^1 m = (1 - sigma^(a+1))/(a+1) with a = 2/(p+1).
    # Equal increments: sigma_j = (1 - j/N) ** (1 / (a + 1)); p=1 -> sqrt, p=3 -> power 2/3.
    n = 8
    out = equalize_local_error(GRID, GRID**2, n, order=order)
    _check_boundaries(out, n)
    want = (1.0 - np.arange(n + 1) / n) ** exponent
    np.testing.assert_allclose(out, want, atol=2e-3)
    other = equalize_local_error(GRID, GRID**2, n, order=2 if order == 1 else 1)
    assert np.abs(other - out).max() > 1e-2


def test_random_densities_with_zeros_and_nan_stay_strictly_decreasing():
    rng = np.random.default_rng(0)
    grid = np.sort(rng.random(300))[::-1]
    grid = np.concatenate([[1.0], grid, [0.0]])
    for trial in range(20):
        d = rng.random(grid.size) ** 4 * 10.0 ** rng.integers(-3, 3)
        d[rng.random(grid.size) < 0.2] = 0.0
        d[rng.random(grid.size) < 0.05] = np.nan
        if trial % 5 == 0:
            d[:] = 0.0  # all zero: uniform
        for n in (1, 3, 50, 500):
            out = equalize_local_error(grid, d, n, order=1 + trial % 3, blend=rng.random())
            _check_boundaries(out, n, grid)
    out = equalize_local_error(GRID, np.zeros_like(GRID), 5)
    np.testing.assert_allclose(out, np.linspace(1, 0, 6))


def test_endpoints_follow_the_grid():
    grid = np.linspace(0.9, 0.05, 100)
    out = equalize_local_error(grid, np.linspace(0, 1, 100), 6)
    _check_boundaries(out, 6, grid)


def test_invalid_inputs_raise():
    d = np.ones_like(GRID)
    with pytest.raises(ValueError, match="decreasing"):
        equalize_local_error(GRID[::-1], d, 4)
    with pytest.raises(ValueError, match="shape"):
        equalize_local_error(GRID, d[:-1], 4)
    with pytest.raises(ValueError, match="num_steps"):
        equalize_local_error(GRID, d, 0)
    with pytest.raises(ValueError, match="blend"):
        equalize_local_error(GRID, d, 4, blend=1.5)
    with pytest.raises(ValueError, match="order"):
        equalize_local_error(GRID, d, 4, order=0)


def test_inputs_not_mutated():
    d = np.exp(-GRID / 0.05)
    d[10] = np.nan
    g0, d0 = GRID.copy(), d.copy()
    equalize_local_error(GRID, d, 7)
    np.testing.assert_array_equal(GRID, g0)
    np.testing.assert_array_equal(d, d0)


def test_step_doubling_error():
    a = np.zeros((2, 3, 4))
    b = np.full((2, 3, 4), 0.01)
    assert step_doubling_error(a, b, 0.1, order=1) == pytest.approx(0.01 / 0.1**2)
    assert step_doubling_error(a, b, -0.1, order=2) == pytest.approx(0.01 / 0.1**3)
    assert step_doubling_error(a, a, 0.1) == 0.0
    with pytest.raises(ValueError, match="shape"):
        step_doubling_error(a, b[0], 0.1)
    with pytest.raises(ValueError, match="non-zero"):
        step_doubling_error(a, b, 0.0)


def test_step_doubling_recovers_euler_error_density():
    # dx/dsigma = x^2 (exact: x = 1/(c - sigma)), Euler from sigma0 with step -h: the measured
    # density stays nearly constant as h shrinks (error ~ h^2), so the model D * h^(p+1) holds.
    def euler(x, s, h):
        return x + (-h) * (-(x**2))  # sigma decreases by h; dx = f * dsigma with f = -x^2

    x0, vals = 0.5, []
    for h in (0.04, 0.02, 0.01, 0.005):
        full = euler(x0, 1.0, h)
        half = euler(euler(x0, 1.0, h / 2), 1.0 - h / 2, h / 2)
        vals.append(step_doubling_error(np.array(full), np.array(half), h, order=1))
    assert max(vals) / min(vals) < 1.2


@pytest.mark.parametrize("shift", [1.0, 3.0, 1.7])
@pytest.mark.parametrize("n", [1, 4, 20, 28, 50])
def test_default_flow_sigmas_match_diffusers(n, shift):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    want = sched.sigmas.double().numpy()
    got = default_flow_sigmas(n, shift=shift)
    assert got.shape == want.shape == (n + 1,)
    np.testing.assert_allclose(got, want, atol=2e-6)
