"""The zoo fidelity scripts behind BENCHMARKS.md run end to end (tiny settings) and report sane numbers."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name: str):
    sys.path.insert(0, str(_BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_fidelity_passes_zoo_smoke(tmp_path):
    out = tmp_path / "passes.json"
    payload = _script("fidelity_passes_zoo").main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == payload["results"].keys()
    quant, sparse = payload["results"]["quant.w4a16"], payload["results"]["sparse.l1_0.06"]
    # 4-bit weights: the plan is much smaller than the float32 model, and the images stay close.
    assert quant["weights_bytes"] < 0.5 * payload["baseline_weights_bytes"]
    assert quant["quantized_layers"] > 0 and 25 < quant["psnr"] < math.inf
    assert 0 < sparse["mean_kept_fraction"] <= 1 and sparse["sparse_sites"] > 0 and sparse["psnr"] > 15


def test_fidelity_zoo_smoke():
    payload = _script("fidelity_zoo").main(["--smoke"])
    row = payload["results"]["2x"]
    assert row["fewer_steps"]["steps"] == 3 and 1.9 < row["fewer_steps"]["speedup"] < 2.1
    measured = [v for v in row.values() if "error" not in v]
    assert len(measured) >= 6 and all(v["psnr"] > 10 and v["speedup"] > 1.5 for v in measured)
