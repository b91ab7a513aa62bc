"""accelkit.report: fidelity metrics and the per-budget report (``OUT_DIR/report/``).

Entry points are imported lazily so that ``import accelkit.report`` stays light (no torch, no
matplotlib) until one is used.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "write_report": "accelkit.report.render",
    "render_from_json": "accelkit.report.render",
    "fidelity": "accelkit.report.metrics",
    "psnr": "accelkit.report.metrics",
    "ssim": "accelkit.report.metrics",
    "lpips": "accelkit.report.metrics",
    "latent_rel_l2": "accelkit.report.metrics",
    "to_unit_float": "accelkit.report.metrics",
    "ReportData": "accelkit.report.schema",
    "BudgetReport": "accelkit.report.schema",
    "FidelityMetrics": "accelkit.report.schema",
    "ReferencePoint": "accelkit.report.schema",
    "TrialPoint": "accelkit.report.schema",
    "ModelInfo": "accelkit.report.schema",
    "Settings": "accelkit.report.schema",
    "BaselineCost": "accelkit.report.schema",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'accelkit.report' has no attribute {name!r}")


__all__ = list(_LAZY)
