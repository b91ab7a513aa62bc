"""Issue 18 item 4: cache (DP schedule, with and without a gap cap at the solver order) vs fewer steps
under DPM-Solver++ 2M and UniPC with flow sigmas, and FlowMatch Euler, on zoo:shapes.

    python benchmarks/cache_multistep_zoo.py 20    # argument: the step count
"""

import sys

import diffusers
import torch

from accelkit.calibrate import Calibrator
from accelkit.capture import capture
from accelkit.loading import load_pipeline, record_denoiser_calls, weights_fingerprint
from accelkit.passes.base import Program, run_passes
from accelkit.passes.cache import CacheConfig
from accelkit.passes.steps import StepsConfig
from accelkit.report.metrics import fidelity
from accelkit.runtime.pipeline import AcceleratedPipeline
from accelkit.zoo import calibration_prompts, evaluation_prompts

FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
SAMPLERS = [("dpm2m-flow", "DPMSolverMultistepScheduler", {**FLOW, "solver_order": 2}),
            ("unipc-flow", "UniPCMultistepScheduler", FLOW), ("flowmatch-euler", None, {})]


def score(base, calib, prompts, reference, configs):
    program, _ = run_passes(base, configs, calib)
    images = calib.generate(program, prompts, seed_offset=10_000).images
    return fidelity(images, reference)["psnr"], program


def main(steps: int) -> None:
    torch.set_num_threads(1)
    for label, name, overrides in SAMPLERS:
        loaded = load_pipeline("zoo:shapes")
        pipe = loaded.pipe
        if name:
            pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
        calls = record_denoiser_calls(pipe, prompt="a red circle", num_inference_steps=2, height=32, width=32,
                                      guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                                      output_type="latent")
        base = Program.from_graph(capture(loaded.denoiser, calls[0]), steps)
        calib = Calibrator(pipe, calibration_prompts(2), 32, 32, 3.0, weights_hash=weights_fingerprint(loaded.denoiser), run_program=AcceleratedPipeline)
        prompts = evaluation_prompts(4)
        reference = calib.generate(base, prompts, seed_offset=10_000).images
        for n in (10, 7):
            psnr, _ = score(base, calib, prompts, reference, [StepsConfig(num_steps=n)])
            print(label, f"fewer steps {n}/{steps}: {psnr:.2f}", flush=True)
        for full in (10, 12, 14):
            for approximation in ("residual", "taylor"):
                for gap in (None, 2):
                    config = CacheConfig(full_fraction=full / steps, approximation=approximation, schedule="dp",
                                         max_gap=gap, warmup=1)
                    try:
                        psnr, program = score(base, calib, prompts, reference, [config])
                    except Exception as error:  # noqa: BLE001 - an infeasible schedule: report and go on
                        print(label, full, approximation, gap, "ERR", error, flush=True)
                        continue
                    mask = "".join("F" if s != "cached" else "." for s in program.schedule)
                    print(label, f"cache full {full}/{steps} {approximation} max_gap={gap}: {psnr:.2f} dB", mask,
                          flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
