"""Fidelity at matched speed on ``zoo:shapes``: accelkit's plans against diffusers' and cache-dit's caches.

Every method is tuned to each speed target (2x and 3x by default) and evaluated on held-out prompts
against the full-step baseline image of the same prompt and seed (PSNR and SSIM in float,
``accelkit.report.metrics.fidelity``).

Speed is *measured*, the same way for every method: the FLOPs the denoiser actually executes during
a whole generation, counted by a dispatch mode around the denoiser's calls (``benchmarks/_flops.py``:
skipped blocks, cached steps and removed steps do not show up), baseline FLOPs / method FLOPs. Wall
time per image (whole pipeline, median over ``--time-prompts`` eval prompts, measured without the
counter) is reported next to it.

Tuning: each method has an ordered list of settings (faster later: a threshold, a cache interval, a
number of full steps); a binary search over it on ``--tune-prompts`` calibration prompts (never the
evaluation prompts) finds, per target, the setting whose measured compute ratio is closest to and not
below the target. Where no setting reaches a target the fastest one is reported, marked as missed.

Methods:

* ``fewer_steps``: the sampler with fewer steps at its default spacing (the trivial reference);
* ``accelkit_cache_dp``: accelkit's cache pass (block 0 always computed, blocks 1..L-1 from the stored
  residual, full steps chosen by the DP over the residual-change prior), plain residual reuse;
* ``accelkit_cache_dp_taylor``: the same with first-order Taylor extrapolation of the residual;
* ``accelkit_steps_equalized``: accelkit's ``steps`` pass, steps placed for equal local error;
* ``accelkit_steps+cache``: ``steps`` (default spacing) then ``cache`` (DP), each taking about the
  square root of the speedup;
* ``accelkit_best``: per target, the accelkit method above with the best PSNR *on the tuning prompts*
  (how ``accelkit optimize`` picks a plan: calibration fidelity, not held-out fidelity);
* ``diffusers_fbc``: diffusers ``FirstBlockCacheConfig(threshold)``;
* ``diffusers_taylorseer``: diffusers ``TaylorSeerCacheConfig(cache_interval)``, Taylor order 1, warm-up
  3 steps, every transformer block cached (``cache_identifiers`` = the block lists; the default
  identifiers hook only the attention modules, so the MLPs always run: that variant is
  ``diffusers_taylorseer_attn``);
* ``cachedit_dbcache``: cache-dit ``DBCacheConfig(Fn=1, Bn=0, residual_diff_threshold)``, 2 warm-up
  steps, through cache-dit's own Flux block adapter; ``cachedit_dbcache_taylor`` adds its TaylorSeer
  calibrator (order 1). Skipped, with the reason recorded, when cache-dit is not importable.

Usage::

    python benchmarks/bench_fidelity_peers.py --out peers.json          # 28 steps, 2x and 3x
    python benchmarks/bench_fidelity_peers.py --cpu                     # tiny settings (test suite)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _flops import count_denoiser  # noqa: E402

from accelkit.report.metrics import fidelity  # noqa: E402

# ---------------------------------------------------------------- runners


@dataclass
class Generation:
    """Images plus the measured denoiser work of one run over some prompts."""

    images: torch.Tensor
    flops: int
    calls: int
    seconds: list[float]


class Runner:
    """Generates one image per (prompt, seed) with a method applied; ``close`` undoes the method."""

    pipe: Any

    def generate(self, prompt: str, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Env:
    """Shared generation settings and pipeline factory."""

    def __init__(self, args: argparse.Namespace) -> None:
        from accelkit.zoo import ZOO_MODELS

        info = ZOO_MODELS["shapes"]
        self.steps = args.steps
        self.height = args.size or info.height
        self.width = args.size or info.width
        self.guidance = info.guidance_scale
        self.device = args.device

    def new_pipe(self) -> Any:
        from accelkit.zoo import load_zoo_pipeline

        pipe = load_zoo_pipeline("shapes", device=self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call(self, pipe: Any, prompt: str, seed: int, steps: int | None = None) -> torch.Tensor:
        out = pipe(prompt, num_inference_steps=steps or self.steps, guidance_scale=self.guidance,
                   height=self.height, width=self.width, generator=torch.Generator("cpu").manual_seed(seed),
                   output_type="pt")
        return torch.as_tensor(out.images).float().clamp(0, 1).cpu()


class PlainRunner(Runner):
    def __init__(self, env: _Env, pipe: Any, steps: int) -> None:
        self.env, self.pipe, self.steps = env, pipe, steps

    def generate(self, prompt: str, seed: int) -> torch.Tensor:
        return self.env.call(self.pipe, prompt, seed, self.steps)


class DiffusersCacheRunner(Runner):
    """``transformer.enable_cache(config)``; CFG is batched, so one cache context, reset per image."""

    def __init__(self, env: _Env, config: Any) -> None:
        self.env, self.pipe = env, env.new_pipe()
        self.pipe.transformer.enable_cache(config)

    def generate(self, prompt: str, seed: int) -> torch.Tensor:
        transformer = self.pipe.transformer
        transformer._reset_stateful_cache()
        with transformer.cache_context("cond_uncond"):
            return self.env.call(self.pipe, prompt, seed)

    def close(self) -> None:
        self.pipe.transformer.disable_cache()


class CacheDitRunner(Runner):
    """``cache_dit.enable_cache`` with cache-dit's own Flux block adapter applied to the zoo pipeline."""

    def __init__(self, env: _Env, threshold: float, taylor: bool) -> None:
        import cache_dit
        from cache_dit.caching.block_adapters.block_registers import BlockAdapterRegister

        self.env, self.pipe = env, env.new_pipe()
        # The zoo pipeline is not named Flux*, so cache-dit's lookup by class name misses it; its Flux
        # adapter factory is applied directly (same blocks, patch functor and forward pattern).
        adapter = BlockAdapterRegister._adapters["Flux"](self.pipe)
        config = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2,
                                         residual_diff_threshold=float(threshold), enable_separate_cfg=False)
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylor else None
        cache_dit.enable_cache(adapter, cache_config=config, calibrator_config=calibrator)

    def generate(self, prompt: str, seed: int) -> torch.Tensor:
        return self.env.call(self.pipe, prompt, seed)

    def close(self) -> None:
        import cache_dit

        cache_dit.disable_cache(self.pipe)


