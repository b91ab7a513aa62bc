"""Read the step schedule a pipeline sets: its scheduler's sigmas and the other ``set_timesteps`` arguments.

The only place accelkit wraps a scheduler's ``set_timesteps``: for one pipeline call, stopped at the first
denoiser call, and undone before it returns.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from accelkit.calibrate.source import CUSTOM_STEP_ARGUMENTS, PipelineSchedule
from accelkit.errors import InputError
from accelkit.pipeline_io import observing_denoiser_calls


class _StopGeneration(Exception):
    """Raised at the first denoiser call to end a probe once the schedule is set."""


def _stop(kwargs: dict[str, Any]) -> None:
    raise _StopGeneration


@contextlib.contextmanager
def _spying_set_timesteps(scheduler: Any) -> Iterator[dict[str, Any]]:
    """While inside, the dict holds the arguments (by name) of the latest ``set_timesteps`` call."""
    original = scheduler.set_timesteps
    signature = inspect.signature(original)
    recorded: dict[str, Any] = {}

    # functools.wraps keeps the signature visible: pipelines check it for a `sigmas` parameter.
    @functools.wraps(original)
    def spy(*args: Any, **kwargs: Any) -> Any:
        recorded.clear()
        recorded.update(signature.bind(*args, **kwargs).arguments)
        return original(*args, **kwargs)

    scheduler.set_timesteps = spy
    try:
        yield recorded
    finally:
        del scheduler.set_timesteps


def read_pipeline_schedule(pipe: Any, call_kwargs: dict[str, Any]) -> PipelineSchedule:
    """The schedule ``pipe(**call_kwargs)`` sets for its ``num_inference_steps``; the denoiser never runs.

    Raises:
        InputError: the scheduler sets another number of sigmas than ``num_inference_steps + 1`` (Heun).
    """
    num_steps = int(call_kwargs["num_inference_steps"])
    scheduler = pipe.scheduler
    with _spying_set_timesteps(scheduler) as recorded:
        try:
            with observing_denoiser_calls(pipe, _stop), torch.no_grad():
                pipe(**call_kwargs)
        except _StopGeneration:
            pass
    sigmas = np.asarray(torch.as_tensor(scheduler.sigmas).detach().double().cpu().reshape(-1))
    if sigmas.size != num_steps + 1:
        raise InputError(
            f"{type(pipe).__name__} set {sigmas.size - 1} sigmas for num_inference_steps={num_steps}; "
            "use steps.placement='default'"
        )
    skipped = ("num_inference_steps", "device", *CUSTOM_STEP_ARGUMENTS)
    return PipelineSchedule(sigmas, {k: v for k, v in recorded.items() if k not in skipped})
