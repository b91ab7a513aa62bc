"""accelkit: capture a diffusion pipeline's denoiser, optimize it under a budget, export engines.

Importing this package stays light: it imports neither triton, tensorrt nor optuna and never touches
CUDA. Heavy entry points are imported lazily on first attribute access.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "apply": ("accelkit.runtime.pipeline", "apply"),
    "AcceleratedPipeline": ("accelkit.runtime.pipeline", "AcceleratedPipeline"),
    "load": ("accelkit.runtime.plan", "load"),
    "optimize": ("accelkit.search.optimize", "optimize"),
    "load_pipeline": ("accelkit.loading", "load_pipeline"),
    "capture": ("accelkit.capture", "capture"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module 'accelkit' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