class AccelkitRunner(Runner):
    def __init__(self, env: _Env, pipe: Any, program: Any) -> None:
        from accelkit.runtime.pipeline import AcceleratedPipeline

        self.env, self.pipe = env, pipe
        self.accelerated = AcceleratedPipeline(pipe, program)
        self.steps = program.num_steps

    def generate(self, prompt: str, seed: int) -> torch.Tensor:
        return self.env.call(self.accelerated, prompt, seed, self.steps)

    def close(self) -> None:
        self.accelerated.restore()


def run(runner: Runner, prompts: Sequence[str], seeds: Sequence[int], *, count: bool = True) -> Generation:
    images, seconds, flops, calls = [], [], 0, 0
    for prompt, seed in zip(prompts, seeds, strict=True):
        t0 = time.perf_counter()
        if count:
            with count_denoiser(runner.pipe.transformer) as counted:
                images.append(runner.generate(prompt, seed))
            flops, calls = flops + counted.flops, calls + counted.calls
        else:
            images.append(runner.generate(prompt, seed))
        seconds.append(time.perf_counter() - t0)
    return Generation(torch.cat(images), flops, calls, seconds)


# ---------------------------------------------------------------- methods


@dataclass
class Method:
    """A method and its ordered settings (faster later).

    Args:
        name: row name.
        family: ``reference``, ``accelkit``, ``diffusers`` or ``cache-dit``.
        settings: the knob values, ordered so that later ones compute less.
        describe: one line per setting.
        open: builds a :class:`Runner` for a setting.
        note: what the row is, for the table.
    """

    name: str
    family: str
    settings: list[Any]
    describe: Callable[[Any], str]
    open: Callable[[Any], Runner]
    note: str = ""
    skipped: str | None = None
    memo: dict[int, dict[str, Any]] = field(default_factory=dict)


