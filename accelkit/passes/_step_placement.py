"""Timestep placement with equal local error per step (in the spirit of SDM-style step placement).

The sampler integrates a flow-matching ODE from ``sigma = 1`` down to ``sigma_min`` (about 0).
Model of the local discretisation error of one step of size ``h`` starting near ``sigma`` for a
solver of order ``p``::

    err(sigma, h) ~= D(sigma) * h ** (p + 1)

``D`` (the *error density*) is estimated on calibration trajectories by step doubling
(:func:`step_doubling_error`). Equal error ``eps`` per step means ``h(sigma) = (eps / D) **
(1 / (p + 1))``, i.e. the step count per unit sigma is proportional to ``D ** (1 / (p + 1))``:
boundaries sit at equal increments of ``integral D(sigma) ** (1 / (p + 1)) d sigma``
(:func:`equalize_local_error`).

Pure numpy; no torch.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "DENSITY_FLOOR_REL",
    "default_flow_sigmas",
    "equalize_local_error",
    "step_doubling_error",
]

#: Floor of the error density, relative to its largest finite value: zeros, negatives, NaN and
#: inf are replaced by ``DENSITY_FLOOR_REL * max(finite density)``. A positive floor keeps the
#: cumulative measure strictly increasing, so the boundaries are distinct, and caps the longest
#: step where the estimate reads zero (a zero estimate is noise, not a free interval).
DENSITY_FLOOR_REL: float = 1e-6


def step_doubling_error(
    x_full_step: np.ndarray,
    x_two_half_steps: np.ndarray,
    h: float,
    order: int = 1,
) -> float:
    """Error density ``D`` at one point from a step-doubling pair.

    ``D = rms(x_full_step - x_two_half_steps) / |h| ** (order + 1)``, where ``x_full_step`` is
    the state after one step of size ``h`` and ``x_two_half_steps`` after two steps of ``h / 2``
    from the same state. The RMS over all elements makes the value independent of batch and
    image size. (Richardson: the difference is ``(1 - 2 ** -order)`` times the error of the full
    step; that constant factor does not move equalised boundaries and is left out.)

    Args:
        x_full_step: state after one step of size ``h`` (array-like; CPU tensors work too).
        x_two_half_steps: state after two steps of size ``h / 2``, same shape.
        h: the step size in sigma (sign ignored), non-zero.
        order: the solver's order ``p`` (Euler: 1).
    """
    a = np.asarray(x_full_step, dtype=np.float64)
    b = np.asarray(x_two_half_steps, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"step-doubling states differ in shape: {a.shape} vs {b.shape}")
    if int(order) < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    h = abs(float(h))
    if not h > 0.0 or not np.isfinite(h):
        raise ValueError(f"step size h must be finite and non-zero, got {h}")
    diff = a - b
    rms = float(np.sqrt(np.mean(diff * diff))) if diff.size else 0.0
    return rms / h ** (int(order) + 1)


def default_flow_sigmas(num_steps: int, shift: float = 1.0, *, num_train_timesteps: int = 1000) -> np.ndarray:
    """Default sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)``.

    Returns ``num_steps + 1`` values, the last one the terminal ``0``, like the scheduler's
    ``.sigmas``. As in diffusers (static shifting, no Karras/exponential/beta options): the
    scheduler's ``sigma_min`` is the *shifted* ``1 / num_train_timesteps``; the unshifted grid is
    ``linspace(1, sigma_min, num_steps)``, which is then shifted with
    ``sigma' = shift * s / (1 + (shift - 1) * s)`` (so the low end is shifted twice, as there).

    Args:
        num_steps: number of sampling steps, ``>= 1``.
        shift: the scheduler's ``shift`` (SD3: 3.0; 1.0 = no shift).
        num_train_timesteps: the scheduler's ``num_train_timesteps``.
    """
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")

    def _shift(s: np.ndarray | float) -> np.ndarray | float:
        return shift * s / (1.0 + (shift - 1.0) * s)

    sigma_max = _shift(1.0)
    sigma_min = _shift(1.0 / num_train_timesteps)
    s = np.linspace(sigma_max, sigma_min, int(num_steps))
    return np.concatenate([_shift(s), [0.0]])


def equalize_local_error(
    sigma_grid: np.ndarray,
    error_density: np.ndarray,
    num_steps: int,
    *,
    order: int = 1,
    blend: float = 1.0,
    reference: np.ndarray | None = None,
) -> np.ndarray:
    """``num_steps + 1`` sigma boundaries giving every step the same estimated local error.

    With ``m(sigma) = D(sigma) ** (1 / (order + 1))`` and ``M(sigma) = integral from sigma to
    sigma_grid[0] of m`` (trapezoid rule on the grid, linear interpolation in between), boundary
    ``j`` is where ``M`` reaches ``j / num_steps`` of its total. ``D`` is floored first (see
    :data:`DENSITY_FLOOR_REL`); an all-zero or all-invalid density gives uniform spacing.

    The result is ``(1 - blend) * reference + blend * equalised``: both are strictly decreasing
    with the same endpoints, hence so is the mix. ``blend`` is a search knob between the default
    placement (0) and full equalisation (1).

    Args:
        sigma_grid: fine, strictly decreasing grid (``M >= 2`` points), e.g. from 1 to 0.
        error_density: ``D`` at each grid point (``>= 0``; invalid entries are floored), shape ``(M,)``.
        num_steps: number of steps, ``>= 1``.
        order: the solver's order ``p``; the density enters with exponent ``1 / (p + 1)``.
        blend: in ``[0, 1]``; 0 returns ``reference``, 1 the equalised placement.
        reference: the placement at ``blend = 0``: ``num_steps + 1`` strictly decreasing sigmas
            from ``sigma_grid[0]`` to ``sigma_grid[-1]``; ``None`` = uniform in sigma.

    Returns:
        Strictly decreasing float64 array of ``num_steps + 1`` sigmas, first ``sigma_grid[0]``
        and last ``sigma_grid[-1]`` exactly.
    """
    s = np.asarray(sigma_grid, dtype=np.float64)
    d = np.asarray(error_density, dtype=np.float64)
    n = int(num_steps)
    if s.ndim != 1 or s.size < 2:
        raise ValueError(f"sigma_grid must be 1-D with at least 2 points, got shape {s.shape}")
    if not np.all(np.isfinite(s)) or not np.all(np.diff(s) < 0):
        raise ValueError("sigma_grid must be finite and strictly decreasing")
    if d.shape != s.shape:
        raise ValueError(f"error_density has shape {d.shape}, sigma_grid {s.shape}")
    if n < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if int(order) < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    blend = float(blend)
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be in [0, 1], got {blend}")

    hi, lo = s[0], s[-1]
    if reference is None:
        ref = np.linspace(hi, lo, n + 1)
    else:
        ref = np.asarray(reference, dtype=np.float64)
        if ref.shape != (n + 1,):
            raise ValueError(f"reference must have num_steps + 1 = {n + 1} entries, got shape {ref.shape}")
        if not np.all(np.diff(ref) < 0) or not (np.isclose(ref[0], hi) and np.isclose(ref[-1], lo)):
            raise ValueError(
                "reference must be strictly decreasing from sigma_grid[0] to sigma_grid[-1] "
                f"({hi} .. {lo}), got {ref[0]} .. {ref[-1]}"
            )
        ref = ref.copy()
        ref[0], ref[-1] = hi, lo

    valid = np.isfinite(d) & (d > 0)
    if valid.any():
        floor = DENSITY_FLOOR_REL * float(d[valid].max())
        d = np.where(valid, np.maximum(d, floor), floor)
    else:
        d = np.ones_like(s)
    m = d ** (1.0 / (int(order) + 1))
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (m[:-1] + m[1:]) * (s[:-1] - s[1:]))])
    targets = np.linspace(0.0, cum[-1], n + 1)
    eq = np.interp(targets, cum, s)
    eq[0], eq[-1] = hi, lo

    out = (1.0 - blend) * ref + blend * eq
    out[0], out[-1] = hi, lo
    if not np.all(np.diff(out) < 0):
        # Only reachable when num_steps is so large that float64 cannot separate the boundaries.
        raise ValueError(
            f"cannot place {n} distinct steps in [{lo}, {hi}] with this density (floating-point resolution)"
        )
    return out
