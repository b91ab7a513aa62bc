"""CPU table per video family on the tiny random-weight pipelines of ``tests/fixtures/video_families.py``.

For each family: capture time (recording the first denoiser call and ``torch.export``), blocks found in the
graph, and at a 2x budget the roofline speedup and fidelity of the cache plan (uniform schedule, the first
block computed, the largest full-step share that meets 2x, else the fastest: 2 full steps) next to the
trivial 2x (half the sampler steps). Fidelity: PSNR per frame averaged, and the temporal PSNR (frame
differences), against the full-step baseline with the same seeds.

Random weights make caching look good (a random block changes little from step to step); the numbers
say that the path works and what it costs, not how a trained model fares.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/video_families_cpu.py --steps 10 --prompts 2 --out video.json
    PYTHONPATH=. python benchmarks/video_families_cpu.py --smoke      # tiny settings, used by the tests
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity_zoo import cache_fraction_for  # noqa: E402

from accelkit.calibrate import Calibrator
from accelkit.loading import load_pipeline  # noqa: E402
from accelkit.passes.base import Program, run_passes  # noqa: E402
from accelkit.passes.cache import CacheConfig  # noqa: E402
from accelkit.passes.steps import StepsConfig  # noqa: E402
from accelkit.pipeline_io import generation_defaults, probe_and_capture, with_call_arguments  # noqa: E402
from accelkit.report.metrics import fidelity  # noqa: E402
from accelkit.runtime.pipeline import AcceleratedPipeline  # noqa: E402
from accelkit.search.cost import device_spec, program_cost  # noqa: E402
from tests.fixtures.video_families import VIDEO_CALL, VIDEO_FAMILIES, saved_video_pipeline_folder  # noqa: E402

PROMPTS = ("a red circle on a blue sky", "a small cat in a green field", "a bright city at night",
           "a yellow bird on a tree")


def bench_family(family: str, root: Path, steps: int, prompts: int, target: float) -> dict:
    call = VIDEO_CALL[family]
    loaded = load_pipeline(str(saved_video_pipeline_folder(family, root)))
    pipe = loaded.pipe
    generation = {"height": call["height"], "width": call["width"], "num_frames": call["num_frames"],
                  "guidance_scale": generation_defaults(pipe)["guidance_scale"]}  # the pipeline's own
    generation = with_call_arguments(pipe, generation, call["call_args"])
    started = time.perf_counter()
    _, graph = probe_and_capture(pipe, generation)
    capture_s = time.perf_counter() - started
    base = Program.from_graph(graph, steps)
    calib = Calibrator(pipe, list(PROMPTS[:prompts]), height=call["height"], width=call["width"],
                       guidance_scale=generation["guidance_scale"], num_frames=call["num_frames"],
                       extra_call_kwargs=dict(generation.get("call_arguments", {})), run_program=AcceleratedPipeline)
    spec = device_spec("cpu")
    base_cost = program_cost(base, spec).seconds
    baseline = calib.generate(base).images

    def evaluate(configs) -> dict:
        program, _ = run_passes(base, configs, calib)
        metrics = fidelity(calib.generate(program).images, baseline)
        return {"speedup": base_cost / program_cost(program, spec).seconds, "psnr": metrics["psnr"],
                "temporal_psnr": metrics["temporal_psnr"], "ssim": metrics["ssim"], "schedule": program.schedule}

    cache = CacheConfig(first_blocks=1, schedule="uniform")
    fraction = cache_fraction_for(base, spec, target, cache) or 2 / steps
    return {
        "denoiser": graph.family, "capture_s": capture_s, "blocks": len(graph.blocks),
        "latent": list(graph.input_specs[graph.input_names.index("hidden_states")].shape),
        "cache": evaluate([CacheConfig(**{**cache.to_dict(), "full_fraction": fraction})]),
        "fewer_steps": evaluate([StepsConfig(fraction=1 / target)]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--families", nargs="+", default=list(VIDEO_FAMILIES), choices=VIDEO_FAMILIES)
    parser.add_argument("--smoke", action="store_true", help="tiny settings for the test suite")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.prompts, args.families = 4, 1, args.families[:1]
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for family in args.families:
            results[family] = bench_family(family, Path(root), args.steps, args.prompts, args.budget)
            row = results[family]
            print(f"{family}: capture {row['capture_s']:.1f} s, {row['blocks']} blocks, cache "
                  f"{row['cache']['speedup']:.2f}x {row['cache']['psnr']:.1f} dB, fewer steps "
                  f"{row['fewer_steps']['speedup']:.2f}x {row['fewer_steps']['psnr']:.1f} dB", flush=True)
    payload = {"steps": args.steps, "prompts": args.prompts, "budget": args.budget, "weights": "random",
               "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()
