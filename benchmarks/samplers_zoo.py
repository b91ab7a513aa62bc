"""Issue 18: per sampler, does ``accelkit optimize`` ever return a plan below running fewer steps?

For each scheduler configuration on ``zoo:shapes`` (FlowMatch Euler, and the flow-matching configurations
of DPM-Solver++ 2M, UniPC and DEIS) and budgets 2x/3x/4x: the fewer-steps reference (the most steps
meeting the budget, default spacing), the best equalized-placement trial, the best trial with a cache,
the best trial with another solver order (where the scheduler has one), and the plan ``optimize``
chose, all measured on the held-out evaluation prompts.

    python benchmarks/samplers_zoo.py --steps 20 --trials 9 --out samplers.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
SCHEDULERS = {
    "FlowMatch Euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "DPM-Solver++ 2M (flow)": ("DPMSolverMultistepScheduler", {**FLOW, "solver_order": 2,
                                                                "algorithm_type": "dpmsolver++"}),
    "UniPC (flow)": ("UniPCMultistepScheduler", FLOW),
    "DEIS (flow)": ("DEISMultistepScheduler", FLOW),
}
# EulerDiscreteScheduler has no flow-prediction mode in diffusers 0.42 (no use_flow_sigmas; its step() rejects
# prediction_type='flow_prediction'): its flow configuration is FlowMatch Euler.


def run_one(label: str, args: argparse.Namespace) -> dict:
    from accelkit import loading
    from accelkit.search.optimize import OptimizeSettings, finish, prepare_search

    name, overrides = SCHEDULERS[label]
    original = loading.load_pipeline

    def load_with_scheduler(*a, **k):  # the search loads the model itself: swap the scheduler there
        loaded = original(*a, **k)
        import diffusers

        loaded.pipe.scheduler = getattr(diffusers, name).from_config(loaded.pipe.scheduler.config, **overrides)
        return loaded

    loading.load_pipeline = load_with_scheduler
    try:
        out = Path(args.out_dir) / label.split()[0].lower()
        settings = OptimizeSettings(model="zoo:shapes", budgets=tuple(f"{b}x" for b in args.budgets),
                                    trials=args.trials, steps=args.steps, num_prompts=args.calib_prompts,
                                    num_val_prompts=args.val_prompts, num_eval_prompts=args.eval_prompts,
                                    out=str(out), passes=("steps", "cache"))
        start = time.time()
        session = prepare_search(settings, role="optimize")
        session.run_trials(settings.trials, progress=False, console=None)
        outcomes, _ = finish(session, None)
    finally:
        loading.load_pipeline = original
    report = json.loads((out / "report" / "report.json").read_text())
    evaluator, prompts = session.evaluator, session.evaluation_prompts
    baseline = evaluator.calib.generate(evaluator.base, prompts, seed_offset=10_000).images
    trials = [t for t in session.study.trials if t.state.name == "COMPLETE" and "skipped" not in t.user_attrs]
    rows = []
    from accelkit.search.objective import _program_from_resolved

    for target, budget in zip(sorted(args.budgets), report["budgets"], strict=True):
        feasible = [t for t in trials if t.user_attrs.get("speedup", 0) >= target * 0.98]
        row = {"budget": budget["budget"], "fewer_steps": budget["references"]["fewer_steps"],
               "chosen": {"psnr": budget["fidelity"]["psnr"], "speedup": budget["speedup"],
                          "plan": budget["plan_summary"], "verdict": budget.get("verdict", "")}}
        groups = {
            "placement": [t for t in feasible if t.user_attrs["passes"].get("steps", {}).get("sigmas")],
            "cache": [t for t in feasible if t.user_attrs["passes"].get("cache", {}).get("full_step_mask")],
            "order": [t for t in feasible if any(t.user_attrs["passes"].get("steps", {}).get(key) is not None
                                                 for key in ("solver_order", "lower_order_final"))],
        }
        for key, group in groups.items():
            if not group:
                row[key] = None
                continue
            best = max(group, key=lambda t: t.values[1])  # best on calibration, measured held-out
            program = _program_from_resolved(evaluator, best.user_attrs["passes"])
            metrics, _ = evaluator.fidelity(program, prompts, baseline, 10_000)
            steps = best.user_attrs["passes"].get("steps", {})
            row[key] = {"psnr": metrics["psnr"], "speedup": best.user_attrs["speedup"], "trial": best.number,
                        "solver_order": steps.get("solver_order"),
                        "lower_order_final": steps.get("lower_order_final")}
        rows.append(row)
    return {"scheduler": label, "class": name, "overrides": overrides, "seconds": time.time() - start,
            "rows": rows, "notes": report.get("notes", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--trials", type=int, default=9)
    parser.add_argument("--calib-prompts", type=int, default=2)
    parser.add_argument("--val-prompts", type=int, default=2)
    parser.add_argument("--eval-prompts", type=int, default=4)
    parser.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS))
    parser.add_argument("--out-dir", default="samplers-out")
    parser.add_argument("--out", default="samplers.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    results = []
    for label in args.schedulers:
        try:
            results.append(run_one(label, args))
        except Exception as error:  # noqa: BLE001 - record it and go on with the next sampler
            print(label, "failed:", type(error).__name__, str(error).splitlines()[0], flush=True)
            results.append({"scheduler": label, "error": f"{type(error).__name__}: {error}"})
            continue
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
        for row in results[-1]["rows"]:
            cells = [f"{row['budget']}", f"fewer {row['fewer_steps']['psnr']:.1f}"]
            for key in ("placement", "cache", "order"):
                cells.append(f"{key} {row[key]['psnr']:.1f}" if row[key] else f"{key} -")
            cells.append(f"chosen {row['chosen']['psnr']:.1f} ({row['chosen']['speedup']:.2f}x)")
            print(results[-1]["scheduler"], " | ".join(cells), flush=True)
        print(results[-1]["scheduler"], f"{results[-1]['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
