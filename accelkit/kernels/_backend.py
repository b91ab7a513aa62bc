"""Backend choice shared by accelkit's kernel ops: explicit, logged once, never a silent fallback."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

BACKENDS = ("auto", "triton", "reference")


@functools.cache
def triton_importable() -> bool:
    """True when ``triton`` imports (it says nothing about a GPU being present)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(device: torch.device | str, backend: str, triton_available: Callable[[], bool]) -> str:
    """Return the backend (``"triton"`` or ``"reference"``) that runs for inputs on ``device``.

    Args:
        device: device of the inputs.
        backend: ``"auto"`` (Triton on CUDA when importable, else the reference), ``"triton"`` (raise
            if it cannot run) or ``"reference"``.
        triton_available: whether the op's Triton implementation can be imported.

    Raises:
        ValueError: unknown backend.
        RuntimeError: ``"triton"`` requested but triton is not importable or the device is not CUDA.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device_type = torch.device(device).type
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if device_type != "cuda":
            raise RuntimeError(f"backend='triton' needs CUDA tensors, got device {device_type!r}")
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not importable (pip install triton)")
        return "triton"
    return "triton" if device_type == "cuda" and triton_available() else "reference"


class BackendLog:
    """Logs each (device type, backend) choice of one op once; CUDA on the reference is a warning.

    Args:
        logger: the op module's logger.
        op_name: e.g. ``"accelkit::svdq_linear"``.
        reference_on_cuda: why running the reference on CUDA inputs is worth a warning.
    """

    def __init__(self, logger: logging.Logger, op_name: str, reference_on_cuda: str) -> None:
        self.logger = logger
        self.op_name = op_name
        self.reference_on_cuda = reference_on_cuda
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, device_type: str, chosen: str) -> None:
        key = (device_type, chosen)
        if key in self.seen:
            return
        self.seen.add(key)
        if device_type == "cuda" and chosen == "reference":
            self.logger.warning("%s: triton is not importable; CUDA inputs run the PyTorch reference (%s)",
                                self.op_name, self.reference_on_cuda)
        else:
            self.logger.info("%s: %s inputs run the %s backend", self.op_name, device_type, chosen)
