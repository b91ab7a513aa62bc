"""Which denoising steps compute fully: CEM-style dynamic programming over a cache-error prior.

Steps are indexed ``0..T-1`` in sampling order. A schedule is a boolean mask ``full`` of length
``T``: ``full[t]`` is true where the denoiser runs fully and false where the step is cached, i.e.
approximated from the last full step (how it is approximated -- plain reuse, residual reuse,
Taylor extrapolation -- is decided elsewhere). Steps ``0`` and ``T-1`` are always full. A *gap*
between consecutive full steps ``a < b`` is ``g = b - a``; it holds ``g - 1`` cached steps.

The DP minimises a total cost that is a sum of per-gap costs, ``sum over gaps (a, b) of
costs[a, b]``. Two ways to get the per-gap cost:

* :func:`gap_cost` / :func:`gap_cost_matrix`, from a local error prior ``e(t, k)`` (CEM's
  feature prior: ``1 - cos(f_t, f_{t-k})``), see :func:`gap_cost` for the exact definition;
* any precomputed ``(T, T)`` matrix given to :func:`dp_schedule_from_costs`, e.g. an end-to-end
  prior where ``costs[a, b]`` is the measured final-image error when only interval ``(a, b)`` is
  cached (assumed additive over intervals).

Pure numpy; no torch.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "WEIGHTINGS",
    "cem_gap_window",
    "describe_schedule",
    "dp_schedule",
    "dp_schedule_from_costs",
    "gap_cost",
    "gap_cost_matrix",
    "gap_weight",
    "gaps_of",
    "schedule_objective",
    "uniform_schedule",
]

#: Names accepted by ``weighting``: the gap weight ``w(g)`` is ``1``, ``g - 1`` or ``(g - 1) ** 2``.
WEIGHTINGS: tuple[str, ...] = ("none", "linear", "quadratic")


# --------------------------------------------------------------------------------------------- helpers


def gap_weight(g: int | np.ndarray, weighting: str) -> float | np.ndarray:
    """Weight ``w(g)`` of a gap of length ``g`` (``g - 1`` cached steps).

    Args:
        g: gap length(s), ``>= 1``.
        weighting: ``"none"`` -> ``1``, ``"linear"`` -> ``g - 1``, ``"quadratic"`` -> ``(g - 1) ** 2``
            (CEM's scripts use ``C ** 2`` with ``C = g - 1`` cached steps).
    """
    c = np.asarray(g, dtype=np.float64) - 1.0
    if weighting == "none":
        w = np.ones_like(c)
    elif weighting == "linear":
        w = c
    elif weighting == "quadratic":
        w = c * c
    else:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    return float(w) if w.ndim == 0 else w


def _check_prior(prior: np.ndarray) -> np.ndarray:
    p = np.asarray(prior, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"prior must have shape (T, K+1) with T >= 1, got shape {p.shape}")
    if p.shape[0] > 1 and p.shape[1] < 2:
        raise ValueError(
            f"prior has shape {p.shape}: it needs at least one profiled interval (K >= 1, column 1) "
            "to cost any cached step"
        )
    # Entries with t - k < 0 are undefined and never read; only check the ones that are.
    t, k = np.indices(p.shape)
    used = (k >= 1) & (t - k >= 0)
    if not np.all(np.isfinite(p[used])):
        raise ValueError("prior holds NaN or inf at defined entries (t - k >= 0, k >= 1)")
    return p


def _prior_at(p: np.ndarray, s: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``e(s, k)`` with the linear-in-``k`` extrapolation beyond the profiled ``K`` columns."""
    K = p.shape[1] - 1
    s = np.asarray(s, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    inside = k <= K
    kk = np.where(inside, k, K)
    val = p[s, kk]
    return np.where(inside, val, val * (k / K))


def _check_mask(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 1 or m.size < 1:
        raise ValueError(f"mask must be a non-empty 1-D array, got shape {m.shape}")
    m = m.astype(bool)
    if not (m[0] and m[-1]):
        raise ValueError("mask must have its first and last steps full")
    return m


# --------------------------------------------------------------------------------------------- costs


def gap_cost(prior: np.ndarray, start: int, end: int, weighting: str = "quadratic") -> float:
    """Cumulative error of caching steps ``start+1 .. end-1`` from the full step at ``start``.

    The cost the DP minimises is, for a gap ``g = end - start``::

        cost(start, end) = w(g) * sum_{s = start+1}^{end-1} e(s, s - start)

    where ``e(s, k) = prior[s, k]`` is the error of approximating step ``s`` by the step ``k``
    earlier, and ``w`` is :func:`gap_weight`. A gap of 1 has no cached step and costs 0.

    Beyond the profiled interval (``k > K``, with ``prior`` of shape ``(T, K+1)``) the error is
    extrapolated linearly in ``k`` from the last column: ``e(s, k) = prior[s, K] * k / K``.

    Unlike CEM's reference code, whose jump cost is ``w * sum_{s <= t} e(s, g - 1)`` (a prefix sum
    over the whole trajectory with one fixed lag), this charges each cached step its own lag to the
    step it reuses, which is what a cached step actually approximates.

    Args:
        prior: error prior, shape ``(T, K+1)``; column 0 is unused.
        start: index of the full step the cached steps reuse.
        end: index of the next full step, ``start < end <= T - 1``.
        weighting: one of :data:`WEIGHTINGS`.
    """
    p = _check_prior(prior)
    T = p.shape[0]
    if not (0 <= start < end <= T - 1):
        raise ValueError(f"need 0 <= start < end <= T-1 = {T - 1}, got start={start}, end={end}")
    g = end - start
    w = gap_weight(g, weighting)
    if g == 1:
        return 0.0
    s = np.arange(start + 1, end)
    return float(w * _prior_at(p, s, s - start).sum())


def gap_cost_matrix(
    prior: np.ndarray,
    *,
    weighting: str = "quadratic",
    min_gap: int = 1,
    max_gap: int | None = None,
) -> np.ndarray:
    """``(T, T)`` matrix of :func:`gap_cost` for every allowed gap; ``inf`` where forbidden.

    ``costs[a, b] = gap_cost(prior, a, b, weighting)`` for ``min_gap <= b - a <= max_gap``,
    ``inf`` elsewhere (including ``b <= a``). Built in ``O(T^2)``.

    Args:
        prior: error prior, shape ``(T, K+1)``.
        weighting: one of :data:`WEIGHTINGS`.
        min_gap: smallest allowed gap, ``>= 1``.
        max_gap: largest allowed gap; ``None`` means ``T - 1`` (unbounded).
    """
    p = _check_prior(prior)
    gap_weight(1, weighting)  # validates the name
    T = p.shape[0]
    lo, hi = _check_window(T, min_gap, max_gap)
    costs = np.full((T, T), np.inf)
    if T == 1:
        return costs
    # E[a, k] = e(a + k, k) for k = 1..T-1-a; C[a, j] = sum_{k=1}^{j} E[a, k] is the unweighted
    # cost of the gap (a, a + j + 1).
    a_idx, k_idx = np.indices((T, T))
    valid = (k_idx >= 1) & (a_idx + k_idx <= T - 1)
    E = np.zeros((T, T))
    E[valid] = _prior_at(p, (a_idx + k_idx)[valid], k_idx[valid])
    C = np.cumsum(E, axis=1)
    for g in range(lo, hi + 1):
        a = np.arange(T - g)
        base = np.zeros(T - g) if g == 1 else C[a, g - 1]
        costs[a, a + g] = gap_weight(g, weighting) * base
    return costs


def _check_window(T: int, min_gap: int, max_gap: int | None) -> tuple[int, int]:
    hi = max(T - 1, 1) if max_gap is None else int(max_gap)
    lo = int(min_gap)
    if lo < 1:
        raise ValueError(f"min_gap must be >= 1, got {min_gap}")
    if hi < lo:
        raise ValueError(f"max_gap ({max_gap}) must be >= min_gap ({min_gap})")
    return lo, min(hi, max(T - 1, 1))


def cem_gap_window(T: int, full_steps: int, *, cap: int = 10) -> tuple[int, int]:
    """CEM's gap window ``G = round(T / Ns) +- 1``, capped at ``cap``, widened to be feasible.

    CEM restricts every gap to ``round(T/Ns) - 1 .. round(T/Ns) + 1`` (at most 10). That window
    can make the budget infeasible (e.g. ``Ns = 2``: one gap of ``T - 1``), so the result is
    widened to contain ``floor`` and ``ceil`` of the mean gap ``(T-1)/(Ns-1)``, which always admits
    a schedule. ``round`` rounds halves up.

    Args:
        T: number of sampling steps, ``>= 2``.
        full_steps: number of full steps ``Ns``, ``2 <= Ns <= T``.
        cap: largest gap CEM allows before widening.

    Returns:
        ``(min_gap, max_gap)`` to pass to :func:`dp_schedule`.
    """
    if T < 2 or not (2 <= full_steps <= T):
        raise ValueError(f"need T >= 2 and 2 <= full_steps <= T, got T={T}, full_steps={full_steps}")
    c = math.floor(T / full_steps + 0.5)
    hi = min(c + 1, cap)
    lo = max(1, min(c - 1, hi))
    mean = (T - 1) / (full_steps - 1)
    lo = min(lo, math.floor(mean))
    hi = max(hi, math.ceil(mean))
    return lo, hi


# --------------------------------------------------------------------------------------------- DP


def dp_schedule_from_costs(costs: np.ndarray, full_steps: int, *, warmup: int = 0) -> np.ndarray:
    """Full-step mask minimising the sum of per-gap costs, with exactly ``full_steps`` full steps.

    ``dp[n][t] = min_g dp[n-1][t-g] + costs[t-g, t]``, ``dp[1][0] = 0``, answer ``dp[Ns][T-1]``;
    only the diagonals of ``costs`` that hold a finite entry are visited, so a gap window of
    width ``G`` costs ``O(Ns * T * G)``.

    Args:
        costs: ``(T, T)`` array, ``costs[a, b]`` = cost of a full step at ``a`` whose next full
            step is ``b``; ``inf`` forbids that gap. Entries with ``b <= a`` are ignored. NaN is
            rejected.
        full_steps: number of full steps, first and last included.
        warmup: the first ``warmup`` steps are forced full (gaps between them are 1 whatever
            ``costs`` says about gap 1 there).

    Returns:
        Boolean mask of length ``T``.

    Raises:
        ValueError: on bad shapes or when no schedule satisfies the constraints.
    """
    c = np.asarray(costs, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 1:
        raise ValueError(f"costs must be a square (T, T) array with T >= 1, got shape {c.shape}")
    if np.isnan(c).any() or np.isneginf(c).any():
        raise ValueError("costs holds NaN or -inf; use +inf to forbid a gap")
    T = c.shape[0]
    full_steps = int(full_steps)
    warmup = int(warmup)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if T == 1:
        if full_steps != 1:
            raise ValueError(f"with T=1 the only schedule has 1 full step, got full_steps={full_steps}")
        return np.ones(1, dtype=bool)
    if not (2 <= full_steps <= T):
        raise ValueError(
            f"full_steps must be in [2, T={T}] (first and last steps are always full), got {full_steps}"
        )
    forced = min(warmup, T)  # steps 0..forced-1 are full
    if forced > full_steps or (forced == T and full_steps != T):
        raise ValueError(f"warmup={warmup} forces more full steps than full_steps={full_steps}")

    c = c.copy()
    c[np.tril_indices(T)] = np.inf
    if forced >= 2:
        # Inside the warm-up the next full step after a is a + 1, at no cost.
        c[: forced - 1, :] = np.inf
        idx = np.arange(forced - 1)
        c[idx, idx + 1] = 0.0
    gaps = [g for g in range(1, T) if np.isfinite(np.diagonal(c, g)).any()]
    if not gaps:
        raise ValueError("costs forbids every gap (all entries above the diagonal are inf)")

    dp_prev = np.full(T, np.inf)
    dp_prev[0] = 0.0
    choice = np.zeros((full_steps + 1, T), dtype=np.int64)
    diags = {g: np.diagonal(c, g) for g in gaps}
    for n in range(2, full_steps + 1):
        dp_cur = np.full(T, np.inf)
        arg = np.zeros(T, dtype=np.int64)
        for g in gaps:
            cand = dp_prev[: T - g] + diags[g]
            better = cand < dp_cur[g:]
            dp_cur[g:][better] = cand[better]
            arg[g:][better] = g
        choice[n] = arg
        dp_prev = dp_cur
    if not np.isfinite(dp_prev[T - 1]):
        raise ValueError(
            f"no schedule with {full_steps} full steps of T={T} fits the allowed gaps"
            + (f" and warmup={warmup}" if warmup else "")
            + f" (gaps with a finite cost: {_ranges(gaps)})"
        )
    mask = np.zeros(T, dtype=bool)
    t = T - 1
    for n in range(full_steps, 1, -1):
        mask[t] = True
        t -= int(choice[n, t])
    assert t == 0, "backtracking must end at step 0"
    mask[0] = True
    return mask


def _ranges(values: list[int]) -> str:
    out: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(out)


def dp_schedule(
    prior: np.ndarray,
    full_steps: int,
    *,
    weighting: str = "quadratic",
    max_gap: int | None = None,
    min_gap: int = 1,
    warmup: int = 0,
) -> np.ndarray:
    """CEM-style optimal full-step mask for a local error prior.

    Minimises :func:`schedule_objective` (sum of :func:`gap_cost` over gaps) over masks with
    exactly ``full_steps`` full steps, steps ``0`` and ``T-1`` full, every gap in
    ``[min_gap, max_gap]`` and the first ``warmup`` steps full. Gaps between two warm-up steps are
    1 and exempt from ``min_gap``. ``full_steps == T`` gives all true (with ``min_gap == 1``).

    Args:
        prior: error prior, shape ``(T, K+1)``, ``prior[t, k] = e(t, k)``; column 0 unused.
        full_steps: number of full steps, first and last included (CEM's ``Ns``).
        weighting: gap weight, one of :data:`WEIGHTINGS`.
        max_gap: largest allowed gap; ``None`` = unbounded. See :func:`cem_gap_window`.
        min_gap: smallest allowed gap.
        warmup: number of leading steps forced full.

    Raises:
        ValueError: when the inputs are invalid or no schedule fits.
    """
    costs = gap_cost_matrix(prior, weighting=weighting, min_gap=min_gap, max_gap=max_gap)
    return dp_schedule_from_costs(costs, full_steps, warmup=warmup)


# --------------------------------------------------------------------------------------------- baselines / inspection


def uniform_schedule(T: int, full_steps: int) -> np.ndarray:
    """Evenly spaced full steps: ``round(linspace(0, T-1, full_steps))``, exactly ``full_steps`` of them.

    Rounding collisions (possible with round-half-to-even) are resolved by pushing indices apart
    while keeping the first and last step.

    Args:
        T: number of sampling steps, ``>= 1``.
        full_steps: number of full steps, ``2 <= full_steps <= T`` (``1`` when ``T == 1``).
    """
    T = int(T)
    full_steps = int(full_steps)
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if T == 1:
        if full_steps != 1:
            raise ValueError(f"with T=1 the only schedule has 1 full step, got full_steps={full_steps}")
        return np.ones(1, dtype=bool)
    if not (2 <= full_steps <= T):
        raise ValueError(f"full_steps must be in [2, T={T}], got {full_steps}")
    idx = np.round(np.linspace(0, T - 1, full_steps)).astype(np.int64)
    for i in range(1, full_steps):  # forward: strictly increasing
        idx[i] = max(idx[i], idx[i - 1] + 1)
    idx[-1] = T - 1
    for i in range(full_steps - 2, -1, -1):  # backward: fit under T-1
        idx[i] = min(idx[i], idx[i + 1] - 1)
    mask = np.zeros(T, dtype=bool)
    mask[idx] = True
    return mask


def gaps_of(mask: np.ndarray) -> np.ndarray:
    """Gaps between consecutive full steps of ``mask`` (``int64``, length ``#full - 1``).

    Args:
        mask: boolean full-step mask.
    """
    m = np.asarray(mask).astype(bool)
    return np.diff(np.flatnonzero(m)).astype(np.int64)


def schedule_objective(prior: np.ndarray, mask: np.ndarray, weighting: str = "quadratic") -> float:
    """Total :func:`gap_cost` of a mask: the quantity :func:`dp_schedule` minimises.

    Args:
        prior: error prior, shape ``(T, K+1)``.
        mask: boolean full-step mask of length ``T`` with first and last step full.
        weighting: one of :data:`WEIGHTINGS`.
    """
    m = _check_mask(mask)
    p = _check_prior(prior)
    if m.size != p.shape[0]:
        raise ValueError(f"mask has {m.size} steps but prior has {p.shape[0]}")
    full = np.flatnonzero(m)
    return float(
        sum(gap_cost(p, int(a), int(b), weighting) for a, b in zip(full[:-1], full[1:], strict=True))
    )


def describe_schedule(mask: np.ndarray) -> str:
    """One line such as ``"10/28 full: 0,1,2,5,8,..."`` listing every full step.

    Args:
        mask: boolean full-step mask.
    """
    m = np.asarray(mask).astype(bool)
    full = np.flatnonzero(m)
    return f"{full.size}/{m.size} full: " + ",".join(str(int(i)) for i in full)
