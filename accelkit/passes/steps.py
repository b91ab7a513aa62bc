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

Only ``FlowMatchEulerDiscreteScheduler`` supports equalized placement. Its ``set_timesteps(sigmas=...)``
takes *unshifted* sigmas and shifts them itself (static ``shift`` or resolution-dependent ``mu``), then
appends the terminal 0; the pass therefore maps the chosen (effective) sigmas back through the
scheduler's own shift, with the ``mu`` the pipeline passes, and stores those pipeline-argument values in
``Program.sigmas``. The effective sigmas are reported in the stats.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

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
)

__all__ = ["PLACEMENTS", "StepsConfig", "error_density", "pipeline_schedule", "steps"]

PLACEMENTS = ("default", "equalized")
FLOW_MATCH_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
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
        sigmas: explicit values of the pipeline's ``sigmas`` argument, one per step (unshifted, no
            terminal 0, as ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`` takes them);
            when given no calibration runs (plans store them).
    """

    fraction: float = 1.0
    placement: str = "default"
    blend: float = 1.0
    num_steps: int | None = None
    sigmas: tuple[float, ...] | None = None

    SEARCH_SPACE: ClassVar = {
        "fraction": FloatRange(0.2, 1.0),
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
        if self.sigmas is not None:
            values = np.asarray(self.sigmas, dtype=np.float64) if len(self.sigmas) else np.zeros(0)
            if values.ndim != 1 or values.size == 0:
                raise InputError("steps.sigmas must be a non-empty list of numbers (one per step) or None")
            if not (np.all(np.isfinite(values)) and np.all(values > 0) and np.all(np.diff(values) < 0)):
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

    def is_noop(self) -> bool:
        return (
            self.fraction == 1.0
            and self.placement == "default"
            and self.num_steps is None
            and self.sigmas is None
        )


# ---------------------------------------------------------------- the pipeline's own schedule


class _StopGeneration(Exception):
    """Raised at the first denoiser call to end a probe once the schedule is set."""


@dataclass(frozen=True)
class PipelineSchedule:
    """What the pipeline's scheduler runs for one step count.

    Args:
        sigmas: the scheduler's effective sigmas after ``set_timesteps``, terminal value included.
        set_timesteps_kwargs: the other arguments the pipeline gave ``set_timesteps`` (e.g. ``mu``).
    """

    sigmas: np.ndarray
    set_timesteps_kwargs: dict[str, Any]


def pipeline_schedule(calib: Any, num_steps: int) -> PipelineSchedule:
    """The schedule the pipeline sets by default for ``num_steps`` steps.

    The pipeline is called on the first calibration prompt and stopped at its first denoiser call,
    so only prompt encoding runs. Reading it from the pipeline (rather than recomputing it) gets its
    own default spacing (Flux pipelines pass ``linspace(1, 1/n, n)``, SD3 lets the scheduler choose)
    and the ``mu`` of resolution-dependent shifting.
    """
    from accelkit.pipeline_io import find_denoiser

    pipe = calib.pipe
    scheduler = pipe.scheduler
    _, denoiser = find_denoiser(pipe)
    original = scheduler.set_timesteps
    signature = inspect.signature(original)
    recorded: dict[str, Any] = {}

    # functools.wraps keeps the signature visible: pipelines check it for a `sigmas` parameter.
    @functools.wraps(original)
    def spy(*args: Any, **kwargs: Any) -> Any:
        recorded.clear()
        recorded.update(signature.bind(*args, **kwargs).arguments)
        return original(*args, **kwargs)

    def stop(module: Any, args: Any, kwargs: Any) -> None:
        raise _StopGeneration

    kwargs = calib.call_kwargs(calib.prompts[0], 0)
    kwargs["num_inference_steps"] = num_steps
    scheduler.set_timesteps = spy
    handle = denoiser.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**kwargs)
    except _StopGeneration:
        pass
    finally:
        handle.remove()
        del scheduler.set_timesteps
    sigmas = np.asarray(torch.as_tensor(scheduler.sigmas).detach().double().cpu().reshape(-1))
    if sigmas.size != num_steps + 1:
        raise InputError(
            f"{type(pipe).__name__} set {sigmas.size - 1} sigmas for num_inference_steps={num_steps}; "
            "use steps.placement='default'"
        )
    extra = {
        k: v for k, v in recorded.items() if k not in ("num_inference_steps", "device", "sigmas", "timesteps")
    }
    return PipelineSchedule(sigmas, extra)


def _check_flow_match(scheduler: Any) -> None:
    name = type(scheduler).__name__
    if name not in FLOW_MATCH_SCHEDULERS:
        raise InputError(
            f"steps.placement='equalized' needs a flow-matching scheduler ({', '.join(FLOW_MATCH_SCHEDULERS)}), "
            f"but the pipeline uses {name}; use steps.placement='default'"
        )
    config = getattr(scheduler, "config", {})
    used = [option for option in _UNSUPPORTED_OPTIONS if config.get(option)]
    if used:
        raise InputError(
            f"steps.placement='equalized' does not support {name} with {', '.join(used)} set; "
            "use steps.placement='default'"
        )


def _apply_shift(scheduler: Any, arguments: np.ndarray, extra: dict[str, Any]) -> np.ndarray:
    """Effective sigmas the scheduler makes from pipeline ``sigmas`` arguments (no terminal value)."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(sigmas=[float(a) for a in arguments], **extra)
    return np.asarray(probe.sigmas.detach().double().cpu())[:-1]


