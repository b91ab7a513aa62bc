"""Shared helpers of the reliability suite: tiny optimize runs, one-line error checks, directory snapshots."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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


def spawn(*args: str, slow_trial: float = 0, slow_finish: float = 0) -> subprocess.Popen:
    """``accelkit ARGS`` in the background, through the runner that can slow trials or the finish down."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("AK_SLOW_TRIAL", None)
    env.pop("AK_SLOW_FINISH", None)
    if slow_trial:
        env["AK_SLOW_TRIAL"] = str(slow_trial)
    if slow_finish:
        env["AK_SLOW_FINISH"] = str(slow_finish)
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "reliability" / "_runner.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def wait_for(process: subprocess.Popen, word: str, timeout: float = 180) -> list[str]:
    """Read the process's stderr until a line holds ``word``; returns the lines read."""
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            raise AssertionError(f"the process ended (rc {process.wait()}) before printing {word}: {lines}")
        lines.append(line)
        if word in line:
            return lines
    raise AssertionError(f"no {word} within {timeout} s: {lines}")


def optimize_args(out: Path, *extra: str, budget: str = "2x", trials: int = 2) -> list[str]:
    return ["optimize", "zoo:shapes", "--budget", budget, "--trials", str(trials), *TINY, "--quiet",
            "--out", str(out), *extra]


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)
