"""Benchmark block-sparse attention against dense SDPA (flash, cuDNN) and FlexAttention.

    python benchmarks/bench_attention.py --device cuda [--lengths 4096 16384 65536] [--tune]
    python benchmarks/bench_attention.py --cpu-smoke        # tiny shapes, reference backend, < 10 s

Rows per (L, kept fraction): SDPA flash and SDPA cuDNN (dense), FlexAttention with the same BlockMask,
the Triton kernel with a given random mask (same count in every query block), ``predict_block_mask``
alone, and Triton + ``predict_block_mask`` (mask prediction included; tau calibrated on the data so the
predicted mask keeps about the target fraction). Times: CUDA events, warm-up, median of ``--repeats``.
TFLOP/s: dense-equivalent (4·B·H·Lq·Lk·D / t) and effective (kept blocks' work / t).
JSON goes to ``$OUT/attention.json`` when ``OUT`` is set (or to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from _timing import time_fn  # noqa: E402 - sibling module in benchmarks/

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from accelkit.kernels.block_sparse_attention import (  # noqa: E402
    block_sparse_attention,
    indices_from_dense_mask,
    predict_block_mask,
)
from accelkit.kernels.block_sparse_attention.reference import num_blocks  # noqa: E402


def random_mask(b, h, nq, nk, keep, *, device, generator=None):
    """Random block mask with the same number of kept KV blocks (round(keep·NK), ≥ 1) per query block."""
    n_keep = max(1, round(keep * nk))
    scores = torch.rand(b, h, nq, nk, device=device, generator=generator)
    top = scores.topk(n_keep, dim=-1).indices
    mask = torch.zeros(b, h, nq, nk, dtype=torch.bool, device=device)
    mask.scatter_(-1, top, True)
    return mask


def kept_fraction(counts, nk) -> float:
    return float(counts.float().mean().item()) / nk


def calibrate_tau(q, k, target, *, block_q, block_k, iters=12):
    """Bisection on tau so predict_block_mask keeps about ``target`` of the blocks on this data."""
    nk = num_blocks(k.shape[2], block_k)
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        counts, _ = predict_block_mask(q, k, block_q=block_q, block_k=block_k, tau=mid)
        if kept_fraction(counts, nk) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _try(fn):
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - a failing backend becomes a row with its error
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def bench_one(L, keep, *, args, device, dtype, results):
    b, h, d = args.batch, args.heads, args.head_dim
    bq, bk = args.block_q, args.block_k
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, L, d, device=device, dtype=dtype, generator=g) for _ in range(3))
    nq, nk = num_blocks(L, bq), num_blocks(L, bk)
    mask = random_mask(b, h, nq, nk, keep, device=device, generator=g)
    counts, indices = indices_from_dense_mask(mask)
    kept = kept_fraction(counts, nk)
    dense_flops = 4.0 * b * h * L * L * d
    timer = dict(device=device, warmup=args.warmup, repeats=args.repeats)
    backend = "triton" if device == "cuda" else "reference"

    def row(name, ms, frac, err=None, **extra):
        r = dict(L=L, keep_target=keep, kept=frac, method=name, ms=ms, error=err, **extra)
        if ms:
            r["tflops_dense_equiv"] = dense_flops / (ms * 1e-3) / 1e12
            r["tflops_effective"] = dense_flops * frac / (ms * 1e-3) / 1e12
        results.append(r)
        return r

    # Dense baselines (same for every keep fraction: measured once per L).
    if not any(r["L"] == L and r["method"].startswith("sdpa") for r in results):
        F = torch.nn.functional
        if device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for name, be in (
                ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
            ):

                def run(be=be):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(q, k, v)

                ms, err = _try(lambda run=run: time_fn(run, **timer))
                row(name, ms, 1.0, err)
        else:
            ms, err = _try(lambda: time_fn(lambda: F.scaled_dot_product_attention(q, k, v), **timer))
            row("sdpa_math", ms, 1.0, err)

    def sparse(c, i):
        if args.kernel_config is not None:  # tuned launch config: call the kernel directly
            from accelkit.kernels.block_sparse_attention.triton import block_sparse_attention_triton

            return block_sparse_attention_triton(
                q, k, v, c, i, block_q=bq, block_k=bk, config=args.kernel_config
            )
        return block_sparse_attention(q, k, v, c, i, block_q=bq, block_k=bk, backend=backend)

    # FlexAttention with the equivalent BlockMask (kept blocks passed as "full" blocks: no mask_mod).
    # Only the compiled flex kernel skips blocks (eager flex applies mask_mod alone), so its output is
    # checked against ours: both must compute the same function.
    if device == "cuda" and not args.no_flex:
        flex_check = {}

        def flex_ms():
            from torch.nn.attention.flex_attention import BlockMask, flex_attention

            flex = _flex_compiled(flex_attention)
            zeros = torch.zeros_like(counts)
            bm = BlockMask.from_kv_blocks(
                zeros, indices, full_kv_num_blocks=counts, full_kv_indices=indices, BLOCK_SIZE=(bq, bk)
            )
            ours = sparse(counts, indices).float()
            theirs = flex(q, k, v, block_mask=bm).float()
            flex_check["rel_err_vs_ours"] = ((theirs - ours).norm() / ours.norm()).item()
            return time_fn(lambda: flex(q, k, v, block_mask=bm), **timer)

        ms, err = _try(flex_ms)
        row("flex_attention", ms, kept, err, **flex_check)

    ms, err = _try(lambda: time_fn(lambda: sparse(counts, indices), **timer))
    row(f"{backend}_given_mask", ms, kept, err)

    # Predicted mask: calibrate tau (outside timing) so the kept fraction lands near the target.
    tau = calibrate_tau(q, k, keep, block_q=bq, block_k=bk, iters=args.tau_iters)
    p_counts, p_indices = predict_block_mask(q, k, block_q=bq, block_k=bk, tau=tau)
    p_kept = kept_fraction(p_counts, nk)
    ms, err = _try(
        lambda: time_fn(lambda: predict_block_mask(q, k, block_q=bq, block_k=bk, tau=tau), **timer)
    )
    row("predict_block_mask", ms, p_kept, err, tau=tau)

    def predicted():
        c, i = predict_block_mask(q, k, block_q=bq, block_k=bk, tau=tau)
        return sparse(c, i)

    ms, err = _try(lambda: time_fn(predicted, **timer))
    row(f"{backend}+predict", ms, p_kept, err, tau=tau)


_FLEX = {}


def _flex_compiled(flex_attention):
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def tune(args, device, dtype):
    """Sweep kernel launch configs at one shape; print and return the table."""
    from accelkit.kernels.block_sparse_attention.triton import KernelConfig, block_sparse_attention_triton

    L, keep = args.tune_length, 0.1
    b, h, d = args.batch, args.heads, args.head_dim
    q, k, v = (torch.randn(b, h, L, d, device=device, dtype=dtype) for _ in range(3))
    nq, nk = num_blocks(L, args.block_q), num_blocks(L, args.block_k)
    counts, indices = indices_from_dense_mask(random_mask(b, h, nq, nk, keep, device=device))
    rows = []
    for bm in (64, 128):
        for bn in (64, 128):  # 128 gathers two 64-token mask blocks per tile
            for nw in (4, 8):
                for ns in (2, 3, 4):
                    cfg = KernelConfig(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)

                    def run(cfg=cfg):
                        return block_sparse_attention_triton(
                            q, k, v, counts, indices, block_q=args.block_q, block_k=args.block_k, config=cfg
                        )

                    ms, err = _try(lambda run=run: time_fn(run, device=device, warmup=3, repeats=10))
                    rows.append(dict(config=cfg.__dict__, ms=ms, error=err))
                    print(f"tune L={L} {cfg}: {ms if ms else err}", flush=True)
    ok = sorted((r for r in rows if r["ms"]), key=lambda r: r["ms"])
    if ok:
        print(f"best: {ok[0]}", flush=True)
    return rows


def print_table(results):
    header = f"{'L':>6} {'target':>6} {'kept':>6} {'method':<22} {'ms':>9} {'TF/s dense-eq':>13} {'TF/s eff':>9} note"
    print(header)
    print("-" * len(header))
    for r in results:
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        tde = f"{r.get('tflops_dense_equiv', 0):.1f}" if r["ms"] else "-"
        tef = f"{r.get('tflops_effective', 0):.1f}" if r["ms"] else "-"
        note = r["error"] or (f"tau={r['tau']:.3f}" if "tau" in r else "")
        if "rel_err_vs_ours" in r:
            note += f"rel err vs ours {r['rel_err_vs_ours']:.1e}"
        print(
            f"{r['L']:>6} {r['keep_target']:>6.2f} {r['kept']:>6.3f} {r['method']:<22} {ms:>9} {tde:>13} {tef:>9} {note}"
        )


def speedups(results):
    """Speedup of each sparse method over dense cuDNN (or math on CPU) at the same L."""
    out = []
    for r in results:
        base = next(
            (
                x
                for x in results
                if x["L"] == r["L"] and x["method"] in ("sdpa_cudnn", "sdpa_math") and x["ms"]
            ),
            None,
        )
        if base and r["ms"] and not r["method"].startswith("sdpa"):
            out.append(dict(L=r["L"], keep_target=r["keep_target"], method=r["method"], vs=base["method"],
                            speedup=base["ms"] / r["ms"]))  # fmt: skip
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU through the reference")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tau-iters", type=int, default=12)
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--tune", action="store_true", help="sweep kernel configs first")
    p.add_argument("--tune-length", type=int, default=16384)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    if args.cpu_smoke:
        args.device = "cpu"
        args.lengths, args.keep = [200], [0.5, 0.1]
        args.heads, args.head_dim, args.block_q, args.block_k = 2, 32, 32, 16
        args.warmup, args.repeats, args.tau_iters, args.no_flex = 1, 2, 4, True
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --cpu-smoke)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    meta = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__,
        dtype=str(dtype),
        batch=args.batch, heads=args.heads, head_dim=args.head_dim, block_q=args.block_q, block_k=args.block_k,
        warmup=args.warmup, repeats=args.repeats, command=" ".join(sys.argv),
    )  # fmt: skip
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    print(json.dumps(meta), flush=True)

    args.kernel_config = None
    tune_rows = tune(args, device, dtype) if args.tune and device == "cuda" else None
    if tune_rows and any(r["ms"] for r in tune_rows):
        from accelkit.kernels.block_sparse_attention.triton import KernelConfig

        best = min((r for r in tune_rows if r["ms"]), key=lambda r: r["ms"])
        args.kernel_config = KernelConfig(**best["config"])
        meta["kernel_config"] = best["config"]
    results: list[dict] = []
    for L in args.lengths:
        for keep in args.keep:
            bench_one(L, keep, args=args, device=device, dtype=dtype, results=results)
            print(f"done L={L} keep={keep}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    print_table(results)
    sp = speedups(results)
    for s in sp:
        print(
            f"speedup L={s['L']:>6} keep={s['keep_target']:.2f} {s['method']:<22} vs {s['vs']}: {s['speedup']:.2f}x"
        )
    report = dict(meta=meta, results=results, speedups=sp, tune=tune_rows)
    path = args.json or (os.path.join(os.environ["OUT"], "attention.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")
    if any(r["error"] for r in results if r["method"] not in ("flex_attention", "sdpa_cudnn")):
        bad = [r for r in results if r["error"] and r["method"] not in ("flex_attention", "sdpa_cudnn")]
        print(f"ERRORS: {bad}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
