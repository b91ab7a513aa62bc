"""Wall-clock speedup of a loaded plan (what ``accelkit run`` calls) over the original pipeline.

For each batch size, the same call (prompt, seed, ``num_images_per_prompt=batch``, the plan's
resolution and guidance) runs on the original pipeline and on ``accelkit.load(out, pipe)``; baseline
and accelerated repeats alternate so drift on a shared machine hits both alike. The first accelerated
call at a batch size the plan was not made for also derives its program (capture + replay): that
one-time cost is reported separately and excluded by the warm-up.

    python benchmarks/run_speedup.py OUT --budget 2x --batch 1 --batch 4 --repeats 7 --json speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(out: str, budget: str | None, batches: list[int], repeats: int, prompt: str) -> dict:
    import accelkit
    from accelkit.loading import load_pipeline
    from accelkit.runtime.plan import read_plan

    plan = read_plan(out, budget)
    pipe = load_pipeline(plan.data["model"]["id"]).pipe
    pipe.set_progress_bar_config(disable=True)
    fast = accelkit.load(out, pipe, plan.budget)
    defaults = dict(plan.call_defaults)
    baseline_steps = int(plan.data["baseline_steps"])
    rows = []
    for batch in batches:
        def call(target, steps, batch=batch):
            return lambda: target(prompt=prompt, num_images_per_prompt=batch, num_inference_steps=steps,
                                  generator=torch.Generator().manual_seed(0), output_type="np", **defaults)

        def original():
            fast.restore()
            try:
                call(pipe, baseline_steps)()
            finally:
                fast.denoiser.forward = fast.forward

        accelerated = call(fast, None)
        first = _timed(accelerated)  # includes deriving the program for a new batch size
        original()
        base, acc = [], []
        for _ in range(repeats):
            base.append(_timed(original))
            acc.append(_timed(accelerated))
        rows.append({
            "batch": batch, "baseline_s": statistics.median(base), "accelerated_s": statistics.median(acc),
            "speedup": statistics.median(base) / statistics.median(acc), "first_accelerated_s": first,
            "baseline_runs_s": base, "accelerated_runs_s": acc,
        })
        print(f"batch {batch}: original {rows[-1]['baseline_s']:.3f} s, accelerated {rows[-1]['accelerated_s']:.3f} s"
              f" -> {rows[-1]['speedup']:.2f}x (first accelerated call {first:.2f} s)", flush=True)
    cost = plan.data.get("cost", {})
    return {
        "plan": plan.budget, "baseline_steps": baseline_steps, "plan_steps": plan.data["num_steps"],
        "schedule": plan.data["schedule"], "roofline_speedup": cost.get("roofline_speedup"),
        "search_speedup": cost.get("speedup"), "search_cost_kind": cost.get("kind"),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the directory accelkit optimize wrote")
    parser.add_argument("--budget", default=None)
    parser.add_argument("--batch", type=int, action="append", help="images per call (repeatable; default 1 and 4)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    result = measure(args.out, args.budget, args.batch or [1, 4], args.repeats, args.prompt)
    print(f"roofline prediction: {result['roofline_speedup']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