def _unshift(scheduler: Any, targets: np.ndarray, extra: dict[str, Any]) -> np.ndarray:
    """Pipeline ``sigmas`` arguments whose shifted values are ``targets``.

    The scheduler's shift (static, or exponential/linear with ``mu``) is increasing and pointwise, so
    a vectorised bisection against the scheduler itself inverts it whatever its form.
    """
    low = np.zeros_like(targets)
    high = np.ones_like(targets)
    for _ in range(60):
        mid = 0.5 * (low + high)
        shifted = _apply_shift(scheduler, np.maximum(mid, 1e-12), extra)
        above = shifted >= targets
        high = np.where(above, mid, high)
        low = np.where(above, low, mid)
    # The scheduler casts its arguments to float32; round here so plans store what it will use.
    return high.astype(np.float32).astype(np.float64)


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


def _measure_density(calib: Any, program: Program, sigmas: np.ndarray) -> np.ndarray:
    generation = calib.generate(_prediction_probe(program), record_states=True)
    cfg_batch = None
    if float(getattr(calib, "guidance_scale", 1.0)) > 1.0:
        cfg_batch = int(getattr(calib, "extra_call_kwargs", {}).get("num_images_per_prompt", 1) or 1)
    return error_density(
        generation.state_logs, sigmas, guidance_scale=float(calib.guidance_scale), cfg_batch=cfg_batch
    )


# ---------------------------------------------------------------- the pass


def _finite_list(values: np.ndarray | tuple[float, ...]) -> list[float]:
    return [float(v) for v in values]


@register_pass(StepsConfig, name="steps")
def steps(program: Program, config: StepsConfig, calib: Any) -> PassResult:
    """Set the number of denoising steps and, for equalized placement, their sigmas.

    Args:
        program: input program; its schedule must be all ``"full"`` (the steps pass runs first).
        config: the step settings.
        calib: a :class:`accelkit.calibrate.Calibrator`; needed only for ``placement="equalized"``
            without explicit ``sigmas``.

    Raises:
        InputError: a schedule that is not all full steps, per-step scalars already set, or equalized
            placement on a scheduler that does not support it or without calibration data.
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
    stats: dict[str, Any] = {"steps_before": before, "steps_after": count, "placement": config.placement}
    effective: np.ndarray | None = None
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
        scheduler = calib.pipe.scheduler
        _check_flow_match(scheduler)
        baseline = pipeline_schedule(calib, before)
        reference = pipeline_schedule(calib, count)
        key = calib.cache_key("steps-density", program)
        density = calib.cached_array(key, lambda: _measure_density(calib, program, baseline.sigmas))
        effective = equalize_local_error(
            baseline.sigmas, density, count, order=1, blend=config.blend, reference=reference.sigmas
        )
        extra = reference.set_timesteps_kwargs
        values = _unshift(scheduler, effective[:-1], extra)
        reached = _apply_shift(scheduler, values, extra)
        if not np.allclose(reached, effective[:-1], rtol=1e-5, atol=1e-6) or not np.all(np.diff(values) < 0):
            raise InputError(
                f"could not express the equalized sigmas through {type(scheduler).__name__}'s shift; "
                "use steps.placement='default'"
            )
        arguments = tuple(float(v) for v in values)
        stats.update(
            blend=config.blend,
            density=_finite_list(density),
            baseline_sigmas=_finite_list(baseline.sigmas),
            effective_sigmas=_finite_list(effective),
        )
        mu = extra.get("mu")
        if mu is not None and isinstance(mu, int | float) and math.isfinite(float(mu)):
            stats["mu"] = float(mu)
    stats["sigmas"] = None if arguments is None else list(arguments)
    resolved = StepsConfig(
        fraction=config.fraction,
        placement=config.placement,
        blend=config.blend,
        num_steps=count,
        sigmas=arguments,
    )
    if count == before and arguments is None and program.sigmas is None:
        # Same step count at the pipeline's own spacing: the program is already that.
        return PassResult(program, modified=False, stats=stats, resolved_config=resolved)
    new_program = program.replace(schedule=("full",) * count, sigmas=arguments, timestep_kind="sigmas")
    return PassResult(new_program, modified=True, stats=stats, resolved_config=resolved)
