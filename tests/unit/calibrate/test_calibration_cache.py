"""The on-disk calibration cache (accelkit/calibrate/__init__.py): damaged or pickled files are recomputed."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from accelkit.calibrate import Calibrator


def _calibrator(cache_dir):
    return Calibrator(pipe=None, prompts=["a"], height=8, width=8, guidance_scale=1.0, cache_dir=cache_dir)


def _counting(value):
    calls = {"n": 0}

    def compute():
        calls["n"] += 1
        return value

    return compute, calls


def test_cached_array_round_trips_and_is_not_recomputed(tmp_path):
    compute, calls = _counting(np.arange(6.0))
    first = _calibrator(tmp_path).cached_array("k", compute)
    again = _calibrator(tmp_path).cached_array("k", compute)  # a new process: read from disk
    assert calls["n"] == 1
    np.testing.assert_array_equal(first, again)
    assert (tmp_path / "k.npy.sha256").is_file()


@pytest.mark.parametrize("damage", ["truncate", "flip", "pickle", "garbage", "no-digest"])
def test_damaged_cache_file_is_recomputed_never_unpickled(tmp_path, monkeypatch, damage):
    compute, calls = _counting(np.arange(6.0))
    _calibrator(tmp_path).cached_array("k", compute)
    path = tmp_path / "k.npy"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # a valid array with other values
    elif damage == "pickle":
        np.save(path, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
        (tmp_path / "k.npy.sha256").write_text(__import__("hashlib").sha256(path.read_bytes()).hexdigest())
    elif damage == "garbage":
        path.write_bytes(b"not an npy file")
    else:
        (tmp_path / "k.npy.sha256").unlink()
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("the cache was unpickled"))
    value = _calibrator(tmp_path).cached_array("k", compute)
    assert calls["n"] == 2
    np.testing.assert_array_equal(value, np.arange(6.0))
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), np.arange(6.0))  # rewritten
