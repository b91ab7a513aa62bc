"""The sampler schedule: how many denoising steps run and where their sigmas sit.

``placement="default"`` keeps the pipeline's own spacing for the new step count (the program carries
no sigmas; the pipeline is called with ``num_inference_steps=n``). ``placement="equalized"`` places the
steps so that each makes about the same local error, in the spirit of SDM-style step placement:

* the local error of an Euler (first-order) flow-matching step of size ``h`` at ``sigma`` is, to
  leading order, the step-doubling difference ``(h**2 / 4) * ||dv/dsigma||``, with ``v`` the velocity
  the sampler integrates (the model prediction, CFG-combined when the pipeline batches CFG);
* ``||dv/dsigma||`` (the error density) is estimated by finite differences of the denoiser outputs
  between consecutive steps of calibration runs of the *input* program at its full step count;
* :func:`accelkit.passes._step_placement.equalize_local_error` turns the density into ``n + 1``
  boundaries (blended with the default ``n``-step spacing by ``blend``).

Every scheduler whose ``set_timesteps`` takes custom ``sigmas`` or ``timesteps`` supports equalized
placement (FlowMatch Euler, Euler, DPM-Solver++ multistep, UniPC with flow sigmas, ...). The steps are
placed in the scheduler's own sigma coordinate, with the solver's order in the local-error exponent;
the chosen (effective) sigmas are mapped back to pipeline arguments by bisection against the
scheduler itself (whatever its shift, ``mu`` or timestep table), and stored in ``Program.sigmas`` with
``Program.timestep_kind`` naming the argument. A scheduler that takes neither (DDIM, Euler ancestral
in diffusers 0.42), or rejects custom steps in its configuration, keeps the default spacing: the pass
then records why in ``stats["placement_note"]`` instead of failing.

The solver order is a knob of its own where the scheduler has one (``solver_order`` in the config of
DPM-Solver multistep/singlestep, UniPC, DEIS): with fewer, longer steps a lower order can be the more
stable one, and ``lower_order_final`` drops the order over the last steps (DPM-Solver and DEIS below
15 steps, UniPC always). Both reach the sampler as ``Program.scheduler_overrides``, which the runtime
applies to a copy of the pipeline's scheduler per generation. The probe lists the orders the scheduler
takes, and the knobs enter the search space only for schedulers that have them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from accelkit.calibrate.source import CalibrationSource, SchedulerFacts
from accelkit.errors import InputError
from accelkit.passes._step_placement import equalize_local_error
from accelkit.passes.base import (
    Choice,
    FloatRange,
    GraphVariant,
    PassConfig,
    PassResult,
    Program,
    register_pass,
    run_passes,
)
from accelkit.passes.hooks import (
    BUDGET_TOLERANCE,
    SPLIT_PRIORITY,
    PassHooks,
    ProbeContext,
    Seed,
    SeedRequest,
    Share,
)

__all__ = [
    "PLACEMENTS",
    "PlacementUnavailable",
    "StepsConfig",
    "error_density",
    "fewer_steps_for",
    "placement_unavailable",
    "solver_order",
    "solver_order_facts",
    "steps",
]

PLACEMENTS = ("default", "equalized")
TIMESTEP_KINDS = ("sigmas", "timesteps")
# Scheduler options that resample or reshape the whole sigma array (not pointwise), so chosen
# sigmas could not be mapped back to the pipeline's ``sigmas`` argument.
_UNSUPPORTED_OPTIONS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "shift_terminal",
    "invert_sigmas",
)
_STATE = "steps.prediction"
#: The highest solver order diffusers implements per scheduler (DPM-Solver, DEIS: 3; UniPC takes any
#: order, but above 3 it is unstable and not recommended); classes not listed: 3.
_MAX_SOLVER_ORDER = {"CosineDPMSolverMultistepScheduler": 2}


@dataclass(frozen=True, kw_only=True)
class StepsConfig(PassConfig):
    """Run fewer sampler steps, at the default spacing or at equal estimated local error.

    Args:
        fraction: share of the input program's step count ``T`` to run; the step count is
            ``max(2, round(fraction * T))`` (never more than ``T``).
        placement: ``"default"`` (the pipeline's own spacing for that step count) or ``"equalized"``
            (equal estimated local error per step; flow-matching schedulers only; needs calibration).
        blend: mix between the default spacing (0) and the fully equalized one (1); equalized only.
        num_steps: explicit step count; overrides ``fraction``.
        sigmas: explicit values of the pipeline argument named by ``timestep_kind``, one per step
            (``sigmas``: as the scheduler's ``set_timesteps(sigmas=...)`` takes them, e.g. unshifted and
            without the terminal 0 for FlowMatch; ``timesteps``: training timesteps); when given no
            calibration runs (plans store them).
        timestep_kind: which pipeline argument ``sigmas`` feeds: ``"sigmas"`` or ``"timesteps"``.
        solver_order: the scheduler's ``solver_order`` to run with (None: the scheduler's own);
            only for schedulers that have one.
        lower_order_final: the scheduler's ``lower_order_final`` to run with (None: its own): lower the
            order over the last steps; only for schedulers that have it.
    """

    fraction: float = 1.0
    placement: str = "default"
    blend: float = 1.0
    num_steps: int | None = None
    sigmas: tuple[float, ...] | None = None
    timestep_kind: str = "sigmas"
    solver_order: int | None = None
    lower_order_final: bool | None = None

    SEARCH_SPACE: ClassVar = {
        # Down to 0.1: fewer steps alone must be able to reach 5x-10x budgets.
        "fraction": FloatRange(0.1, 1.0),
        "placement": Choice(PLACEMENTS),
        "blend": FloatRange(0.25, 1.0),
    }

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float):
            raise InputError(f"steps.fraction must be a number in (0, 1], got {self.fraction!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise InputError(f"steps.fraction must be in (0, 1], got {self.fraction}")
        if self.placement not in PLACEMENTS:
            raise InputError(f"steps.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if (
            isinstance(self.blend, bool)
            or not isinstance(self.blend, int | float)
            or not 0.0 <= self.blend <= 1.0
        ):
            raise InputError(f"steps.blend must be in [0, 1], got {self.blend!r}")
        if self.num_steps is not None and (
            isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1
        ):
            raise InputError(f"steps.num_steps must be an integer >= 1 or None, got {self.num_steps!r}")
        if self.timestep_kind not in TIMESTEP_KINDS:
            raise InputError(f"steps.timestep_kind must be one of {TIMESTEP_KINDS}, got {self.timestep_kind!r}")
        if self.solver_order is not None and (
            isinstance(self.solver_order, bool) or not isinstance(self.solver_order, int)
            or not 1 <= self.solver_order <= 3
        ):
            raise InputError(f"steps.solver_order must be 1, 2, 3 or None, got {self.solver_order!r}")
        if self.lower_order_final is not None and not isinstance(self.lower_order_final, bool):
            raise InputError(f"steps.lower_order_final must be true, false or None, got {self.lower_order_final!r}")
        if self.sigmas is not None:
            values = np.asarray(self.sigmas, dtype=np.float64) if len(self.sigmas) else np.zeros(0)
            if values.ndim != 1 or values.size == 0:
                raise InputError("steps.sigmas must be a non-empty list of numbers (one per step) or None")
            # Training timesteps may end at 0; sigmas may not.
            floor_ok = np.all(values >= 0) if self.timestep_kind == "timesteps" else np.all(values > 0)
            if not (np.all(np.isfinite(values)) and floor_ok and np.all(np.diff(values) < 0)):
                raise InputError(
                    f"steps.sigmas must be positive and strictly decreasing, got {list(self.sigmas)}"
                )
            if self.num_steps is not None and self.num_steps != values.size:
                raise InputError(
                    f"steps.num_steps={self.num_steps} but steps.sigmas has {values.size} values"
                )

    def resolve_num_steps(self, baseline: int) -> int:
        """The step count this config runs for a program of ``baseline`` steps."""
        if self.sigmas is not None:
            return len(self.sigmas)
        if self.num_steps is not None:
            return self.num_steps
        if baseline < 2:
            return baseline
        return int(min(baseline, max(2, round(self.fraction * baseline))))

    def scheduler_overrides(self) -> dict[str, Any]:
        """The scheduler config values this config sets (none for the scheduler's own)."""
        values = {"solver_order": self.solver_order, "lower_order_final": self.lower_order_final}
        return {key: value for key, value in values.items() if value is not None}

    def is_noop(self) -> bool:
        return (
            self.fraction == 1.0
            and self.placement == "default"
            and self.num_steps is None
            and self.sigmas is None
            and not self.scheduler_overrides()
        )


class PlacementUnavailable(Exception):
    """Equalized placement cannot be expressed through this scheduler; the steps keep default spacing."""


def placement_unavailable(scheduler: SchedulerFacts) -> str | None:
    """Why equalized placement cannot run on ``scheduler`` (one line), or None when it may.

    Static checks only (the argument it takes, options that resample the whole schedule); the pass
    also probes the scheduler and falls back to default spacing when the chosen steps cannot be
    expressed through it.
    """
    name = scheduler.class_name
    if not scheduler.custom_arguments:
        return f"{name} accepts no custom timesteps or sigmas"
    config = scheduler.config
    used = [option for option in _UNSUPPORTED_OPTIONS if config.get(option)]
    if used:
        return f"{name} with {', '.join(used)} resamples the whole schedule"
    return None


def solver_order(scheduler: SchedulerFacts) -> int:
    """The order of the scheduler's solver (the exponent of the local-error model)."""
    config = scheduler.config
    if config.get("solver_order"):
        return int(config["solver_order"])
    return 2 if scheduler.class_name.startswith("Heun") else 1


@dataclass(frozen=True)
class _ArgumentMap:
    """Pipeline ``sigmas``/``timesteps`` arguments -> the effective sigmas the scheduler makes of them.

    The map is increasing and pointwise (a larger argument gives a larger sigma) for every scheduler
    that takes custom steps, so a vectorised bisection against the scheduler itself inverts it
    whatever its shift, spacing or timestep table.
    """

    scheduler: SchedulerFacts
    kind: str
    extra: dict[str, Any]
    high: float

    def apply(self, arguments: np.ndarray) -> np.ndarray:
        """Effective sigmas (no terminal value) for ``arguments``, one per step."""
        arguments = np.asarray(arguments, dtype=np.float64)
        sigmas = self.scheduler.effective_sigmas(self.kind, arguments, self.extra)
        if sigmas.size != len(arguments) + 1:
            raise PlacementUnavailable(
                f"{self.scheduler.class_name} makes {sigmas.size - 1} steps of {len(arguments)} "
                f"custom {self.kind}"
            )
        return sigmas[:-1]

    def invert(self, targets: np.ndarray) -> np.ndarray:
        top = self.high
        # Sigma arguments of Karras-style schedulers are not bounded by 1: widen until they cover.
        while top < 1e6 and self.apply(np.full(targets.size, top))[0] < targets.max():
            top *= 2
        low, high = np.zeros_like(targets), np.full_like(targets, top)
        for _ in range(60):
            mid = 0.5 * (low + high)
            above = self.apply(np.maximum(mid, 1e-12)) >= targets
            high = np.where(above, mid, high)
            low = np.where(above, low, mid)
        # The schedulers cast arguments to float32; round here so plans store what they will use.
        return high.astype(np.float32).astype(np.float64)


def _argument_map(scheduler: SchedulerFacts, extra: dict[str, Any], count: int) -> _ArgumentMap:
    reason = placement_unavailable(scheduler)
    if reason is not None:
        raise PlacementUnavailable(reason)
    name = scheduler.class_name
    problems = []
    for kind in scheduler.custom_arguments:
        high = float(scheduler.config.get("num_train_timesteps", 1000)) - 1 if kind == "timesteps" else 1.0
        mapping = _ArgumentMap(scheduler, kind, dict(extra), high)
        try:
            mapping.apply(np.linspace(mapping.high, mapping.high / count, count))
            return mapping
        except PlacementUnavailable as error:
            problems.append(str(error))
        except Exception as error:  # noqa: BLE001 - the scheduler rejects custom steps in this configuration
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            problems.append(f"{name} rejects custom {kind}: {first}")
    raise PlacementUnavailable("; ".join(problems) or f"{name} accepts no custom timesteps or sigmas")


# ---------------------------------------------------------------- error density


def _prediction_probe(program: Program) -> Program:
    """The input program whose full variant also writes its prediction as a state (the executor logs states)."""
    from accelkit.capture.graph import clone_graph_module

    base = program.variants["full"]
    module = clone_graph_module(base.module)
    output = next(n for n in module.graph.nodes if n.op == "output")
    values = tuple(output.args[0])
    output.args = (values + (values[0],),)
    module.recompile()
    full = GraphVariant(module, base.state_inputs, (*base.state_outputs, _STATE), base.scalar_inputs)
    return program.replace(variants={**program.variants, "full": full})


def _velocity(prediction: torch.Tensor, guidance_scale: float, cfg_batch: int | None) -> torch.Tensor:
    v = prediction.detach().double().cpu()
    if cfg_batch is not None and v.shape[0] == 2 * cfg_batch:
        # Pipelines that batch CFG put [uncond, cond] in one call and integrate u + g (c - u).
        uncond, cond = v.chunk(2)
        v = uncond + guidance_scale * (cond - uncond)
    return v


def error_density(
    logs: list[list[tuple[int, int, dict[str, torch.Tensor]]]],
    sigmas: np.ndarray,
    *,
    guidance_scale: float = 1.0,
    cfg_batch: int | None = None,
) -> np.ndarray:
    """``||dv/dsigma||`` at each of the ``T + 1`` baseline sigmas, from per-step predictions.

    Between consecutive steps ``i, i + 1`` the RMS of ``v_{i+1} - v_i`` over ``|sigma_{i+1} - sigma_i|``
    estimates the derivative at the midpoint; these are averaged over prompts and CFG branches (calls
    per step) and interpolated onto ``sigmas`` (constant beyond the first and last midpoint).

    Args:
        logs: per prompt, ``(step, branch, {name: tensor})`` records holding the prediction.
        sigmas: the ``T + 1`` effective sigmas of the run, terminal value included.
        guidance_scale: CFG weight used to combine batched [uncond, cond] predictions.
        cfg_batch: images per call; a prediction with twice that batch is CFG-combined. None: never.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    steps = sigmas.size - 1
    total = np.zeros(max(steps - 1, 0))
    counts = np.zeros_like(total)
    for log in logs:
        by_branch: dict[int, dict[int, torch.Tensor]] = {}
        for step, branch, states in log:
            by_branch.setdefault(branch, {})[step] = states[_STATE]
        for per_step in by_branch.values():
            for i in range(steps - 1):
                if i not in per_step or i + 1 not in per_step:
                    continue
                a = _velocity(per_step[i], guidance_scale, cfg_batch)
                b = _velocity(per_step[i + 1], guidance_scale, cfg_batch)
                rms = float(torch.sqrt(torch.mean((b - a) ** 2)))
                total[i] += rms / abs(sigmas[i] - sigmas[i + 1])
                counts[i] += 1
    if steps < 2 or not counts.any():
        return np.ones_like(sigmas)
    derivative = np.divide(total, counts, out=np.zeros_like(total), where=counts > 0)
    keep = counts > 0
    midpoints = 0.5 * (sigmas[:-2] + sigmas[1:-1])
    # np.interp wants increasing abscissae; the midpoints decrease with the step index.
    return np.interp(sigmas, midpoints[keep][::-1], derivative[keep][::-1])


def _measure_density(calib: CalibrationSource, program: Program, sigmas: np.ndarray) -> np.ndarray:
    generation = calib.generate(_prediction_probe(program), record_states=True)
    return error_density(
        generation.state_logs, sigmas, guidance_scale=float(calib.guidance_scale), cfg_batch=calib.cfg_batch
    )


# ---------------------------------------------------------------- the pass


def _finite_list(values: np.ndarray | tuple[float, ...]) -> list[float]:
    return [float(v) for v in values]


def _equalized(
    calib: CalibrationSource, program: Program, config: StepsConfig, before: int, count: int
) -> tuple[tuple[float, ...], str, dict[str, Any]]:
    """Pipeline arguments placing ``count`` steps at equal estimated local error, their kind, stats."""
    scheduler = calib.scheduler
    reason = placement_unavailable(scheduler)
    if reason is not None:
        raise PlacementUnavailable(reason)
    try:
        baseline = calib.pipeline_schedule(before)
        reference = calib.pipeline_schedule(count)
    except (InputError, AttributeError) as error:  # e.g. Heun runs 2n - 1 sigmas for n steps
        raise PlacementUnavailable(str(error).split(";")[0]) from None
    extra = reference.set_timesteps_kwargs
    mapping = _argument_map(scheduler, extra, count)
    density = calib.cached("steps-density", program,
                           lambda: _measure_density(calib, program, baseline.sigmas))
    order = config.solver_order or solver_order(scheduler)
    effective = equalize_local_error(
        baseline.sigmas, density, count, order=order, blend=config.blend, reference=reference.sigmas
    )
    values = mapping.invert(effective[:-1])
    reached = mapping.apply(values)
    if mapping.kind == "sigmas":
        exact = np.allclose(reached, effective[:-1], rtol=1e-5, atol=1e-6)
    else:  # integer timestep tables move each step to its nearest entry: only the order must hold
        exact = True
    if not exact or not np.all(np.diff(values) < 0) or not np.all(np.diff(reached) < 0):
        raise PlacementUnavailable(
            f"the equalized steps cannot be expressed through {scheduler.class_name}'s {mapping.kind}"
        )
    stats: dict[str, Any] = dict(
        blend=config.blend,
        solver_order=order,
        timestep_kind=mapping.kind,
        density=_finite_list(density),
        baseline_sigmas=_finite_list(baseline.sigmas),
        effective_sigmas=_finite_list(np.concatenate([reached, effective[-1:]])),
    )
    mu = extra.get("mu")
    if mu is not None and isinstance(mu, int | float) and math.isfinite(float(mu)):
        stats["mu"] = float(mu)
    return tuple(float(v) for v in values), mapping.kind, stats


# ---------------------------------------------------------------- hooks: report, seeds, probe


def fewer_steps_for(num_steps: int, target: float) -> int | None:
    """The most sampler steps (of ``num_steps``) that alone meet ``target``; None when 2 steps do not.

    Cost is linear in the step count, so ``n`` steps are ``num_steps / n`` times faster.
    """
    count = min(num_steps, math.floor(num_steps / (target * (1 - BUDGET_TOLERANCE)) + 1e-9))
    return count if count >= 2 else None


def describe(resolved: Mapping[str, Any], stats: Mapping[str, Any]) -> str | None:
    """The step count, spacing and solver order, in words."""
    before, after = stats.get("steps_before"), stats.get("steps_after")
    order = _describe_order(resolved)
    if before is None or (after == before and not order):
        return None
    placement = "equalized-error" if stats.get("sigmas") is not None else "default"
    return f"run {after} of {before} sampler steps ({placement} spacing{order})"


def _describe_order(resolved: Mapping[str, Any]) -> str:
    parts = []
    if resolved.get("solver_order") is not None:
        parts.append(f"solver order {resolved['solver_order']}")
    if resolved.get("lower_order_final") is not None:
        parts.append("lower order over the last steps" if resolved["lower_order_final"]
                     else "full order to the last step")
    return "".join(f", {part}" for part in parts)


def _share_of_steps(num_steps: int | None, target: float) -> float | None:
    if num_steps is None:
        return min(1.0, 1.0 / target)
    count = fewer_steps_for(num_steps, target)
    return None if count is None else count / num_steps


def seeds(request: SeedRequest) -> list[Seed]:
    """Fewer steps alone: the most steps meeting the budget, at each placement the pipeline takes.

    These are the guaranteed candidates (priority 0 at the default spacing, 1 at the other placement).
    Without ``num_steps`` the share is ``1 / target`` (it may miss a budget by rounding).
    """
    share = _share_of_steps(request.num_steps, request.target)
    if share is None:
        return []
    placements = request.facts.get("placements", PLACEMENTS)
    seeds = [Seed({"fraction": share, "placement": placement, "blend": 1.0}, priority)
             for priority, placement in enumerate(placements[:2])]
    # The other solver orders at the same step count, after the guaranteed candidates and the splits.
    fewer = {"fraction": share, "placement": "default", "blend": 1.0}
    seeds += [Seed({**fewer, **change}, SPLIT_PRIORITY + 1) for change in _order_changes(request.facts)]
    return seeds


def _order_changes(facts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The solver orders other than the scheduler's own (from the probe's facts).

    ``lower_order_final`` is searched but not seeded: it changes nothing for DPM-Solver++ 2M with its
    default zero final sigma (the last step is first order either way), and seeds are few.
    """
    return [{"solver_order": order} for order in facts.get("solver_orders", ())]


def space(facts: Mapping[str, Any]) -> dict[str, Any]:
    """The search space on this scheduler: the solver-order knobs only where its config has them."""
    domains: dict[str, Any] = dict(StepsConfig.SEARCH_SPACE)
    if facts.get("solver_orders"):
        # None is the scheduler's own order, so the no-op default lies in the space.
        domains["solver_order"] = Choice((None, *facts["solver_orders"]))
    if facts.get("lower_order_final") is not None:
        domains["lower_order_final"] = Choice((None, not facts["lower_order_final"]))
    return domains


def solver_order_facts(scheduler: SchedulerFacts) -> dict[str, Any]:
    """The scheduler's own solver order and the other orders it runs with; {} without the knob.

    ``solver_orders`` lists the orders (1 .. the scheduler's maximum) other than its own whose copy
    constructs; ``lower_order_final`` is the scheduler's own setting, when it has one.
    """
    config = scheduler.config
    facts: dict[str, Any] = {}
    if isinstance(config.get("solver_order"), int):
        own = int(config["solver_order"])
        highest = max(own, _MAX_SOLVER_ORDER.get(scheduler.class_name, 3))
        others = [order for order in range(1, min(highest, 3) + 1)
                  if order != own and scheduler.runs_with({"solver_order": order})]
        facts.update(solver_order=own, solver_orders=tuple(others))
    if isinstance(config.get("lower_order_final"), bool):
        facts["lower_order_final"] = bool(config["lower_order_final"])
    return facts


def shares(request: SeedRequest) -> Iterator[Share]:
    """Step counts that take about half the budget (on a log scale), most steps first."""
    num_steps, target = request.num_steps, request.target
    if num_steps is None:
        share = target ** 0.5
        yield Share({"fraction": min(1.0, 1.0 / share), "placement": "default", "blend": 1.0}, share, None)
        return
    low = fewer_steps_for(num_steps, target) or 2
    for count in range(min(num_steps, round(num_steps / target ** 0.5)), low, -1):
        params = {"fraction": count / num_steps, "placement": "default", "blend": 1.0}
        yield Share(params, num_steps / count, count)


def probe(context: ProbeContext) -> dict[str, Any]:
    """The placements this pipeline takes; ``note`` says why equalized placement falls back, if it does.

    Runs the pass once (its density measurement is cached for the trials that follow), since some
    schedulers take custom steps in general but not in their configuration (DPM-Solver++ with flow sigmas).
    """
    note = _placement_note(context)
    orders = solver_order_facts(context.calib.scheduler) if context.calib is not None else {}
    return {"placements": ("default",) if note else PLACEMENTS,
            "note": f"Step placement: {note}." if note else None,
            **orders}


def _placement_note(context: ProbeContext) -> str | None:
    if context.calib is None:
        return "equalized placement needs calibration data"
    static = placement_unavailable(context.calib.scheduler)
    count = fewer_steps_for(context.num_steps, context.targets[0])
    if static or count is None or count >= context.num_steps:
        return static
    try:
        _, results = run_passes(context.base, [StepsConfig(num_steps=count, placement="equalized")], context.calib)
    except Exception as error:  # noqa: BLE001 - trials will record the failure themselves
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return results["steps"].stats.get("placement_note")


def _check_overrides(scheduler: SchedulerFacts, overrides: Mapping[str, Any]) -> None:
    missing = [f"steps.{key}" for key in overrides if key not in scheduler.config]
    if missing:
        raise InputError(
            f"{', '.join(missing)}: {scheduler.class_name} has no such setting; leave it unset (None)"
        )


# ---------------------------------------------------------------- the pass


@register_pass(StepsConfig, name="steps",
               hooks=PassHooks(describe=describe, seeds=seeds, shares=shares, probe=probe, space=space))
def steps(program: Program, config: StepsConfig, calib: CalibrationSource | None) -> PassResult:
    """Set the number of denoising steps and, for equalized placement, their sigmas.

    Args:
        program: input program; its schedule must be all ``"full"`` (the steps pass runs first).
        config: the step settings.
        calib: the calibration source; needed only for ``placement="equalized"``
            without explicit ``sigmas``.

    Raises:
        InputError: a schedule that is not all full steps, per-step scalars already set, or equalized
            placement without calibration data. (A scheduler that cannot take the placed steps is no
            error: the steps keep the default spacing and ``stats["placement_note"]`` says why.)
    """
    before = program.num_steps
    if config.is_noop():
        return PassResult(
            program,
            modified=False,
            stats={"steps_before": before, "steps_after": before, "placement": "default", "sigmas": None},
        )
    if any(name != "full" for name in program.schedule):
        raise InputError(
            f"the steps pass needs a program that runs the full denoiser at every step, got schedule "
            f"{list(program.schedule)}; apply 'steps' before the other passes"
        )
    if program.step_scalars:
        raise InputError(
            f"the steps pass cannot change the step count of a program with per-step scalars "
            f"{sorted(program.step_scalars)}; apply 'steps' first"
        )
    count = config.resolve_num_steps(before)
    overrides = config.scheduler_overrides()
    if overrides and calib is not None:
        _check_overrides(calib.scheduler, overrides)
    stats: dict[str, Any] = {"steps_before": before, "steps_after": count, "placement": config.placement,
                             "scheduler_overrides": overrides}
    kind = config.timestep_kind
    if config.sigmas is not None:
        arguments: tuple[float, ...] | None = tuple(float(s) for s in config.sigmas)
        stats["placement"] = "explicit"
    elif config.placement == "default":
        arguments = None
    else:
        if calib is None:
            raise InputError(
                "steps.placement='equalized' needs calibration data; pass a Calibrator or steps.sigmas"
            )
        try:
            arguments, kind, placed = _equalized(calib, program, config, before, count)
            stats.update(placed)
        except PlacementUnavailable as reason:
            # Not an error: the search asks every scheduler; those that take no custom steps run
            # the default spacing, and the stats say why (the probe puts it in the report's notes).
            arguments = None
            stats.update(placement="default", placement_note=f"default spacing: {reason}")
    stats["sigmas"] = None if arguments is None else list(arguments)
    resolved = StepsConfig(
        fraction=config.fraction,
        placement="default" if "placement_note" in stats else config.placement,
        blend=config.blend,
        num_steps=count,
        sigmas=arguments,
        timestep_kind=kind,
        solver_order=config.solver_order,
        lower_order_final=config.lower_order_final,
    )
    if count == before and arguments is None and program.sigmas is None and not overrides:
        # Same step count at the pipeline's own spacing: the program is already that.
        return PassResult(program, modified=False, stats=stats, resolved_config=resolved)
    new_program = program.replace(schedule=("full",) * count, sigmas=arguments, timestep_kind=kind,
                                  scheduler_overrides=overrides)
    return PassResult(new_program, modified=True, stats=stats, resolved_config=resolved)
