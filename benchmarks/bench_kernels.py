"""Kernel benchmarks with the device's measured peaks: svdq_linear and block-sparse attention.

    python benchmarks/bench_kernels.py                 # GPU: peaks, bench_svdq.py rows, bench_attention.py rows
    python benchmarks/bench_kernels.py --cpu           # CPU smoke: same code paths, tiny shapes, seconds

First the two ceilings, measured in the same run: a large square BF16 ``torch.mm`` and FP8 (e4m3,
per-tensor scales) ``torch._scaled_mm`` (``--peak-size``, 8192 by default; CUDA events, warm-up,
median). Then ``bench_svdq.py`` (``svdq_linear`` W4A16/W4A8 vs ``torch.mm`` BF16 and ``_scaled_mm``
FP8 at FLUX shapes) and ``bench_attention.py`` (block-sparse attention vs SDPA flash/cuDNN and
FlexAttention at 4K/16K/64K tokens and 50/25/10% kept blocks, mask prediction included) run as they
do on their own, and every row gets its TFLOP/s as a share of the relevant measured peak: FP8 for
``fp8_scaled_mm`` and ``svdq_w4a8`` (whose main GEMM runs in FP8), BF16 for the others; attention
rows use their effective TFLOP/s (work of the kept blocks only) against the BF16 peak.

Prints one table; writes ``$OUT/kernels.json`` (or ``--out``), and the two sub-benchmarks write their
own ``svdq.json`` / ``attention.json`` beside it when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench_attention  # noqa: E402
import bench_svdq  # noqa: E402
from _timing import time_fn  # noqa: E402


def measure_peaks(device: str, n: int, *, warmup: int, repeats: int) -> dict[str, dict]:
    """BF16 (fp32 on CPU) ``torch.mm`` and FP8 ``torch._scaled_mm`` TFLOP/s at ``n``×``n``×``n``."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    # Random data, never zeros: zeros run faster than real data on some GPUs.
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    flops = 2.0 * n**3
    peaks: dict[str, dict] = {}
    name = "bf16_mm" if dtype == torch.bfloat16 else "fp32_mm"
    try:
        ms = time_fn(lambda: torch.mm(a, b), device=device, warmup=warmup, repeats=repeats)
        peaks["bf16"] = dict(method=name, n=n, ms=ms, tflops=flops / (ms * 1e-3) / 1e12, error=None)
    except Exception as error:  # noqa: BLE001
        peaks["bf16"] = dict(method=name, n=n, ms=None, tflops=None, error=f"{type(error).__name__}: {error}")
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.t().contiguous().to(torch.float8_e4m3fn).t()  # _scaled_mm wants the second operand column-major
        one = torch.ones((), device=device)
        out_dtype = torch.bfloat16

        def fp8():
            return torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=out_dtype)

        ms = time_fn(fp8, device=device, warmup=warmup, repeats=repeats)
        peaks["fp8"] = dict(method="fp8_scaled_mm", n=n, ms=ms, tflops=flops / (ms * 1e-3) / 1e12, error=None)
    except Exception as error:  # noqa: BLE001 - no FP8 GEMM on this device: the rows say so
        first = str(error).splitlines()[0][:200] if str(error) else ""
        peaks["fp8"] = dict(method="fp8_scaled_mm", n=n, ms=None, tflops=None, error=f"{type(error).__name__}: {first}")
    for peak in peaks.values():
        print(json.dumps(peak), flush=True)
    return peaks


def annotate(rows: list[dict], peaks: dict[str, dict], kind: str) -> None:
    """Add ``peak`` (which ceiling) and ``pct_of_peak`` to each row with a rate."""
    for row in rows:
        if kind == "svdq":
            ref = "fp8" if row["method"] in ("fp8_scaled_mm", "svdq_w4a8") else "bf16"
            rate = row.get("tflops")
        else:
            ref, rate = "bf16", row.get("tflops_effective")
        peak = peaks.get(ref, {}).get("tflops")
        row["peak"] = ref
        row["pct_of_peak"] = 100.0 * rate / peak if rate and peak else None


def format_table(report: dict) -> str:
    lines = [f"device: {report['meta']['device']}  peaks: " + ", ".join(
        f"{v['method']} {v['tflops']:.3g} TFLOP/s" if v.get("tflops") else f"{v['method']} unavailable ({v['error']})"
        for k, v in report["peaks"].items())]
    header = f"{'kernel':<24} {'shape':<26} {'kept':>5} {'ms':>9} {'TFLOP/s':>8} {'% peak':>7} note"
    lines += [header, "-" * len(header)]
    for r in report["svdq"]:
        shape = f"M{r['M']} K{r['K']} N{r['N']}"
        lines.append(_line(r["method"], shape, None, r, r.get("tflops")))
    for r in report["attention"]:
        shape = f"L{r['L']}"
        lines.append(_line(r["method"], shape, r.get("kept"), r, r.get("tflops_effective")))
    return "\n".join(lines)


def _line(method, shape, kept, r, rate) -> str:
    ms = f"{r['ms']:.3f}" if r.get("ms") else "-"
    tf = f"{rate:.3g}" if rate else "-"
    pct = f"{r['pct_of_peak']:.0f}%" if r.get("pct_of_peak") else "-"
    kept_s = f"{kept:.2f}" if kept is not None else ""
    note = (r.get("error") or "") + (f" vs {r['peak']}" if r.get("pct_of_peak") else "")
    return f"{method:<24} {shape:<26} {kept_s:>5} {ms:>9} {tf:>8} {pct:>7} {note}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU smoke run: tiny shapes, reference kernels")
    p.add_argument("--peak-size", type=int, default=8192)
    p.add_argument("--m", type=int, nargs="+", default=None, help="svdq token counts (bench_svdq.py --m)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="attention lengths (bench_attention.py)")
    p.add_argument("--no-tune", action="store_true", help="skip the attention kernel's launch-config sweep")
    p.add_argument("--no-svdq", action="store_true")
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    started = time.time()
    if args.cpu:
        device, peak_size, warmup, repeats = "cpu", 256, 1, 3
        svdq_argv, attention_argv = ["--cpu-smoke"], ["--cpu-smoke"]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu for the CPU smoke mode")
        device, peak_size, warmup, repeats = "cuda", args.peak_size, 5, 20
        svdq_argv = ["--device", "cuda"] + (["--m", *map(str, args.m)] if args.m else [])
        attention_argv = ["--device", "cuda"] + ([] if args.no_tune else ["--tune"])
        attention_argv += ["--lengths", *map(str, args.lengths)] if args.lengths else []
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                command=" ".join(sys.argv))
    print(json.dumps(meta), flush=True)
    peaks = measure_peaks(device, peak_size, warmup=warmup, repeats=repeats)
    svdq = [] if args.no_svdq else bench_svdq.main(svdq_argv)["results"]
    annotate(svdq, peaks, "svdq")
    if device == "cuda":
        torch.cuda.empty_cache()
    attention_report = {"results": []} if args.no_attention else bench_attention.main(attention_argv)
    attention = attention_report["results"]
    annotate(attention, peaks, "attention")
    meta["seconds"] = time.time() - started
    report = dict(meta=meta, peaks=peaks, svdq=svdq, attention=attention,
                  attention_speedups=attention_report.get("speedups"),
                  attention_kernel_config=attention_report.get("meta", {}).get("kernel_config"))
    print(format_table(report))
    path = args.out or (os.path.join(os.environ["OUT"], "kernels.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
