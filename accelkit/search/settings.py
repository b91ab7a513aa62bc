"""What an optimize run takes: :class:`OptimizeSettings`, budgets and passes parsed from text, the three
disjoint prompt sets and the generation defaults; nothing here loads a model."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from accelkit.errors import InputError
from accelkit.passes.base import pass_order, registered_passes
from accelkit.search.space import BUDGET_TOLERANCE

SPEEDUP_TOLERANCE = BUDGET_TOLERANCE
DEFAULT_PASSES = ("steps", "cache")


def parse_budget(text: str) -> float:
    """``"2x"``, ``"2.5x"`` or ``"2"`` -> 2.0; anything else is an InputError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[xX]?\s*", str(text))
    if not match or float(match.group(1)) < 1.0:
        raise InputError(f"invalid budget '{text}': write a speedup of at least 1, such as 2x or 3.5x")
    return float(match.group(1))


def budget_name(target: float) -> str:
    return f"{target:g}x"


def parse_passes(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """Comma-separated pass names, validated and put in canonical order."""
    if text is None:
        return DEFAULT_PASSES
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    available = registered_passes()
    order = pass_order()
    unknown = [n for n in names if n not in order]
    if unknown:
        raise InputError(f"unknown pass(es) {unknown}: choose from {', '.join(order)}")
    missing = [n for n in names if n not in available]
    if missing:
        raise InputError(
            f"pass(es) {missing} are not available in this version of accelkit; available: {', '.join(available)}"
        )
    if not names:
        raise InputError("--passes is empty: name at least one of " + ", ".join(available))
    return tuple(sorted(set(names), key=order.index))


@dataclass
class OptimizeSettings:
    """Everything ``accelkit optimize`` takes (see ``accelkit optimize --help``)."""

    model: str | None = None
    budgets: tuple[str, ...] = ("2x",)
    passes: tuple[str, ...] = DEFAULT_PASSES
    trials: int = 12
    steps: int = 28
    num_prompts: int = 8
    num_eval_prompts: int = 8
    #: Prompts the best few trials per budget are re-scored on before one is chosen.
    num_val_prompts: int = 8
    prompts_file: str | None = None
    eval_prompts_file: str | None = None
    seed: int = 0
    device: str = "cpu"
    cost: str = "roofline"
    cost_target: str | None = None
    min_psnr: float | None = None
    storage: str | None = None
    study: str | None = None
    out: str = "accelkit-out"
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    #: Frames per video (video pipelines only); None: the pipeline's default.
    num_frames: int | None = None
    #: Extra pipeline call arguments (``--call-arg KEY=VALUE``), on top of those the model family needs.
    call_args: dict[str, Any] = field(default_factory=dict)
    export: str | None = None
    #: Reuse an OUT made for another model or other budgets, removing its stale plans and report.
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    #: Heartbeat of running trials in seconds; a trial silent for ``grace_period`` (default 3x) is
    #: marked FAIL by the next process that asks the study for a trial, and retried.
    heartbeat: int = 10
    grace_period: int | None = None
    #: Explicit prompt lists (they win over files and counts); a report rebuilt from a study uses them.
    calibration_prompts: tuple[str, ...] | None = None
    evaluation_prompts: tuple[str, ...] | None = None
    validation_prompts: tuple[str, ...] | None = None


@dataclass
class BudgetOutcome:
    budget: str
    target: float
    met: bool
    speedup: float
    psnr: float | None
    trial: int | None
    plan_dir: Path | None
    message: str


@dataclass
class OptimizeResult:
    out: Path
    outcomes: list[BudgetOutcome]
    report_path: Path | None
    exit_code: int
    study_name: str


def _read_prompts(path: str) -> list[str]:
    from accelkit._io import read_prompt_file

    return read_prompt_file(path)


GENERIC_PROMPTS = (
    "a red circle", "a blue square on a white background", "a green triangle", "a yellow star at night",
    "a small house by a lake", "a cat sitting on a chair", "a mountain landscape at sunset", "a bowl of fruit",
    "a city street in the rain", "a portrait of an old man", "a sailing boat on the sea", "a forest in autumn",
)


@dataclass(frozen=True)
class PromptSets:
    """Three disjoint prompt sets: trials score on calibration, the choice is made on validation,
    the report measures on evaluation. ``warning`` is one line when a user's file was too small."""

    calibration: list[str]
    validation: list[str]
    evaluation: list[str]
    warning: str | None = None


def _split_prompts(prompts: list[str], sizes: Sequence[int], source: str) -> tuple[list[list[str]], str | None]:
    """``prompts`` cut into consecutive disjoint parts of ``sizes``; shrunk in proportion when too few."""
    wanted = sum(sizes)
    if len(prompts) >= wanted:
        parts, start = [], 0
        for size in sizes:
            parts.append(prompts[start : start + size])
            start += size
        return parts, None
    if len(prompts) < len(sizes):
        # Too few to keep the sets apart: every set reuses all prompts.
        return [list(prompts) for _ in sizes], (
            f"warning: {source} holds {len(prompts)} prompt(s), fewer than the {len(sizes)} disjoint sets need; "
            "all sets use the same prompts, so the scores are not held out")
    shares = [max(1, math.floor(len(prompts) * size / wanted)) for size in sizes]
    shares[0] += len(prompts) - sum(shares)
    parts, start = [], 0
    for size in shares:
        parts.append(prompts[start : start + size])
        start += size
    return parts, (f"warning: {source} holds {len(prompts)} prompts, fewer than the {wanted} asked for; split "
                   f"{'/'.join(map(str, shares))} into calibration/validation/evaluation")


def _prompt_sets(settings: OptimizeSettings, source: str) -> PromptSets:
    n_cal, n_val, n_eval = max(1, settings.num_prompts), max(1, settings.num_val_prompts), settings.num_eval_prompts
    if settings.calibration_prompts is not None and settings.evaluation_prompts is not None:
        validation = settings.validation_prompts
        return PromptSets(list(settings.calibration_prompts),
                          list(validation if validation else settings.calibration_prompts),
                          list(settings.evaluation_prompts))
    evaluation = _read_prompts(settings.eval_prompts_file)[: max(1, n_eval)] if settings.eval_prompts_file else None
    warning = None
    if settings.prompts_file:
        # The user's prompts are split, never mixed with generic ones.
        mine = [p for p in dict.fromkeys(_read_prompts(settings.prompts_file)) if p not in set(evaluation or ())]
        sizes = [n_cal, n_val] + ([] if evaluation is not None else [n_eval])
        parts, warning = _split_prompts(mine, sizes, f"--prompts {settings.prompts_file}")
        calibration, validation = parts[0], parts[1]
        evaluation = evaluation if evaluation is not None else parts[2]
    elif source == "zoo":
        from accelkit.zoo import calibration_prompts, evaluation_prompts

        pool = list(calibration_prompts())
        calibration, validation = pool[:n_cal], pool[n_cal : n_cal + n_val] or pool[-n_val:]
        evaluation = evaluation if evaluation is not None else list(evaluation_prompts(n_eval))
    else:
        pool = [p for p in GENERIC_PROMPTS if p not in set(evaluation or ())]
        sizes = [n_cal, n_val] + ([] if evaluation is not None else [n_eval])
        parts, _ = _split_prompts(pool, [min(s, max(1, len(pool) // len(sizes))) for s in sizes], "generic prompts")
        calibration, validation = parts[0], parts[1]
        evaluation = evaluation if evaluation is not None else parts[2]
    return PromptSets(calibration, validation, evaluation, warning)


def _generation_defaults(pipe: Any, settings: OptimizeSettings, source: str) -> dict[str, Any]:
    from accelkit.pipeline_io import generation_defaults, with_call_arguments

    if source == "zoo":
        from accelkit.zoo import ZOO_MODELS

        info = ZOO_MODELS[(settings.model or "zoo:shapes").removeprefix("zoo:")]
        defaults = {"height": info.height, "width": info.width, "guidance_scale": info.guidance_scale}
    else:
        defaults = generation_defaults(pipe)
    for key in ("height", "width", "guidance_scale", "num_frames"):
        if getattr(settings, key) is not None:
            defaults[key] = getattr(settings, key)
    return with_call_arguments(pipe, defaults, settings.call_args)


def validate_settings(settings: OptimizeSettings, *, min_trials: int = 1) -> list[float]:
    """Check what can be checked without loading anything; returns the budget targets, ascending."""
    targets = sorted({parse_budget(b) for b in settings.budgets})
    if settings.trials < min_trials:
        raise InputError(f"--trials must be at least {min_trials}, got {settings.trials}")
    if settings.steps < 2:
        raise InputError(f"--steps must be at least 2, got {settings.steps}")
    if settings.num_prompts < 1 or settings.num_eval_prompts < 1 or settings.num_val_prompts < 1:
        raise InputError("--num-prompts, --num-eval-prompts and --num-val-prompts must be at least 1")
    for name in ("height", "width"):
        value = getattr(settings, name)
        if value is not None and (value < 8 or value % 8):
            raise InputError(f"--{name} {value} is not a positive multiple of 8: pass e.g. --{name} {max(8, value // 8 * 8)}")
    if settings.cost not in ("roofline", "latency"):
        raise InputError(f"--cost must be 'roofline' or 'latency', got {settings.cost!r}")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if settings.heartbeat < 1:
        raise InputError(f"--heartbeat must be at least 1 second, got {settings.heartbeat}")
    if settings.grace_period is not None and settings.grace_period <= settings.heartbeat:
        raise InputError(f"--grace-period ({settings.grace_period} s) must exceed --heartbeat ({settings.heartbeat} s)")
    return targets
