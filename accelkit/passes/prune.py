"""Layer pruning: remove whole repeated blocks, chosen LAPTOP-Diff style (one-shot, additive losses).

A block is removed by wiring its outputs to its inputs: each block output is paired with the block
input it is a *residual update* of, every use of the output after the block reads the input instead,
and dead-code elimination drops the block's nodes. The pairing is found in the graph, not from model
knowledge: walking back from an output through residual adds, scalar scalings, dtype casts, views and
matching ``cat``/``slice`` pairs (the Flux single-stream block concatenates text and image tokens and
slices them apart again) must reach a block input of the same shape and dtype. Blocks whose outputs
cannot all be paired so (UNet down/up blocks change shape; their skip connections are not residual
paths) are not candidates.

Which blocks go (``score="output_mse"``): the one-shot removal loss of every candidate block, the MSE
between the denoiser output with and without that block, averaged over denoiser inputs recorded while
the input program generates the calibration prompts (a spread of timesteps), is assumed additive over
blocks (LAPTOP-Diff); the set with the smallest summed loss whose FLOPs reach ``fraction`` of all block
FLOPs is then an exact 0/1 knapsack (:func:`select_min_loss`). ``"last"`` and ``"random"`` are
baseline criteria that remove candidates from the end / in a seeded random order until the FLOPs
target is reached.

Recovery: ``accelkit distill`` (:mod:`accelkit.workflows.recover`, training in :mod:`accelkit.calibrate.distill`)
trains the pruned graph's weights and stores them in ``Program.new_weights`` under ``prune.<weight name>``;
the pass, replaying a plan, gives the pruned graph those tensors (:func:`~accelkit.capture.graph.replace_weights`)
instead of the original ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import fx

from accelkit.capture.blocks import BlockIndex, find_blocks
from accelkit.capture.cost import graph_costs
from accelkit.capture.graph import clone_graph_module, eliminate_dead_nodes, replace_weights
from accelkit.capture.streams import BlockPairing, pair_block_outputs, removal_candidates
from accelkit.errors import InputError
from accelkit.passes.base import (
    Choice,
    FloatRange,
    GraphVariant,
    PassConfig,
    PassResult,
    Program,
    register_pass,
)
from accelkit.passes.hooks import PassHooks

__all__ = [
    "SCORES",
    "BlockPairing",
    "PruneConfig",
    "block_flops",
    "measure_additivity",
    "pair_block_outputs",
    "prune",
    "record_calibration_inputs",
    "recovered_weight_key",
    "remove_blocks",
    "removal_candidates",
    "replace_weights",
    "score_blocks",
    "select_min_loss",
]

aten = torch.ops.aten

SCORES = ("output_mse", "last", "random")
# How many recorded denoiser calls the output-MSE scores average over (spread over the trajectory).
DEFAULT_SCORE_CALLS = 8
# FLOPs are discretized to this many units of the total candidate FLOPs for the knapsack DP.
KNAPSACK_RESOLUTION = 1000
# Program.new_weights prefix of the tensors `accelkit distill` trained for the pruned graph.
RECOVERED_WEIGHT_PREFIX = "prune."


@dataclass(frozen=True, kw_only=True)
class PruneConfig(PassConfig):
    """Remove whole repeated blocks of the denoiser (depth pruning).

    Args:
        fraction: share of the blocks' FLOPs (all repeated blocks together) to remove; 0 = no-op.
            The removed set is the cheapest by ``score`` whose FLOPs reach at least this share.
        score: how blocks are chosen: ``"output_mse"`` (LAPTOP-Diff: one-shot per-block removal loss,
            the MSE between the denoiser output with and without the block on calibration inputs at a
            spread of timesteps, summed over the set; needs calibration), ``"last"`` (remove the last
            candidates; baseline) or ``"random"`` (a seeded random order; baseline).
        random_seed: seed of the ``"random"`` order.
        removed_blocks: the resolved choice, block names such as ``"transformer_blocks.3"``; when given,
            ``fraction``, ``score`` and the protections are not used and no calibration runs (plans
            store it).
        protect_first: number of leading blocks never removed.
        protect_last: number of trailing blocks never removed.
    """

    fraction: float = 0.0
    score: str = "output_mse"
    random_seed: int = 0
    removed_blocks: tuple[str, ...] | None = None
    protect_first: int = 1
    protect_last: int = 1

    SEARCH_SPACE: ClassVar = {
        "fraction": FloatRange(0.0, 0.5),
        "score": Choice(("output_mse",)),
    }

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float):
            raise InputError(f"prune.fraction must be a number in [0, 1), got {self.fraction!r}")
        if not 0.0 <= self.fraction < 1.0:
            raise InputError(f"prune.fraction must be in [0, 1), got {self.fraction}")
        if self.score not in SCORES:
            raise InputError(f"prune.score must be one of {SCORES}, got {self.score!r}")
        for name in ("protect_first", "protect_last", "random_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (name != "random_seed" and value < 0):
                raise InputError(f"prune.{name} must be a non-negative integer, got {value!r}")
        if self.removed_blocks is not None:
            if isinstance(self.removed_blocks, str) or not all(isinstance(b, str) for b in self.removed_blocks):
                raise InputError(f"prune.removed_blocks must be a list of block names, got {self.removed_blocks!r}")
            if len(set(self.removed_blocks)) != len(self.removed_blocks):
                raise InputError(f"prune.removed_blocks lists a block twice: {list(self.removed_blocks)}")

    def is_noop(self) -> bool:
        if self.removed_blocks is not None:
            return len(self.removed_blocks) == 0
        return self.fraction == 0.0


# ---------------------------------------------------------------- which blocks can be removed




def remove_blocks(module: fx.GraphModule, pairings: Sequence[BlockPairing]) -> fx.GraphModule:
    """A copy of ``module`` (sharing its weights) with the given removable blocks wired through.

    Raises:
        ValueError: a pairing is not removable, or a removed block's node survives elimination.
    """
    clone = clone_graph_module(module)
    if not pairings:
        return clone
    graph = clone.graph
    nodes = {n.name: n for n in graph.nodes}
    blocks = find_blocks(clone)
    by_name = {b.name: b for b in blocks}
    substitute: dict[str, str] = {}
    for pairing in pairings:
        if not pairing.removable:
            raise ValueError(f"block '{pairing.name}' cannot be removed: {pairing.reason}")
        substitute.update(dict(pairing.pairs))

    def resolve(name: str) -> str:
        # Adjacent removed blocks: the next block's input is this block's output, itself replaced.
        while name in substitute:
            name = substitute[name]
        return name

    for pairing in pairings:
        members = set(by_name[pairing.name].nodes)
        for out, _ in pairing.pairs:
            replacement = nodes[resolve(out)]
            for user in list(nodes[out].users):
                if user.name not in members:
                    user.replace_input_with(nodes[out], replacement)
    # Erase the blocks' nodes explicitly: plain dead-code elimination keeps side-effect nodes that
    # torch.export leaves in (``_assert_tensor_metadata`` checks, eval-mode ``dropout``) and with them
    # everything they read. Every use outside a block now reads the paired input, so walking a block
    # backwards erases each node after all its users.
    for pairing in pairings:
        members = set(by_name[pairing.name].nodes)
        for node in reversed(list(graph.nodes)):
            if node.name in members and node.op == "call_function":
                if node.users:
                    raise ValueError(f"block '{pairing.name}' node '{node.name}' is still used by "
                                     f"{[u.name for u in node.users]}")
                graph.erase_node(node)
    eliminate_dead_nodes(graph)
    graph.lint()
    clone.recompile()
    removed = {p.name for p in pairings}
    leftovers = [n.name for n in graph.nodes
                 if n.op == "call_function" and _block_path(n) in removed]
    if leftovers:
        raise ValueError(f"removing {sorted(removed)} left block node(s) {leftovers[:5]} in the graph")
    return clone


def _block_path(node: fx.Node) -> str | None:
    from accelkit.capture.blocks import _block_of_stack

    found = _block_of_stack(node.meta.get("nn_module_stack"))
    return found[0] if found else None


def recovered_weight_key(target: str) -> str:
    """Key in ``Program.new_weights`` of a recovered (distilled) weight: ``prune.<get_attr target>``."""
    return RECOVERED_WEIGHT_PREFIX + target


def block_flops(module: fx.GraphModule, blocks: BlockIndex | None = None) -> dict[str, float]:
    """FLOPs of each block of ``module`` (sum over its nodes of :func:`accelkit.capture.cost.graph_costs`)."""
    blocks = find_blocks(module) if blocks is None else blocks
    costs = graph_costs(module)
    return {b.name: float(sum(costs[n].flops for n in b.nodes if n in costs)) for b in blocks}


# ---------------------------------------------------------------- selection


def select_min_loss(
    scores: Sequence[float], flops: Sequence[float], target: float, *, resolution: int = KNAPSACK_RESOLUTION
) -> tuple[int, ...]:
    """Indices of the set with the smallest summed score whose summed FLOPs reach ``target``.

    An exact 0/1 knapsack DP over covered FLOPs capped at the target. FLOPs are measured in units of
    ``sum(flops) / resolution`` when they are not already integers summing to at most ``resolution``;
    item weights are rounded *down* and the target *up*, so any set the DP accepts truly reaches the
    target; a second DP over weights rounded to the nearest unit catches sets that reach it by less
    than a unit per item, used when their real FLOPs reach the target at a lower summed score. With
    integer FLOPs summing to at most ``resolution`` the DP is exact. Ties go to the set found first
    (earlier indices).

    Raises:
        InputError: even all items together do not reach ``target``.
    """
    flops = [float(f) for f in flops]
    scores = [float(s) for s in scores]
    if len(flops) != len(scores):
        raise ValueError("scores and flops differ in length")
    total = sum(flops)
    if target <= 0:
        return ()
    if total < target * (1 - 1e-12):
        raise InputError(
            f"the removable blocks hold {total:.4g} FLOPs, less than the {target:.4g} asked for: lower "
            "prune.fraction or prune.protect_first/protect_last"
        )
    if all(f.is_integer() for f in flops) and total <= resolution:
        weights = [int(f) for f in flops]
        need = int(np.ceil(target - 1e-9))
        return _knapsack(weights, scores, need)
    unit = total / resolution
    need = int(np.ceil(target / unit - 1e-9))
    floor = [int(np.floor(f / unit + 1e-9)) for f in flops]
    safe = _knapsack(floor, scores, min(need, sum(floor)))
    # Rounding every weight down can miss a set that reaches the target by less than a unit per block
    # (three of the zoo model's 1/6 blocks hold 0.5000009 of its block FLOPs): a DP over rounded-to-
    # nearest weights finds such sets, kept when their true FLOPs do reach the target and they lose less.
    nearest = [int(np.rint(f / unit)) for f in flops]
    try:
        close = _knapsack(nearest, scores, min(need, sum(nearest)))
    except InputError:
        return safe
    if sum(flops[i] for i in close) < target * (1 - 1e-12):
        return safe
    return min((close, safe), key=lambda chosen: (sum(scores[i] for i in chosen), sum(flops[i] for i in chosen)))


def _knapsack(weights: list[int], scores: list[float], need: int) -> tuple[int, ...]:
    """DP table ``best[i, c]``: least score of a subset of the first ``i`` items covering ``min(need, c)``."""
    count = len(weights)
    best = np.full((count + 1, need + 1), np.inf)
    best[0, 0] = 0.0
    for i, (weight, score) in enumerate(zip(weights, scores, strict=True)):
        best[i + 1] = best[i]
        for covered in np.flatnonzero(np.isfinite(best[i])):
            reached = min(need, int(covered) + weight)
            best[i + 1, reached] = min(best[i + 1, reached], best[i, covered] + score)
    if not np.isfinite(best[count, need]):
        raise InputError("no set of removable blocks reaches the FLOPs target")
    chosen: list[int] = []
    covered = need
    for i in range(count, 0, -1):
        if best[i, covered] == best[i - 1, covered]:
            continue  # reachable without item i - 1
        weight, score = weights[i - 1], scores[i - 1]
        # The table value was the minimum over exactly these sums, so one of them matches bit for bit.
        covered = next(c for c in range(need + 1)
                       if min(need, c + weight) == covered and best[i - 1, c] + score == best[i, covered])
        chosen.append(i - 1)
    return tuple(sorted(chosen))


def _ordered_until(order: Iterable[int], flops: Sequence[float], target: float) -> tuple[int, ...]:
    chosen: list[int] = []
    removed = 0.0
    for i in order:
        if removed >= target * (1 - 1e-12):
            break
        chosen.append(i)
        removed += flops[i]
    if removed < target * (1 - 1e-12):
        raise InputError(
            f"the removable blocks hold {removed:.4g} FLOPs, less than the {target:.4g} asked for: lower "
            "prune.fraction or prune.protect_first/protect_last"
        )
    return tuple(sorted(chosen))


# ---------------------------------------------------------------- calibration


def record_calibration_inputs(
    program: Program, calib: Any, max_calls: int = DEFAULT_SCORE_CALLS
) -> list[list[torch.Tensor]]:
    """Flat graph inputs of ``max_calls`` denoiser calls spread over the calibration generations.

    The input program generates every calibration prompt (so the step count and sigmas of an earlier
    ``steps`` pass apply) while a forward pre-hook on the pipeline's denoiser records its inputs; the
    kept calls are evenly spaced over all recorded calls, hence over timesteps and prompts.
    """
    from accelkit.pipeline_io import bind_positional, find_denoiser, positional_parameter_names

    _, denoiser = find_denoiser(calib.pipe)
    positional = positional_parameter_names(denoiser)
    recorded: list[list[torch.Tensor]] = []

    def hook(module: Any, args: Any, kwargs: Any) -> None:
        bound = bind_positional(positional, args, dict(kwargs))
        recorded.append([t.detach().clone() for t in program.graph.flat_inputs(bound)])

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        calib.generate(program)
    finally:
        handle.remove()
    if not recorded:
        raise InputError("the calibration generations never called the denoiser")
    keep = sorted({int(round(x)) for x in np.linspace(0, len(recorded) - 1, min(max_calls, len(recorded)))})
    return [recorded[i] for i in keep]


def _user_outputs(module: fx.GraphModule, inputs: Sequence[torch.Tensor], count: int) -> list[torch.Tensor]:
    with torch.no_grad():
        outputs = module(*inputs)
    return [o.detach().double() for o in tuple(outputs)[:count]]


def _output_mse(module: fx.GraphModule, calls: Sequence[Sequence[torch.Tensor]],
                references: Sequence[Sequence[torch.Tensor]], count: int) -> float:
    total = 0.0
    for inputs, reference in zip(calls, references, strict=True):
        outputs = _user_outputs(module, inputs, count)
        total += float(np.mean([float(((o - r) ** 2).mean()) for o, r in zip(outputs, reference, strict=True)]))
    return total / max(len(calls), 1)


def score_blocks(
    module: fx.GraphModule,
    pairings: Sequence[BlockPairing],
    calls: Sequence[Sequence[torch.Tensor]],
    num_user_outputs: int,
) -> np.ndarray:
    """One-shot removal loss per pairing: mean over ``calls`` of MSE(output without the block, output)."""
    references = [_user_outputs(module, inputs, num_user_outputs) for inputs in calls]
    scores = []
    for pairing in pairings:
        pruned = remove_blocks(module, [pairing])
        scores.append(_output_mse(pruned, calls, references, num_user_outputs))
    return np.asarray(scores, dtype=np.float64)


def _calibrated_scores(
    program: Program, calib: Any, candidates: Sequence[BlockPairing], max_calls: int = DEFAULT_SCORE_CALLS
) -> tuple[np.ndarray, Callable[[], list[list[torch.Tensor]]]]:
    """Scores of ``candidates`` from the calibrator's cache (computed on a miss) and a lazy call recorder."""
    calls_cache: list[list[list[torch.Tensor]]] = []

    def calls() -> list[list[torch.Tensor]]:
        if not calls_cache:
            calls_cache.append(record_calibration_inputs(program, calib, max_calls))
        return calls_cache[0]

    module = program.variants["full"].module
    key = calib.cache_key("prune-scores", program, candidates=[c.name for c in candidates], calls=max_calls)
    scores = calib.cached_array(
        key, lambda: score_blocks(module, candidates, calls(), program.graph.num_user_outputs)
    )
    return np.asarray(scores, dtype=np.float64), calls


