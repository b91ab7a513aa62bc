"""What one trial measures: the :class:`Evaluator` (programs from configs, their cost and fidelity), the
trial objective Optuna calls, and the guaranteed seed trials from the passes' probes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from accelkit.errors import InputError
from accelkit.passes.base import PassConfig, PassFailedError, Program, config_from_dict, run_passes
from accelkit.passes.hooks import ProbeContext
from accelkit.search.settings import SPEEDUP_TOLERANCE, OptimizeSettings


class Evaluator:
    """Builds programs from configs and measures their cost and fidelity; shared by trials."""

    def __init__(self, *, base: Program, calib: Any, spec: Any, baseline_images: torch.Tensor | None = None,
                 latency_inputs: dict[str, Any] | None = None) -> None:
        self.base = base
        self.calib = calib
        self.spec = spec
        # With latency inputs (one recorded denoiser call) costs are measured, not modelled.
        self.latency_inputs = latency_inputs
        self._baseline_images = baseline_images
        self.base_cost = self.cost(base)
        #: what the passes' probes measured, per (passes, steps, budgets)
        self.probe_facts: dict[tuple, dict[str, Any]] = {}

    def cost(self, program: Program) -> Any:
        from accelkit.search.cost import measured_program_cost, program_cost

        if self.latency_inputs is not None:
            return measured_program_cost(program, self.latency_inputs)
        return program_cost(program, self.spec)

    def roofline_speedup(self, program: Program) -> float:
        from accelkit.search.cost import program_cost

        return program_cost(self.base, self.spec).seconds / program_cost(program, self.spec).seconds

    @property
    def baseline_images(self) -> torch.Tensor:
        """The baseline on the calibration prompts (generated on first use)."""
        if self._baseline_images is None:
            self._baseline_images = self.calib.generate(self.base).images
        return self._baseline_images

    def build(self, configs: Sequence[PassConfig]) -> tuple[Program, dict[str, Any]]:
        program, _ = run_passes(self.base, list(configs), self.calib)
        return program, {name: program.resolved[name] for name in program.applied}

    def speedup(self, program: Program) -> tuple[float, Any]:
        cost = self.cost(program)
        return self.base_cost.seconds / cost.seconds, cost

    def fidelity(self, program: Program, prompts: Sequence[str] | None = None,
                 baseline: torch.Tensor | None = None, seed_offset: int = 0) -> tuple[dict, torch.Tensor]:
        from accelkit.report.metrics import fidelity

        images = self.calib.generate(program, prompts, seed_offset=seed_offset).images
        reference = self.baseline_images if baseline is None else baseline
        return fidelity(images, reference), images


def _program_from_resolved(evaluator: Evaluator, resolved: dict[str, dict[str, Any]]) -> Program:
    configs = [config_from_dict(name, data) for name, data in resolved.items()]
    program, _ = run_passes(evaluator.base, configs, evaluator.calib)
    return program


def trial_objective(evaluator: Evaluator, passes: Sequence[str], lowest: float,
                    current: dict[str, Any]) -> Callable[[Any], tuple[float, float]]:
    """The function Optuna calls per trial: suggest configs, build the program, check its speed against the
    ``lowest`` budget, measure fidelity. ``current`` records the running trial's id and every number run
    (so an interrupted process can mark its trial, and a worker count its own)."""
    import optuna

    from accelkit.search.space import suggest_configs

    def objective(trial: Any) -> tuple[float, float]:
        current["trial_id"] = trial._trial_id
        current["numbers"].append(trial.number)
        configs = suggest_configs(trial, passes)
        try:
            program, resolved = evaluator.build(configs)
            speedup, cost = evaluator.speedup(program)
            trial.set_user_attr("passes", resolved)
            trial.set_user_attr("speedup", speedup)
            trial.set_user_attr("flops", cost.flops)
            trial.set_constraint("lowest_budget", lowest * (1 - SPEEDUP_TOLERANCE) - speedup)
            if speedup < lowest * (1 - SPEEDUP_TOLERANCE):
                # Too slow for any budget: skip the costly generation, record why.
                trial.set_user_attr("skipped", "slower than the lowest budget")
                raise optuna.TrialPruned(f"{speedup:.2f}x is below the lowest budget")
            metrics, _ = evaluator.fidelity(program)
            trial.set_user_attr("ssim", metrics["ssim"])
            return cost.seconds, float(metrics["psnr"])
        except optuna.TrialPruned:
            raise
        except (InputError, PassFailedError) as error:
            if isinstance(error, PassFailedError) and not isinstance(error.__cause__, InputError):
                trial.set_user_attr("error", f"PassFailedError: {str(error).splitlines()[0]}")
                raise
            # A sampled combination the passes reject (e.g. warm-up longer than the full steps allow).
            trial.set_user_attr("error", str(error))
            raise optuna.TrialPruned(str(error)) from None
        except KeyboardInterrupt:
            _note_interrupted(trial)
            raise  # optuna marks the trial FAIL and re-raises
        except Exception as error:  # noqa: BLE001 - a failing trial must not end the search
            trial.set_user_attr("error", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            raise

    return objective


def _note_interrupted(trial: Any) -> None:
    try:
        trial.set_user_attr("error", "interrupted")
    except BaseException:  # noqa: BLE001 - a second Ctrl-C or a finished trial: mark_interrupted follows
        pass


def _seed_trials(settings: OptimizeSettings, evaluator: Evaluator, targets: Sequence[float]) -> list[dict[str, Any]]:
    """The guaranteed candidates (see :func:`accelkit.search.space.default_trials`) for this model."""
    from accelkit.search.space import default_trials

    return default_trials(settings.passes, targets, num_steps=settings.steps,
                          facts=_probe_facts(settings, evaluator, targets))


def _probe_facts(settings: OptimizeSettings, evaluator: Evaluator, targets: Sequence[float]) -> dict[str, Any]:
    """What the searched passes' probes measure on this model (memoised: seeds and notes both read it)."""
    from accelkit.search.space import probe_facts

    key = (tuple(settings.passes), settings.steps, tuple(targets))
    if key not in evaluator.probe_facts:
        def seconds(program: Program) -> float:  # the baseline's cost is known (and measured once)
            return (evaluator.base_cost if program is evaluator.base else evaluator.cost(program)).seconds

        context = ProbeContext(base=evaluator.base, calib=evaluator.calib, cost=seconds,
                               num_steps=settings.steps, targets=tuple(targets))
        evaluator.probe_facts[key] = probe_facts(settings.passes, context)
    return evaluator.probe_facts[key]
