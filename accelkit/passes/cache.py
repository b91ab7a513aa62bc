"""Cache insertion with a static, DP-chosen schedule of full steps (CEM-style).

Two graph variants come out of the captured denoiser:

* ``full`` computes everything and also outputs the residual of the cached span, blocks
  ``[first_blocks, L - last_blocks)``, for each stream crossing the span (image and text streams of a
  Flux model; the one stream of DiT/PixArt/SD3); where a span output has no input of the same shape
  (UNet spans) it outputs the span output itself;
* ``cached`` computes the first and last blocks and replaces the span by ``input + residual``
  (``"residual"``), optionally plus a first-order Taylor term ``c_t * (r - r_prev)`` whose per-step
  coefficient ``c_t`` is a step scalar (``"taylor"``).

*When* to compute fully is a boolean mask over steps chosen offline, so the graphs have no
data-dependent branch and no host sync. The mask comes from a DP over an error prior e(t, k)
(:mod:`accelkit.passes._cache_schedule`) or is uniform; priors are profiled by calibration.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import fx

from accelkit.calibrate.source import CalibrationSource
from accelkit.capture.blocks import find_blocks
from accelkit.capture.graph import clone_graph_module, eliminate_dead_nodes
from accelkit.capture.streams import pair_block_outputs
from accelkit.errors import InputError
from accelkit.passes import _cache_schedule as schedules
from accelkit.passes.base import (
    Choice,
    FloatRange,
    GraphVariant,
    IntRange,
    PassConfig,
    PassResult,
    Program,
    register_pass,
    run_passes,
)
from accelkit.passes.hooks import (
    BUDGET_TOLERANCE,
    DENSE,
    WRITES_CACHE_STATE,
    Ablation,
    PassHooks,
    ProbeContext,
    Seed,
    SeedRequest,
)

aten = torch.ops.aten

PRIOR_KINDS = ("residual", "feature", "end_to_end")
PRIOR_MAX_INTERVAL = 10
APPROXIMATIONS = ("residual", "taylor")


@dataclass(frozen=True, kw_only=True)
class CacheConfig(PassConfig):
    """Cache the middle blocks on the steps a static schedule marks as cached.

    Args:
        full_fraction: share of denoising steps computed fully (1.0 = no caching). The number of full
            steps is ``round(full_fraction * T)``, at least 2 (first and last).
        first_blocks: blocks at the start always computed (Fn).
        last_blocks: blocks at the end always computed (Bn).
        approximation: ``"residual"`` (reuse the span residual) or ``"taylor"`` (first-order
            extrapolation from the last two full steps).
        schedule: ``"dp"`` (minimize the cumulative prior error) or ``"uniform"``.
        prior: error prior for the DP: ``"residual"`` (relative L1 change of the span residual
            across k steps: the error plain reuse makes), ``"feature"`` (CEM: 1 - cos of the token-mean
            span output), or ``"end_to_end"`` (final-image MSE with only one interval cached; costly).
        weighting: gap weight in the DP cost: ``"none"``, ``"linear"`` (g - 1) or ``"quadratic"``.
        max_gap: longest allowed gap between full steps (None: unbounded).
        warmup: leading steps forced to compute fully.
        solver_gap: under a multistep sampler of order p (DPM-Solver++, UniPC), cap the gap between
            full steps at p, so each step's update has at least one exact model output in the
            solver's history of outputs (DP schedule only; no effect with a one-step sampler).
        full_step_mask: the resolved schedule as the list of full step indices; when given, no
            calibration runs (plans store it).
        schedule_prior: what the DP chose ``full_step_mask`` from, stored so that another step count can
            re-derive a schedule without calibration (:mod:`accelkit.runtime.rederive`): the prior
            e(t, k) (rows = steps, column k = interval) or, for ``prior="end_to_end"``, the (T, T) gap
            cost matrix with -1 where a gap is forbidden. Never read by this pass.
    """

    full_fraction: float = 1.0
    first_blocks: int = 1
    last_blocks: int = 0
    approximation: str = "residual"
    schedule: str = "dp"
    prior: str = "residual"
    weighting: str = "quadratic"
    max_gap: int | None = None
    warmup: int = 0
    solver_gap: bool = False
    full_step_mask: tuple[int, ...] | None = None
    schedule_prior: tuple[tuple[float, ...], ...] | None = None

    SEARCH_SPACE: ClassVar = {
        "full_fraction": FloatRange(0.15, 1.0),
        "first_blocks": IntRange(0, 2),
        "last_blocks": IntRange(0, 1),
        "approximation": Choice(APPROXIMATIONS),
        "schedule": Choice(("dp", "uniform")),
        "prior": Choice(("residual", "feature")),
        "weighting": Choice(schedules.WEIGHTINGS),
        "warmup": IntRange(0, 2),
        # solver_gap is not searched: on zoo:shapes the DP already alternates full and cached steps
        # under DPM-Solver++ 2M / UniPC, so the cap changed no schedule (BENCHMARKS.md, issue 18).
    }

    def __post_init__(self) -> None:
        if not 0.0 < self.full_fraction <= 1.0:
            raise InputError(f"cache.full_fraction must be in (0, 1], got {self.full_fraction}")
        if self.approximation not in APPROXIMATIONS:
            raise InputError(f"cache.approximation must be one of {APPROXIMATIONS}, got {self.approximation!r}")
        if self.schedule not in ("dp", "uniform"):
            raise InputError(f"cache.schedule must be 'dp' or 'uniform', got {self.schedule!r}")
        if self.prior not in PRIOR_KINDS:
            raise InputError(f"cache.prior must be one of {PRIOR_KINDS}, got {self.prior!r}")
        if self.weighting not in schedules.WEIGHTINGS:
            raise InputError(f"cache.weighting must be one of {schedules.WEIGHTINGS}, got {self.weighting!r}")
        if self.first_blocks < 0 or self.last_blocks < 0 or self.warmup < 0:
            raise InputError("cache.first_blocks, cache.last_blocks and cache.warmup must be >= 0")

    def full_steps(self, num_steps: int) -> int:
        if self.full_step_mask is not None:
            return len(self.full_step_mask)
        return int(min(num_steps, max(2 if num_steps > 1 else 1, round(self.full_fraction * num_steps))))

    def is_noop(self) -> bool:
        return self.full_step_mask is None and self.full_fraction >= 1.0


# ---------------------------------------------------------------- graph surgery


@dataclass(frozen=True)
class CachedSpan:
    """Where the cache sits: block range, boundary streams and whether residuals pair up.

    Args:
        start: first cached block index.
        stop: one past the last cached block index.
        inputs: per cached stream, the node entering the span (None in plain-reuse mode).
        outputs: per cached stream, the span node consumed after the span.
    """

    start: int
    stop: int
    inputs: tuple[str | None, ...]
    outputs: tuple[str, ...]

    @property
    def residual(self) -> bool:
        return all(name is not None for name in self.inputs)


def _shape_of(node: fx.Node) -> tuple | None:
    value = node.meta.get("val")
    return (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else None


def _trace_streams(module: fx.GraphModule, blocks, start: int, stop: int,
                   outputs: tuple[str, ...]) -> list[str] | None:
    """Follow each span output back through the blocks' residual paths to the span input it updates."""
    pairings = {}
    for index in range(start, stop):
        pairing = pair_block_outputs(module, blocks, index)
        if not pairing.removable:
            return None
        pairings[index] = dict(pairing.pairs)
    traced = []
    for output in outputs:
        current = output
        for index in range(stop - 1, start - 1, -1):
            source = pairings[index].get(current)
            if source is None:
                return None
            current = source
        traced.append(current)
    return traced if len(set(traced)) == len(traced) else None


