"""Layer pruning on the trained zoo model: which blocks to remove, additivity, and recovery.

For each removed-FLOPs fraction, the ``prune`` pass chooses blocks by the one-shot LAPTOP-Diff
criterion (``output_mse``: per-block output MSE on calibration inputs, summed, exact knapsack), by
removing the last candidates, and in seeded random orders; each choice is evaluated on held-out
prompts against the unpruned model (PSNR/SSIM in float, same seeds). Additivity: for random sets of
2-3 removable blocks, the sum of single-block losses against the loss of removing the set. Recovery:
for the ``output_mse`` choices that remove ``--recover`` blocks, ``accelkit.calibrate.distill``
trains the pruned model from the original on teacher trajectories of the training prompts, and the
plan is replayed with the trained weights (as ``accelkit run`` would) and evaluated again.

Usage::

    python benchmarks/prune_zoo.py --steps 20 --iterations 200 --out prune.json
    python benchmarks/prune_zoo.py --smoke        # tiny settings, a few minutes on a CPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from accelkit.calibrate import Calibrator
from accelkit.calibrate.distill import DistillConfig, distill
from accelkit.capture import capture
from accelkit.loading import load_pipeline, record_denoiser_calls, weights_fingerprint
from accelkit.passes.base import Program, run_passes
from accelkit.passes.prune import (
    PruneConfig,
    measure_additivity,
    record_calibration_inputs,
    recovered_weight_key,
)
from accelkit.report.metrics import fidelity
from accelkit.runtime.pipeline import AcceleratedPipeline
from accelkit.zoo import ZOO_MODELS, calibration_prompts, evaluation_prompts

EVAL_SEED_OFFSET = 10_000


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (default: the zoo model's 20)")
    parser.add_argument("--calib-prompts", type=int, default=4, help="prompts the block scores average over")
    parser.add_argument("--eval-prompts", type=int, default=4, help="held-out prompts PSNR is measured on")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--additivity-sets", type=int, default=10)
    parser.add_argument("--recover", type=int, nargs="*", default=[1, 2],
                        help="distill the output_mse choices that remove this many blocks")
    parser.add_argument("--train-prompts", type=int, default=8, help="prompts whose teacher trajectories train")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny settings (4 steps, 1 prompt, 5 iterations)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a CPU shared with other jobs, 1 avoids OpenMP spin-waiting)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.steps, args.calib_prompts, args.eval_prompts, args.train_prompts = 4, 1, 1, 1
        args.fractions, args.random_seeds, args.additivity_sets, args.recover = [0.2], [0], 2, [2]
        args.iterations = 5

    started = time.perf_counter()
    info = ZOO_MODELS["shapes"]
    loaded = load_pipeline("zoo:shapes")
    generation = {"height": info.height, "width": info.width, "guidance_scale": info.guidance_scale}
    calls = record_denoiser_calls(loaded.pipe, prompt="a photo", num_inference_steps=2, output_type="latent",
                                  generator=torch.Generator("cpu").manual_seed(0), **generation)
    graph = capture(loaded.denoiser, calls[0])
    base = Program.from_graph(graph, args.steps)
    calib = Calibrator(loaded.pipe, calibration_prompts(args.calib_prompts), seed=0,
                       weights_hash=weights_fingerprint(loaded.denoiser), **generation, run_program=AcceleratedPipeline)
    held_out = evaluation_prompts(args.eval_prompts)
    reference = calib.generate(base, held_out, seed_offset=EVAL_SEED_OFFSET).images
    evaluated: dict[tuple[str, ...], dict] = {}

    def evaluate(program: Program, removed: tuple[str, ...]) -> dict:
        if removed not in evaluated:
            metrics = fidelity(calib.generate(program, held_out, seed_offset=EVAL_SEED_OFFSET).images, reference)
            evaluated[removed] = {"psnr": metrics["psnr"], "ssim": metrics["ssim"]}
        return evaluated[removed]

    rows = []
    for fraction in args.fractions:
        criteria = [("output_mse", PruneConfig(fraction=fraction, score="output_mse")),
                    ("last", PruneConfig(fraction=fraction, score="last"))]
        criteria += [(f"random{s}", PruneConfig(fraction=fraction, score="random", random_seed=s))
                     for s in args.random_seeds]
        for name, config in criteria:
            program, results = run_passes(base, [config], calib)
            stats = results["prune"].stats
            removed = tuple(stats["removed_blocks"])
            row = {"fraction": fraction, "criterion": name, "removed_blocks": list(removed),
                   "removed_flops_fraction": stats["removed_flops_fraction"], **evaluate(program, removed)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    # Additivity: random sets of 2-3 removable blocks (first and last included: the sum is what matters).
    scores_stats = next(r for r in rows if r["criterion"] == "output_mse")
    _, results = run_passes(base, [PruneConfig(fraction=scores_stats["fraction"], score="output_mse")], calib)
    scores = results["prune"].stats["scores"]
    rng = np.random.default_rng(0)
    names = sorted(scores)
    every = [s for size in (2, 3) for s in itertools.combinations(names, size)]
    sets = [list(every[i]) for i in rng.choice(len(every), size=min(args.additivity_sets, len(every)), replace=False)]
    pairs = measure_additivity(base, calib, sets)
    predicted, actual = np.array([p for p, _ in pairs]), np.array([a for _, a in pairs])
    additivity = {
        "sets": [{"blocks": s, "predicted": p, "actual": a} for s, (p, a) in zip(sets, pairs, strict=True)],
        "ratio_min": float((actual / predicted).min()), "ratio_max": float((actual / predicted).max()),
        "pearson": float(np.corrcoef(predicted, actual)[0, 1]) if len(pairs) > 2 else None,
    }
    print(json.dumps({"additivity": {k: v for k, v in additivity.items() if k != "sets"}}), flush=True)

    # Recovery of the one-shot choices that remove 1, 2, ... blocks.
    recovery = []
    train = Calibrator(loaded.pipe, calibration_prompts(args.train_prompts), seed=0, **generation, run_program=AcceleratedPipeline)
    train_calls = record_calibration_inputs(base, train, max_calls=10**9) if args.recover else []
    config = DistillConfig(iterations=args.iterations, lr=args.lr, batch_size=args.batch_size)
    for count in args.recover:
        row = next((r for r in rows if r["criterion"] == "output_mse" and len(r["removed_blocks"]) == count), None)
        if row is None:
            print(f"no output_mse choice removes {count} block(s) at fractions {args.fractions}; skipped")
            continue
        prune_config = PruneConfig(removed_blocks=tuple(row["removed_blocks"]))
        pruned, _ = run_passes(base, [prune_config])
        result = distill(graph.module, pruned.variants["full"].module, row["removed_blocks"], train_calls,
                         graph.num_user_outputs, config, progress=_report_every_50)
        weights = {recovered_weight_key(t): w for t, w in result.weights.items()}
        replayed, _ = run_passes(base.replace(new_weights=weights), [prune_config])
        after = fidelity(calib.generate(replayed, held_out, seed_offset=EVAL_SEED_OFFSET).images, reference)
        entry = {"removed_blocks": row["removed_blocks"], "psnr_before": row["psnr"], "psnr_after": after["psnr"],
                 "ssim_before": row["ssim"], "ssim_after": after["ssim"], "losses_before": result.losses_before,
                 "losses_after": result.losses_after, "train_calls": len(train_calls), "seconds": result.seconds}
        recovery.append(entry)
        print(json.dumps(entry), flush=True)

    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": "cpu", "torch_threads": torch.get_num_threads(), "rows": rows, "additivity": additivity,
        "recovery": recovery, "seconds": time.perf_counter() - started,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    _print_table(summary)
    return summary


def _report_every_50(step: int, total: int, losses: dict) -> None:
    if step % 50 == 0 or step == total:
        print(f"  step {step}/{total}: " + ", ".join(f"{k} {v:.4g}" for k, v in losses.items()), flush=True)


def _print_table(summary: dict) -> None:
    by_fraction: dict[float, dict[str, dict]] = {}
    for row in summary["rows"]:
        by_fraction.setdefault(row["fraction"], {})[row["criterion"]] = row
    recovered = {tuple(r["removed_blocks"]): r for r in summary["recovery"]}
    print("\n| fraction | output_mse | + recovery | last | random (mean) |")
    print("|---|---|---|---|---|")
    for fraction, rows in by_fraction.items():
        one_shot = rows["output_mse"]
        randoms = [r["psnr"] for name, r in rows.items() if name.startswith("random")]
        rec = recovered.get(tuple(one_shot["removed_blocks"]))
        after = f"{rec['psnr_after']:.2f}" if rec else "-"
        print(f"| {fraction} ({len(one_shot['removed_blocks'])}) | {one_shot['psnr']:.2f} | {after} | "
              f"{rows['last']['psnr']:.2f} | {np.mean(randoms):.2f} |")


if __name__ == "__main__":
    main()
