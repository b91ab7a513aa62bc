"""Shared helpers of the reliability suite: tiny optimize runs, one-line error checks, directory snapshots."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: zoo:shapes at the smallest settings: about 20 s per optimize run on one CPU core.
TINY = ["--steps", "4", "--num-prompts", "1", "--num-eval-prompts", "1", "--height", "8", "--width", "8"]


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("accelkit: error:"), stderr
    assert "Traceback" not in stderr
    return lines[0]


def snapshot(directory: Path) -> dict[str, str]:
    """Every file and folder under ``directory`` with the sha256 of its content."""
    if not directory.exists():
        return {}
    state = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        state[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


def cli(*args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """``accelkit ARGS`` in a fresh process that imports this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "accelkit.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=popen.pop("cwd", ROOT), **popen)


def spawn(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "accelkit.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, **popen)


def optimize_args(out: Path, *extra: str, budget: str = "2x", trials: int = 2) -> list[str]:
    return ["optimize", "zoo:shapes", "--budget", budget, "--trials", str(trials), *TINY, "--quiet",
            "--out", str(out), *extra]