def locate_span(module: fx.GraphModule, first_blocks: int, last_blocks: int) -> CachedSpan:
    """Find the cached span in ``module`` and pair each span output with the stream it updates."""
    blocks = find_blocks(module)
    count = len(blocks)
    start, stop = first_blocks, count - last_blocks
    if count == 0:
        raise InputError("the denoiser has no repeated blocks to cache")
    if not 0 <= start < stop <= count:
        raise InputError(
            f"cache.first_blocks={first_blocks} and cache.last_blocks={last_blocks} leave no block to cache "
            f"in a denoiser with {count} blocks"
        )
    boundary = blocks.span_boundary(module, start, stop)
    pairs = _trace_streams(module, blocks, start, stop, boundary.outputs)
    if pairs is None:
        # Some block is not a residual update (UNet stages change shape): store the span outputs.
        pairs = [None] * len(boundary.outputs)
    return CachedSpan(start, stop, tuple(pairs), tuple(boundary.outputs))


def _append_outputs(graph: fx.Graph, values: list[fx.Node]) -> None:
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(output.args[0]) + tuple(values),)


def _new_placeholders(graph: fx.Graph, names: list[str]) -> list[fx.Node]:
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    created = []
    for name in names:
        with graph.inserting_after(last):
            node = graph.placeholder(name.replace(".", "_").replace("@", "_"))
        created.append(node)
        last = node
    return created


