"""The GPU benchmark suite's CPU modes (tiny shapes, same code paths) run here so the suite cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(_BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(_BENCH))


@pytest.fixture(autouse=True)
def _no_out(monkeypatch):
    # $OUT makes the scripts (and bench_svdq/bench_attention inside bench_kernels) write there.
    monkeypatch.delenv("OUT", raising=False)


def test_bench_kernels_cpu(tmp_path):
    out = tmp_path / "kernels.json"
    report = _load("bench_kernels").main(["--cpu", "--out", str(out)])
    assert json.loads(out.read_text())["meta"]["device"] == "cpu"
    assert report["peaks"]["bf16"]["tflops"] > 0
    assert {r["method"] for r in report["svdq"]} >= {"bf16_mm", "svdq_w4a16", "svdq_w4a8"}
    assert not any(r["error"] for r in report["svdq"] + report["attention"])
    assert all(r["pct_of_peak"] is not None for r in report["svdq"] if r["method"] == "bf16_mm")


@pytest.mark.slow
def test_bench_e2e_cpu(tmp_path):
    out = tmp_path / "e2e.json"
    report = _load("bench_e2e").main(["--cpu", "--out", str(out)])
    rows = {(r["name"], r["resolution"]): r for r in report["rows"]}
    assert json.loads(out.read_text())["rows"]
    errors = {k: r["error"] for k, r in rows.items() if r.get("error")}
    assert not errors, errors
    expected = {"eager_module", "baseline", "baseline_compiled", "steps", "prune", "quant_w4a16", "quant_w4a8",
                "cache", "sparse", "combined_compiled"}
    assert expected <= {name for name, _ in rows}
    assert rows[("sparse", 256)]["kept_share"] < 1.0
    assert rows[("cache", 128)]["cached_ms"] > 0 and "C" in rows[("cache", 128)]["schedule"]
    assert rows[("prune", 128)]["removed_blocks"] >= 1
    assert all(r["finite"] for r in report["rows"] if "finite" in r)


@pytest.mark.slow
def test_bench_fidelity_peers_cpu(tmp_path):
    out = tmp_path / "peers.json"
    report = _load("bench_fidelity_peers").main(["--cpu", "--out", str(out)])
    rows = report["rows"]
    assert json.loads(out.read_text())["rows"].keys() == rows.keys()
    for name, row in rows.items():
        assert "error" not in row, (name, row.get("error"))
        if row.get("skipped"):  # cache-dit missing: the reason is recorded
            assert name.startswith("cachedit")
            continue
        result = row["targets"]["2x"]
        assert 0 <= result["ssim"] <= 1 and result["psnr"] > 0
        assert result["compute_ratio"] > 1.0 or not result["met"]
    # Fewer steps is exact: 4 -> 2 steps halves the denoiser FLOPs.
    assert rows["fewer_steps"]["targets"]["2x"]["compute_ratio"] == pytest.approx(2.0)
