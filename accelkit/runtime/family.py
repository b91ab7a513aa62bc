"""The programs of one plan: one per denoiser shape signature and step count, derived when first needed.

A capture is valid for one shape signature (batch, resolution, token counts), but what the passes
decided is not: cache schedules, prune sets, quantized weights and sparse thresholds are stored as
resolved configs that replay on any capture without calibration. So a call with new denoiser inputs
captures the denoiser once more (memoized per signature) and replays the plan's configs on it; a call
with another step count re-derives the step-dependent settings (:mod:`accelkit.runtime.rederive`).
The plan's own program is kept as built, so the plan's own settings run exactly as before.
docs/runtime-shapes.md records why this was chosen over symbolic shapes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from accelkit.capture.graph import DenoiserGraph, split_call
from accelkit.capture.specialize import input_values
from accelkit.errors import InputError, PlanMismatchError
from accelkit.passes.base import PassConfig, PassFailedError, Program, config_from_dict, run_passes
from accelkit.runtime.rederive import cache_mask_for_steps, rescale_step_configs

logger = logging.getLogger(__name__)

CaptureFunction = Callable[[Mapping[str, Any]], DenoiserGraph]


@dataclass(frozen=True)
class Recipe:
    """What rebuilds a plan's program on any capture: its resolved configs and the tensors passes made.

    Args:
        configs: the resolved pass configs, in pass order.
        new_weights: tensors the passes created (quantized, recovered weights), by their program key.
        baseline_steps: the step count the first pass started from (before any ``steps`` pass).
    """

    configs: tuple[PassConfig, ...]
    new_weights: Mapping[str, torch.Tensor] = field(default_factory=dict)
    baseline_steps: int = 1

    @classmethod
    def of_program(cls, program: Program, baseline_steps: int | None = None) -> Recipe | None:
        """The recipe a program records, or None for one its passes were applied to by hand.

        ``run_passes`` records each pass's resolved config; a program with variants but no record (a pass
        function called directly) cannot be rebuilt.
        """
        if not program.applied and (
            set(program.variants) != {"full"} or program.sigmas is not None or program.scheduler_overrides
        ):
            return None
        configs = tuple(config_from_dict(name, program.resolved[name]) for name in program.applied)
        if baseline_steps is None:
            baseline_steps = int(program.stats.get("steps", {}).get("steps_before", program.num_steps))
        return cls(configs, dict(program.new_weights), baseline_steps)

    def build(self, graph: DenoiserGraph, plan_steps: int, num_steps: int) -> Program:
        """The program for ``graph`` at ``num_steps`` steps (the plan's configs as is at ``plan_steps``)."""
        from accelkit.passes.steps import StepsConfig

        if num_steps == plan_steps:
            configs, cache_config = list(self.configs), None
        else:
            configs, cache_config = rescale_step_configs(self.configs, plan_steps, num_steps)
        has_steps_pass = any(isinstance(c, StepsConfig) for c in self.configs)
        program = Program.from_graph(graph, self.baseline_steps if has_steps_pass else num_steps)
        if self.new_weights:
            program = program.replace(new_weights=dict(self.new_weights))
        program, _ = run_passes(program, configs, calib=None)
        if cache_config is not None:
            forced = next((i for i, name in enumerate(program.schedule) if name == "full"), program.num_steps)
            mask = cache_mask_for_steps(cache_config, plan_steps, program.num_steps, forced)
            program, _ = run_passes(program, [dataclasses.replace(cache_config, full_step_mask=mask)], None)
        return program


def describe_signature_mismatch(program: Program, kwargs: Mapping[str, Any]) -> str:
    """One line naming which inputs differ from the ones the plan was made for."""
    differences = []
    tensors, _, nested = split_call(kwargs)  # nested tensors by path: added_cond_kwargs.text_embeds
    for name, spec in zip(program.graph.input_names, program.graph.input_specs, strict=True):
        value = tensors.get(name)
        if not isinstance(value, torch.Tensor):
            differences.append(f"{name} missing (expected shape {list(spec.shape)})")
        elif tuple(value.shape) != spec.shape or str(value.dtype) != spec.dtype:
            differences.append(
                f"{name} is {list(value.shape)} {value.dtype}, the plan expects {list(spec.shape)} {spec.dtype}"
            )
    for name, expected in program.graph.static_kwargs.items():
        if kwargs.get(name) != expected:
            differences.append(f"{name}={kwargs.get(name)!r}, the plan expects {expected!r}")
    for name, expected in program.graph.input_values.items():
        if name in tensors and input_values(kwargs, (name,)).get(name) != expected:
            differences.append(f"the values of {name} differ from the ones the plan was captured for")
    extra = sorted(set(tensors) - set(program.graph.input_names))
    extra += sorted(set(kwargs) - set(tensors) - set(nested) - set(program.graph.static_kwargs))
    extra = [k for k in extra if kwargs.get(k) is not None]
    if extra:
        differences.append(f"unexpected argument(s) {extra}")
    detail = "; ".join(differences) or "argument structure differs"
    return (
        f"the plan was made for other denoiser inputs ({detail}); use the resolution, batch size and "
        "guidance setting the plan was made for, or optimize again for these"
    )


def steps_mismatch_message(plan_steps: int, num_steps: int, *, derivable: bool) -> str:
    hint = " or drop --strict-steps (strict_steps=False) to re-derive the schedule" if derivable else ""
    return (
        f"the plan was made for {plan_steps} denoising steps but the pipeline runs {num_steps}: "
        f"call it with num_inference_steps={plan_steps}{hint}"
    )


class ProgramFamily:
    """The programs of one plan by (shape signature, step count); the plan's own program is the first.

    Args:
        base: the plan's program (returned unchanged for its own signature and step count).
        recipe: how to rebuild it on another capture; None: only ``base`` can run.
        capture: captures the denoiser for a call's keyword arguments (memoized by the caller).
    """

    def __init__(self, base: Program, recipe: Recipe | None, capture: CaptureFunction | None = None) -> None:
        self.base = base
        self.recipe = recipe
        self._capture = capture
        self._graphs: dict[tuple, DenoiserGraph] = {base.graph.signature(): base.graph}
        self._programs: dict[tuple[tuple, int], Program] = {(base.graph.signature(), base.num_steps): base}
        #: (what was derived, seconds) for every derived program, in order.
        self.derivations: list[tuple[str, float]] = []

    @property
    def derivable(self) -> bool:
        return self.recipe is not None

    def for_steps(self, num_steps: int) -> Program:
        """The program for the plan's own denoiser inputs at ``num_steps`` steps."""
        return self._get(self.base.graph.signature(), num_steps, None)

    def for_call(self, kwargs: Mapping[str, Any], num_steps: int) -> Program:
        """The program for a denoiser call with these keyword arguments at ``num_steps`` steps."""
        return self._get(self.base.graph.call_signature(kwargs), num_steps, kwargs)

    def _get(self, signature: tuple, num_steps: int, kwargs: Mapping[str, Any] | None) -> Program:
        program = self._programs.get((signature, num_steps))
        if program is None:
            program = self._derive(signature, num_steps, kwargs)
            self._programs[(signature, num_steps)] = program
        return program

    def _graph(self, signature: tuple, kwargs: Mapping[str, Any] | None) -> DenoiserGraph:
        graph = self._graphs.get(signature)
        if graph is not None:
            return graph
        if self.recipe is None or self._capture is None or kwargs is None:
            raise PlanMismatchError(describe_signature_mismatch(self.base, kwargs or {}))
        start = time.perf_counter()
        graph = self._capture(kwargs)
        self._graphs[signature] = graph
        shapes = {n: list(spec.shape) for n, spec in zip(graph.input_names, graph.input_specs, strict=True)}
        self.derivations.append((f"capture {shapes}", time.perf_counter() - start))
        logger.info("captured the denoiser for new inputs %s in %.2f s", shapes, self.derivations[-1][1])
        return graph

    def _derive(self, signature: tuple, num_steps: int, kwargs: Mapping[str, Any] | None) -> Program:
        plan_steps = self.base.num_steps
        if self.recipe is None and num_steps != plan_steps:
            raise PlanMismatchError(steps_mismatch_message(plan_steps, num_steps, derivable=False))
        graph = self._graph(signature, kwargs)
        start = time.perf_counter()
        try:
            program = self.recipe.build(graph, plan_steps, num_steps)
        except (InputError, PassFailedError) as error:
            raise PlanMismatchError(
                f"could not rebuild the plan for these denoiser inputs at {num_steps} steps: {error}"
            ) from None
        seconds = time.perf_counter() - start
        self.derivations.append((f"program at {num_steps} steps", seconds))
        if num_steps != plan_steps and not any(
            steps == num_steps for (_, steps) in self._programs
        ):
            logger.warning(
                "the plan was made for %d steps: its schedule was re-derived for %d steps in %.0f ms; its "
                "fidelity was measured at %d steps (check it with --check)",
                plan_steps, num_steps, 1000 * seconds, plan_steps,
            )
        return program


class StepSelection:
    """The step-count choice a runner shares with its :class:`ProgramFamily` (a mixin).

    ``select_steps`` is called before a generation; ``current_program`` gives the program for a call.
    """

    family: ProgramFamily | None = None
    strict_steps: bool = False
    _selected_steps: int | None = None

    @property
    def num_steps(self) -> int:
        return self._selected_steps if self._selected_steps is not None else self.program.num_steps

    def select_steps(self, num_steps: int) -> None:
        """Run ``num_steps`` steps from the next call on (derives the schedule once per count)."""
        plan_steps = self.program.num_steps
        if num_steps == self.num_steps:
            return
        derivable = self.family is not None and self.family.derivable
        if num_steps != plan_steps and (self.strict_steps or not derivable):
            raise PlanMismatchError(steps_mismatch_message(plan_steps, num_steps, derivable=derivable))
        if num_steps != plan_steps:
            self.family.for_steps(num_steps)
        self._selected_steps = num_steps

    def current_program(self, kwargs: Mapping[str, Any]) -> Program:
        """The program for this call: the plan's own one, or the one derived for its inputs and step count."""
        if self.family is None:
            return self.program
        return self.family.for_call(kwargs, self.num_steps)