def build_full_variant(module: fx.GraphModule, span: CachedSpan) -> tuple[fx.GraphModule, tuple[str, ...]]:
    """Full variant that also outputs the span residual (or output) of every stream."""
    clone = clone_graph_module(module)
    graph = clone.graph
    nodes = {n.name: n for n in graph.nodes}
    values = []
    for index, (inp, out) in enumerate(zip(span.inputs, span.outputs, strict=True)):
        out_node = nodes[out]
        if inp is None:
            values.append(out_node)
            continue
        with graph.inserting_after(out_node):
            residual = graph.call_function(aten.sub.Tensor, (out_node, nodes[inp]))
        residual.meta = {"val": out_node.meta.get("val"), "accelkit": f"cache residual {index}"}
        values.append(residual)
    _append_outputs(graph, values)
    clone.recompile()
    return clone, tuple(f"cache.r{i}" for i in range(len(values)))


def build_cached_variant(
    module: fx.GraphModule, span: CachedSpan, approximation: str
) -> tuple[fx.GraphModule, tuple[str, ...], tuple[str, ...]]:
    """Cached variant: the span is replaced by its stored residual (or output)."""
    clone = clone_graph_module(module)
    graph = clone.graph
    nodes = {n.name: n for n in graph.nodes}
    count = len(span.outputs)
    taylor = approximation == "taylor"
    state_names = [f"cache.r{i}" for i in range(count)]
    if taylor:
        state_names += [f"cache.r{i}@prev" for i in range(count)]
    scalar_names = ["cache.taylor_coef"] if taylor else []
    placeholders = _new_placeholders(graph, state_names + scalar_names)
    stored = placeholders[:count]
    previous = placeholders[count : 2 * count] if taylor else []
    coefficient = placeholders[-1] if taylor else None
    span_nodes = {n for block in find_blocks(clone).blocks[span.start : span.stop] for n in block.nodes}
    # Insert the replacement right after the last span output so every later consumer sees it.
    anchor = max((nodes[o] for o in span.outputs), key=lambda n: list(graph.nodes).index(n))

    def emit(target, args):
        nonlocal anchor
        with graph.inserting_after(anchor):
            anchor = graph.call_function(target, args)
        return anchor

    for index, out in enumerate(span.outputs):
        out_node = nodes[out]
        estimate = stored[index]
        if taylor:
            delta = emit(aten.sub.Tensor, (stored[index], previous[index]))
            step = emit(aten.mul.Tensor, (delta, coefficient))
            estimate = emit(aten.add.Tensor, (stored[index], step))
        value = estimate
        if span.inputs[index] is not None:
            value = emit(aten.add.Tensor, (nodes[span.inputs[index]], estimate))
        if value is not stored[index]:
            value.meta = {"val": out_node.meta.get("val")}
        for user in list(out_node.users):
            if user.name not in span_nodes and user is not value:
                user.replace_input_with(out_node, value)
    eliminate_dead_nodes(graph)
    clone.recompile()
    return clone, tuple(state_names), tuple(scalar_names)


