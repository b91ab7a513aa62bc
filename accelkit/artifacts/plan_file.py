"""``plan.json`` as a typed, versioned record, checked on load.

A plan lists every file it references (weights, ONNX models, engines and their manifests) with its
sha256 under ``files``, and the shape and dtype of every tensor of its weights file under ``weights``.
:func:`parse_plan` refuses a plan of another schema, of the wrong shape, without the model's weights
hash, or naming a file outside its folder; :func:`verify_plan_files` refuses missing, truncated or
changed files. :func:`seal_plan` fills ``files`` before a plan is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelkit.artifacts.files import FileRecord, inside, record_files, verify_records
from accelkit.errors import InputError, PlanMismatchError

#: 2: ``files`` (sha256 of every referenced file) and ``weights`` (tensor shapes and dtypes) are required.
PLAN_SCHEMA = 2


@dataclass(frozen=True, kw_only=True)
class TensorRecord:
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True, kw_only=True)
class ModelRef:
    id: str
    weights_hash: str
    family: str | None = None


@dataclass(frozen=True, kw_only=True)
class Generation:
    height: int
    width: int
    # None where the pipeline's own default is None (Qwen-Image guides with ``true_cfg_scale``)
    guidance_scale: float | None
    probe_prompt: str = "a photo"


@dataclass(frozen=True, kw_only=True)
class PlanFile:
    """The checked fields of ``plan.json`` (the rest stays in ``Plan.data``)."""

    schema: int = PLAN_SCHEMA
    budget: str
    model: ModelRef
    scheduler_class: str
    generation: Generation
    baseline_steps: int
    num_steps: int
    passes: dict[str, dict[str, Any]]
    weights_file: str | None = None
    weights: dict[str, TensorRecord] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)


def _need(condition: bool, path: Path, what: str) -> None:
    if not condition:
        raise PlanMismatchError(f"'{path}' is not a valid accelkit plan ({what}): it was edited or damaged; "
                                "re-run `accelkit optimize` to rewrite it")


def check_plan_shape(data: Any, path: Path) -> None:
    """What every reader relies on: a JSON object of this schema with a budget."""
    if not isinstance(data, dict):
        raise InputError(f"'{path}' does not hold a JSON object: re-run `accelkit optimize` to rewrite it")
    if data.get("schema") != PLAN_SCHEMA:
        raise PlanMismatchError(f"'{path}' has plan schema {data.get('schema')}, this accelkit reads {PLAN_SCHEMA}: "
                                "re-run `accelkit optimize` with this version")
    _need(isinstance(data.get("budget"), str), path, "no budget")


def parse_plan(data: Any, path: Path) -> PlanFile:
    """Check the whole plan; ``path`` is ``plan.json`` (named in every message)."""
    check_plan_shape(data, path)
    model = data.get("model")
    _need(isinstance(model, dict) and isinstance(model.get("id"), str), path, "no model id")
    if not isinstance(model.get("weights_hash"), str) or not model["weights_hash"]:
        raise PlanMismatchError(f"'{path}' records no model weights hash, so it cannot be checked against the "
                                "pipeline: re-run `accelkit optimize` to rewrite it")
    generation = data.get("generation")
    _need(isinstance(generation, dict), path, "no generation section")
    for key in ("height", "width"):
        _need(isinstance(generation.get(key), int) and generation[key] > 0, path, f"generation.{key}")
    scale = generation.get("guidance_scale")
    _need(scale is None or (isinstance(scale, int | float) and math.isfinite(scale)), path,
          "generation.guidance_scale")
    scheduler = data.get("scheduler")
    _need(isinstance(scheduler, dict) and isinstance(scheduler.get("class"), str), path, "no scheduler class")
    for key in ("baseline_steps", "num_steps"):
        _need(isinstance(data.get(key), int) and data[key] >= 1, path, key)
    passes = data.get("passes", {})
    _need(isinstance(passes, dict) and all(isinstance(v, dict) for v in passes.values()), path, "passes")
    files = data.get("files")
    _need(isinstance(files, dict), path, "no files section")
    records = {name: FileRecord.from_json(record, name, f"'{path}'") for name, record in files.items()}
    weights_file = data.get("weights_file")
    tensors: dict[str, TensorRecord] = {}
    if weights_file is not None:
        inside(path.parent, weights_file, f"'{path}' weights_file")
        _need(weights_file in records, path, f"weights_file '{weights_file}' has no sha256 under files")
        weights = data.get("weights")
        _need(isinstance(weights, dict), path, "no weights section for its weights_file")
        for key, item in weights.items():
            _need(isinstance(item, dict) and isinstance(item.get("shape"), list)
                  and isinstance(item.get("dtype"), str), path, f"weights['{key}']")
            tensors[key] = TensorRecord(shape=tuple(int(n) for n in item["shape"]), dtype=item["dtype"])
    missing = [name for name in referenced_files(data, path.parent) if name not in records]
    _need(not missing, path, f"files without a sha256: {missing}")
    return PlanFile(
        schema=data["schema"], budget=data["budget"],
        model=ModelRef(id=model["id"], weights_hash=model["weights_hash"], family=model.get("family")),
        scheduler_class=scheduler["class"],
        generation=Generation(height=generation["height"], width=generation["width"], guidance_scale=None if scale is None else float(scale),
                              probe_prompt=str(generation.get("probe_prompt", "a photo"))),
        baseline_steps=data["baseline_steps"], num_steps=data["num_steps"], passes=passes,
        weights_file=weights_file, weights=tensors, files=records)


def manifest_files(root: Path, directory: Any, manifest: Any, what: str) -> list[str]:
    """Files of an export section (relative to the plan folder), each kept inside the export folder.

    Every ``models[].file`` must be one of the manifest's hashed ``files``: a model file outside that
    list would load unverified.
    """
    folder = inside(root, directory, f"{what} directory")
    if not isinstance(manifest, Mapping) or not isinstance(manifest.get("files"), list):
        raise PlanMismatchError(f"{what} in '{root}' lists no files: export again")
    listed = []
    for item in manifest["files"]:
        name = item.get("path") if isinstance(item, Mapping) else None
        inside(folder, name, f"{what} file")
        listed.append(name)
    for model in manifest.get("models", []):
        name = model.get("file") if isinstance(model, Mapping) else None
        inside(folder, name, f"{what} model file")
        if name not in listed:
            raise PlanMismatchError(f"{what} model file '{name}' is not covered by the manifest's sha256 list: "
                                    "export again")
    return [f"{directory}/manifest.json", *(f"{directory}/{name}" for name in listed)]


def export_sections(data: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(what, directory, manifest)`` of each export a plan lists (TensorRT engines and their ONNX)."""
    section = data.get("engines")
    if not section:
        return []
    if not isinstance(section, Mapping):
        raise PlanMismatchError("the plan's engines section is damaged: export again")
    sections = [(f"{section.get('target', 'export')} export", section.get("directory"), section.get("manifest"))]
    if section.get("onnx"):
        onnx = section["onnx"]
        sections.append(("onnx export", onnx.get("directory"), onnx.get("manifest")))
    return sections


