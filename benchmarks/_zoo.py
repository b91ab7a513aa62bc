"""The set-up the zoo fidelity scripts share: the trained model, its program, calibration and baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from accelkit.calibrate import Calibrator
from accelkit.capture import capture
from accelkit.loading import load_pipeline, record_denoiser_calls, weights_fingerprint
from accelkit.passes.base import Program
from accelkit.runtime.pipeline import AcceleratedPipeline
from accelkit.zoo import ZOO_MODELS, calibration_prompts, evaluation_prompts

# Evaluation seeds differ from the calibration seeds (the search uses the same offset).
EVALUATION_SEED_OFFSET = 10_000


@dataclass
class ZooBench:
    """``zoo:shapes`` ready for fidelity measurements.

    Args:
        loaded: the loaded pipeline (``accelkit.loading.load_pipeline``).
        base: the captured denoiser as a program of ``steps`` steps.
        calib: a calibrator on the calibration prompts.
        prompts: held-out evaluation prompts.
        baseline: the unmodified program's images on ``prompts``.
        generation: height, width and guidance scale of the model.
    """

    loaded: Any
    base: Program
    calib: Calibrator
    prompts: list[str]
    baseline: torch.Tensor
    generation: dict[str, Any]

    def images(self, program: Program) -> torch.Tensor:
        return self.calib.generate(program, self.prompts, seed_offset=EVALUATION_SEED_OFFSET).images


def load_zoo_bench(steps: int, calib_prompts: int, eval_prompts: int) -> ZooBench:
    loaded = load_pipeline("zoo:shapes")
    info = ZOO_MODELS["shapes"]
    generation = {"height": info.height, "width": info.width, "guidance_scale": info.guidance_scale}
    calls = record_denoiser_calls(loaded.pipe, prompt="a red circle", num_inference_steps=2, output_type="latent",
                                  generator=torch.Generator().manual_seed(0), **generation)
    base = Program.from_graph(capture(loaded.denoiser, calls[0]), steps)
    calib = Calibrator(loaded.pipe, calibration_prompts(calib_prompts), seed=0,
                       weights_hash=weights_fingerprint(loaded.denoiser), **generation, run_program=AcceleratedPipeline)
    prompts = evaluation_prompts(eval_prompts)
    baseline = calib.generate(base, prompts, seed_offset=EVALUATION_SEED_OFFSET).images
    return ZooBench(loaded, base, calib, prompts, baseline, generation)
