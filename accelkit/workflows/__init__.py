"""Workflows: what each ``accelkit`` command does, as functions the CLI (and scripts) call.

The top layer: a workflow orchestrates the libraries below it (loading, capture, passes, search,
export, runtime, report) and returns a typed result; ``accelkit/cli/`` only parses arguments,
validates them, calls one workflow and prints its result. One module per user workflow:

- :mod:`~accelkit.workflows.optimize`: search the passes' settings per budget, write plans and the
  report, optionally export the met plans; distributed workers and reports from a shared study.
- :mod:`~accelkit.workflows.recover`: recover a pruned plan by distillation (``accelkit distill``).
- :mod:`~accelkit.workflows.export`: export a plan's graph variants (ONNX, TensorRT).
- :mod:`~accelkit.workflows.inspect`: the denoiser's blocks, FLOPs and attention sites.
- :mod:`~accelkit.workflows.run`: generate with a plan and save the images or videos.

Importing this package imports nothing else: every module loads its libraries when called.
"""

from __future__ import annotations

import accelkit

__version__ = accelkit.__version__

__all__ = ["__version__"]