def referenced_files(data: Mapping[str, Any], root: Path) -> list[str]:
    """Every file the plan references, relative to its folder ``root``."""
    names = [data["weights_file"]] if data.get("weights_file") else []
    for what, directory, manifest in export_sections(data):
        names += manifest_files(root, directory, manifest, what)
    return list(dict.fromkeys(names))


def seal_plan(directory: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``schema`` and the sha256 of every referenced file (and weights' tensors) filled in."""
    sealed = dict(data, schema=PLAN_SCHEMA)
    names = referenced_files(sealed, directory)
    sealed["files"] = {name: r.to_json() for name, r in record_files(directory, names, "the plan").items()}
    if sealed.get("weights_file"):
        sealed["weights"] = {key: r.to_json() for key, r in read_tensor_records(directory / sealed["weights_file"])
                             .items()}
    else:
        sealed.pop("weights", None)
    return sealed


def read_tensor_records(path: Path) -> dict[str, TensorRecord]:
    """Names, shapes and dtypes of a safetensors file, read from its header (no tensor is loaded)."""
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if not 0 < header_size <= path.stat().st_size - 8:
                raise ValueError("bad header size")
            header = json.loads(handle.read(header_size))
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
    except (OSError, ValueError) as error:
        raise PlanMismatchError(f"'{path}' is not a safetensors file ({error}): re-run the command that "
                                "wrote it") from None
    return {key: TensorRecord(shape=tuple(item["shape"]), dtype=str(item["dtype"]))
            for key, item in sorted(header.items()) if key != "__metadata__"}


def verify_plan_files(plan: PlanFile, directory: Path) -> None:
    """Refuse missing, truncated or changed files; and weights whose tensors differ from the record."""
    verify_records(directory, plan.files, f"'{directory / 'plan.json'}'")
    if plan.weights_file is None:
        return
    path = directory / plan.weights_file
    actual = read_tensor_records(path)
    if actual != plan.weights:
        extra = sorted(set(actual) - set(plan.weights))
        missing = sorted(set(plan.weights) - set(actual))
        changed = sorted(k for k in set(actual) & set(plan.weights) if actual[k] != plan.weights[k])
        raise PlanMismatchError(f"'{path}' does not hold the tensors the plan needs (missing {missing[:3]}, "
                                f"unexpected {extra[:3]}, other shape or dtype {changed[:3]}): re-run optimize")
