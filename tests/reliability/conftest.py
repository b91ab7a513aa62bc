"""Fixtures of the reliability suite: one tiny optimize run shared by the module that asks for it."""

from __future__ import annotations

import shutil

import pytest

from accelkit.cli.main import main
from tests.reliability.helpers import optimize_args


@pytest.fixture(scope="session")
def base_out(tmp_path_factory):
    """A finished OUT (zoo:shapes, 2x, 2 trials); read-only for tests: copy it with ``out_copy``."""
    out = tmp_path_factory.mktemp("reliability") / "out"
    assert main(optimize_args(out)) == 0
    return out


@pytest.fixture
def out_copy(base_out, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(base_out, copy)
    return copy