class AccelkitPlans:
    """Capture + calibrator shared by the accelkit methods (the code path of ``fidelity_zoo.py``)."""

    def __init__(self, env: _Env, calib_prompts: Sequence[str]) -> None:
        from accelkit.calibrate import Calibrator
        from accelkit.capture import capture
        from accelkit.loading import record_denoiser_calls, weights_fingerprint
        from accelkit.passes.base import Program
        from accelkit.runtime.pipeline import AcceleratedPipeline

        self.env = env
        self.pipe = env.new_pipe()
        generation = {"height": env.height, "width": env.width, "guidance_scale": env.guidance}
        calls = record_denoiser_calls(self.pipe, prompt="a red circle", num_inference_steps=2, output_type="latent",
                                      generator=torch.Generator().manual_seed(0), **generation)
        self.base = Program.from_graph(capture(self.pipe.transformer, calls[0]), env.steps)
        self.calib = Calibrator(self.pipe, list(calib_prompts), seed=0,
                                weights_hash=weights_fingerprint(self.pipe.transformer), **generation,
                                run_program=AcceleratedPipeline)
        self._programs: dict[str, Any] = {}

    def runner(self, configs: list[Any]) -> Runner:
        from accelkit.passes.base import run_passes

        key = json.dumps([[type(c).__name__, c.to_dict()] for c in configs], sort_keys=True)
        if key not in self._programs:
            self._programs[key], _ = run_passes(self.base, configs, self.calib)
        return AccelkitRunner(self.env, self.pipe, self._programs[key])


