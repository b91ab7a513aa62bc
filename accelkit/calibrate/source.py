"""What a pass may ask of calibration: the :class:`CalibrationSource` protocol and the types it speaks.

Passes receive a ``CalibrationSource`` (or None) and never the pipeline: they generate through it,
get denoiser inputs, the pipeline's own step schedule and cached measurements from it, and read the
scheduler as :class:`SchedulerFacts`. The concrete source is :class:`accelkit.calibrate.Calibrator`;
a test may hand a pass any object with these members.

This module sits below ``passes`` and ``runtime``: the :class:`Program` it names is imported for type
checking only, and what runs a program is the :class:`ProgramRunner` the calibrator's creator supplies.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from accelkit.passes.base import Program

#: ``(step, branch, {state name: tensor})`` for every denoiser call of a generation: the states the
#: variant that ran wrote (a CFG branch is 0, or 1 for the second of separate CFG calls).
StateObserver = Callable[[int, int, Mapping[str, torch.Tensor]], None]
StateRecord = tuple[int, int, dict[str, torch.Tensor]]

# The set_timesteps arguments that place steps, preferred first.
CUSTOM_STEP_ARGUMENTS = ("sigmas", "timesteps")


@dataclass
class Generation:
    """Outputs of running a program on prompts.

    Args:
        images: float tensor (N, 3, H, W) in [0, 1], one image per prompt; for a video pipeline
            (N, F, 3, H, W), one video of F frames per prompt.
        state_logs: per prompt, the executor's ``(step, branch, {state: tensor})`` records (when asked).
        variant_calls: how many times each variant ran in total.
    """

    images: torch.Tensor
    state_logs: list[list[StateRecord]] = field(default_factory=list)
    variant_calls: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineSchedule:
    """What the pipeline's scheduler runs for one step count.

    Args:
        sigmas: the scheduler's effective sigmas after ``set_timesteps``, terminal value included.
        set_timesteps_kwargs: the other arguments the pipeline gave ``set_timesteps`` (e.g. ``mu``).
    """

    sigmas: np.ndarray
    set_timesteps_kwargs: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class SchedulerFacts:
    """A read-only description of the pipeline's scheduler, and a private copy to try step arguments on.

    Args:
        class_name: the scheduler's class name (``"FlowMatchEulerDiscreteScheduler"``).
        config: its configuration (read-only).
        custom_arguments: which of ``sigmas`` / ``timesteps`` its ``set_timesteps`` takes, preferred first.
        effective_sigmas: ``(kind, arguments, extra) -> sigmas``: the sigmas (terminal value included) a copy
            of the scheduler sets for custom ``kind`` arguments plus ``extra`` ``set_timesteps`` arguments;
            the live scheduler is never touched.
        runs_with: ``(config overrides) -> bool``: whether a copy of the scheduler with these config values
            (e.g. another ``solver_order``) constructs and sets its timesteps.
    """

    class_name: str
    config: Mapping[str, Any]
    custom_arguments: tuple[str, ...]
    effective_sigmas: Callable[[str, np.ndarray, Mapping[str, Any]], np.ndarray] = field(
        repr=False, compare=False
    )
    runs_with: Callable[[Mapping[str, Any]], bool] = field(default=lambda overrides: False, repr=False,
                                                           compare=False)

    @classmethod
    def of(cls, scheduler: Any) -> SchedulerFacts:
        """The facts of a diffusers scheduler (``None`` gives a scheduler taking no custom steps)."""
        try:
            parameters = inspect.signature(scheduler.set_timesteps).parameters
        except (AttributeError, TypeError, ValueError):
            parameters = {}

        def effective_sigmas(kind: str, arguments: np.ndarray, extra: Mapping[str, Any]) -> np.ndarray:
            probe = copy.deepcopy(scheduler)
            # An array, as the runtime passes it (UniPC's flow path cannot shift a list).
            probe.set_timesteps(**{kind: np.asarray(arguments, dtype=np.float64)}, **extra)
            return np.asarray(torch.as_tensor(probe.sigmas).detach().double().cpu().reshape(-1))

        def runs_with(overrides: Mapping[str, Any]) -> bool:
            from accelkit.pipeline_io import scheduler_with

            try:
                scheduler_with(scheduler, overrides).set_timesteps(4)
            except Exception:  # noqa: BLE001 - a configuration the scheduler rejects does not run
                return False
            return True

        return cls(
            class_name=type(scheduler).__name__,
            runs_with=runs_with,
            config=MappingProxyType(dict(getattr(scheduler, "config", None) or {})),
            custom_arguments=tuple(k for k in CUSTOM_STEP_ARGUMENTS if k in parameters),
            effective_sigmas=effective_sigmas,
        )


@runtime_checkable
class CalibrationSource(Protocol):
    """What passes may ask of calibration (see the module docstring).

    Attributes:
        prompts: the calibration prompts.
        guidance_scale: the classifier-free guidance scale the generations use.
        cfg_batch: images per denoiser call whose predictions the pipeline CFG-combines from a doubled
            batch ([uncond, cond]); None when guidance is off.
        scheduler: the pipeline's scheduler, described.
    """

    @property
    def prompts(self) -> Sequence[str]: ...

    @property
    def guidance_scale(self) -> float: ...

    @property
    def cfg_batch(self) -> int | None: ...

    @property
    def scheduler(self) -> SchedulerFacts: ...

    def generate(
        self,
        program: Program,
        prompts: Sequence[str] | None = None,
        *,
        record_states: bool = False,
        observer: StateObserver | None = None,
        seed_offset: int = 0,
        progress: Callable[[int, int], None] | None = None,
    ) -> Generation:
        """One output per prompt with ``program`` (same seeds for every program); ``record_states`` fills
        :attr:`Generation.state_logs`, ``observer`` sees every call's written states as they come."""
        ...

    def denoiser_inputs(self, program: Program, n: int) -> list[list[torch.Tensor]]:
        """Flat graph inputs of ``n`` denoiser calls spread over calibration generations of ``program``."""
        ...

    def pipeline_schedule(self, num_steps: int) -> PipelineSchedule:
        """The schedule the pipeline sets by default for ``num_steps`` steps."""
        ...

    def cached(
        self, kind: str, program: Program, compute: Callable[[], np.ndarray], **parts: Any
    ) -> np.ndarray:
        """The measurement ``kind`` of ``program`` (keyed also on ``parts``), computed on a miss."""
        ...


class RunningProgram(Protocol):
    """A pipeline running a program until :meth:`restore` (``AcceleratedPipeline`` is one)."""

    @property
    def variant_calls(self) -> Mapping[str, int]: ...

    def __call__(self, **kwargs: Any) -> Any: ...

    def restore(self) -> Any: ...


class ProgramRunner(Protocol):
    """Makes ``pipe`` run ``program``, reporting written states to ``observer``.

    ``accelkit.runtime.pipeline.AcceleratedPipeline`` is one; the layer that builds a calibrator (search,
    recover) supplies it, so calibration itself imports no runtime.
    """

    def __call__(
        self, pipe: Any, program: Program, *, observer: StateObserver | None = None
    ) -> RunningProgram: ...
