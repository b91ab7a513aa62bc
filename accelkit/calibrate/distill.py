"""Recovery of a pruned plan by distillation: LAPTOP-Diff's normalized feature distillation.

The student is the pruned denoiser graph, initialized from the weights its kept blocks (and the
embedders, norms and projections around them) already have; the teacher is the original captured
denoiser. Both run the same recorded denoiser inputs: what the pipeline passed the teacher while it
generated the training prompts, every step of every trajectory (so a spread of timesteps) and the
classifier-free-guidance batch exactly as the pipeline builds it.

Loss, per recorded call (batch: ``batch_size`` calls, gradients accumulated, because the captured
graph is specialized to the pipeline's batch shape)::

    loss = output_weight  * mean((y_s - y_t)^2)
         + feature_weight * mean over matched points p of  ||F_s^p - F_t^p||^2 / ||F_t^p||^2

The feature term divides each point's squared error by the teacher feature's squared norm, per
sample: LAPTOP-Diff's normalization, so that blocks (and timesteps) with large activations do not
drown the others. Matched points: every output of every kept block. Where blocks after it were
removed, the student's value stands where the teacher's value *entering the next kept block* stood
(the removal wired the removed blocks' outputs to their inputs), so that teacher value is the target;
the pairing comes from :func:`accelkit.capture.streams.removal_candidates`, not from node positions.

Running this on a plan (recording the teacher's calls, storing the student's weights in the plan and
a ``recovery`` section in ``plan.json`` and the report) is orchestration: :mod:`accelkit.workflows.recover`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx

from accelkit.capture.blocks import find_blocks
from accelkit.capture.graph import clone_graph_module, replace_weights
from accelkit.capture.streams import removal_candidates
from accelkit.errors import InputError

__all__ = [
    "DistillConfig",
    "DistillResult",
    "MatchedPoint",
    "distill",
    "distillation_losses",
    "evaluate_losses",
    "matched_points",
    "normalized_feature_loss",
    "trainable_copy",
    "with_extra_outputs",
]

# Teacher targets of all recorded calls are kept in memory when they fit in this many bytes
# (saves a teacher forward per student step); above it they are recomputed every time.
TEACHER_CACHE_BYTES = 1 << 30
# Recorded calls the before/after loss measurements average over.
LOSS_PROBE_CALLS = 8


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Settings of one recovery run.

    Args:
        version: schema version of this config.
        iterations: optimizer steps.
        lr: AdamW learning rate (cosine-decayed to zero over ``iterations``).
        batch_size: recorded denoiser calls per optimizer step (each is the pipeline's own batch,
            CFG halves included); their gradients are accumulated.
        output_weight: weight of the output-distillation term.
        feature_weight: weight of the normalized feature-distillation term.
        max_grad_norm: gradient clipping threshold (0 disables).
        seed: seed of the order in which recorded calls are drawn.
    """

    version: int = 1
    iterations: int = 200
    lr: float = 2e-5
    batch_size: int = 2
    output_weight: float = 1.0
    feature_weight: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"distill {name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("lr", "output_weight", "feature_weight", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise InputError(f"distill {name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise InputError(f"distill lr must be > 0, got {self.lr}")
        if self.output_weight == 0 and self.feature_weight == 0:
            raise InputError("distill output-weight and feature-weight are both 0: nothing to learn from")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"DistillConfig: unknown field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**data)


# ---------------------------------------------------------------- graphs


@dataclass(frozen=True)
class MatchedPoint:
    """A stream value the student must reproduce.

    Args:
        block: the kept block whose output it is.
        student: node name in the student graph.
        teacher: node name of the target value in the teacher graph.
    """

    block: str
    student: str
    teacher: str


def matched_points(teacher: fx.GraphModule, student: fx.GraphModule, removed: Sequence[str]) -> list[MatchedPoint]:
    """Every output of every kept block of ``student``, paired with its target in ``teacher``.

    ``removed`` names the blocks the student lacks. Pruning (``remove_blocks``) keeps node names, so
    a kept block's output has the same name in both graphs; when the blocks after it were removed,
    their outputs were wired to their inputs, and the target is the teacher value at the end of that
    chain (what the teacher feeds the next kept block).

    Raises:
        ValueError: a removed block is not removable, or a target's shape differs from the student's.
    """
    pairings = {p.name: p for p in removal_candidates(teacher)}
    unknown = [name for name in removed if name not in pairings]
    if unknown:
        raise ValueError(f"blocks {unknown} are not blocks of the teacher graph")
    stands_for: dict[str, str] = {}  # block input -> the removed block's output it replaced
    for name in removed:
        if not pairings[name].removable:
            raise ValueError(f"block '{name}' cannot have been removed: {pairings[name].reason}")
        for output, source in pairings[name].pairs:
            if source in stands_for:
                raise ValueError(f"two removed outputs were both wired to '{source}'")
            stands_for[source] = output
    teacher_nodes = {n.name: n for n in teacher.graph.nodes}
    student_nodes = {n.name: n for n in student.graph.nodes}
    points = []
    for block in find_blocks(student):
        if block.name in removed:
            raise ValueError(f"block '{block.name}' is listed as removed but is still in the student graph")
        for name in block.outputs:
            target = name
            while target in stands_for:
                target = stands_for[target]
            shapes = [getattr(nodes[n].meta.get("val"), "shape", None)
                      for nodes, n in ((student_nodes, name), (teacher_nodes, target))]
            if target not in teacher_nodes or shapes[0] != shapes[1]:
                raise ValueError(f"student '{name}' ({shapes[0]}) has no teacher counterpart of its shape "
                                 f"('{target}': {shapes[1]})")
            points.append(MatchedPoint(block.name, name, target))
    return points


def with_extra_outputs(module: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """A copy of ``module`` (sharing its weights) that also returns the values of nodes ``names``."""
    clone = clone_graph_module(module)
    nodes = {n.name: n for n in clone.graph.nodes}
    output = next(n for n in clone.graph.nodes if n.op == "output")
    outputs = tuple(output.args[0]) if isinstance(output.args[0], tuple | list) else (output.args[0],)
    output.args = ((*outputs, *(nodes[name] for name in names)),)
    clone.graph.lint()
    clone.recompile()
    return clone


def trainable_copy(module: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, torch.nn.Parameter]]:
    """A copy of ``module`` with its own trainable copy of every floating-point parameter it reads.

    Returns:
        The copy and its trainable parameters by get_attr target (``transformer_blocks.0.ff.net.0.proj.weight``).
    """
    targets = sorted({str(n.target) for n in module.graph.nodes if n.op == "get_attr"})
    parameters: dict[str, torch.nn.Parameter] = {}
    for target in targets:
        value = module.get_parameter(target) if _is_parameter(module, target) else None
        if value is not None and value.is_floating_point():
            parameters[target] = torch.nn.Parameter(value.detach().clone())
    return replace_weights(module, parameters), parameters


def _is_parameter(module: torch.nn.Module, target: str) -> bool:
    owner_path, _, attribute = target.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    return attribute in owner._parameters


# ---------------------------------------------------------------- losses


def normalized_feature_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``||F_s - F_t||^2 / ||F_t||^2`` per sample (leading dimension), averaged over samples."""
    student, teacher = student.float(), teacher.float()
    if teacher.ndim < 2:
        return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(eps)
    dims = tuple(range(1, teacher.ndim))
    return ((student - teacher).pow(2).sum(dims) / teacher.pow(2).sum(dims).clamp_min(eps)).mean()


def distillation_losses(
    student_outputs: Sequence[torch.Tensor],
    teacher_outputs: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    config: DistillConfig,
) -> dict[str, torch.Tensor]:
    """The loss terms of one call: ``output`` (MSE), ``feature`` (normalized, mean over points), ``total``."""
    output = torch.stack([
        (s.float() - t.float()).pow(2).mean() for s, t in zip(student_outputs, teacher_outputs, strict=True)
    ]).mean()
    if student_features:
        feature = torch.stack([
            normalized_feature_loss(s, t) for s, t in zip(student_features, teacher_features, strict=True)
        ]).mean()
    else:
        feature = torch.zeros((), device=output.device)
    return {"output": output, "feature": feature,
            "total": config.output_weight * output + config.feature_weight * feature}


def _split(values: Sequence[torch.Tensor], count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    values = list(values)
    return values[:count], values[count:]


def evaluate_losses(
    student: fx.GraphModule,
    teacher: fx.GraphModule,
    calls: Sequence[Sequence[torch.Tensor]],
    num_outputs: int,
    config: DistillConfig,
) -> dict[str, float]:
    """Mean loss terms over ``calls`` (no gradients); both modules return features after the outputs."""
    sums: dict[str, float] = {}
    with torch.no_grad():
        for inputs in calls:
            s_out, s_feat = _split(student(*inputs), num_outputs)
            t_out, t_feat = _split(teacher(*inputs), num_outputs)
            for key, value in distillation_losses(s_out, t_out, s_feat, t_feat, config).items():
                sums[key] = sums.get(key, 0.0) + float(value)
    return {key: value / max(len(calls), 1) for key, value in sums.items()}


# ---------------------------------------------------------------- training


@dataclass
class DistillResult:
    """What :func:`distill` learned.

    Args:
        weights: the student's trained tensors by get_attr target (detached, on the training device).
        losses_before: loss terms on the probe calls before training.
        losses_after: the same after training.
        last_step: loss terms of the last optimizer step (mean over its batch).
        history: per step, ``{"total", "output", "feature"}``.
        seconds: wall time of the training loop.
        points: the matched feature points.
    """

    weights: dict[str, torch.Tensor]
    losses_before: dict[str, float]
    losses_after: dict[str, float]
    last_step: dict[str, float]
    history: list[dict[str, float]] = field(repr=False)
    seconds: float
    points: list[MatchedPoint]


def distill(
    teacher: fx.GraphModule,
    student: fx.GraphModule,
    removed: Sequence[str],
    calls: Sequence[Sequence[torch.Tensor]],
    num_outputs: int,
    config: DistillConfig,
    *,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> DistillResult:
    """Train a copy of ``student`` (the pruned graph) to reproduce ``teacher`` on recorded ``calls``.

    Neither module is modified: the student's weights are copied before training.

    Args:
        teacher: the unpruned graph module.
        student: the pruned graph module (its weights initialize the student).
        removed: names of the blocks ``student`` lacks.
        calls: flat graph inputs of recorded denoiser calls.
        num_outputs: the graphs' user outputs (the denoiser prediction) come first, this many.
        config: the training settings.
        progress: called after every step with ``(step, iterations, losses of the step)``.
    """
    if not calls:
        raise InputError("no recorded denoiser calls to distill on: generate with at least one prompt")
    points = matched_points(teacher, student, removed)
    trainable, parameters = trainable_copy(student)
    student_taps = with_extra_outputs(trainable, [p.student for p in points])
    teacher_taps = with_extra_outputs(teacher, [p.teacher for p in points])
    names = list(parameters)
    live = [parameters[n] for n in names]
    # Low-precision weights train through float32 master copies: AdamW's small updates vanish in bf16.
    masters = live if all(p.dtype == torch.float32 for p in live) else \
        [torch.nn.Parameter(p.detach().float().clone()) for p in live]
    optimizer = torch.optim.AdamW(masters, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iterations)
    rng = np.random.default_rng(config.seed)
    probe = [calls[int(i)] for i in np.linspace(0, len(calls) - 1, min(LOSS_PROBE_CALLS, len(calls)))]
    losses_before = evaluate_losses(student_taps, teacher_taps, probe, num_outputs, config)

    cache: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] | None = {}

    def targets(index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        nonlocal cache
        if cache is not None and index in cache:
            return cache[index]
        with torch.no_grad():
            value = _split([t.detach() for t in teacher_taps(*calls[index])], num_outputs)
        if cache is not None:
            size = sum(t.numel() * t.element_size() for part in value for t in part)
            if size * len(calls) <= TEACHER_CACHE_BYTES:
                cache[index] = value
            else:
                cache = None
        return value

    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for step in range(config.iterations):
        picked = rng.choice(len(calls), size=config.batch_size, replace=config.batch_size > len(calls))
        for p in live:
            p.grad = None
        sums = {"total": 0.0, "output": 0.0, "feature": 0.0}
        for index in picked:
            t_out, t_feat = targets(int(index))
            s_out, s_feat = _split(student_taps(*calls[int(index)]), num_outputs)
            terms = distillation_losses(s_out, t_out, s_feat, t_feat, config)
            (terms["total"] / config.batch_size).backward()
            for key in sums:
                sums[key] += float(terms[key].detach()) / config.batch_size
        if masters is not live:
            for master, p in zip(masters, live, strict=True):
                master.grad = None if p.grad is None else p.grad.float()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(masters, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if masters is not live:
            with torch.no_grad():
                for master, p in zip(masters, live, strict=True):
                    p.copy_(master.to(p.dtype))
        if not all(math.isfinite(v) for v in sums.values()):
            raise InputError(f"distillation diverged at step {step + 1} (loss {sums['total']}): lower --lr")
        history.append(sums)
        if progress is not None:
            progress(step + 1, config.iterations, sums)
    seconds = time.perf_counter() - started
    losses_after = evaluate_losses(student_taps, teacher_taps, probe, num_outputs, config)
    weights = {name: p.detach().clone() for name, p in zip(names, live, strict=True)}
    return DistillResult(weights=weights, losses_before=losses_before, losses_after=losses_after,
                         last_step=history[-1], history=history, seconds=seconds, points=points)
