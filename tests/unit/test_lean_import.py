"""``import accelkit`` (and the core modules) stays lean: no triton, tensorrt, optuna, no CUDA init."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("triton", "tensorrt", "optuna")

# One fresh interpreter, checked at several points as more of accelkit gets imported.
_PROBE = """
import json, sys

def snapshot():
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
    cuda = None
    if "torch" in sys.modules:
        import torch
        cuda = bool(torch.cuda.is_initialized())
    return {{"heavy": heavy, "torch": "torch" in sys.modules, "cuda": cuda}}

report = {{}}
import accelkit
assert accelkit.__version__
report["accelkit"] = snapshot()
import accelkit.passes.base, accelkit.capture, accelkit.runtime.pipeline
report["core"] = snapshot()
accelkit.passes.base.registered_passes()  # imports every built-in pass
import accelkit.loading, accelkit.calibrate, accelkit.runtime.executor
assert accelkit.capture and accelkit.apply and accelkit.load_pipeline
report["passes"] = snapshot()
import types
sys.modules["optuna"] = types.ModuleType("optuna")  # control: the probe must be able to fail
report["control"] = snapshot()
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def report() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_accelkit_is_lean(report):
    assert report["accelkit"]["heavy"] == []
    assert report["accelkit"]["cuda"] in (None, False)


@pytest.mark.parametrize("stage", ["core", "passes"])
def test_core_modules_are_lean(report, stage):
    assert report[stage]["torch"] is True
    assert report[stage]["heavy"] == []
    assert report[stage]["cuda"] is False


def test_probe_detects_heavy_modules(report):
    assert report["control"]["heavy"] == ["optuna"]