def measure_additivity(
    program: Program, calib: Any, sets: Sequence[Sequence[str]], *, max_calls: int = DEFAULT_SCORE_CALLS
) -> list[tuple[float, float]]:
    """LAPTOP-Diff's additivity check: per set of block names, (sum of single-block losses, actual loss).

    The actual loss is the output MSE with the whole set removed, on the same recorded calibration
    inputs the single-block scores use. Not run by the pass; for reports and experiments.
    """
    full = program.sole_full_variant("prune")
    pairings = {p.name: p for p in removal_candidates(full.module)}
    candidates = [p for p in pairings.values() if p.removable]
    scores, calls = _calibrated_scores(program, calib, candidates, max_calls)
    by_name = dict(zip((c.name for c in candidates), scores, strict=True))
    count = program.graph.num_user_outputs
    references = [_user_outputs(full.module, inputs, count) for inputs in calls()]
    results = []
    for names in sets:
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise InputError(f"block(s) {unknown} are not removable; removable: {sorted(by_name)}")
        pruned = remove_blocks(full.module, [pairings[n] for n in names])
        predicted = float(sum(by_name[n] for n in names))
        results.append((predicted, _output_mse(pruned, calls(), references, count)))
    return results


# ---------------------------------------------------------------- the pass


def _candidate_stats(pairings: Sequence[BlockPairing], protected: set[str]) -> dict[str, Any]:
    return {
        "blocks": [p.name for p in pairings],
        "candidates": [p.name for p in pairings if p.removable and p.name not in protected],
        "protected": [p.name for p in pairings if p.removable and p.name in protected],
        "non_candidates": {p.name: p.reason for p in pairings if not p.removable},
    }