def taylor_coefficients(mask: np.ndarray) -> tuple[float, ...]:
    """Per step: (t - a) / (a - a_prev) with a, a_prev the last two full steps (0 until two exist)."""
    coefficients = []
    last = previous = None
    for step, full in enumerate(mask):
        if full:
            previous, last = last, step
            coefficients.append(0.0)
        elif last is None or previous is None:
            coefficients.append(0.0)
        else:
            coefficients.append((step - last) / (last - previous))
    return tuple(coefficients)


# ---------------------------------------------------------------- priors


def _relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    fa, fb = a.float().mean(dim=-2).reshape(-1), b.float().mean(dim=-2).reshape(-1)
    return float(1 - torch.nn.functional.cosine_similarity(fa, fb, dim=0))


def profile_prior(calib: CalibrationSource, probe: Program, kind: str, max_interval: int) -> np.ndarray:
    """e(t, k) for k = 1..K averaged over calibration prompts and CFG branches, shape (T, K + 1)."""
    generation = calib.generate(probe, record_states=True)
    steps = probe.num_steps
    prior = np.zeros((steps, max_interval + 1))
    counts = np.zeros_like(prior)
    measure = _relative_l1 if kind == "residual" else _one_minus_cos
    for log in generation.state_logs:
        by_branch: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        for step, branch, states in log:
            by_branch.setdefault(branch, {})[step] = states
        for per_step in by_branch.values():
            for t in range(steps):
                for k in range(1, max_interval + 1):
                    if t - k < 0 or t not in per_step or t - k not in per_step:
                        continue
                    now, before = per_step[t], per_step[t - k]
                    if not now or not before:
                        # A call that ran a program derived for other inputs writes no probe states
                        # (Lumina2's negative prompt: a capture of its own caption length).
                        continue
                    values = [measure(before[name], now[name]) for name in now]
                    prior[t, k] += float(np.mean(values))
                    counts[t, k] += 1
    return np.divide(prior, counts, out=np.zeros_like(prior), where=counts > 0)


def profile_end_to_end_costs(
    calib: CalibrationSource, program: Program, writers: Mapping[str, GraphVariant], cached: GraphVariant,
    max_gap: int,
    scalars: Sequence[str],
) -> np.ndarray:
    """costs[a, b]: final-image MSE when only steps a+1..b-1 are cached (assumed additive).

    ``writers`` are the full-compute variants instrumented to write the cache state, by the name the
    program's schedule uses; only steps that run ``"full"`` can be cached (others stay infinite).
    """
    steps = program.num_steps
    baseline = calib.generate(program.replace(variants=dict(writers))).images
    cacheable = np.array([name == "full" for name in program.schedule])
    costs = np.full((steps, steps), np.inf)
    for a in range(steps):
        costs[a, a + 1 : a + 2] = 0.0
        for b in range(a + 2, min(steps, a + max_gap + 1)):
            if not cacheable[a + 1 : b].all():
                continue
            mask = np.ones(steps, dtype=bool)
            mask[a + 1 : b] = False
            schedule = tuple(name if m else "cached" for name, m in zip(program.schedule, mask, strict=True))
            trial = program.replace(
                variants={**writers, "cached": cached},
                schedule=schedule,
                step_scalars={k: taylor_coefficients(mask) for k in scalars},
            )
            images = calib.generate(trial).images
            costs[a, b] = float(((images - baseline) ** 2).mean())
    return costs


# ---------------------------------------------------------------- hooks: report, seeds, probe