def build_methods(env: _Env, args: argparse.Namespace, plans: Callable[[], AccelkitPlans],
                  baseline_pipe: Any) -> list[Method]:
    from accelkit.passes.cache import CacheConfig
    from accelkit.passes.steps import StepsConfig

    steps = env.steps
    counts = list(range(steps - 1, 1, -1))  # step / full-step counts, faster later
    thresholds = [float(t) for t in np.geomspace(args.min_threshold, args.max_threshold, args.thresholds)]
    methods = [
        Method("fewer_steps", "reference", counts, lambda n: f"{n} steps",
               lambda n: PlainRunner(env, baseline_pipe, n), "sampler with fewer steps, default spacing"),
    ]

    def cache_config(k: int, approximation: str) -> CacheConfig:
        return CacheConfig(full_fraction=k / steps, first_blocks=1, approximation=approximation, schedule="dp",
                           prior="residual", weighting="quadratic")

    def steps_cache(setting: tuple[int, int]) -> list[Any]:
        n, k = setting
        configs: list[Any] = [StepsConfig(num_steps=n)]
        if k < n:
            configs.append(CacheConfig(full_fraction=k / n, first_blocks=1, approximation="residual",
                                       schedule="dp", prior="residual", weighting="quadratic"))
        return configs

    combos: list[tuple[int, int]] = []
    for r in np.geomspace(1.05, args.max_speed, 4 * steps):
        n = max(2, round(steps / math.sqrt(r)))
        k = max(2, min(n, round(n / math.sqrt(r))))
        if (n, k) not in combos and (n, k) != (steps, steps):
            combos.append((n, k))
    methods += [
        Method("accelkit_cache_dp", "accelkit", counts, lambda k: f"{k} full steps",
               lambda k: plans().runner([cache_config(k, "residual")]),
               "cache pass: DP schedule (residual-change prior), residual reuse, block 0 always computed"),
        Method("accelkit_cache_dp_taylor", "accelkit", counts, lambda k: f"{k} full steps",
               lambda k: plans().runner([cache_config(k, "taylor")]),
               "cache pass: DP schedule (residual-change prior), first-order Taylor"),
        Method("accelkit_steps_equalized", "accelkit", counts, lambda n: f"{n} steps",
               lambda n: plans().runner([StepsConfig(num_steps=n, placement="equalized")]),
               "steps pass: equal-local-error placement"),
        Method("accelkit_steps+cache", "accelkit", combos, lambda s: f"{s[0]} steps, {s[1]} full",
               lambda s: plans().runner(steps_cache(s)), "steps pass then cache pass (DP), ~sqrt each"),
    ]

    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    blocks = [r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"]
    intervals = list(range(1, args.max_interval + 1))
    methods += [
        Method("diffusers_fbc", "diffusers", thresholds, lambda t: f"threshold {t:.4g}",
               lambda t: DiffusersCacheRunner(env, FirstBlockCacheConfig(threshold=t)),
               "FirstBlockCacheConfig(threshold)"),
        Method("diffusers_taylorseer", "diffusers", intervals, lambda n: f"cache_interval {n}",
               lambda n: DiffusersCacheRunner(env, TaylorSeerCacheConfig(
                   cache_interval=n, max_order=1, taylor_factors_dtype=torch.float32, cache_identifiers=blocks)),
               "TaylorSeerCacheConfig(cache_interval), order 1, 3 warm-up steps, whole blocks cached"),
        Method("diffusers_taylorseer_attn", "diffusers", intervals, lambda n: f"cache_interval {n}",
               lambda n: DiffusersCacheRunner(env, TaylorSeerCacheConfig(
                   cache_interval=n, max_order=1, taylor_factors_dtype=torch.float32)),
               "TaylorSeerCacheConfig defaults: attention modules cached"),
    ]
    try:
        import cache_dit  # noqa: F401

        skipped = None
    except Exception as error:  # noqa: BLE001 - any import failure is recorded as the reason
        skipped = f"cache-dit not importable: {type(error).__name__}: {error}"
    methods += [
        Method("cachedit_dbcache", "cache-dit", thresholds, lambda t: f"residual_diff_threshold {t:.4g}",
               lambda t: CacheDitRunner(env, t, taylor=False), "DBCache F1B0, 2 warm-up steps", skipped),
        Method("cachedit_dbcache_taylor", "cache-dit", thresholds, lambda t: f"residual_diff_threshold {t:.4g}",
               lambda t: CacheDitRunner(env, t, taylor=True), "DBCache F1B0 + TaylorSeer calibrator (order 1)",
               skipped),
    ]
    if args.methods:
        unknown = sorted(set(args.methods) - {m.name for m in methods})
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {[m.name for m in methods]}")
        by_name = {m.name: m for m in methods}
        methods = [by_name[name] for name in dict.fromkeys(args.methods)]  # in the order given
    return methods


METHOD_NAMES = ("fewer_steps", "accelkit_cache_dp", "accelkit_cache_dp_taylor", "accelkit_steps_equalized",
                "accelkit_steps+cache", "diffusers_fbc", "diffusers_taylorseer", "diffusers_taylorseer_attn",
                "cachedit_dbcache", "cachedit_dbcache_taylor")

# ---------------------------------------------------------------- tuning and evaluation


def measure(method: Method, index: int, prompts, seeds, reference: Generation) -> dict[str, Any]:
    """Run one setting on the tuning prompts (memoized): compute ratio and PSNR there."""
    if index not in method.memo:
        runner = method.open(method.settings[index])
        try:
            gen = run(runner, prompts, seeds)
        finally:
            runner.close()
        method.memo[index] = {
            "setting": method.describe(method.settings[index]), "ratio": reference.flops / max(gen.flops, 1),
            "psnr": fidelity(gen.images, reference.images)["psnr"],
        }
        print(f"  tune {method.name:26s} {method.memo[index]['setting']:28s} "
              f"ratio {method.memo[index]['ratio']:.3f}  psnr {method.memo[index]['psnr']:.2f}", flush=True)
    return method.memo[index]


def tune(method: Method, target: float, prompts, seeds, reference: Generation) -> tuple[int, bool]:
    """Index of the setting whose measured ratio is closest to and not below ``target`` (binary search)."""
    last = len(method.settings) - 1
    if measure(method, last, prompts, seeds, reference)["ratio"] < target:
        return last, False
    lo, hi = 0, last  # invariant: settings[hi] meets the target
    while lo < hi:
        mid = (lo + hi) // 2
        if measure(method, mid, prompts, seeds, reference)["ratio"] >= target:
            hi = mid
        else:
            lo = mid + 1
    meeting = [(v["ratio"], i) for i, v in method.memo.items() if v["ratio"] >= target]
    return min(meeting)[1], True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny settings on CPU (seconds; the test suite)")
    parser.add_argument("--device", default="cpu", help="where the zoo pipeline runs (cpu or cuda)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=None, help="image size (default: the model's, 32)")
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--calib-prompts", type=int, default=4, help="prompts the accelkit priors profile")
    parser.add_argument("--tune-prompts", type=int, default=2, help="calibration prompts the tuning runs on")
    parser.add_argument("--time-prompts", type=int, default=2,
                        help="eval prompts timed again without the FLOP counter; 0 = use the counted runs' times")
    parser.add_argument("--thresholds", type=int, default=28, help="threshold grid size (FBC, DBCache)")
    parser.add_argument("--min-threshold", type=float, default=0.02)
    parser.add_argument("--max-threshold", type=float, default=8.0)
    parser.add_argument("--max-interval", type=int, default=16, help="largest TaylorSeer cache_interval")
    parser.add_argument("--max-speed", type=float, default=8.0, help="fastest steps+cache combination")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--time-budget", type=float, default=float("inf"),
                        help="seconds after which methods not yet started are skipped (recorded as not run)")
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/fidelity_peers.json when OUT is set)")
    args = parser.parse_args(argv)
    if args.cpu:
        args.steps, args.size, args.targets = 4, 16, [2.0]
        args.eval_prompts, args.calib_prompts, args.tune_prompts, args.time_prompts = 1, 1, 1, 0
        args.thresholds, args.min_threshold, args.max_interval, args.max_speed = 4, 0.1, 2, 3.0
        if args.methods is None:  # same runners as diffusers_taylorseer / cachedit_dbcache
            args.methods = [m for m in METHOD_NAMES if m not in ("diffusers_taylorseer_attn", "cachedit_dbcache_taylor")]
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelkit.zoo import calibration_prompts, evaluation_prompts

    started = time.time()
    env = _Env(args)
    eval_prompts = evaluation_prompts(args.eval_prompts)
    eval_seeds = [10_000 + i for i in range(len(eval_prompts))]
    calib = calibration_prompts(max(args.calib_prompts, args.tune_prompts))
    tune_prompts, tune_seeds = calib[: args.tune_prompts], list(range(args.tune_prompts))
    baseline_pipe = env.new_pipe()
    base_runner = PlainRunner(env, baseline_pipe, env.steps)
    tune_reference = run(base_runner, tune_prompts, tune_seeds)
    eval_reference = run(base_runner, eval_prompts, eval_seeds)
    timed = eval_prompts[: args.time_prompts], eval_seeds[: args.time_prompts]

    def wall_seconds(runner: Runner, counted: Generation) -> float:
        if not args.time_prompts:  # the counted runs' own times (counter overhead included)
            return statistics.median(counted.seconds)
        return statistics.median(run(runner, *timed, count=False).seconds)

    base_seconds = wall_seconds(base_runner, eval_reference)
    print(f"baseline: {env.steps} steps, {eval_reference.flops / len(eval_prompts) / 1e9:.2f} GFLOP/image in the "
          f"denoiser, {base_seconds:.2f} s/image", flush=True)

    holder: dict[str, AccelkitPlans] = {}

    def plans() -> AccelkitPlans:
        if "plans" not in holder:
            holder["plans"] = AccelkitPlans(env, calib[: args.calib_prompts])
        return holder["plans"]

    methods = build_methods(env, args, plans, baseline_pipe)
    rows: dict[str, dict[str, Any]] = {}
    path = args.out or (os.path.join(os.environ["OUT"], "fidelity_peers.json") if os.environ.get("OUT") else None)
    for method in methods:
        rows[method.name] = {"family": method.family, "note": method.note, "targets": {}}
        if time.time() - started > args.time_budget:
            rows[method.name]["skipped"] = f"not run: past --time-budget {args.time_budget:g} s"
            continue
        if method.skipped:
            rows[method.name]["skipped"] = method.skipped
            print(f"{method.name}: skipped ({method.skipped})", flush=True)
            continue
        print(f"{method.name}: tuning on {len(tune_prompts)} calibration prompt(s)", flush=True)
        try:
            evaluated: dict[int, tuple[Generation, float]] = {}  # a setting chosen for two targets runs once
            for target in args.targets:
                index, met = tune(method, target, tune_prompts, tune_seeds, tune_reference)
                if index not in evaluated:
                    runner = method.open(method.settings[index])
                    try:
                        gen = run(runner, eval_prompts, eval_seeds)
                        evaluated[index] = (gen, wall_seconds(runner, gen))
                    finally:
                        runner.close()
                gen, seconds = evaluated[index]
                metrics = fidelity(gen.images, eval_reference.images)
                rows[method.name]["targets"][f"{target:g}x"] = {
                    "setting": method.describe(method.settings[index]), "met": met,
                    "compute_ratio": eval_reference.flops / max(gen.flops, 1),
                    "tune_ratio": method.memo[index]["ratio"], "tune_psnr": method.memo[index]["psnr"],
                    "psnr": metrics["psnr"], "ssim": metrics["ssim"], "per_image_psnr": metrics["per_image"]["psnr"],
                    "denoiser_calls": gen.calls, "seconds_per_image": seconds,
                    "wall_speedup": base_seconds / seconds,
                }
                r = rows[method.name]["targets"][f"{target:g}x"]
                print(f"{method.name} @ {target:g}x: {r['setting']}, compute {r['compute_ratio']:.2f}x, "
                      f"PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, wall {r['wall_speedup']:.2f}x", flush=True)
        except Exception as error:  # noqa: BLE001 - one failing peer must not hide the others
            rows[method.name]["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"{method.name}: FAILED {rows[method.name]['error']}", flush=True)
        rows[method.name]["tuning"] = [dict(v, index=i) for i, v in sorted(method.memo.items())]
        if path:  # partial results survive an interrupted run
            Path(path).write_text(json.dumps({"partial": True, "rows": rows}, indent=1))

    # accelkit_best: per target, the accelkit method with the best PSNR on the tuning prompts.
    best: dict[str, Any] = {"family": "accelkit", "note": "best accelkit method by tuning-prompt PSNR", "targets": {}}
    for target in args.targets:
        key = f"{target:g}x"
        candidates = [(r["targets"][key]["tune_psnr"], name) for name, r in rows.items()
                      if r["family"] == "accelkit" and key in r["targets"] and r["targets"][key]["met"]]
        if candidates:
            name = max(candidates)[1]
            best["targets"][key] = {**rows[name]["targets"][key], "method": name}
    rows["accelkit_best"] = best

    payload = {
        "model": "zoo:shapes", "steps": env.steps, "size": [env.height, env.width], "guidance": env.guidance,
        "targets": args.targets, "eval_prompts": len(eval_prompts), "tune_prompts": len(tune_prompts),
        "calib_prompts": args.calib_prompts, "time_prompts": args.time_prompts,
        "baseline": {"gflop_per_image": eval_reference.flops / len(eval_prompts) / 1e9,
                     "seconds_per_image": base_seconds},
        "speed": "compute ratio = baseline denoiser FLOPs / method denoiser FLOPs, counted while running",
        "rows": rows, "seconds": time.time() - started, "torch": torch.__version__,
        "device": args.device, "threads": torch.get_num_threads(), "command": " ".join(sys.argv),
        "versions": _versions(),
    }
    print(format_table(payload))
    if path:
        Path(path).write_text(json.dumps(payload, indent=1))
        print(f"wrote {path}")
    return payload


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out = {}
    for name in ("diffusers", "cache-dit"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def format_table(payload: dict) -> str:
    targets = [f"{t:g}x" for t in payload["targets"]]
    lines = [f"zoo:shapes, {payload['steps']} steps, {payload['eval_prompts']} held-out prompts; "
             "PSNR dB / SSIM (measured compute ratio, wall-time ratio)",
             f"{'method':28s} " + " ".join(f"{t:>40s}" for t in targets)]
    for name, row in payload["rows"].items():
        cells = []
        for t in targets:
            if row.get("skipped"):
                cells.append("skipped")
            elif t not in row["targets"]:
                cells.append(row.get("error", "-")[:40])
            else:
                r = row["targets"][t]
                miss = "" if r["met"] else " MISSED"
                cells.append(f"{r['psnr']:.2f} / {r['ssim']:.3f} ({r['compute_ratio']:.2f}x, "
                             f"{r['wall_speedup']:.2f}x){miss}")
        lines.append(f"{name:28s} " + " ".join(f"{c:>40s}" for c in cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