def describe(resolved: Mapping[str, Any], stats: Mapping[str, Any]) -> str | None:
    """The removed blocks and their share of the block FLOPs, in words."""
    removed = stats.get("removed_blocks") or []
    if not removed:
        return None
    fraction = stats.get("removed_flops_fraction", 0.0)
    return f"remove {len(removed)} block(s) ({', '.join(map(str, removed))}; {fraction:.0%} of block FLOPs)"


@register_pass(PruneConfig, name="prune", after=("steps",), hooks=PassHooks(describe=describe))
def prune(program: Program, config: PruneConfig, calib: Any) -> PassResult:
    """Remove whole blocks from the ``full`` variant.

    Args:
        program: input program; must have only the ``full`` variant (prune runs before cache).
        config: the pruning settings.
        calib: a :class:`accelkit.calibrate.Calibrator`; needed only for ``score="output_mse"`` without
            a resolved ``removed_blocks``.
    """
    if not config.is_noop():
        program.sole_full_variant("prune")
    full = program.variants["full"]
    module = full.module
    blocks = find_blocks(module)
    pairings = removal_candidates(module, blocks)
    count = len(pairings)
    protected = {p.name for p in pairings[: config.protect_first]}
    protected |= {p.name for p in pairings[max(0, count - config.protect_last):]} if config.protect_last else set()
    stats: dict[str, Any] = _candidate_stats(pairings, protected)
    if config.is_noop():
        stats.update(removed_blocks=[], removed_flops_fraction=0.0)
        return PassResult(program, modified=False, stats=stats, resolved_config=config)
    flops = block_flops(module, blocks)
    total_block_flops = float(sum(flops.values()))
    by_name = {p.name: p for p in pairings}
    if config.removed_blocks is not None:
        unknown = [n for n in config.removed_blocks if n not in by_name]
        if unknown:
            raise InputError(f"prune.removed_blocks names unknown block(s) {unknown}; blocks: {list(by_name)}")
        bad = {n: by_name[n].reason for n in config.removed_blocks if not by_name[n].removable}
        if bad:
            raise InputError(f"prune.removed_blocks lists block(s) that cannot be removed: {bad}")
        chosen = sorted(config.removed_blocks, key=lambda n: by_name[n].index)
    else:
        candidates = [p for p in pairings if p.removable and p.name not in protected]
        weights = [flops[c.name] for c in candidates]
        target = config.fraction * total_block_flops
        stats.update(score=config.score, target_flops_fraction=config.fraction)
        if config.score == "output_mse":
            if calib is None:
                raise InputError("prune.score='output_mse' needs calibration data; pass a Calibrator or removed_blocks")
            # Every removable block is scored (protected ones too): the cached vector then serves any
            # protection setting and measure_additivity.
            removable = [p for p in pairings if p.removable]
            all_scores, _ = _calibrated_scores(program, calib, removable)
            by_block = {p.name: float(s) for p, s in zip(removable, all_scores, strict=True)}
            scores = [by_block[c.name] for c in candidates]
            picked = select_min_loss(scores, weights, target)
            stats["scores"] = by_block
            stats["predicted_loss"] = float(sum(scores[i] for i in picked))
        elif config.score == "last":
            picked = _ordered_until(reversed(range(len(candidates))), weights, target)
        else:
            order = np.random.default_rng(config.random_seed).permutation(len(candidates))
            picked = _ordered_until((int(i) for i in order), weights, target)
        chosen = [candidates[i].name for i in picked]
    if not chosen:
        stats.update(removed_blocks=[], removed_flops_fraction=0.0)
        return PassResult(program, modified=False, stats=stats, resolved_config=config)
    pruned = remove_blocks(module, [by_name[n] for n in chosen])
    recovered = {key.removeprefix(RECOVERED_WEIGHT_PREFIX): tensor for key, tensor in program.new_weights.items()
                 if key.startswith(RECOVERED_WEIGHT_PREFIX)}
    if recovered:
        # A plan that `accelkit distill` recovered replays with the student's weights.
        pruned = replace_weights(pruned, recovered)
        stats["recovered_weights"] = len(recovered)
    before = float(sum(c.flops for c in graph_costs(module).values()))
    after = float(sum(c.flops for c in graph_costs(pruned).values()))
    stats.update(
        removed_blocks=list(chosen),
        removed_flops_fraction=(before - after) / total_block_flops if total_block_flops else 0.0,
        removed_graph_flops_fraction=(before - after) / before if before else 0.0,
        block_flops=flops,
    )
    variant = GraphVariant(pruned, full.state_inputs, full.state_outputs, full.scalar_inputs)
    new_program = program.replace(variants={"full": variant})
    resolved = PruneConfig.from_dict({**config.to_dict(), "removed_blocks": list(chosen)})
    return PassResult(new_program, modified=bool(chosen), stats=stats, resolved_config=resolved)