#: Cost of a cached step relative to a full one when the probe cannot measure it.
GUESSED_CACHED_STEP_COST = 0.2
#: The smallest full-step share the search space allows.
MIN_FULL_SHARE = CacheConfig.SEARCH_SPACE["full_fraction"].low


def cache_fraction_for(target: float, cached_cost: float = GUESSED_CACHED_STEP_COST) -> float:
    """Full-step share meeting ``target`` when a cached step costs ``cached_cost`` of a full one.

    A cached step still runs the blocks outside the span (and the embedders), about a fifth of a full
    step on the zoo model; the search corrects the guess.
    """
    return max(MIN_FULL_SHARE, min(1.0, (1.0 / target - cached_cost) / (1.0 - cached_cost)))


def _seed_config(full_share: float, approximation: str, warmup: int) -> dict[str, Any]:
    return {"full_fraction": full_share, "first_blocks": 1, "last_blocks": 0, "approximation": approximation,
            "schedule": "dp", "prior": "residual", "weighting": "quadratic", "warmup": warmup}


def seeds(request: SeedRequest) -> list[Seed]:
    """The cache alone: a residual-reuse DP schedule with the full-step share the budget needs."""
    cached_cost = request.facts.get("cached_cost", GUESSED_CACHED_STEP_COST)
    return [Seed(_seed_config(cache_fraction_for(request.target, cached_cost), "residual", 1), priority=3)]


def complete(request: SeedRequest) -> dict[str, Any] | None:
    """A Taylor-extrapolated cache meeting what a leading pass left of the budget, or None.

    With ``F`` full and ``n - F`` cached steps the cost is ``F + (n - F) * c`` full steps, so the most
    full steps meeting the speedup are ``F = floor((n / target - n c) / (1 - c))``; the pass rounds
    ``full_fraction * n`` and the space floors the share at :data:`MIN_FULL_SHARE`.
    """
    cached_cost = request.facts.get("cached_cost", GUESSED_CACHED_STEP_COST)
    count = request.num_steps
    if count is None:
        return _seed_config(cache_fraction_for(request.target, cached_cost), "taylor", 0)
    allowed = count / (request.target * (1 - BUDGET_TOLERANCE))  # full-step equivalents allowed
    full = math.floor((allowed - count * cached_cost) / (1 - cached_cost) + 1e-9)
    if full >= max(2, math.ceil(MIN_FULL_SHARE * count)) and full < count:
        return _seed_config(full / count, "taylor", 0)
    return None


def probe(context: ProbeContext) -> dict[str, Any]:
    """``cached_cost``: a cached step's cost relative to a full one, from a uniform cache (no calibration)."""
    steps = context.num_steps
    try:
        program, _ = run_passes(context.base, [CacheConfig(full_fraction=0.5, schedule="uniform")], None)
    except Exception:  # noqa: BLE001 - a denoiser the cache cannot split: seeds fall back to a guess
        return {"cached_cost": GUESSED_CACHED_STEP_COST}
    full = sum(1 for name in program.schedule if WRITES_CACHE_STATE in program.variants[name].roles)
    cached = steps - full
    per_step = context.cost(context.base) / steps
    ratio = (context.cost(program) / per_step - full) / max(cached, 1)
    return {"cached_cost": float(min(0.95, max(0.01, ratio)))}


def describe(resolved: Mapping[str, Any], stats: Mapping[str, Any]) -> str | None:
    """The full steps and the reused span, in words."""
    if "span_blocks" not in stats:
        return None
    span = stats["span_blocks"]
    return (f"compute {stats['full_steps']} of {stats['num_steps']} steps fully; on the others reuse the "
            f"{resolved['approximation']} of blocks {span[0]}..{int(span[1]) - 1} ({resolved['schedule']} schedule)")


