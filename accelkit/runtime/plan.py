"""Plans on disk: ``OUT/plans/<budget>/plan.json`` (+ ``weights.safetensors``), and ``accelkit.load``.

A plan stores the resolved pass configs (schedules spelled out), so rebuilding the program needs no
calibration: the denoiser is captured again and the passes replayed. Loading refuses a plan made
for other weights, another scheduler or another library version's schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from accelkit._io import atomic_write_bytes, atomic_write_json
from accelkit.artifacts.plan_file import (
    PLAN_SCHEMA,
    PlanFile,
    check_plan_shape,
    manifest_files,
    parse_plan,
    seal_plan,
    verify_plan_files,
)
from accelkit.errors import InputError, PlanMismatchError

__all__ = ["PLAN_SCHEMA", "Plan", "build_program", "export_plan", "load", "read_plan", "write_plan",
           "write_plan_json"]


@dataclass
class Plan:
    """A plan as read from ``plan.json``.

    Args:
        path: the plan directory.
        data: the parsed JSON.
    """

    path: Path
    data: dict[str, Any]

    @cached_property
    def file(self) -> PlanFile:
        """The checked, typed view of ``data`` (raises on a plan of the wrong shape)."""
        return parse_plan(self.data, self.path / "plan.json")

    @property
    def budget(self) -> str:
        return str(self.data["budget"])

    @property
    def passes(self) -> dict[str, dict[str, Any]]:
        return dict(self.data.get("passes", {}))

    @property
    def call_defaults(self) -> dict[str, Any]:
        generation = self.data["generation"]
        return {
            "height": generation["height"],
            "width": generation["width"],
            "guidance_scale": generation["guidance_scale"],
            **({"num_frames": generation["num_frames"]} if "num_frames" in generation else {}),  # video plans
            **generation.get("call_arguments", {}),  # --call-arg values and what the model family needs
        }


def scheduler_identity(pipe: Any) -> dict[str, Any]:
    scheduler = pipe.scheduler
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, "config": json.loads(json.dumps(config, default=repr))}


def versions() -> dict[str, str]:
    import diffusers

    import accelkit

    return {"accelkit": accelkit.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def write_plan(
    directory: Path,
    *,
    budget: str,
    program: Any,
    model: dict[str, Any],
    pipe: Any,
    generation: dict[str, Any],
    baseline_steps: int,
    cost: dict[str, Any],
    fidelity: dict[str, Any],
) -> Path:
    """Write ``plan.json`` (and ``weights.safetensors`` when a pass made new tensors) atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    weights_file = None
    if program.new_weights:
        from safetensors.torch import save

        weights_file = "weights.safetensors"
        tensors = {k: v.detach().contiguous().cpu() for k, v in program.new_weights.items()}
        atomic_write_bytes(directory / weights_file, save(tensors))
    data = {
        "schema": PLAN_SCHEMA,
        "budget": budget,
        "versions": versions(),
        "model": model,
        "scheduler": scheduler_identity(pipe),
        "generation": generation,
        "baseline_steps": baseline_steps,
        "num_steps": program.num_steps,
        "passes": {name: program.resolved[name] for name in program.applied},
        "schedule": list(program.schedule),
        "sigmas": list(program.sigmas) if program.sigmas is not None else None,
        "cost": cost,
        "fidelity": fidelity,
        "weights_file": weights_file,
    }
    return write_plan_json(directory, data)


def write_plan_json(directory: Path, data: dict[str, Any]) -> Path:
    """Write ``plan.json`` atomically with the sha256 of every file it references (write those first)."""
    atomic_write_json(directory / "plan.json", seal_plan(directory, data))
    return directory / "plan.json"


def read_plan(out_dir: str | Path, budget: str | None = None, *, strict: bool = True) -> Plan:
    """Find and parse the plan for ``budget`` under ``out_dir`` (the only plan when None).

    Args:
        strict: check the whole plan (:func:`~accelkit.artifacts.plan_file.parse_plan`); False checks
            only its schema and budget (enough to list its exports).
    """
    root = Path(out_dir)
    plans_dir = root / "plans"
    if not plans_dir.is_dir():
        raise InputError(f"'{root}' holds no plans/ folder: run `accelkit optimize ... --out {root}` first")
    available = sorted(p.name for p in plans_dir.iterdir() if (p / "plan.json").is_file())
    if not available:
        raise InputError(f"'{plans_dir}' holds no plan.json: no budget was met or optimize did not finish")
    if budget is None:
        if len(available) > 1:
            raise InputError(f"'{root}' holds plans for budgets {available}: choose one with --budget")
        budget = available[0]
    budget = budget if budget.endswith("x") else f"{budget}x"
    if budget not in available:
        raise InputError(f"no plan for budget {budget} in '{root}': available budgets are {available}")
    path = plans_dir / budget / "plan.json"
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"'{path}' is not valid JSON ({error.msg}); re-run optimize to rewrite it") from None
    except UnicodeDecodeError:
        raise InputError(f"'{path}' is not UTF-8 JSON; re-run optimize to rewrite it") from None
    check_plan_shape(data, path)
    if data["budget"] != budget:
        raise PlanMismatchError(f"'{path}' is the plan for budget {data['budget']}, not {budget}: it was moved or "
                                "edited; re-run optimize to rewrite it")
    plan = Plan(path.parent, data)
    if strict:
        plan.file  # noqa: B018 - check the whole plan now, naming plan.json
    return plan


