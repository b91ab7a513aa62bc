"""The video-family benchmark behind BENCHMARKS.md runs end to end (tiny settings) and reports sane numbers."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_video_families_cpu_smoke(tmp_path):
    sys.path.insert(0, str(_BENCHMARKS))
    try:
        script = importlib.import_module("video_families_cpu")
    finally:
        sys.path.pop(0)
    out = tmp_path / "video.json"
    payload = script.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == payload["results"].keys() == {"wan"}
    row = payload["results"]["wan"]
    assert row["blocks"] == 4 and row["capture_s"] > 0 and len(row["latent"]) == 5
    assert row["fewer_steps"]["speedup"] == pytest.approx(2.0, rel=0.02)
    assert row["cache"]["speedup"] > 1.2 and "cached" in row["cache"]["schedule"]
    assert 10 < row["cache"]["psnr"] < 100 and 0 < row["cache"]["temporal_psnr"] <= 100