def ablations(resolved: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Ablation]:
    """A DP schedule against the uniform one with the same number of full steps."""
    if "span_blocks" not in stats or resolved.get("schedule") != "dp":
        return {}
    full_steps = len(resolved["full_step_mask"])
    uniform = {**resolved, "schedule": "uniform", "full_step_mask": None,
               "full_fraction": full_steps / stats["num_steps"]}
    return {"uniform_cache": Ablation(uniform, "same plan with a uniform cache schedule", {"full_steps": full_steps})}


# ---------------------------------------------------------------- the pass


@register_pass(CacheConfig, name="cache", after=("steps", "prune", "quant", "sparse"),
               hooks=PassHooks(describe=describe, seeds=seeds, complete=complete, probe=probe, ablations=ablations))
def cache(program: Program, config: CacheConfig, calib: CalibrationSource | None) -> PassResult:
    """Insert the span cache and choose the full-compute steps.

    Args:
        program: input program (its ``full`` variant is the graph to cache).
        config: the cache settings.
        calib: the calibration source; needed only for ``schedule="dp"`` without a
            resolved ``full_step_mask``.
    """
    steps = program.num_steps
    if config.is_noop() or config.full_steps(steps) >= steps:
        return PassResult(program, modified=False, stats={"full_steps": steps, "num_steps": steps})
    # Steps that run another full-compute variant (role DENSE, e.g. block-sparse attention's dense first
    # steps) must stay full steps: the cached variant is derived from "full" alone. They may only lead
    # the schedule, where they act as a cache warm-up.
    forced = sum(1 for _ in itertools.takewhile(
        lambda name: name != "full" and DENSE in program.variants[name].roles, program.schedule))
    others = sorted(set(program.schedule[forced:]) - {"full"})
    if others:
        raise InputError(
            f"the cache pass can cache only 'full' steps after any leading dense steps, but the schedule "
            f"also runs {others} later; combine cache with a schedule of 'full' steps"
        )
    base = program.variants["full"]
    span = locate_span(base.module, config.first_blocks, config.last_blocks)
    full_module, state_names = build_full_variant(base.module, span)
    cached_module, cached_inputs, scalar_names = build_cached_variant(base.module, span, config.approximation)
    full = GraphVariant(full_module, base.state_inputs, (*base.state_outputs, *state_names), base.scalar_inputs,
                        base.roles | {WRITES_CACHE_STATE})
    cached = GraphVariant(cached_module, (*base.state_inputs, *cached_inputs), base.state_outputs,
                          (*base.scalar_inputs, *scalar_names))
    # Every full-compute variant writes the cache state, so a cached step may follow any of them.
    writers = {"full": full}
    for name in sorted(set(program.schedule[:forced])):
        other = program.variants[name]
        other_span = locate_span(other.module, config.first_blocks, config.last_blocks)
        other_module, other_states = build_full_variant(other.module, other_span)
        if other_states != state_names:
            raise InputError(f"cache: variant '{name}' has a different block structure than 'full'")
        writers[name] = dataclasses.replace(other, module=other_module,
                                            state_outputs=(*other.state_outputs, *other_states),
                                            roles=other.roles | {WRITES_CACHE_STATE})
    full_steps = config.full_steps(steps)
    warmup = max(config.warmup, forced)
    stats: dict[str, Any] = {
        "span_blocks": [span.start, span.stop],
        "mode": "residual" if span.residual else "output reuse",
        "num_steps": steps,
    }
    if config.full_step_mask is not None:
        mask = np.zeros(steps, dtype=bool)
        indices = list(config.full_step_mask)
        if any(not 0 <= i < steps for i in indices) or 0 not in indices:
            raise InputError(f"cache.full_step_mask {indices} does not fit {steps} steps (step 0 must be full)")
        mask[indices] = True
        if not mask[:forced].all():
            raise InputError(f"cache.full_step_mask {indices} caches one of the first {forced} (dense) steps")
    elif config.schedule == "uniform":
        mask = schedules.uniform_schedule(steps, full_steps)
        mask[:forced] = True
    else:
        if calib is None:
            raise InputError("the DP cache schedule needs calibration data; pass a Calibrator or a full_step_mask")
        max_gap = config.max_gap or max(2, int(np.ceil(steps / max(full_steps - 1, 1))) * 2)
        order = _multistep_order(calib) if config.solver_gap else 1
        if order > 1:
            max_gap = min(max_gap, order)
            stats["solver_order_gap"] = order
        if config.prior == "end_to_end":
            costs = calib.cached(
                "cache-e2e", program,
                lambda: profile_end_to_end_costs(calib, program, writers, cached, max_gap, scalar_names),
                span=[span.start, span.stop], approximation=config.approximation, max_gap=max_gap,
            )
            try:
                mask = schedules.dp_schedule_from_costs(_apply_weighting(costs, config.weighting), full_steps,
                                                        warmup=warmup)
            except ValueError as error:
                raise InputError(f"cache: {error}; allow more full steps or less warm-up") from None
            objective = float(_mask_cost(costs, mask))
            derived_from = np.where(np.isfinite(costs), costs, -1.0)
        else:
            probe = program.replace(variants={**program.variants, **writers})
            # A fixed profiling window keeps one cached prior valid for every full-step count.
            interval = min(steps - 1, PRIOR_MAX_INTERVAL)
            prior = calib.cached(
                "cache-prior", program, lambda: profile_prior(calib, probe, config.prior, interval),
                span=[span.start, span.stop], prior=config.prior, interval=interval,
            )
            try:
                mask = schedules.dp_schedule(prior, full_steps, weighting=config.weighting,
                                             max_gap=max_gap if order > 1 else config.max_gap, warmup=warmup)
            except ValueError as error:
                raise InputError(f"cache: {error}; allow more full steps or less warm-up") from None
            objective = schedules.schedule_objective(prior, mask, config.weighting)
            derived_from = prior
            uniform = schedules.uniform_schedule(steps, full_steps)
            stats["uniform_objective"] = schedules.schedule_objective(prior, uniform, config.weighting)
        stats["objective"] = objective
    schedule = tuple(name if m else "cached" for name, m in zip(program.schedule, mask, strict=True))
    step_scalars = dict(program.step_scalars)
    if scalar_names:
        step_scalars["cache.taylor_coef"] = taylor_coefficients(mask)
    new_program = program.replace(variants={**program.variants, **writers, "cached": cached},
                                  schedule=schedule, step_scalars=step_scalars)
    stats.update(full_steps=int(mask.sum()), schedule=schedules.describe_schedule(mask))
    resolved_fields = {**config.to_dict(), "full_step_mask": tuple(int(i) for i in np.flatnonzero(mask))}
    if config.full_step_mask is None and config.schedule == "dp":
        resolved_fields["schedule_prior"] = tuple(tuple(float(v) for v in row) for row in derived_from)
    resolved = CacheConfig.from_dict(resolved_fields)
    return PassResult(new_program, modified=True, stats=stats, resolved_config=resolved)


def _multistep_order(calib: CalibrationSource) -> int:
    """The order of the calibration pipeline's multistep sampler (1 for one-step samplers)."""
    return int(calib.scheduler.config.get("solver_order") or 1)


def _apply_weighting(costs: np.ndarray, weighting: str) -> np.ndarray:
    steps = costs.shape[0]
    gaps = np.arange(steps)[None, :] - np.arange(steps)[:, None]
    weights = schedules.gap_weight(np.maximum(gaps, 1), weighting)
    # The end-to-end cost already measures the whole interval; weighting only reshapes the schedule.
    weighted = costs * np.where(np.isfinite(costs), np.maximum(weights, 1.0), 1.0)
    return weighted


def _mask_cost(costs: np.ndarray, mask: np.ndarray) -> float:
    full = np.flatnonzero(mask)
    return float(sum(costs[a, b] for a, b in zip(full[:-1], full[1:], strict=True)))