def build_program(plan: Plan, pipe: Any, *, check_weights: bool = True) -> Any:
    """Capture ``pipe``'s denoiser for the plan's settings and replay its passes (no calibration)."""
    from accelkit.loading import weights_fingerprint
    from accelkit.passes.base import Program, config_from_dict, run_passes
    from accelkit.runtime.pipeline import find_denoiser
    from accelkit.runtime.probe import capture_at_generation

    _, denoiser = find_denoiser(pipe)
    # Every referenced file is checked before any is read: a changed weights file never runs.
    verify_plan_files(plan.file, plan.path)
    if check_weights:
        expected = plan.file.model.weights_hash
        actual = weights_fingerprint(denoiser)
        if expected != actual:
            raise PlanMismatchError(
                f"the plan in '{plan.path}' was made for other weights (hash {expected[:12]}, these are "
                f"{actual[:12]}): optimize this model again"
            )
    scheduler = scheduler_identity(pipe)
    if scheduler["class"] != plan.data["scheduler"]["class"]:
        raise PlanMismatchError(
            f"the plan was made with {plan.data['scheduler']['class']}, the pipeline uses {scheduler['class']}: "
            "set the same scheduler or optimize again"
        )
    generation = plan.data["generation"]
    graph = capture_at_generation(pipe, generation)
    program = Program.from_graph(graph, int(plan.data["baseline_steps"]))
    if plan.data.get("weights_file"):
        from safetensors.torch import load_file

        # Tensors a pass derived from calibration (quantized weights, smoothing) replay as saved.
        program = program.replace(new_weights=load_file(str(plan.path / plan.data["weights_file"])))
    configs = [config_from_dict(name, config) for name, config in plan.passes.items()]
    program, _ = run_passes(program, configs, calib=None)
    return program


def load(
    out_dir: str | Path, pipe: Any, budget: str | None = None, *, compile: bool = False, strict_steps: bool = False
) -> Any:
    """Rebuild the accelerated pipeline from ``out_dir``'s plan for ``budget``.

    Args:
        out_dir: the directory ``accelkit optimize --out`` wrote.
        pipe: the same pipeline the plan was made for (weights and scheduler are checked).
        budget: e.g. ``"2x"``; may be omitted when there is one plan.
        compile: run graph variants through ``torch.compile``.
        strict_steps: refuse another ``num_inference_steps`` than the plan's (by default the schedule
            is re-derived for it).

    Raises:
        InputError: no such plan.
        PlanMismatchError: other weights, scheduler or plan schema.
    """
    from accelkit.runtime.pipeline import AcceleratedPipeline

    plan = read_plan(out_dir, budget)
    program = build_program(plan, pipe)
    return AcceleratedPipeline(pipe, program, compile=compile, call_defaults=plan.call_defaults,
                               strict_steps=strict_steps)


