"""Benchmark the SVDQuant 4-bit linear against BF16 ``torch.mm`` and FP8 ``torch._scaled_mm``.

    python benchmarks/bench_svdq.py --device cuda [--m 4096 4608 16384] [--repeats 50]
    python benchmarks/bench_svdq.py --cpu-smoke          # tiny shapes through the reference, < 10 s

Rows per (M, K, N) at FLUX shapes (K, N in {3072, 12288}): ``bf16_mm`` (x @ Wᵀ), ``fp8_scaled_mm``
(per-tensor FP8 e4m3, the FP8 baseline), ``svdq_w4a16`` and ``svdq_w4a8`` (the Triton backend: the
activation step + the INT4 GEMM with the low-rank epilogue, i.e. the whole op), rank 32, group 64.
Times: CUDA events, warm-up, median of ``--repeats``; TFLOP/s counts 2·M·N·K (the main GEMM only).
JSON goes to ``$OUT/svdq.json`` when ``OUT`` is set (or to ``--json``).
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

from accelkit.kernels.svdq_linear import quantize_weight_int4, svdq_linear  # noqa: E402


def make_layer(n: int, k: int, rank: int, group: int, device: str, dtype: torch.dtype):
    w = torch.randn(n, k, device=device) / k**0.5
    packed, scales = quantize_weight_int4(w.cpu(), group)
    down = (torch.randn(rank, k) / k**0.5).to(device, dtype)
    up = (torch.randn(n, rank) / rank**0.5).to(device, dtype)
    smooth = (torch.rand(k) + 0.5).to(device)
    return w.to(dtype), packed.to(device), scales.to(device), down, up, smooth


def run_case(m: int, k: int, n: int, *, device: str, backend: str, rank: int, group: int,
             warmup: int, repeats: int, dtype: torch.dtype) -> list[dict]:
    x = torch.randn(m, k, device=device).to(dtype)
    w, packed, scales, down, up, smooth = make_layer(n, k, rank, group, device, dtype)
    methods = {"bf16_mm": lambda: x @ w.t()}
    if device == "cuda" and hasattr(torch, "_scaled_mm"):
        x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        methods["fp8_scaled_mm"] = lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=dtype)
    for mode in ("w4a16", "w4a8"):
        methods[f"svdq_{mode}"] = (lambda mode=mode: svdq_linear(
            x, packed, scales, down, up, smooth, None, group_size=group, act_mode=mode, backend=backend))
    rows = []
    for name, fn in methods.items():
        row = {"method": name, "M": m, "K": k, "N": n, "rank": rank, "group": group, "error": None}
        try:
            ms = time_fn(fn, device=device, warmup=warmup, repeats=repeats)
            row.update(ms=ms, tflops=2.0 * m * n * k / (ms * 1e-3) / 1e12)
        except Exception as error:  # noqa: BLE001 - one failing method must not hide the others
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, reference backend, CPU")
    p.add_argument("--m", type=int, nargs="+", default=[4096, 4608, 16384])
    p.add_argument("--kn", type=int, nargs="+", default=[3072, 12288])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device, backend, dtype = "cpu", "reference", torch.float32
        shapes = [(64, 128, 256), (96, 256, 128)]
        args.repeats, args.warmup, args.rank, args.group = 3, 1, 8, 32
    else:
        device, backend, dtype = args.device, ("triton" if args.device == "cuda" else "reference"), torch.bfloat16
        shapes = [(m, k, n) for m in args.m for k in args.kn for n in args.kn if (k, n) != (12288, 12288)]
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    print(json.dumps(meta), flush=True)
    results = []
    for m, k, n in shapes:
        results += run_case(m, k, n, device=device, backend=backend, rank=args.rank, group=args.group,
                            warmup=args.warmup, repeats=args.repeats, dtype=dtype)
    report = {"meta": meta, "results": results}
    path = args.json or (os.path.join(os.environ["OUT"], "svdq.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
