"""Data model of the per-budget fidelity report and its JSON form (``report/report.json``).

The JSON is the contract with CI: the key names below are fixed, fields may only be added. It is
strict JSON (no ``NaN``/``Infinity``): PSNR of identical images, +inf, is written capped at
:data:`accelkit.report.metrics.PSNR_CAP_DB`.

Images travel with the dataclasses (``baseline_images`` etc.) but not inside the JSON: the renderer
saves them as PNG files under ``report/images/`` and records their relative paths in the JSON
(``"images"`` entries), from which :meth:`ReportData.from_json` can load them back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from accelkit.errors import InputError

SCHEMA_VERSION = 1

#: A plan beats a reference only if its speedup is at least (1 - this) times the reference's.
SPEEDUP_TOLERANCE = 0.02

_PSNR_CAP_DB = 100.0

# Keys the dataclasses own; any other key read from JSON is carried in ``extra``.
_BUDGET_KEYS = frozenset(
    "budget target_speedup met speedup fidelity weights_bytes passes references ablations plan_summary verdict "
    "eval_prompts latency_ms images".split()
)
_TOP_KEYS = frozenset(
    "schema model settings baseline budgets floor_met trials notes cost_model min_psnr".split()
)  # same value as metrics.PSNR_CAP_DB; not imported so that schema stays torch-free


def _num(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"report.json: {where} must be a number, got {value!r}")
    return float(value)


def _opt_num(value: Any, where: str) -> float | None:
    return None if value is None else _num(value, where)


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise InputError(f"report.json: {where} must be an integer, got {value!r}")
    return int(value)


def _req(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise InputError(f"report.json: {where} must be an object, got {type(obj).__name__}")
    if key not in obj:
        raise InputError(f"report.json: {where} is missing the key {key!r}")
    return obj[key]


def _psnr_json(value: float) -> float:
    # JSON has no infinity; identical images (+inf dB) are written at the cap used for means.
    return _PSNR_CAP_DB if value > _PSNR_CAP_DB else float(value)


def _opt_json(value: float | None) -> float | None:
    # NaN (e.g. a failed metric) is written as null rather than producing invalid JSON.
    return None if value is None or math.isnan(value) else float(value)


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """The model that was accelerated.

    Args:
        id: hub id, zoo name or folder of the model.
        family: architecture family (``flux``, ``sd3``, ``pixart``, ``dit``, ``unet``...).
        params: number of denoiser parameters.
    """

    id: str
    family: str
    params: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "family": self.family, "params": int(self.params)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ModelInfo:
        return cls(
            id=str(_req(obj, "id", "model")),
            family=str(_req(obj, "family", "model")),
            params=_int(_req(obj, "params", "model"), "model.params"),
        )


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How the run was set up.

    Args:
        steps: sampler steps of the baseline.
        num_prompts: evaluation prompts per budget.
        seed: base seed of the evaluation images.
        device: device the cost was measured on (``cuda:0``, ``cpu``...).
        cost_kind: ``"latency"`` when cost is measured time, ``"flops"`` when it is the cost model.
    """

    steps: int
    num_prompts: int
    seed: int
    device: str
    cost_kind: Literal["latency", "flops"]

    def __post_init__(self) -> None:
        if self.cost_kind not in ("latency", "flops"):
            raise InputError(f"cost_kind must be 'latency' or 'flops', got {self.cost_kind!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": int(self.steps),
            "num_prompts": int(self.num_prompts),
            "seed": int(self.seed),
            "device": self.device,
            "cost_kind": self.cost_kind,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Settings:
        return cls(
            steps=_int(_req(obj, "steps", "settings"), "settings.steps"),
            num_prompts=_int(_req(obj, "num_prompts", "settings"), "settings.num_prompts"),
            seed=_int(_req(obj, "seed", "settings"), "settings.seed"),
            device=str(_req(obj, "device", "settings")),
            cost_kind=_req(obj, "cost_kind", "settings"),
        )


@dataclass(frozen=True, kw_only=True)
class BaselineCost:
    """Cost of the unaccelerated pipeline.

    Args:
        cost: cost in the unit of ``settings.cost_kind`` (ms or FLOPs); speedups divide this.
        latency_ms: measured latency per image, or None where none was measured.
        flops: FLOPs per image from the cost model.
        weights_bytes: size of the denoiser weights.
    """

    cost: float
    latency_ms: float | None
    flops: float
    weights_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "cost": float(self.cost),
            "latency_ms": _opt_json(self.latency_ms),
            "flops": float(self.flops),
            "weights_bytes": int(self.weights_bytes),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> BaselineCost:
        return cls(
            cost=_num(_req(obj, "cost", "baseline"), "baseline.cost"),
            latency_ms=_opt_num(_req(obj, "latency_ms", "baseline"), "baseline.latency_ms"),
            flops=_num(_req(obj, "flops", "baseline"), "baseline.flops"),
            weights_bytes=_int(_req(obj, "weights_bytes", "baseline"), "baseline.weights_bytes"),
        )


@dataclass(frozen=True, kw_only=True)
class FidelityMetrics:
    """Fidelity of accelerated outputs against the same-seed baseline outputs.

    Args:
        psnr: mean PSNR in dB (per-image values capped at 100 dB before averaging).
        ssim: mean SSIM.
        lpips: mean LPIPS, or None where LPIPS could not run offline.
        lpips_reason: why ``lpips`` is None (empty when it is not).
        per_image: optional ``{"psnr": [...], "ssim": [...], "lpips": [...] | None}`` (videos add
            ``"temporal_psnr"``), one value per prompt.
        temporal_psnr: videos only: mean PSNR of the frame differences (motion kept), else None.
        frames: videos only: frames per video (PSNR/SSIM average every frame), else None.
    """

    psnr: float
    ssim: float
    lpips: float | None = None
    lpips_reason: str = ""
    per_image: dict[str, list[float] | None] | None = None
    temporal_psnr: float | None = None
    frames: int | None = None

    @classmethod
    def from_metrics(cls, result: dict[str, Any]) -> FidelityMetrics:
        """Build from the dict returned by :func:`accelkit.report.metrics.fidelity`.

        Args:
            result: that dict.
        """
        return cls(
            psnr=result["psnr"],
            ssim=result["ssim"],
            lpips=result.get("lpips"),
            lpips_reason=result.get("lpips_reason", ""),
            per_image=result.get("per_image"),
            temporal_psnr=result.get("temporal_psnr"),
            frames=result.get("frames"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "psnr": _psnr_json(self.psnr),
            "ssim": float(self.ssim),
            "lpips": _opt_json(self.lpips),
        }
        if self.lpips_reason:
            out["lpips_reason"] = self.lpips_reason
        if self.temporal_psnr is not None:
            out["temporal_psnr"] = _psnr_json(self.temporal_psnr)
            out["frames"] = self.frames
        if self.per_image is not None:
            per: dict[str, Any] = {}
            for key, values in self.per_image.items():
                if values is None:
                    per[key] = None
                elif key in ("psnr", "temporal_psnr"):
                    per[key] = [_psnr_json(v) for v in values]
                else:
                    per[key] = [_opt_json(v) for v in values]
            out["per_image"] = per
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FidelityMetrics:
        per = obj.get("per_image") if isinstance(obj, dict) else None
        return cls(
            psnr=_num(_req(obj, "psnr", "fidelity"), "fidelity.psnr"),
            ssim=_num(_req(obj, "ssim", "fidelity"), "fidelity.ssim"),
            lpips=_opt_num(_req(obj, "lpips", "fidelity"), "fidelity.lpips"),
            lpips_reason=str(obj.get("lpips_reason", "")),
            per_image=None if per is None else {k: None if v is None else list(v) for k, v in per.items()},
            temporal_psnr=_opt_num(obj.get("temporal_psnr"), "fidelity.temporal_psnr"),
            frames=None if obj.get("frames") is None else _int(obj["frames"], "fidelity.frames"),
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class ReferencePoint:
    """A trivial alternative the plan must beat, e.g. running fewer sampler steps at the same cost.

    ``eq=False``: images may be tensors, whose ``==`` is elementwise.

    Args:
        speedup: its speedup over the baseline.
        psnr: its PSNR against the baseline, dB.
        ssim: its SSIM against the baseline.
        lpips: its LPIPS, or None.
        cost: its cost in ``settings.cost_kind`` units, or None.
        description: one line saying what it is ("14 of 28 sampler steps").
        images: optional outputs (float ``(N, 3, H, W)`` in ``[0, 1]`` or PIL list) shown beside the plan's.
    """

    speedup: float
    psnr: float
    ssim: float
    lpips: float | None = None
    cost: float | None = None
    description: str = ""
    images: Any = None

    def to_json(self, image_paths: list[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "speedup": float(self.speedup),
            "psnr": _psnr_json(self.psnr),
            "ssim": float(self.ssim),
        }
        if self.lpips is not None:
            out["lpips"] = _opt_json(self.lpips)
        if self.cost is not None:
            out["cost"] = float(self.cost)
        if self.description:
            out["description"] = self.description
        if image_paths:
            out["images"] = list(image_paths)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], name: str, root: Path | None = None) -> ReferencePoint:
        where = f"references.{name}"
        paths = obj.get("images") if isinstance(obj, dict) else None
        return cls(
            speedup=_num(_req(obj, "speedup", where), f"{where}.speedup"),
            psnr=_num(_req(obj, "psnr", where), f"{where}.psnr"),
            ssim=_num(_req(obj, "ssim", where), f"{where}.ssim"),
            lpips=_opt_num(obj.get("lpips"), f"{where}.lpips"),
            cost=_opt_num(obj.get("cost"), f"{where}.cost"),
            description=str(obj.get("description", "")),
            images=_load_images(root, paths),
        )


@dataclass(frozen=True, kw_only=True)
class TrialPoint:
    """One configuration the search evaluated (a dot on the speed–fidelity plot).

    Args:
        trial: trial number.
        cost: its cost in ``settings.cost_kind`` units.
        speedup: baseline cost / its cost.
        psnr: its PSNR against the baseline, dB.
        feasible: whether it met the constraints (fidelity floor, validity).
        passes: pass name -> config as JSON.
        ssim: its SSIM, when measured.
    """

    trial: int
    cost: float
    speedup: float
    psnr: float
    feasible: bool
    passes: dict[str, Any] = field(default_factory=dict)
    ssim: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "trial": int(self.trial),
            "cost": float(self.cost),
            "speedup": float(self.speedup),
            "psnr": _psnr_json(self.psnr),
            "feasible": bool(self.feasible),
            "passes": self.passes,
        }
        if self.ssim is not None:
            out["ssim"] = _opt_json(self.ssim)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TrialPoint:
        return cls(
            trial=_int(_req(obj, "trial", "trials[]"), "trials[].trial"),
            cost=_num(_req(obj, "cost", "trials[]"), "trials[].cost"),
            speedup=_num(_req(obj, "speedup", "trials[]"), "trials[].speedup"),
            psnr=_num(_req(obj, "psnr", "trials[]"), "trials[].psnr"),
            feasible=bool(_req(obj, "feasible", "trials[]")),
            passes=dict(obj.get("passes") or {}),
            ssim=_opt_num(obj.get("ssim"), "trials[].ssim"),
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class BudgetReport:
    """What one budget ("2x", "4x"...) achieved.

    ``eq=False``: images may be tensors, whose ``==`` is elementwise.

    Args:
        budget: the budget's name, e.g. ``"2x"``.
        target_speedup: the speedup asked for.
        met: whether the plan reached the target within the fidelity floor.
        speedup: the speedup achieved.
        fidelity: fidelity against the baseline on the evaluation prompts.
        weights_bytes: size of the plan's weights.
        passes: pass name -> its config as JSON, in pipeline order.
        references: name -> trivial alternative (``"fewer_steps"``, ``"uniform_cache"``...).
        ablations: pass name -> tables that pass adds (nested dicts/lists of scalars).
        plan_summary: the plan in one human sentence.
        verdict: how the plan compares with running fewer steps, in words (e.g. that the other passes
            did not help on this model and sampler, so the plan is the fewer-steps plan).
        eval_prompts: the evaluation prompts.
        prompts: caption of each image (defaults to ``eval_prompts``).
        baseline_images: baseline outputs, float ``(N, 3, H, W)`` in ``[0, 1]`` or a PIL list.
        accelerated_images: the plan's outputs for the same prompts and seeds.
        latency_ms: measured latency of the plan, when measured.
        extra: further JSON keys, kept as they are (fields added by other tools survive a re-render), e.g.
            ``recovery``, which ``accelkit distill`` adds (the same section as in ``plan.json``).
    """

    budget: str
    target_speedup: float
    met: bool
    speedup: float
    fidelity: FidelityMetrics
    weights_bytes: int
    passes: dict[str, Any] = field(default_factory=dict)
    references: dict[str, ReferencePoint] = field(default_factory=dict)
    ablations: dict[str, Any] = field(default_factory=dict)
    plan_summary: str = ""
    verdict: str = ""
    eval_prompts: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    baseline_images: Any = None
    accelerated_images: Any = None
    latency_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def captions(self) -> tuple[str, ...]:
        """Caption per image: ``prompts`` if given, else ``eval_prompts``."""
        return tuple(self.prompts) or tuple(self.eval_prompts)

    def beats(self, name: str) -> bool:
        """Whether the plan beats reference ``name``: as fast (2% tolerance) and higher PSNR.

        "As fast" means at least the reference's speedup, or the budget's target when the reference
        overshoots it (a step count is an integer: 9 of 28 steps is 3.11x for a 3x budget). A plan
        slower than both does not beat it even with higher PSNR, since the reference could then be run
        with more steps.

        Args:
            name: key in ``references``.
        """
        ref = self.references[name]
        bar = min(ref.speedup, self.target_speedup)
        fast_enough = self.speedup >= bar * (1.0 - SPEEDUP_TOLERANCE)
        return bool(fast_enough and self.fidelity.psnr > ref.psnr)

    def to_json(self, images: dict[str, Any] | None = None) -> dict[str, Any]:
        """JSON form; ``images`` holds the relative PNG paths the renderer wrote.

        Args:
            images: ``{"baseline": [...], "accelerated": [...], "references": {name: [...]}}`` or None.
        """
        images = images or {}
        ref_paths = images.get("references", {})
        refs = {}
        for name, ref in self.references.items():
            entry = ref.to_json(ref_paths.get(name))
            # Derived, for CI: the verdict the HTML shows.
            entry["beaten"] = self.beats(name)
            refs[name] = entry
        out: dict[str, Any] = {
            **self.extra,
            "budget": self.budget,
            "target_speedup": float(self.target_speedup),
            "met": bool(self.met),
            "speedup": float(self.speedup),
            "fidelity": self.fidelity.to_json(),
            "weights_bytes": int(self.weights_bytes),
            "passes": self.passes,
            "references": refs,
            "ablations": self.ablations,
            "plan_summary": self.plan_summary,
            "verdict": self.verdict,
            "eval_prompts": list(self.eval_prompts),
        }
        if self.latency_ms is not None:
            out["latency_ms"] = _opt_json(self.latency_ms)
        if images.get("baseline") or images.get("accelerated"):
            out["images"] = {
                "captions": list(self.captions),
                "baseline": list(images.get("baseline", [])),
                "accelerated": list(images.get("accelerated", [])),
            }
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], root: Path | None = None) -> BudgetReport:
        """Parse one ``budgets[]`` entry, loading its images from ``root`` when given.

        Args:
            obj: the entry.
            root: the report directory the image paths are relative to, or None to skip images.
        """
        name = str(_req(obj, "budget", "budgets[]"))
        where = f"budgets[{name}]"
        refs = _req(obj, "references", where) or {}
        imgs = obj.get("images") or {}
        return cls(
            budget=name,
            target_speedup=_num(_req(obj, "target_speedup", where), f"{where}.target_speedup"),
            met=bool(_req(obj, "met", where)),
            speedup=_num(_req(obj, "speedup", where), f"{where}.speedup"),
            fidelity=FidelityMetrics.from_json(_req(obj, "fidelity", where)),
            weights_bytes=_int(_req(obj, "weights_bytes", where), f"{where}.weights_bytes"),
            passes=dict(_req(obj, "passes", where) or {}),
            references={k: ReferencePoint.from_json(v, k, root) for k, v in refs.items()},
            ablations=dict(_req(obj, "ablations", where) or {}),
            plan_summary=str(obj.get("plan_summary", "")),
            verdict=str(obj.get("verdict", "")),
            eval_prompts=tuple(str(p) for p in obj.get("eval_prompts", ())),
            prompts=tuple(str(p) for p in imgs.get("captions", ())),
            baseline_images=_load_images(root, imgs.get("baseline")),
            accelerated_images=_load_images(root, imgs.get("accelerated")),
            latency_ms=_opt_num(obj.get("latency_ms"), f"{where}.latency_ms"),
            extra={k: v for k, v in obj.items() if k not in _BUDGET_KEYS},
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class ReportData:
    """Everything the report shows; ``to_json`` is ``report/report.json``.

    Args:
        model: the model.
        settings: run settings.
        baseline: baseline cost.
        budgets: one entry per budget, in the order asked for.
        floor_met: whether every budget met the minimum-fidelity floor.
        trials: every configuration the search evaluated.
        notes: free-form lines (which cost model and why, the PSNR floor...).
        cost_model: description of the cost model used.
        min_psnr: the fidelity floor in dB, drawn on the plot, or None.
        extra: further top-level JSON keys, kept as they are across a re-render.
        schema: JSON schema version.
    """

    model: ModelInfo
    settings: Settings
    baseline: BaselineCost
    budgets: tuple[BudgetReport, ...]
    floor_met: bool
    trials: tuple[TrialPoint, ...] = ()
    notes: tuple[str, ...] = ()
    cost_model: str = ""
    min_psnr: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def to_json(self, images: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        """JSON form (strict: no NaN/Infinity).

        Args:
            images: per budget (same order as ``budgets``), the image paths for
                :meth:`BudgetReport.to_json`, or None.
        """
        images = list(images or [])
        images += [{}] * (len(self.budgets) - len(images))
        out: dict[str, Any] = {
            **self.extra,
            "schema": self.schema,
            "model": self.model.to_json(),
            "settings": self.settings.to_json(),
            "baseline": self.baseline.to_json(),
            "budgets": [b.to_json(paths) for b, paths in zip(self.budgets, images, strict=False)],
            "floor_met": bool(self.floor_met),
            "trials": [t.to_json() for t in self.trials],
            "notes": list(self.notes),
            "cost_model": self.cost_model,
        }
        if self.min_psnr is not None:
            out["min_psnr"] = float(self.min_psnr)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], root: Path | None = None) -> ReportData:
        """Parse ``report.json``; with ``root`` (the report directory) its images are loaded too.

        Args:
            obj: the parsed JSON.
            root: directory the image paths are relative to, or None to leave images out.
        """
        schema = _req(obj, "schema", "top level")
        if schema != SCHEMA_VERSION:
            raise InputError(
                f"report.json has schema {schema!r}; this accelkit reads schema {SCHEMA_VERSION}. "
                "Re-run `accelkit optimize` with this version."
            )
        budgets = _req(obj, "budgets", "top level")
        if not isinstance(budgets, list):
            raise InputError("report.json: budgets must be a list")
        return cls(
            model=ModelInfo.from_json(_req(obj, "model", "top level")),
            settings=Settings.from_json(_req(obj, "settings", "top level")),
            baseline=BaselineCost.from_json(_req(obj, "baseline", "top level")),
            budgets=tuple(BudgetReport.from_json(b, root) for b in budgets),
            floor_met=bool(_req(obj, "floor_met", "top level")),
            trials=tuple(TrialPoint.from_json(t) for t in obj.get("trials", ())),
            notes=tuple(str(n) for n in obj.get("notes", ())),
            cost_model=str(obj.get("cost_model", "")),
            min_psnr=_opt_num(obj.get("min_psnr"), "min_psnr"),
            extra={k: v for k, v in obj.items() if k not in _TOP_KEYS},
            schema=SCHEMA_VERSION,
        )


def _load_images(root: Path | None, paths: Any) -> list[Any] | None:
    if root is None or not paths:
        return None
    from PIL import Image

    images = []
    for rel in paths:
        path = (Path(root) / rel).resolve()
        # Image paths come from a file on disk: keep them inside the report directory.
        if Path(root).resolve() not in path.parents:
            raise InputError(f"report.json: image path {rel!r} points outside the report directory")
        if not path.is_file():
            raise InputError(f"report.json names {rel!r}, which is missing from {root}")
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images