def export_plan(out_dir: str | Path, pipe: Any, budget: str | None = None, *, target: str = "onnx") -> Path:
    """Export a plan's graph variants next to its ``plan.json`` and list the files in it.

    Args:
        out_dir: the directory ``accelkit optimize --out`` wrote.
        pipe: the pipeline the plan was made for.
        budget: which plan (may be omitted when there is one).
        target: ``"onnx"`` (checked with onnxruntime) or ``"tensorrt"`` (the ONNX export, then one
            engine per variant; needs TensorRT and a GPU).

    Returns:
        The export directory (``plans/<budget>/onnx`` or ``plans/<budget>/engines``).
    """
    if target not in ("onnx", "tensorrt"):
        raise InputError(f"unknown export target '{target}': choose onnx or tensorrt")
    if target == "tensorrt":
        from accelkit.export.tensorrt import require_tensorrt

        # Before the (slow) capture: a machine without TensorRT learns it at once.
        require_tensorrt()
    from accelkit.export.onnx import export_program_onnx

    plan = read_plan(out_dir, budget)
    program = build_program(plan, pipe)
    directory = plan.path / "onnx"
    manifest = export_program_onnx(program, directory)
    data = dict(plan.data)
    data["engines"] = {"target": "onnx", "directory": "onnx", "manifest": manifest}
    if target == "tensorrt":
        from accelkit.export.tensorrt import build_engines, plan_weight_names

        engines_dir = plan.path / "engines"
        engine_manifest = build_engines(
            directory,
            engines_dir,
            plan_data=plan.data,
            weight_names=plan_weight_names(program),
            # One cache per output folder: every budget's build reuses the tactic timings.
            timing_cache=Path(out_dir) / "tensorrt-timing.cache",
        )
        data["engines"] = {
            "target": "tensorrt",
            "directory": "engines",
            "manifest": engine_section(engine_manifest),
            "onnx": {"directory": "onnx", "manifest": manifest},
        }
        directory = engines_dir
    write_plan_json(plan.path, data)
    return directory


def engine_section(manifest: dict[str, Any]) -> dict[str, Any]:
    """The engine manifest as ``plan.json`` lists it: every file, variant, profile, precision and hash.

    The refit weight maps stay in the engine folder's own manifest (they can be long).
    """
    models = []
    for model in manifest["models"]:
        models.append(
            {
                "variant": model["variant"],
                "file": model["file"],
                "profile": {i["name"]: i["profile"] for i in model["inputs"]},
                "precision": model["precision"]["label"],
                "refit": model["refit"]["mode"],
            }
        )
    return {
        "tensorrt": manifest["tensorrt"],
        "device": manifest["device"],
        "compute_capability": manifest["compute_capability"],
        "strongly_typed": manifest["strongly_typed"],
        "models": models,
        "files": manifest["files"],
    }


def verify_exports(out_dir: str | Path, budget: str | None = None) -> list[str]:
    """Check every exported file ``plan.json`` lists against its sha256 (for CI after publishing).

    Returns:
        The checked files, relative to the plan folder.

    Raises:
        InputError: the plan lists no export, or a file is missing or differs (the message names it).
    """
    from accelkit.artifacts.plan_file import export_sections
    from accelkit.export.onnx import OnnxExportError, verify_files

    plan = read_plan(out_dir, budget, strict=False)
    section = plan.data.get("engines")
    if not section:
        raise InputError(f"plan {plan.budget} lists no export: run `accelkit export {out_dir} --budget {plan.budget}`")
    listed = [(folder, manifest) for _, folder, manifest in export_sections(plan.data)]
    for what, folder, manifest in export_sections(plan.data):
        manifest_files(plan.path, folder, manifest, what)  # every file inside the export folder, and hashed
    checked = []
    for folder, manifest in listed:
        try:
            verify_files(plan.path / folder, manifest)
        except OnnxExportError as error:
            raise InputError(str(error)) from None
        checked += [f"{folder}/{item['path']}" for item in manifest["files"]]
    return checked


def load_onnx(out_dir: str | Path, pipe: Any, budget: str | None = None) -> Any:
    """Like :func:`load`, but the denoiser runs the plan's ONNX export in onnxruntime."""
    from accelkit.runtime.ort_runner import apply_onnx

    plan = read_plan(out_dir, budget)
    directory = plan.path / "onnx"
    if not (directory / "manifest.json").is_file():
        raise InputError(f"plan {plan.budget} has no ONNX export: run `accelkit export {out_dir} --budget {plan.budget}`")
    program = build_program(plan, pipe)
    return apply_onnx(pipe, program, directory, call_defaults=plan.call_defaults)


def load_tensorrt(out_dir: str | Path, pipe: Any, budget: str | None = None) -> Any:
    """Like :func:`load`, but the denoiser runs the plan's TensorRT engines."""
    from accelkit.export.tensorrt import require_tensorrt
    from accelkit.runtime.trt_runner import apply_tensorrt

    require_tensorrt()
    plan = read_plan(out_dir, budget)
    directory = plan.path / "engines"
    if not (directory / "manifest.json").is_file():
        raise InputError(
            f"plan {plan.budget} has no TensorRT engines: run `accelkit export {out_dir} --budget {plan.budget} "
            "--target tensorrt`"
        )
    program = build_program(plan, pipe)
    return apply_tensorrt(pipe, program, directory, call_defaults=plan.call_defaults)
