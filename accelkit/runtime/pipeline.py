"""``AcceleratedPipeline``: the user's diffusers pipeline with a step-aware denoiser.

The denoiser module stays in place (pipelines read its ``config``, ``dtype`` and hooks); only its
``forward`` is replaced by a function that identifies the denoising step from the current timestep's
index in the scheduler's timesteps and runs the graph variant the program names for that step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from accelkit.errors import InputError, PlanMismatchError
from accelkit.passes.base import Program

# Pipeline I/O moved to accelkit.pipeline_io; re-exported for code importing it from here.
from accelkit.pipeline_io import (  # noqa: F401
    accepts_argument,
    bind_positional,
    family_of,
    find_denoiser,
    positional_parameter_names,
)
from accelkit.runtime.executor import ProgramExecutor


class StepLocator:
    """Maps a denoiser call's ``timestep`` to its index in ``scheduler.timesteps``.

    Pipelines pass the scheduler's timestep as is (SD3, PixArt, UNets), divided by 1000 (Flux) or as
    ``1 - t/1000`` (Lumina2); the family's ``timestep_maps`` say which (the generic family tries the
    first two and the nearest timestep wins).
    """

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self._maps = family_of(pipe).timestep_maps
        self._source: torch.Tensor | None = None
        self._values: np.ndarray | None = None

    def timesteps(self) -> np.ndarray:
        source = getattr(self._pipe.scheduler, "timesteps", None)
        if source is None:
            raise RuntimeError("the scheduler has no timesteps: the pipeline did not call set_timesteps")
        if source is not self._source:
            self._source = source
            self._values = np.asarray(torch.as_tensor(source).detach().double().cpu().reshape(-1))
        return self._values

    def locate(self, timestep: Any) -> int:
        values = self.timesteps()
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        best_index, best_error = 0, float("inf")
        for scale, offset in self._maps:
            mapped = values * scale + offset
            # Relative error, floored for timesteps near 0 (Lumina2's first step passes 1 - 1000/1000).
            errors = np.abs(mapped - t) / max(abs(t), 1e-3 * float(np.abs(mapped).max(initial=0.0)), 1e-6)
            index = int(np.argmin(errors))
            if errors[index] < best_error:
                best_index, best_error = index, float(errors[index])
        if best_error > 0.05:
            raise RuntimeError(
                f"timestep {t} matches none of the scheduler's timesteps; accelkit identifies the step from it"
            )
        return best_index


class StepAwareForward:
    """The replacement ``forward`` of the denoiser.

    Args:
        pipe: the pipeline (its scheduler is read at every call).
        executor: runs the program's variants.
    """

    def __init__(self, pipe: Any, executor: ProgramExecutor) -> None:
        self.pipe = pipe
        self.executor = executor
        self.locator = StepLocator(pipe)
        try:
            self._positional = positional_parameter_names(find_denoiser(pipe)[1])
        except InputError:
            self._positional = ()
        self._timestep_input = family_of(pipe).timestep_input
        self._last_step = -1
        self._branch = 0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs = bind_positional(self._positional, args, kwargs)
        program = self.executor.program
        num_timesteps = len(self.locator.timesteps())
        if num_timesteps != program.num_steps:
            raise PlanMismatchError(
                f"the plan was made for {program.num_steps} denoising steps but the pipeline runs "
                f"{num_timesteps}: call it with num_inference_steps={program.num_steps}"
            )
        step = self.locator.locate(kwargs[self._timestep_input])
        if step == self._last_step:
            # Same step again: the pipeline runs CFG as separate calls; each branch keeps its own cache.
            self._branch += 1
        else:
            if step < self._last_step:
                self.executor.reset()
            self._branch = 0
        self._last_step = step
        return_dict = bool(kwargs.get("return_dict", True))
        self.calls += 1
        return self.executor.run(step, self._branch, kwargs, return_dict)

    def reset(self) -> None:
        self._last_step = -1
        self._branch = 0
        self.executor.reset()


class AcceleratedPipeline:
    """A diffusers pipeline whose denoiser runs an accelkit :class:`Program`.

    Calls behave like the wrapped pipeline's; the step count (and, when the ``steps`` pass chose them,
    the sigmas) come from the program. Other attributes are the wrapped pipeline's.

    Args:
        pipe: the diffusers pipeline (modified in place until :meth:`restore`).
        program: the program to run.
        compile: run graph variants through ``torch.compile``.
        call_defaults: pipeline arguments applied when the caller omits them (the resolution and
            guidance scale a plan was made for).
        executor: what runs a step (``run(step, branch, kwargs, return_dict)``, ``reset()``): the
            onnxruntime or TensorRT runner of an export; a :class:`ProgramExecutor` when None.
    """

    def __init__(
        self, pipe: Any, program: Program, *, compile: bool = False, call_defaults: dict[str, Any] | None = None,
        executor: Any = None,
    ) -> None:
        program.validate()
        self.pipe = pipe
        self.program = program
        self.call_defaults = dict(call_defaults or {})
        self.denoiser_name, self.denoiser = find_denoiser(pipe)
        self.executor = executor if executor is not None else ProgramExecutor(program, compile=compile)
        self.forward = StepAwareForward(pipe, self.executor)
        self._original_forward = self.denoiser.__dict__.get("forward")
        self.denoiser.forward = self.forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        steps = kwargs.get("num_inference_steps")
        if steps is not None and steps != self.program.num_steps:
            raise PlanMismatchError(
                f"the plan was made for {self.program.num_steps} denoising steps, not {steps}: "
                f"omit num_inference_steps or pass {self.program.num_steps}"
            )
        kwargs["num_inference_steps"] = self.program.num_steps
        for key, value in self.call_defaults.items():
            kwargs.setdefault(key, value)
        if self.program.sigmas is not None:
            kind = self.program.timestep_kind
            if not accepts_argument(self.pipe, kind):
                raise InputError(
                    f"{type(self.pipe).__name__} does not accept custom {kind}: the plan's step schedule "
                    "cannot be applied to it; optimize without the 'steps' pass"
                )
            kwargs[kind] = list(self.program.sigmas)
        self.forward.reset()
        return self.pipe(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    @property
    def variant_calls(self) -> dict[str, int]:
        """How many times each graph variant ran (for tests and cost accounting)."""
        return dict(self.executor.variant_calls)

    def restore(self) -> Any:
        """Put the original denoiser forward back and return the plain pipeline."""
        if self._original_forward is None:
            self.denoiser.__dict__.pop("forward", None)
        else:
            self.denoiser.forward = self._original_forward
        return self.pipe


def apply(pipe: Any, plan: Any, *, compile: bool = False) -> AcceleratedPipeline:
    """Accelerate ``pipe`` with a :class:`Program` (or a loaded plan object that holds one).

    Args:
        pipe: the diffusers pipeline.
        plan: a :class:`Program`, or an object with a ``program`` attribute.
        compile: run graph variants through ``torch.compile``.
    """
    program = plan if isinstance(plan, Program) else getattr(plan, "program", None)
    if not isinstance(program, Program):
        raise InputError(f"apply() needs a Program or a loaded plan, got {type(plan).__name__}")
    return AcceleratedPipeline(pipe, program, compile=compile)
