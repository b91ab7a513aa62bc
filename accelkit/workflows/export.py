"""``accelkit export``: write a plan's graph variants as ONNX models (or TensorRT engines) into its folder."""

from __future__ import annotations

from pathlib import Path


def export(out_dir: str | Path, budget: str | None = None, *, target: str = "onnx",
           model: str | None = None) -> Path:
    """Export the plan ``OUT/plans/<budget>`` for ``target``; returns the folder the files went to.

    Args:
        out_dir: the directory ``accelkit optimize`` wrote.
        budget: which plan (None: the only one).
        target: ``"onnx"`` or ``"tensorrt"`` (checked first: a machine without TensorRT learns it at once).
        model: model to load (default: the one the plan names).
    """
    from accelkit.loading import load_pipeline
    from accelkit.runtime.plan import export_plan, read_plan

    if target == "tensorrt":
        from accelkit.export.tensorrt import require_tensorrt

        # Before reading the plan and loading the model: say at once that TensorRT is missing.
        require_tensorrt()
    plan = read_plan(out_dir, budget)
    loaded = load_pipeline(model or plan.data["model"]["id"])
    return export_plan(out_dir, loaded.pipe, plan.budget, target=target)
