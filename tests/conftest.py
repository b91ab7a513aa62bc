"""Test-wide setup: repo root on sys.path, gpu/trt auto-skip, and shared tiny pipelines."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

GPU_SKIP_REASON = "needs a CUDA GPU and triton"
TRT_SKIP_REASON = (
    "TensorRT is not installed (standard TensorRT is not installable from PyPI alone; "
    "TensorRT-RTX refuses compute capability 9.0)"
)


@functools.cache
def _have_gpu() -> bool:
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def _have_trt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu") is not None and not _have_gpu():
            item.add_marker(pytest.mark.skip(reason=GPU_SKIP_REASON))
        if item.get_closest_marker("trt") is not None and not _have_trt():
            item.add_marker(pytest.mark.skip(reason=TRT_SKIP_REASON))


# Session-scoped: build once (~0.1 s). Treat as read-only; a test that patches/compiles a component
# should build its own with tests.fixtures.tiny_models.tiny_pipeline(kind).
@pytest.fixture(scope="session")
def pixart_pipeline():
    from tests.fixtures.tiny_models import tiny_pipeline

    return tiny_pipeline("pixart")


@pytest.fixture(scope="session")
def flux_pipeline():
    from tests.fixtures.tiny_models import tiny_pipeline

    return tiny_pipeline("flux")
