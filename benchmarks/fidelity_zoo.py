"""Fidelity at matched speed on the trained zoo model: fewer steps vs step placement vs caching.

For each budget (2x, 3x, 4x by default) every method is set to the cheapest configuration whose
roofline cost meets the budget, then evaluated on held-out prompts against the full-step baseline
(PSNR/SSIM in float, same seeds). Methods:

* ``fewer_steps``: the sampler with T/budget steps at its default spacing (the trivial baseline);
* ``steps_equalized``: the same step count, timesteps placed for equal estimated local error;
* ``cache_uniform`` / ``cache_dp_residual`` / ``cache_dp_feature`` / ``cache_dp_e2e``: caching blocks
  1..L-1 with a uniform schedule or the DP over the residual-change, CEM feature and end-to-end priors,
  each with plain residual reuse and Taylor extrapolation;
* ``steps+cache``: half of the speedup from fewer steps, half from caching (DP, residual prior).

Usage::

    python benchmarks/fidelity_zoo.py --steps 28 --budgets 2 3 4 --eval-prompts 8 --out fidelity.json
    python benchmarks/fidelity_zoo.py --smoke        # tiny settings, used by the test suite
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _zoo import load_zoo_bench

from accelkit.passes.base import Program, run_passes
from accelkit.passes.cache import CacheConfig
from accelkit.passes.steps import StepsConfig
from accelkit.report.metrics import fidelity
from accelkit.search.cost import device_spec, program_cost


def cache_fraction_for(base: Program, spec, target: float, config: CacheConfig) -> float | None:
    """Largest full-step share whose roofline cost meets ``target`` (None if even 2 full steps miss)."""
    steps = base.num_steps
    probe, _ = run_passes(base, [CacheConfig(**{**config.to_dict(), "full_fraction": 2 / steps,
                                                "schedule": "uniform", "full_step_mask": None})], None)
    full = program_cost(base, spec).per_variant["full"]
    per_variant = program_cost(probe, spec).per_variant
    budget = steps * full / target
    for count in range(steps - 1, 1, -1):
        cost = count * per_variant["full"] + (steps - count) * per_variant["cached"]
        if cost <= budget * 1.02:
            return count / steps
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--calib-prompts", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--no-e2e", action="store_true", help="skip the costly end-to-end prior")
    parser.add_argument("--smoke", action="store_true", help="tiny settings for the test suite")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.budgets, args.calib_prompts, args.eval_prompts, args.no_e2e = 6, [2.0], 1, 1, True

    started = time.time()
    bench = load_zoo_bench(args.steps, args.calib_prompts, args.eval_prompts)
    base, calib, prompts = bench.base, bench.calib, bench.prompts
    spec = device_spec("cpu")
    base_cost = program_cost(base, spec).seconds

    def evaluate(configs) -> dict:
        program, _ = run_passes(base, configs, calib)
        metrics = fidelity(bench.images(program), bench.baseline)
        return {"speedup": base_cost / program_cost(program, spec).seconds, "psnr": metrics["psnr"],
                "ssim": metrics["ssim"], "schedule": program.stats.get("cache", {}).get("schedule"),
                "steps": program.num_steps}

    results: dict[str, dict[str, dict]] = {}
    for target in args.budgets:
        row: dict[str, dict] = {}
        count = max(2, round(args.steps / target))
        row["fewer_steps"] = evaluate([StepsConfig(num_steps=count)])
        row["steps_equalized"] = evaluate([StepsConfig(num_steps=count, placement="equalized")])
        priors = [("uniform", "residual")] + [("dp", p) for p in ("residual", "feature")]
        if not args.no_e2e:
            priors.append(("dp", "end_to_end"))
        for approximation in ("residual", "taylor"):
            for schedule, prior in priors:
                template = CacheConfig(full_fraction=1.0, first_blocks=1, approximation=approximation,
                                       schedule=schedule, prior=prior, weighting="quadratic")
                fraction = cache_fraction_for(base, spec, target, template)
                name = f"cache_{schedule}" + (f"_{prior}" if schedule == "dp" else "") + f"_{approximation}"
                if fraction is None:
                    row[name] = {"error": f"{target:g}x is out of reach with block 0 always computed"}
                    continue
                config = CacheConfig(**{**template.to_dict(), "full_fraction": fraction})
                row[name] = evaluate([config])
        share = target ** 0.5
        steps_count = max(2, round(args.steps / share))
        reduced, _ = run_passes(base, [StepsConfig(num_steps=steps_count)], None)
        template = CacheConfig(full_fraction=1.0, first_blocks=1, approximation="residual", schedule="dp",
                               prior="residual")
        fraction = cache_fraction_for(reduced, spec, target * program_cost(reduced, spec).seconds / base_cost,
                                      template)
        if fraction is not None:
            row["steps+cache"] = evaluate([StepsConfig(num_steps=steps_count),
                                           CacheConfig(**{**template.to_dict(), "full_fraction": fraction})])
        results[f"{target:g}x"] = row
    payload = {"model": "zoo:shapes", "steps": args.steps, "eval_prompts": len(prompts),
               "calib_prompts": args.calib_prompts, "cost": "roofline:cpu", "results": results,
               "seconds": time.time() - started, "torch": torch.__version__}
    print(format_table(payload))
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2))
    return payload


def format_table(payload: dict) -> str:
    lines = [f"zoo:shapes, {payload['steps']} steps, {payload['eval_prompts']} held-out prompts, "
             f"PSNR dB (speedup)"]
    for budget, row in payload["results"].items():
        lines.append(f"-- {budget}")
        for name, value in row.items():
            if "error" in value:
                lines.append(f"  {name:34s} {value['error']}")
            else:
                lines.append(f"  {name:34s} {value['psnr']:6.2f} dB  ({value['speedup']:.2f}x)  SSIM {value['ssim']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
