"""End-to-end latency of a FLUX.1-dev-size transformer under each accelkit pass and the combined plan.

    python benchmarks/bench_e2e.py                  # GPU: 19+38 blocks, 3072 hidden, bf16, 1024² (+ 2048² sparse)
    python benchmarks/bench_e2e.py --cpu            # tiny Flux (2+2 blocks, width 64), same code paths, seconds

The model is ``diffusers.FluxTransformer2DModel`` with random weights (speed needs no training), batch
1, guidance embedding on, 512 text tokens (8 in ``--cpu``). It is captured once per resolution with
``accelkit.capture.capture`` and every configuration is an accelkit ``Program`` made by
``accelkit.passes.base.run_passes`` and run by ``accelkit.runtime.executor.ProgramExecutor``; nothing
here calls a pass's internals. Passes that normally calibrate get *resolved* configs instead (the form
plans store), so no calibration data is needed:

* ``steps``: ``StepsConfig(num_steps=n)``, default spacing (same graph: per-step latency is the
  baseline's; the row reports the denoising loop);
* ``prune``: ``PruneConfig(fraction, score="last")`` (which blocks go does not matter for speed);
* ``quant``: ``QuantConfig(bits=4, alphas=[(layer, 0.0), ...])`` with random INT4 weights, scales and
  low-rank factors placed in ``Program.new_weights`` (the pass takes stored tensors as they are, no SVD);
* ``sparse``: ``SparseConfig(taus=(tau,) * sites)``; the kept share of attention blocks that the
  predicted masks actually keep is measured on one call and reported;
* ``cache``: ``CacheConfig(full_fraction, schedule="uniform")``: the cached variant's per-step latency
  and the whole denoising loop of the plan;
* ``combined``: prune + quant (w4a8) + sparse + cache, compiled.

Per row: median per-step latency (CUDA events, warm-ups, median of repeats; ``_timing.time_fn``), the
denoising loop (all steps of the plan with an Euler update, median of ``--loop-repeats``), peak GPU
memory while the row ran (everything resident) and the bytes of the weights the row's graphs read,
the accelkit cost model's FLOPs per step and the achieved TFLOP/s. Compile time is the first call.
Prints a table; JSON to ``$OUT/e2e.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _timing import time_fn  # noqa: E402

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))


def build_model(config: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Random-weight FluxTransformer2DModel made directly on ``device`` in ``dtype`` (no fp32 copy)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def make_inputs(config: dict, resolution: int, text_tokens: int, device: str, dtype: torch.dtype) -> dict:
    """One FluxPipeline-style denoiser call at ``resolution``² pixels (VAE /8, 2x2 packing: /16 per side)."""
    side = resolution // 16
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    kwargs = dict(
        hidden_states=randn(1, side * side, config["in_channels"]),
        encoder_hidden_states=randn(1, text_tokens, config["joint_attention_dim"]),
        pooled_projections=randn(1, config["pooled_projection_dim"]),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        img_ids=ids.reshape(-1, 3).to(device, dtype),
        txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
    )
    if config.get("guidance_embeds"):
        kwargs["guidance"] = torch.tensor([3.5], device=device, dtype=dtype)
    kwargs["return_dict"] = False
    return kwargs


# ---------------------------------------------------------------- resolved configs without calibration


def random_quant_weights(program, config, device: str, lora_dtype: torch.dtype, seed: int = 0) -> dict:
    """Random INT4 residuals, scales and low-rank factors for every quantizable linear of ``program``.

    Scales are ~1/(8·sqrt(K)) so the random 4-bit weights have about the magnitude of the default init
    (keeps activations finite through many blocks: the sparse masks then see real numbers).
    """
    from accelkit.passes.quant import find_quant_sites, weight_key

    # Drawn on the device: billions of random bytes are slow to make on the host.
    g = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    sites = [s for s in find_quant_sites(program.variants["full"].module, config) if s.reason is None]
    for site in sites:
        n, k = site.shape
        scale = 1.0 / (8.0 * math.sqrt(k))
        on = dict(generator=g, device=device)
        parts = {
            "packed": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, **on),
            "scales": (torch.rand(n, k // config.group_size, **on) * 0.5 + 0.5).mul(scale).half(),
            "lora_down": (torch.randn(config.rank, k, **on) / math.sqrt(k)).to(lora_dtype),
            "lora_up": (torch.randn(n, config.rank, **on) / math.sqrt(config.rank) * 0.1).to(lora_dtype),
            "smooth": torch.rand(k, **on) * 0.5 + 0.75,
        }
        for name, value in parts.items():
            tensors[weight_key(site.path, name)] = value
    return tensors, tuple((s.path, 0.0) for s in sites)


def quantized(program, act_mode: str, device: str, dtype: torch.dtype, rank: int, group: int):
    """``program`` with the quant pass applied from a resolved config and random stored tensors."""
    from accelkit.passes.base import run_passes
    from accelkit.passes.quant import QuantConfig

    probe = QuantConfig(bits=4, act_mode=act_mode, rank=rank, group_size=group)
    weights, alphas = random_quant_weights(program, probe, device, dtype)
    config = QuantConfig(bits=4, act_mode=act_mode, rank=rank, group_size=group, alphas=alphas)
    prepared = program.replace(new_weights={**program.new_weights, **weights})
    result, _ = run_passes(prepared, [config], None)
    return result


def sparse_config(program, tau: float, min_tokens: int, block_q: int, block_k: int):
    """A resolved SparseConfig with the same tau at every eligible attention site."""
    from accelkit.passes.sparse import SparseConfig, attention_sites

    probe = SparseConfig(l1_budget=0.06, min_tokens=min_tokens, block_q=block_q, block_k=block_k)
    text = program.graph.input_specs[program.graph.input_names.index("encoder_hidden_states")].shape[1]
    sites = [s for s in attention_sites(program.variants["full"].module, probe, text) if s.dense_reason is None]
    return SparseConfig(l1_budget=0.06, min_tokens=min_tokens, block_q=block_q, block_k=block_k,
                        taus=(float(tau),) * len(sites)), len(sites)


class _KeptShare(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the kept share of KV blocks of every ``accelkit::predict_block_mask`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.shares: list[float] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "predict_block_mask" in str(func):
            counts, indices = out
            self.shares.append(float(counts.float().mean() / indices.shape[-1]))
        return out


# ---------------------------------------------------------------- measurement


class Bench:
    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.args, self.device = args, device
        self.rows: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.path: str | None = None

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def memory_start(self) -> float:
        if self.device != "cuda":
            return 0.0
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def memory_row(self, row: dict, start: float) -> None:
        if self.device == "cuda":
            peak = torch.cuda.max_memory_allocated()
            row["peak_mem_gib"] = peak / 2**30
            row["activation_peak_gib"] = (peak - start) / 2**30
        else:
            row["peak_mem_gib"] = row["activation_peak_gib"] = None

    def time(self, fn: Callable[[], Any], repeats: int | None = None, warmup: int | None = None) -> float:
        return time_fn(fn, device=self.device, warmup=self.args.warmup if warmup is None else warmup,
                       repeats=self.args.repeats if repeats is None else repeats)

    def record(self, row: dict) -> dict:
        self.rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "stats"}, default=str), flush=True)
        if self.path:  # rows measured so far survive a call killed at its time limit
            Path(self.path).write_text(json.dumps(dict(meta=self.meta, rows=self.rows, partial=True),
                                                  indent=1, default=str))
        return row


def graph_weight_bytes(modules) -> int:
    """Bytes of the distinct tensors the graphs read through ``get_attr`` (what a variant keeps resident)."""
    seen, total = set(), 0
    for module in modules:
        for node in module.graph.nodes:
            if node.op != "get_attr":
                continue
            value = module
            for part in str(node.target).split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


def variant_flops(program, name: str) -> float:
    from accelkit.capture.cost import graph_costs

    return float(sum(c.flops for c in graph_costs(program.variants[name].module).values()))


def make_executor(program, compile_backend: str | None):
    """ProgramExecutor; compiled through its own ``compile=True`` for inductor, else with ``backend``."""
    from accelkit.runtime.executor import ProgramExecutor

    if compile_backend in (None, "inductor"):
        return ProgramExecutor(program, compile=compile_backend == "inductor")
    executor = ProgramExecutor(program)
    # The executor's compile flag always uses inductor; the CPU smoke mode uses another backend (inductor's
    # C++ build takes minutes on the small test CPUs), with the executor's exact compile arguments.
    for name, variant in program.variants.items():
        executor._compiled[name] = torch.compile(variant.module, backend=compile_backend, fullgraph=True,
                                                 dynamic=False)
    return executor


def run_row(bench: Bench, name: str, program, kwargs: dict, *, compile_backend: str | None = None,
            loop: bool = True, per_step: bool = True, note: str = "", extra: dict | None = None) -> dict:
    """Per-step latency of each variant the program runs, the denoising loop, memory and FLOPs."""
    args = bench.args
    row: dict[str, Any] = dict(name=name, resolution=kwargs["_resolution"], steps=program.num_steps,
                               compiled=compile_backend, note=note, error=None, **(extra or {}))
    start = bench.memory_start()
    flat = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    try:
        executor = make_executor(program, compile_backend)
        schedule = list(program.schedule)
        variants = [v for v in dict.fromkeys(schedule)]
        first = {v: schedule.index(v) for v in variants}
        if compile_backend:
            # Compile time: the first call of each variant, in schedule order (cached steps need state).
            t0 = time.perf_counter()
            for v in variants:
                if first[v] > 0:
                    executor.run(0, 0, flat, False)
                executor.run(first[v], 0, flat, False)
            bench.sync()
            row["compile_s"] = time.perf_counter() - t0
        if per_step:
            for v in variants:
                if first[v] > 0:
                    executor.reset()
                    executor.run(0, 0, flat, False)  # a full step writes the state the variant reads
                ms = bench.time(lambda v=v: executor.run(first[v], 0, flat, False))
                flops = variant_flops(program, v)
                row[f"{v}_ms"] = ms
                row[f"{v}_gflop"] = flops / 1e9
                row[f"{v}_tflops"] = flops / (ms * 1e-3) / 1e12
            out = executor.run(0, 0, flat, False)[0]
            row["finite"] = bool(torch.isfinite(out).all())
        if loop:
            dts = [1.0 / program.num_steps] * program.num_steps
            timesteps = [torch.full_like(flat["timestep"], 1.0 - i / program.num_steps)
                         for i in range(program.num_steps)]

            def denoise():
                executor.reset()
                x = flat["hidden_states"]
                for i in range(program.num_steps):
                    v = executor.run(i, 0, {**flat, "hidden_states": x, "timestep": timesteps[i]}, False)[0]
                    x = x - dts[i] * v
                return x

            # Per-step timing already warmed this executor; a loop-only row warms up once.
            row["loop_ms"] = bench.time(denoise, repeats=args.loop_repeats, warmup=0 if per_step else 1)
            row["schedule"] = "".join("F" if s == "full" else ("C" if s == "cached" else "D") for s in schedule)
        row["weights_gib"] = graph_weight_bytes(v.module for v in program.variants.values()) / 2**30
    except Exception as error:  # noqa: BLE001 - one failing configuration must not hide the others
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    bench.memory_row(row, start)
    return bench.record(row)


def kept_share(program, kwargs) -> float | None:
    flat = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    mode = _KeptShare()
    with torch.no_grad(), mode:
        program.variants["full"].module(*program.graph.flat_inputs(flat))
    return statistics.mean(mode.shares) if mode.shares else None


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny Flux on CPU, float32, same code paths (seconds)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--sparse-resolution", type=int, default=2048, help="0 skips the large-resolution rows")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--steps-pass", type=int, default=14, help="step count of the steps-pass row")
    p.add_argument("--prune-fraction", type=float, default=0.25)
    p.add_argument("--quant-rank", type=int, default=32)
    p.add_argument("--quant-group", type=int, default=64)
    p.add_argument("--tau", type=float, default=0.3, help="top-p tau of every sparse site")
    p.add_argument("--min-tokens", type=int, default=4096)
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--cache-full-fraction", type=float, default=0.5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--loop-repeats", type=int, default=3)
    p.add_argument("--rows", nargs="+", default=None,
                   help="run only these rows (baseline_compiled steps prune quant_w4a16 quant_w4a8 cache sparse "
                        "sparse_large combined); the eager baselines always run")
    p.add_argument("--time-budget", type=float, default=380.0,
                   help="seconds after which the remaining rows are skipped (the suite's 9-minute limit)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.cpu:
        config, device, dtype = TINY, "cpu", torch.float32
        args.resolution, args.sparse_resolution, args.text_tokens = 128, 256, 8
        args.steps, args.steps_pass, args.min_tokens, args.block_q, args.block_k = 4, 2, 0, 16, 16
        args.warmup, args.repeats, args.loop_repeats, args.quant_rank, args.quant_group = 0, 1, 1, 8, 16
        args.compile_backend = "eager"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu for the tiny CPU mode")
        config, device, dtype = FLUX_DEV, "cuda", torch.bfloat16
    compile_backend = None if args.no_compile else args.compile_backend
    started = time.time()
    from accelkit.capture import capture
    from accelkit.passes.base import Program, run_passes
    from accelkit.passes.cache import CacheConfig
    from accelkit.passes.prune import PruneConfig
    from accelkit.passes.steps import StepsConfig

    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                dtype=str(dtype), model=config, batch=1, text_tokens=args.text_tokens, command=" ".join(sys.argv))
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        meta["triton"] = None
    print(json.dumps(meta, default=str), flush=True)
    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    meta["build_s"] = time.perf_counter() - t0
    meta["params_b"] = sum(q.numel() for q in model.parameters()) / 1e9
    bench = Bench(args, device)
    bench.meta = meta
    bench.path = args.out or (os.path.join(os.environ["OUT"], "e2e.json") if os.environ.get("OUT") else None)

    def inputs(resolution: int) -> dict:
        kwargs = make_inputs(config, resolution, args.text_tokens, device, dtype)
        kwargs["_resolution"] = resolution
        return kwargs

    kwargs = inputs(args.resolution)
    flat = {k: v for k, v in kwargs.items() if not k.startswith("_")}

    def guarded(name: str, resolution: int, build: Callable[[], None]) -> None:
        """Run one row unless the time budget is spent; a failure becomes the row's error."""
        if args.rows and name not in args.rows:
            return
        if time.time() - started > args.time_budget:
            bench.record(dict(name=name, resolution=resolution, error=f"skipped: past --time-budget {args.time_budget} s"))
            return
        try:
            build()
        except Exception as error:  # noqa: BLE001 - one failing configuration must not hide the others
            bench.record(dict(name=name, resolution=resolution, error=f"{type(error).__name__}: {error}"[:240]))
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    # Eager diffusers module (no capture): the reference the captured graph is checked against.
    start = bench.memory_start()
    with torch.no_grad():
        ms = bench.time(lambda: model(**flat))
    row = dict(name="eager_module", resolution=args.resolution, steps=args.steps, compiled=None, error=None,
               note="diffusers module, no capture", full_ms=ms)
    bench.memory_row(row, start)
    bench.record(row)

    t0 = time.perf_counter()
    graph = capture(model, flat)
    meta["capture_s"] = time.perf_counter() - t0
    meta["graph_gflop"] = graph.total_flops() / 1e9
    base = Program.from_graph(graph, args.steps)
    run_row(bench, "baseline", base, kwargs, note="captured graph, eager")
    if compile_backend and (not args.rows or "baseline_compiled" in args.rows):
        guarded("baseline_compiled", args.resolution, lambda: run_row(
            bench, "baseline_compiled", base, kwargs, compile_backend=compile_backend,
            note="captured graph, torch.compile(fullgraph=True, dynamic=False)"))

    def steps_row() -> None:
        program, _ = run_passes(base, [StepsConfig(num_steps=args.steps_pass)], None)
        run_row(bench, "steps", program, kwargs, per_step=False,
                note=f"{args.steps_pass} steps instead of {args.steps}: same graph, shorter loop")

    def prune_row() -> None:
        program, results = run_passes(base, [PruneConfig(fraction=args.prune_fraction, score="last")], None)
        run_row(bench, "prune", program, kwargs, loop=False, note=f"fraction {args.prune_fraction}",
                extra={"removed_blocks": len(results["prune"].stats.get("removed_blocks", []))})

    def quant_row(act_mode: str) -> None:
        program = quantized(base, act_mode, device, dtype, args.quant_rank, args.quant_group)
        run_row(bench, f"quant_{act_mode}", program, kwargs, loop=False,
                note=f"random INT4 + rank-{args.quant_rank} factors, group {args.quant_group}",
                extra={"layers": len(program.stats["quant"]["quantized"])})

    cache = CacheConfig(full_fraction=args.cache_full_fraction, first_blocks=1, schedule="uniform")

    def cache_row() -> None:
        program, _ = run_passes(base, [cache], None)
        run_row(bench, "cache", program, kwargs, note=f"uniform, {program.schedule.count('full')} of {args.steps} full")

    def sparse_row(program: Any, call: dict, loop: bool) -> None:
        config_s, sites = sparse_config(program, args.tau, args.min_tokens, args.block_q, args.block_k)
        sparse_program, _ = run_passes(program, [config_s], None)
        share = kept_share(sparse_program, call)
        run_row(bench, "sparse", sparse_program, call, loop=loop, note=f"tau {args.tau} at {sites} sites",
                extra={"kept_share": share, "sites": sites})

    def combined_row() -> None:
        from accelkit.passes.quant import QuantConfig

        program, _ = run_passes(base, [PruneConfig(fraction=args.prune_fraction, score="last")], None)
        probe = QuantConfig(bits=4, act_mode="w4a8", rank=args.quant_rank, group_size=args.quant_group)
        weights, alphas = random_quant_weights(program, probe, device, dtype)
        program = program.replace(new_weights={**program.new_weights, **weights})
        config_s, _ = sparse_config(program, args.tau, args.min_tokens, args.block_q, args.block_k)
        quant = QuantConfig(bits=4, act_mode="w4a8", rank=args.quant_rank, group_size=args.quant_group, alphas=alphas)
        program, _ = run_passes(program, [quant, config_s, cache], None)
        run_row(bench, "combined" + ("_compiled" if compile_backend else ""), program, kwargs,
                compile_backend=compile_backend, note="prune + quant w4a8 + sparse + cache")

    def large_rows() -> None:
        large = inputs(args.sparse_resolution)
        large_flat = {k: v for k, v in large.items() if not k.startswith("_")}
        t0 = time.perf_counter()
        large_base = Program.from_graph(capture(model, large_flat), args.steps)
        meta["capture_large_s"] = time.perf_counter() - t0
        run_row(bench, "baseline", large_base, large, loop=False, note="captured graph, eager")
        sparse_row(large_base, large, loop=False)

    guarded("steps", args.resolution, steps_row)
    guarded("prune", args.resolution, prune_row)
    for act_mode in ("w4a16", "w4a8"):
        guarded(f"quant_{act_mode}", args.resolution, lambda act_mode=act_mode: quant_row(act_mode))
    guarded("cache", args.resolution, cache_row)
    guarded("sparse", args.resolution, lambda: sparse_row(base, kwargs, loop=False))
    if args.sparse_resolution:
        guarded("sparse_large", args.sparse_resolution, large_rows)
    guarded("combined", args.resolution, combined_row)
    meta["seconds"] = time.time() - started
    report = dict(meta=meta, rows=bench.rows)
    print(format_table(report))
    path = args.out or (os.path.join(os.environ["OUT"], "e2e.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {path}")
    return report


def format_table(report: dict) -> str:
    rows = report["rows"]
    bases = {r["resolution"]: r for r in rows if r["name"] == "baseline" and r.get("full_ms")}
    header = (f"{'config':<20} {'res':>5} {'full ms':>9} {'cached ms':>9} {'TFLOP/s':>8} {'loop ms':>10} "
              f"{'vs base':>8} {'peak GiB':>8} {'weights':>8} note")
    lines = [header, "-" * len(header)]

    def f(value, fmt):
        width = int(fmt.split(".")[0])
        return format(value, fmt) if isinstance(value, int | float) else "-".rjust(width)

    for r in rows:
        speed, base = None, bases.get(r.get("resolution"))
        if base and r.get("loop_ms") and base.get("loop_ms"):
            speed = base["loop_ms"] / r["loop_ms"]
        elif base and r.get("full_ms"):
            speed = base["full_ms"] / r["full_ms"]
        note = r.get("error") or r.get("note", "")
        if r.get("kept_share") is not None:
            note += f"; kept {r['kept_share']:.2f}"
        if r.get("compile_s"):
            note += f"; compile {r['compile_s']:.0f} s"
        lines.append(f"{r['name']:<20} {r.get('resolution', '-'):>5} {f(r.get('full_ms'), '9.2f')} "
                     f"{f(r.get('cached_ms'), '9.2f')} {f(r.get('full_tflops'), '8.1f')} "
                     f"{f(r.get('loop_ms'), '10.1f')} {f(speed, '8.2f')} {f(r.get('peak_mem_gib'), '8.1f')} "
                     f"{f(r.get('weights_gib'), '8.2f')} {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
