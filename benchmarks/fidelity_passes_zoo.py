"""What the quant and sparse passes cost in fidelity on the trained zoo model (CPU is fine).

For each setting the pass runs on ``zoo:shapes`` (calibrated on calibration prompts) and the result is
compared with the unmodified model on held-out evaluation prompts (PSNR/SSIM in float, same seeds):

* ``quant``: SVDQuant W4A16, W4A8 (FP8 per-token activations, fake-quantized on CPU), W4A4 (INT4
  per-group activations, fake-quantized) and plain per-group INT4 without the low-rank branch (the
  ablation), with the plan's weight bytes against the baseline model's (float32 on CPU);
* ``sparse``: block-sparse attention (``min_tokens=0``: the zoo model has 256 image tokens) at several
  per-site L1 error budgets, with the calibrated mean kept share of the attention FLOPs.

Speed is not measured here (the kernels need a GPU; see bench_kernels.py / bench_svdq.py).

Usage::

    python benchmarks/fidelity_passes_zoo.py --steps 28 --eval-prompts 8 --out passes.json
    python benchmarks/fidelity_passes_zoo.py --smoke        # tiny settings, used by the test suite
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _zoo import load_zoo_bench

from accelkit.passes.base import Program, run_passes
from accelkit.passes.quant import QuantConfig
from accelkit.passes.sparse import SparseConfig
from accelkit.report.metrics import fidelity
from accelkit.search.optimize import program_weights_bytes

QUANT_SETTINGS = {
    "w4a16": {"act_mode": "w4a16"},
    "w4a8": {"act_mode": "w4a8"},
    "w4a4": {"act_mode": "w4a4"},
    "int4_no_low_rank": {"act_mode": "w4a16", "low_rank": False},
    "w4a16_rank16": {"act_mode": "w4a16", "rank": 16},
}
SPARSE_BUDGETS = (0.02, 0.04, 0.06, 0.09, 0.12)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--calib-prompts", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--sections", nargs="+", default=["quant", "sparse"], choices=["quant", "sparse"])
    parser.add_argument("--quant", nargs="+", default=list(QUANT_SETTINGS), choices=list(QUANT_SETTINGS))
    parser.add_argument("--sparse-budgets", type=float, nargs="+", default=list(SPARSE_BUDGETS))
    parser.add_argument("--smoke", action="store_true", help="tiny settings for the test suite")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    quant_extra: dict = {}
    sparse_extra: dict = {}
    if args.smoke:
        args.steps, args.calib_prompts, args.eval_prompts = 3, 1, 1
        args.quant, args.sparse_budgets = ["w4a16"], [0.06]
        # Same code paths, without the per-layer smoothing search and with a short sparse profile.
        quant_extra, sparse_extra = {"alpha_grid": (0.0,), "rank": 8}, {"calibration_calls": 1}

    started = time.time()
    bench = load_zoo_bench(args.steps, args.calib_prompts, args.eval_prompts)
    base, calib, prompts = bench.base, bench.calib, bench.prompts
    base_bytes = program_weights_bytes(base)

    def evaluate(config) -> tuple[Program, dict]:
        began = time.time()
        program, _ = run_passes(base, [config], calib)
        pass_seconds = time.time() - began
        metrics = fidelity(bench.images(program), bench.baseline)
        return program, {"psnr": metrics["psnr"], "ssim": metrics["ssim"], "pass_seconds": pass_seconds,
                         "weights_bytes": program_weights_bytes(program)}

    results: dict[str, dict] = {}
    if "quant" in args.sections:
        for name in args.quant:
            program, row = evaluate(QuantConfig(bits=4, **{**QUANT_SETTINGS[name], **quant_extra}))
            stats = program.stats["quant"]
            row.update(quantized_layers=len(stats["quantized"]), compression=base_bytes / row["weights_bytes"],
                       quantized_layer_compression=stats.get("compression"))
            results[f"quant.{name}"] = row
    if "sparse" in args.sections:
        for budget in args.sparse_budgets:
            program, row = evaluate(SparseConfig(l1_budget=budget, min_tokens=0, **sparse_extra))
            stats = program.stats["sparse"]
            row.update(mean_kept_fraction=stats.get("mean_kept_fraction", 1.0),
                       sparse_sites=len(stats.get("sparse_sites", [])))
            results[f"sparse.l1_{budget:g}"] = row
    payload = {"model": "zoo:shapes", "steps": args.steps, "eval_prompts": len(prompts),
               "calib_prompts": args.calib_prompts, "baseline_weights_bytes": base_bytes, "results": results,
               "seconds": time.time() - started, "torch": torch.__version__}
    print(format_table(payload))
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2))
    return payload


def format_table(payload: dict) -> str:
    lines = [f"zoo:shapes, {payload['steps']} steps, {payload['eval_prompts']} held-out prompts; "
             f"baseline weights {payload['baseline_weights_bytes'] / 2**20:.2f} MiB"]
    for name, row in payload["results"].items():
        extra = (f"weights {row['weights_bytes'] / 2**20:.2f} MiB ({row['compression']:.2f}x smaller)"
                 if name.startswith("quant") else
                 f"kept {row['mean_kept_fraction']:.2f} of attention FLOPs at {row['sparse_sites']} sites")
        lines.append(f"  {name:24s} PSNR {row['psnr']:6.2f} dB  SSIM {row['ssim']:.4f}  {extra}  "
                     f"(pass {row['pass_seconds']:.0f} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
