"""Calibration: run programs on calibration prompts, and cache what passes measure from them.

Everything a pass measures (error priors, activation statistics, block scores) depends on the
weights, the scheduler and its timesteps, the resolution and the passes applied before it. The
:class:`Calibrator` keys its cache on exactly those, in memory and (optionally) on disk as ``.npy``
files, so search trials reuse priors and remote workers can share them.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from accelkit._io import atomic_write_bytes
from accelkit.calibrate.schedule import read_pipeline_schedule
from accelkit.calibrate.source import (
    CalibrationSource,
    Generation,
    PipelineSchedule,
    ProgramRunner,
    SchedulerFacts,
    StateObserver,
    StateRecord,
)
from accelkit.errors import InputError
from accelkit.pipeline_io import observing_denoiser_calls

if TYPE_CHECKING:
    from accelkit.passes.base import Program

__all__ = [
    "CalibrationSource",
    "Calibrator",
    "Generation",
    "PipelineSchedule",
    "ProgramRunner",
    "SchedulerFacts",
    "StateObserver",
    "output_media",
]


def output_media(output: Any) -> torch.Tensor:
    """A pipeline output as float CPU tensors in [0, 1]: images (B, C, H, W) or videos (B, F, C, H, W).

    Image pipelines return ``.images``; video pipelines return ``.frames``, which with ``output_type="pt"``
    is (B, F, C, H, W) (channels-last arrays (B, F, H, W, C) are turned around too).
    """
    if hasattr(output, "frames"):
        frames = torch.as_tensor(output.frames)
        if frames.ndim == 4:  # one video without its batch dimension
            frames = frames.unsqueeze(0)
        if frames.ndim != 5:
            raise ValueError(f"video output has shape {tuple(frames.shape)}; expected (B, F, C, H, W)")
        if frames.shape[-1] in (1, 3) and frames.shape[2] not in (1, 3):
            frames = frames.permute(0, 1, 4, 2, 3)
        return frames.float().clamp(0, 1).cpu()
    image = output.images if hasattr(output, "images") else output[0]
    image = torch.as_tensor(image)
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.shape[-1] == 3 and image.shape[1] != 3:
        image = image.permute(0, 3, 1, 2)
    return image.float().clamp(0, 1).cpu()


@dataclass
class Calibrator:
    """Runs programs on a pipeline with fixed generation settings: the :class:`CalibrationSource` of a search.

    Args:
        pipe: the diffusers pipeline.
        prompts: calibration prompts.
        height: image height.
        width: image width.
        guidance_scale: classifier-free guidance scale.
        seed: seed of prompt i is ``seed + i``.
        num_frames: frames per video for a video pipeline; None for image pipelines (or the
            pipeline's default).
        weights_hash: fingerprint of the denoiser weights (cache key).
        cache_dir: where cached measurements are stored; None keeps them in memory only.
        extra_call_kwargs: any other pipeline arguments.
        run_program: makes the pipeline run a program (``AcceleratedPipeline``); needed to generate.
    """

    pipe: Any
    prompts: Sequence[str]
    height: int
    width: int
    guidance_scale: float
    seed: int = 0
    num_frames: int | None = None
    weights_hash: str = ""
    cache_dir: Path | None = None
    extra_call_kwargs: dict[str, Any] = field(default_factory=dict)
    run_program: ProgramRunner | None = None
    _memory: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def scheduler(self) -> SchedulerFacts:
        return SchedulerFacts.of(getattr(self.pipe, "scheduler", None))

    @property
    def cfg_batch(self) -> int | None:
        if float(self.guidance_scale) <= 1.0:
            return None
        return int(self.extra_call_kwargs.get("num_images_per_prompt", 1) or 1)

    def call_kwargs(self, prompt: str, index: int) -> dict[str, Any]:
        kwargs = dict(self.extra_call_kwargs)
        kwargs.update(
            prompt=prompt,
            height=self.height,
            width=self.width,
            guidance_scale=self.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(self.seed + index),
            output_type="pt",
        )
        if self.num_frames is not None:
            kwargs["num_frames"] = self.num_frames
        return kwargs

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
        """Generate one image per prompt with ``program`` (same seeds for every program)."""
        if self.run_program is None:
            raise ValueError("this Calibrator was made without run_program, so it cannot generate: pass "
                             "run_program=AcceleratedPipeline (accelkit.runtime.pipeline)")
        prompts = list(self.prompts if prompts is None else prompts)
        logs: list[list[StateRecord]] = []

        def observe(step: int, branch: int, states: Mapping[str, torch.Tensor]) -> None:
            if record_states:
                logs[-1].append((step, branch, dict(states)))
            if observer is not None:
                observer(step, branch, states)

        watching = record_states or observer is not None
        running = self.run_program(self.pipe, program, observer=observe if watching else None)
        images: list[torch.Tensor] = []
        try:
            for index, prompt in enumerate(prompts):
                logs.append([])
                output = running(**self.call_kwargs(prompt, seed_offset + index))
                images.append(output_media(output))
                if progress is not None:
                    progress(index + 1, len(prompts))
        finally:
            running.restore()
        return Generation(torch.cat(images), logs if record_states else [], dict(running.variant_calls))

    def denoiser_inputs(self, program: Program, n: int) -> list[list[torch.Tensor]]:
        """Flat graph inputs of ``n`` denoiser calls spread over the calibration generations.

        The input program generates every calibration prompt (so the step count and sigmas of an earlier
        ``steps`` pass apply) while the denoiser's calls are observed; the kept calls are evenly spaced
        over all recorded calls, hence over timesteps and prompts.
        """
        recorded: list[list[torch.Tensor]] = []

        def record(kwargs: dict[str, Any]) -> None:
            recorded.append([t.detach().clone() for t in program.graph.flat_inputs(kwargs)])

        with observing_denoiser_calls(self.pipe, record):
            self.generate(program)
        if not recorded:
            raise InputError("the calibration generations never called the denoiser")
        keep = sorted({int(round(x)) for x in np.linspace(0, len(recorded) - 1, min(n, len(recorded)))})
        return [recorded[i] for i in keep]

    def pipeline_schedule(self, num_steps: int) -> PipelineSchedule:
        """The schedule the pipeline sets by default for ``num_steps`` steps.

        The pipeline is called on the first calibration prompt and stopped at its first denoiser call,
        so only prompt encoding runs. Reading it from the pipeline (rather than recomputing it) gets its
        own default spacing (Flux pipelines pass ``linspace(1, 1/n, n)``, SD3 lets the scheduler choose)
        and the ``mu`` of resolution-dependent shifting.
        """
        kwargs = self.call_kwargs(self.prompts[0], 0)
        kwargs["num_inference_steps"] = num_steps
        return read_pipeline_schedule(self.pipe, kwargs)

    def cached(
        self, kind: str, program: Program, compute: Callable[[], np.ndarray], **parts: Any
    ) -> np.ndarray:
        """The measurement ``kind`` of ``program`` from the cache (:meth:`cache_key`), computed on a miss."""
        return self.cached_array(self.cache_key(kind, program, **parts), compute)

    def cache_key(self, kind: str, program: Program, **parts: Any) -> str:
        """Key over what a measurement depends on: weights, scheduler, timesteps, shapes, earlier passes."""
        scheduler = getattr(self.pipe, "scheduler", None)
        payload = {
            "kind": kind,
            "weights": self.weights_hash,
            "scheduler": type(scheduler).__name__,
            "scheduler_config": {k: repr(v) for k, v in dict(getattr(scheduler, "config", {})).items()},
            "steps": program.num_steps,
            "sigmas": program.sigmas,
            "resolution": [self.height, self.width, *([self.num_frames] if self.num_frames is not None else [])],
            "guidance": self.guidance_scale,
            "prompts": list(self.prompts),
            "seed": self.seed,
            "passes": {name: program.resolved.get(name) for name in program.applied},
            "parts": parts,
        }
        text = json.dumps(payload, sort_keys=True, default=repr)
        return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"

    def cached_array(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """Return the array stored under ``key``, computing and storing it on a miss."""
        if key in self._memory:
            return self._memory[key]
        path = self.cache_dir / f"{key}.npy" if self.cache_dir is not None else None
        value = _load_cached(path) if path is not None else None
        if value is None:
            value = np.asarray(compute())
            if path is not None:
                _store_cached(path, value)
        self._memory[key] = value
        return value


def _load_cached(path: Path) -> np.ndarray | None:
    """The cached array, or None when missing, changed, damaged or holding objects (then recomputed).

    allow_pickle=False: cache files are plain numeric arrays; a pickled one is never unpickled.
    """
    digest_file = path.with_name(path.name + ".sha256")
    if not path.is_file() or not digest_file.is_file():
        return None
    try:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest_file.read_text().strip():
            return None  # changed since it was written
        value = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        return None
    return value


def _store_cached(path: Path, value: np.ndarray) -> None:
    """The array, then its sha256 beside it: a reader trusts the array only when both agree."""
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
