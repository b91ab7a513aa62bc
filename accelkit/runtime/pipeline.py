"""``AcceleratedPipeline``: the user's diffusers pipeline with a step-aware denoiser.

The denoiser module stays in place (pipelines read its ``config``, ``dtype`` and hooks); only its
``forward`` is replaced by a function that identifies the denoising step (the scheduler's step index,
or the current timestep's index in the scheduler's timesteps) and runs the graph variant the program
names for that step. Calls with other batch sizes, resolutions or step counts than the plan's run the
program derived for them (:mod:`accelkit.runtime.family`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from accelkit.calibrate.source import StateObserver
from accelkit.errors import InputError, PlanMismatchError
from accelkit.passes.base import Program

# Pipeline I/O moved to accelkit.pipeline_io; re-exported for code importing it from here.
from accelkit.pipeline_io import (  # noqa: F401
    accepts_argument,
    bind_positional,
    family_of,
    find_denoiser,
    positional_parameter_names,
    scheduler_with,
)
from accelkit.runtime.executor import ProgramExecutor
from accelkit.runtime.family import ProgramFamily, Recipe, StepSelection, steps_mismatch_message

logger = logging.getLogger(__name__)


class StepLocator:
    """Maps a denoiser call's ``timestep`` to its index in ``scheduler.timesteps``.

    Schedulers that count their steps (``step_index``: the flow-matching, DPM-Solver, Euler families)
    name the index directly, so no timestep value is read back from the device. Otherwise, and before
    a scheduler's first step (``step_index`` is None), the timestep value is matched: pipelines pass it
    as is (SD3, PixArt, UNets), divided by 1000 (Flux) or as ``1 - t/1000`` (Lumina2); the family's
    ``timestep_maps`` say which (the generic family tries the first two and the nearest timestep wins).
    That reads one value to the host: once per generation with a counting scheduler.
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
        counted = getattr(self._pipe.scheduler, "step_index", None)
        if isinstance(counted, int) and 0 <= counted < len(values):
            return counted
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
        #: the forward this one replaced in the denoiser's ``__dict__`` (None: the class's own).
        self.replaced: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs = bind_positional(self._positional, args, kwargs)
        num_timesteps = len(self.locator.timesteps())
        if isinstance(self.executor, StepSelection):
            self.executor.select_steps(num_timesteps)
        elif num_timesteps != self.executor.program.num_steps:
            raise PlanMismatchError(
                steps_mismatch_message(self.executor.program.num_steps, num_timesteps, derivable=False)
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


@contextlib.contextmanager
def original_forward(denoiser: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The denoiser with every accelkit forward taken out (a pipeline loaded twice has two), restored after.

    Capturing or running the original pipeline must not go through a step-aware forward.
    """
    saved = denoiser.__dict__.get("forward")
    inner = saved
    while isinstance(inner, StepAwareForward):
        inner = inner.replaced
    if inner is None:
        denoiser.__dict__.pop("forward", None)
    else:
        denoiser.forward = inner
    try:
        yield denoiser
    finally:
        if saved is None:
            denoiser.__dict__.pop("forward", None)
        else:
            denoiser.forward = saved


@contextlib.contextmanager
def scheduler_overridden(pipe: Any, overrides: Any) -> Iterator[None]:
    """``pipe`` runs a copy of its scheduler with the program's config ``overrides``; its own is put back after.

    A copy, not the scheduler itself: schedulers derive state from their config at construction (the
    multistep history's length), and the user's pipeline must come back exactly as it was.
    """
    if not overrides:
        yield
        return
    original = pipe.scheduler
    pipe.scheduler = scheduler_with(original, overrides)
    try:
        yield
    finally:
        pipe.scheduler = original


class AcceleratedPipeline:
    """A diffusers pipeline whose denoiser runs an accelkit :class:`Program`.

    Calls behave like the wrapped pipeline's, at any batch size, resolution and step count: a call the
    plan was not made for runs the program derived for it (captured once per new denoiser input
    shape, schedule re-derived once per step count); the plan's own settings run the plan's program.
    When the ``steps`` pass chose the sigmas, they come from the program; its scheduler overrides (the
    solver order) apply to a copy of the scheduler during each call. Other attributes are the wrapped
    pipeline's.

    Args:
        pipe: the diffusers pipeline (modified in place until :meth:`restore`).
        program: the program to run.
        compile: run graph variants through ``torch.compile`` (once per variant and input shape).
        call_defaults: pipeline arguments applied when the caller omits them (the resolution and
            guidance scale a plan was made for).
        executor: what runs a step (``run(step, branch, kwargs, return_dict)``, ``reset()``): the
            onnxruntime or TensorRT runner of an export; a :class:`ProgramExecutor` when None.
        recipe: how to rebuild the program for other inputs (default: what ``program`` records).
        strict_steps: refuse another ``num_inference_steps`` than the plan's instead of re-deriving.
        observer: sees every step's written states (see :class:`ProgramExecutor`); only with the default
            executor (an export's runner takes its own).
    """

    def __init__(
        self, pipe: Any, program: Program, *, compile: bool = False, call_defaults: dict[str, Any] | None = None,
        executor: Any = None, recipe: Recipe | None = None, strict_steps: bool = False,
        observer: StateObserver | None = None,
    ) -> None:
        program.validate()
        self.pipe = pipe
        self.program = program
        self.call_defaults = dict(call_defaults or {})
        self.denoiser_name, self.denoiser = find_denoiser(pipe)
        self.family = ProgramFamily(program, recipe or Recipe.of_program(program), self._capture)
        if executor is None:
            executor = ProgramExecutor(program, compile=compile, family=self.family, observer=observer)
        elif observer is not None:
            raise ValueError("AcceleratedPipeline: pass the observer to the executor given, not here")
        if isinstance(executor, StepSelection):
            executor.family = self.family
        self.executor = executor
        self.strict_steps = strict_steps
        self.forward = StepAwareForward(pipe, self.executor)
        self._original_forward = self.denoiser.__dict__.get("forward")
        self.forward.replaced = self._original_forward
        self.denoiser.forward = self.forward

    @property
    def strict_steps(self) -> bool:
        """Refuse another ``num_inference_steps`` than the plan's (instead of re-deriving the schedule)."""
        return bool(getattr(self.executor, "strict_steps", True))

    @strict_steps.setter
    def strict_steps(self, value: bool) -> None:
        if isinstance(self.executor, StepSelection):
            self.executor.strict_steps = bool(value)

    def _capture(self, kwargs: Any) -> Any:
        """Capture the original denoiser for a call's inputs (its forward is ours meanwhile)."""
        from accelkit.capture.graph import capture_cached

        with original_forward(self.denoiser):
            return capture_cached(self.denoiser, kwargs)

    def _put_original_forward(self) -> None:
        if self._original_forward is None:
            self.denoiser.__dict__.pop("forward", None)
        else:
            self.denoiser.forward = self._original_forward

    def program_for_steps(self, num_steps: int | None) -> Program:
        """The program a call with ``num_inference_steps=num_steps`` runs (the plan's own for None)."""
        if num_steps is None or num_steps == self.program.num_steps:
            return self.program
        if not isinstance(self.executor, StepSelection):
            plan_steps = self.program.num_steps
            raise PlanMismatchError(steps_mismatch_message(plan_steps, num_steps, derivable=False))
        self.executor.select_steps(num_steps)
        return self.family.for_steps(num_steps)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        program = self.program_for_steps(kwargs.get("num_inference_steps"))
        if isinstance(self.executor, StepSelection):
            self.executor.select_steps(program.num_steps)
        kwargs["num_inference_steps"] = program.num_steps
        for key, value in self.call_defaults.items():
            kwargs.setdefault(key, value)
        if program.sigmas is not None:
            kind = program.timestep_kind
            if not accepts_argument(self.pipe, kind):
                raise InputError(
                    f"{type(self.pipe).__name__} does not accept custom {kind}: the plan's step schedule "
                    "cannot be applied to it; optimize without the 'steps' pass"
                )
            # An array: UniPC's flow path shifts it with numpy (a list fails there).
            kwargs[kind] = np.asarray(program.sigmas, dtype=np.float64)
        self.forward.reset()
        with scheduler_overridden(self.pipe, program.scheduler_overrides):
            return self.pipe(*args, **kwargs)

    def check(self, prompt: Any, *, seed: int = 0, **kwargs: Any) -> float:
        """Run the original pipeline and this one once on the same noise; log and return the PSNR in dB.

        The original runs the plan's baseline step count (scaled like ``num_inference_steps`` when
        that is given); the lowest PSNR over the generated images is returned.
        """
        import torch

        steps = kwargs.pop("num_inference_steps", None)
        kwargs.pop("generator", None)  # both runs are seeded with ``seed``
        recipe = self.family.recipe
        baseline_steps = recipe.baseline_steps if recipe is not None else self.program.num_steps
        if steps is not None:
            baseline_steps = max(1, round(steps * baseline_steps / self.program.num_steps))
        call = {**self.call_defaults, **kwargs, "prompt": prompt, "output_type": "pt", "return_dict": True}
        with original_forward(self.denoiser):
            reference = self.pipe(**call, num_inference_steps=baseline_steps,
                                  generator=torch.Generator("cpu").manual_seed(seed)).images
        generator = torch.Generator("cpu").manual_seed(seed)
        accelerated = self(**call, num_inference_steps=steps, generator=generator)
        value = min_psnr(accelerated.images, reference)
        ran = self.executor.num_steps if isinstance(self.executor, StepSelection) else self.program.num_steps
        logger.warning("check: PSNR %.2f dB of the accelerated pipeline against the original (%d vs %d steps)",
                       value, ran, baseline_steps)
        return value

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
        self._put_original_forward()
        return self.pipe


def min_psnr(images: Any, reference: Any) -> float:
    """The lowest per-image PSNR (dB) of ``images`` against ``reference``, both in [0, 1]; inf if equal."""
    import torch

    a = torch.as_tensor(images).double().flatten(1)
    b = torch.as_tensor(reference).double().flatten(1)
    mse = float(((a - b) ** 2).mean(dim=1).max())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


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
