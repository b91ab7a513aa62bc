"""``accelkit optimize`` (and ``search --worker``, ``report``): search the passes per budget, write plans.

The search itself is :func:`accelkit.search.optimize.optimize`; this workflow adds what the command
does around it: refuse a TensorRT export before an hour of trials on a machine without TensorRT, and
export every met plan afterwards. Distributed workers (:func:`run_worker`) and reports from a shared
study or from ``report.json`` are here too, so the CLI calls nothing but workflows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelkit.pipeline_io import parse_call_arguments
from accelkit.search.settings import OptimizeResult, OptimizeSettings, parse_budget, parse_passes
from accelkit.search.worker import WorkerResult, run_worker

__all__ = ["OptimizeResult", "OptimizeRun", "OptimizeSettings", "WorkerResult", "optimize", "parse_budget",
           "parse_call_arguments", "parse_passes", "render_report", "report_study", "run_worker"]


@dataclass
class OptimizeRun:
    """The search's result, and the export folder of each met plan (by budget) when exports were asked for."""

    result: OptimizeResult
    exports: dict[str, Path] = field(default_factory=dict)


def optimize(settings: OptimizeSettings, *, export: str | None = None, console: Any = None,
             progress: bool = True) -> OptimizeRun:
    """Run the search of ``settings`` and, with ``export`` (``"onnx"`` / ``"tensorrt"``), export each met plan."""
    from accelkit.search.optimize import optimize as search

    if export == "tensorrt":
        from accelkit.export.tensorrt import require_tensorrt

        # Before the search: a machine without TensorRT should not learn it after an hour of trials.
        require_tensorrt()
    result = search(settings, console=console, progress=progress)
    run = OptimizeRun(result)
    if export:
        from accelkit.loading import load_pipeline
        from accelkit.runtime.plan import export_plan

        pipe = load_pipeline(settings.model, device=settings.device).pipe
        for outcome in result.outcomes:
            if outcome.plan_dir is not None:
                run.exports[outcome.budget] = export_plan(result.out, pipe, outcome.budget, target=export)
                if console is not None:
                    console.print(f"exported {outcome.budget}: {run.exports[outcome.budget]}")
    return run


def render_report(out: str | Path) -> Path:
    """Re-render ``OUT/report/`` from ``OUT/report/report.json``; returns the page written."""
    from accelkit.report.render import render_from_json

    return render_from_json(out)


def report_study(out: str, storage: str, study: str | None = None, *, model: str | None = None,
                 budgets: Sequence[str] | None = None, min_psnr: float | None = None, device: str | None = None,
                 console: Any = None) -> OptimizeResult:
    """Plans and report from a shared study (see :func:`accelkit.search.worker.report_from_study`)."""
    from accelkit.search.worker import report_from_study

    for budget in budgets or []:
        parse_budget(budget)
    return report_from_study(out, storage, study, model=model, budgets=budgets, min_psnr=min_psnr, device=device,
                             console=console)
