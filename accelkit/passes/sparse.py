"""Attention sparsification: SpargeAttn-style block-sparse attention with a per-site calibrated τ.

Each eligible ``aten.scaled_dot_product_attention`` node of the ``full`` variant is replaced by

    counts, indices = accelkit::predict_block_mask(q, k, block_q, block_k, tau, ...)
    out = accelkit::block_sparse_attention(q, k, v, counts, indices, block_q, block_k, scale)

The mask is SpargeAttn's: mean-pool Q blocks and K blocks, softmax of the pooled scores, keep the
smallest set of KV blocks per query block whose pooled mass reaches τ (top-p). For joint attention
(Flux, SD3) the text tokens' rows and columns stay dense; the text token count is the
``encoder_hidden_states`` input's token count and its side (first in Flux, last in SD3) is read from
the ``cat`` that builds the joint sequence. A site stays dense when it has an ``attn_mask`` (PixArt's
cross-attention with the caption mask), is causal, uses dropout or GQA, or has fewer than
``min_tokens`` KV tokens; the reasons are listed in the stats.

Calibration (no ``taus`` given): the dense ``full`` graph runs on denoiser inputs recorded while the
input program generates the calibration prompts (a spread of steps, ``CalibrationSource.denoiser_inputs``);
at every eligible site the relative L1 error ``||O_sparse - O_dense||_1 / ||O_dense||_1`` and the kept
share of the attention FLOPs are measured for a fixed grid of τ (:data:`TAU_GRID`), averaged over the
calls. The profile does not depend on ``l1_budget`` and is cached by the calibrator, so search trials
with other budgets reuse it; per site the smallest grid τ whose mean error, and that of every larger τ,
stays within the budget is chosen (the grid stands in for a binary search, which would tie the cached
measurement to one budget).

``dense_steps``: the first steps run the original graph, kept as variant ``"full_dense"`` with the
role :data:`accelkit.passes.hooks.DENSE` (later passes treat it as a full-compute step by that role).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import fx

from accelkit.calibrate.source import CalibrationSource
from accelkit.capture.graph import clone_graph_module, eliminate_dead_nodes
from accelkit.errors import InputError
from accelkit.families import traits_for
from accelkit.kernels.block_sparse_attention import block_sparse_attention_reference
from accelkit.kernels.block_sparse_attention.mask_op import (
    predict_block_mask_with_dense_tokens,  # registers the op
)
from accelkit.kernels.block_sparse_attention.reference import dense_mask_from_indices, num_blocks
from accelkit.passes.base import (
    Choice,
    FloatRange,
    GraphVariant,
    IntRange,
    PassConfig,
    PassResult,
    Program,
    register_pass,
)
from accelkit.passes.hooks import DENSE, PassHooks

__all__ = [
    "KEPT_FRACTION_META",
    "TAU_GRID",
    "AttentionSite",
    "SparseConfig",
    "attention_sites",
    "choose_taus",
    "kept_fraction",
    "profile_sites",
    "sparsify_module",
    "sparse",
]

aten = torch.ops.aten

# node.meta key holding the calibrated mean kept share of a sparse attention node's dense FLOPs.
KEPT_FRACTION_META = "accelkit_kept_fraction"
# τ candidates of the calibration, ascending; dense near 1 where the error changes fastest.
TAU_GRID: tuple[float, ...] = tuple(
    float(t) for t in sorted({round(1.0 - x, 6) for x in np.geomspace(0.9, 1e-4, 27)} | {1.0})
)
DEFAULT_CALIBRATION_CALLS = 8


@dataclass(frozen=True, kw_only=True)
class SparseConfig(PassConfig):
    """Replace attention by SpargeAttn-style block-sparse attention, τ calibrated per site.

    Args:
        l1_budget: relative L1 error budget of each attention site's output,
            ``||O_sparse - O_dense||_1 / ||O_dense||_1`` averaged over the calibration calls
            (SpargeAttn uses ~0.06); ``0`` = no-op (attention stays dense).
        block_q: query block size of the mask (and of the kernel).
        block_k: key/value block size.
        min_tokens: attention with fewer KV tokens stays dense. Below a few thousand tokens building
            the mask costs about what skipping blocks saves; 4096 is a placeholder from the literature
            until it is measured on the target GPU. Fidelity studies on small models use 0.
        dense_steps: the first denoising steps run the original dense graph (variant ``"full_dense"``).
        text_tokens_dense: in joint attention (Flux, SD3) keep the text tokens' rows and columns dense.
        similarity_threshold: SpargeAttn's θ: query/key blocks whose mean pairwise cosine similarity is
            below it stay dense; ``None`` disables the rule.
        taus: the resolved top-p τ of every sparse site, in graph order (stats list the sites); when
            given, no calibration runs (plans store it).
        kept_fractions: the calibrated mean kept share of each sparse site's attention FLOPs, in the
            order of ``taus``; only feeds the cost model (stored in plans next to ``taus``).
        mask_reuse: reuse a mask for this many steps; only 1 (a fresh mask every step) is implemented.
        min_blocks: KV blocks every query block keeps at least.
        calibration_calls: recorded denoiser calls the calibration averages over.
    """

    l1_budget: float = 0.0
    block_q: int = 128
    block_k: int = 64
    min_tokens: int = 4096
    dense_steps: int = 0
    text_tokens_dense: bool = True
    similarity_threshold: float | None = None
    taus: tuple[float, ...] | None = None
    kept_fractions: tuple[float, ...] | None = None
    mask_reuse: int = 1
    min_blocks: int = 1
    calibration_calls: int = DEFAULT_CALIBRATION_CALLS

    SEARCH_SPACE: ClassVar = {
        "l1_budget": FloatRange(0.0, 0.12),
        "block_q": Choice((64, 128)),
        "block_k": Choice((64, 128)),
        "dense_steps": IntRange(0, 4),
    }

    def __post_init__(self) -> None:
        if isinstance(self.l1_budget, bool) or not isinstance(self.l1_budget, int | float):
            raise InputError(f"sparse.l1_budget must be a number >= 0, got {self.l1_budget!r}")
        if not 0.0 <= self.l1_budget < 1.0:
            raise InputError(f"sparse.l1_budget must be in [0, 1), got {self.l1_budget}")
        for name in ("block_q", "block_k", "mask_reuse", "min_blocks", "calibration_calls"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"sparse.{name} must be a positive integer, got {value!r}")
        for name in ("min_tokens", "dense_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"sparse.{name} must be a non-negative integer, got {value!r}")
        if self.mask_reuse != 1:
            raise InputError(
                f"sparse.mask_reuse={self.mask_reuse} is not implemented yet: only 1 (a fresh mask every step)"
            )
        if self.taus is not None and not all(0.0 <= float(t) <= 1.0 for t in self.taus):
            raise InputError(f"sparse.taus must lie in [0, 1], got {list(self.taus)}")
        if self.kept_fractions is not None and (
            self.taus is None or len(self.kept_fractions) != len(self.taus)
        ):
            raise InputError("sparse.kept_fractions needs taus of the same length")

    def is_noop(self) -> bool:
        if self.taus is not None:
            return len(self.taus) == 0
        return self.l1_budget == 0.0


# ---------------------------------------------------------------- sites


@dataclass(frozen=True)
class AttentionSite:
    """One ``scaled_dot_product_attention`` node and what the pass decided about it.

    Args:
        name: node name in the ``full`` variant.
        module_path: innermost module path (``transformer_blocks.0.attn``).
        q_tokens: query length.
        kv_tokens: key/value length.
        dense_prefix: leading tokens kept dense (text tokens of Flux-style joint attention).
        dense_suffix: trailing tokens kept dense (text tokens of SD3-style joint attention).
        scale: the softmax scale SDPA uses.
        dense_reason: why the site stays dense, or None when it is made sparse.
    """

    name: str
    module_path: str
    q_tokens: int
    kv_tokens: int
    dense_prefix: int
    dense_suffix: int
    scale: float
    dense_reason: str | None


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    values = dict(zip(names, defaults, strict=True))
    values.update(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


def _text_placement(node: fx.Node, length: int, text_tokens: int, max_visits: int = 200) -> tuple[int, int]:
    """(prefix, suffix) text tokens of a joint sequence of ``length`` tokens feeding ``node``'s query.

    Walks back from the query to the nearest ``cat`` whose result spans ``length`` tokens along the cat
    dimension; a first (last) piece of ``text_tokens`` tokens makes the text a prefix (suffix). When
    both ends match, both are kept dense (safe); without such a ``cat`` the site has no text tokens.
    """
    if text_tokens <= 0 or text_tokens >= length:
        return 0, 0
    seen: set[str] = set()
    queue: deque[fx.Node] = deque([node])
    while queue and len(seen) < max_visits:
        current = queue.popleft()
        if current.name in seen:
            continue
        seen.add(current.name)
        if current.op == "call_function" and current.target is aten.cat.default:
            pieces = list(current.args[0])
            value = _val(current)
            dim = current.args[1] if len(current.args) > 1 else current.kwargs.get("dim", 0)
            if isinstance(value, torch.Tensor) and len(pieces) >= 2:
                dim = dim % value.dim()
                if int(value.shape[dim]) == length:
                    sizes = [int(_val(p).shape[dim]) if isinstance(_val(p), torch.Tensor) else -1 for p in pieces]
                    prefix = text_tokens if sizes[0] == text_tokens else 0
                    suffix = text_tokens if sizes[-1] == text_tokens else 0
                    if prefix or suffix:
                        return prefix, suffix
        for arg in current.all_input_nodes:
            if arg.op != "get_attr":
                queue.append(arg)
    return 0, 0


def _text_tokens(program: Program) -> int:
    """Text token count: the first of the family's text-token inputs (``encoder_hidden_states``...)."""
    text_inputs = traits_for(program.graph.family).text_token_inputs
    for name, spec in zip(program.graph.input_names, program.graph.input_specs, strict=True):
        if name in text_inputs and len(spec.shape) >= 3:
            return int(spec.shape[-2])
    return 0


def attention_sites(module: fx.GraphModule, config: SparseConfig, text_tokens: int = 0) -> list[AttentionSite]:
    """Every SDPA node of ``module`` with the pass's decision (sparse, or dense and why)."""
    from accelkit.capture.blocks import node_module_path

    sites = []
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
            continue
        args = _sdpa_arguments(node)
        q, k, v = (_val(args[n]) for n in ("query", "key", "value"))
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
            sites.append(AttentionSite(node.name, node_module_path(node), 0, 0, 0, 0, 0.0, "not 4-D (B, H, L, D)"))
            continue
        lq, lk = int(q.shape[2]), int(k.shape[2])
        scale = args["scale"] if args["scale"] is not None else 1.0 / math.sqrt(int(q.shape[-1]))
        reason = None
        if args["attn_mask"] is not None:
            reason = "has an attn_mask"
        elif args["is_causal"]:
            reason = "causal"
        elif args["dropout_p"]:
            reason = "dropout"
        elif args["enable_gqa"] or k.shape[1] != q.shape[1]:
            reason = "grouped-query attention"
        elif lk < config.min_tokens:
            reason = f"{lk} KV tokens < min_tokens={config.min_tokens}"
        prefix = suffix = 0
        if reason is None and config.text_tokens_dense and lq == lk:
            prefix, suffix = _text_placement(node, lq, text_tokens)
        sites.append(AttentionSite(node.name, node_module_path(node), lq, lk, prefix, suffix, float(scale), reason))
    return sites


# ---------------------------------------------------------------- calibration


def _mask(q: torch.Tensor, k: torch.Tensor, site: AttentionSite, config: SparseConfig, tau: float):
    return predict_block_mask_with_dense_tokens(
        q, k, block_q=config.block_q, block_k=config.block_k, tau=tau, min_blocks=config.min_blocks,
        similarity_threshold=config.similarity_threshold, dense_prefix=site.dense_prefix,
        dense_suffix=site.dense_suffix, scale=site.scale,
    )


def kept_fraction(counts: torch.Tensor, indices: torch.Tensor, lq: int, lk: int, block_q: int, block_k: int) -> float:
    """Share of the dense attention FLOPs (query x key token pairs) the block mask keeps."""
    nk = num_blocks(lk, block_k)
    mask = dense_mask_from_indices(counts, indices, nk).double()  # (B, H, NQ, NK)
    rows = torch.full((mask.shape[2],), float(block_q), dtype=torch.float64, device=mask.device)
    rows[-1] = lq - (mask.shape[2] - 1) * block_q
    cols = torch.full((nk,), float(block_k), dtype=torch.float64, device=mask.device)
    cols[-1] = lk - (nk - 1) * block_k
    kept = torch.einsum("bhqk,q,k->", mask, rows, cols)
    return float(kept / (mask.shape[0] * mask.shape[1] * lq * lk))


class _SiteProfiler(fx.Interpreter):
    """Runs the dense graph and measures, at each sparse site, error and kept share for every τ."""

    def __init__(self, module, sites: dict[str, tuple[int, AttentionSite]], config, grid, out: np.ndarray):
        super().__init__(module)
        self.sites, self.config, self.grid, self.out = sites, config, grid, out

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        if node.name in self.sites:
            index, site = self.sites[node.name]
            args = _sdpa_arguments(node)
            q, k, v = (self.env[args[n]] for n in ("query", "key", "value"))
            dense = result.double()
            norm = float(dense.abs().sum().clamp_min(1e-30))
            for g, tau in enumerate(self.grid):
                counts, indices = _mask(q, k, site, self.config, tau)
                sparse_out = block_sparse_attention_reference(
                    q, k, v, counts, indices, block_q=self.config.block_q, block_k=self.config.block_k,
                    scale=site.scale,
                )
                self.out[index, g, 0] += float((sparse_out.double() - dense).abs().sum()) / norm
                self.out[index, g, 1] += kept_fraction(
                    counts, indices, site.q_tokens, site.kv_tokens, self.config.block_q, self.config.block_k
                )
        return result


def profile_sites(
    module: fx.GraphModule,
    sites: Sequence[AttentionSite],
    calls: Sequence[Sequence[torch.Tensor]],
    config: SparseConfig,
    grid: Sequence[float] = TAU_GRID,
) -> np.ndarray:
    """``(sites, len(grid), 2)``: mean relative L1 error and mean kept share per site and τ over ``calls``.

    The dense ``module`` runs each call; each site's sparse output is computed from the dense run's
    q, k, v (errors do not compound across sites, as in SpargeAttn's per-layer tuning).
    """
    out = np.zeros((len(sites), len(grid), 2), dtype=np.float64)
    by_name = {s.name: (i, s) for i, s in enumerate(sites)}
    profiler = _SiteProfiler(module, by_name, config, list(grid), out)
    with torch.no_grad():
        for inputs in calls:
            profiler.run(*inputs)
    return out / max(len(calls), 1)


def choose_taus(profile: np.ndarray, budget: float, grid: Sequence[float] = TAU_GRID) -> list[int]:
    """Per site, the grid index of the smallest τ whose error and every larger τ's stay within ``budget``."""
    chosen = []
    for errors in profile[:, :, 0]:
        index = len(grid) - 1
        while index > 0 and errors[index - 1] <= budget:
            index -= 1
        chosen.append(index)
    return chosen


# ---------------------------------------------------------------- graph surgery


def _fake_call(op, args: tuple) -> Any:
    """Run ``op`` on the fake tensors export recorded, for the new nodes' ``meta["val"]``."""
    fakes = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in args]
    mode = next((getattr(f, "fake_mode", None) for f in fakes if getattr(f, "fake_mode", None) is not None), None)
    if mode is None:
        return None
    with mode:
        return op(*fakes)


def sparsify_module(
    module: fx.GraphModule,
    sites: Sequence[AttentionSite],
    taus: Sequence[float],
    config: SparseConfig,
    kept: Sequence[float] | None = None,
) -> fx.GraphModule:
    """A copy of ``module`` (sharing its weights) with each of ``sites`` replaced by mask + sparse attention."""
    clone = clone_graph_module(module)
    graph = clone.graph
    nodes = {n.name: n for n in graph.nodes}
    for index, (site, tau) in enumerate(zip(sites, taus, strict=True)):
        node = nodes[site.name]
        args = _sdpa_arguments(node)
        q, k, v = args["query"], args["key"], args["value"]
        mask_args = (q, k, config.block_q, config.block_k, float(tau), config.min_blocks,
                     config.similarity_threshold, site.dense_prefix, site.dense_suffix, site.scale)
        stack = node.meta.get("nn_module_stack")
        with graph.inserting_before(node):
            mask = graph.call_function(torch.ops.accelkit.predict_block_mask.default, mask_args)
            counts = graph.call_function(operator.getitem, (mask, 0))
            indices = graph.call_function(operator.getitem, (mask, 1))
            attention_args = (q, k, v, counts, indices, config.block_q, config.block_k, site.scale)
            attention = graph.call_function(torch.ops.accelkit.block_sparse_attention.default, attention_args)
        mask_val = _fake_call(torch.ops.accelkit.predict_block_mask.default, mask_args)
        for new, value in ((mask, mask_val), (counts, mask_val[0] if mask_val else None),
                           (indices, mask_val[1] if mask_val else None)):
            new.meta = {"nn_module_stack": stack, "accelkit": "sparse attention mask"}
            if value is not None:
                new.meta["val"] = value
        attention.meta = dict(node.meta)
        attention.meta["accelkit"] = "sparse attention"
        attention.meta[KEPT_FRACTION_META] = float(kept[index]) if kept is not None else 1.0
        node.replace_all_uses_with(attention)
        graph.erase_node(node)
    eliminate_dead_nodes(graph)
    graph.lint()
    clone.recompile()
    return clone


# ---------------------------------------------------------------- the pass


def _site_stats(sites: Sequence[AttentionSite]) -> dict[str, Any]:
    return {
        "dense_sites": {s.name: s.dense_reason for s in sites if s.dense_reason},
        "text_tokens": {s.name: [s.dense_prefix, s.dense_suffix] for s in sites
                        if s.dense_reason is None and (s.dense_prefix or s.dense_suffix)},
    }


def describe(resolved: Mapping[str, Any], stats: Mapping[str, Any]) -> str | None:
    """The sparse sites and the attention FLOPs they keep, in words."""
    if not stats.get("sparse_sites"):
        return None
    kept_share = stats.get("mean_kept_fraction")
    dense = stats.get("dense_steps", 0)
    return (f"block-sparse attention at {len(stats['sparse_sites'])} site(s)"
            + (f", keeping {kept_share:.0%} of attention FLOPs" if kept_share is not None else "")
            + (f" (first {dense} steps dense)" if dense else ""))


@register_pass(SparseConfig, name="sparse", after=("steps", "prune", "quant"), hooks=PassHooks(describe=describe))
def sparse(program: Program, config: SparseConfig, calib: CalibrationSource | None) -> PassResult:
    """Make the eligible attention sites of the ``full`` variant block-sparse.

    Args:
        program: input program; must have only the ``full`` variant (sparse runs before cache).
        config: the sparsity settings.
        calib: the calibration source; needed only without resolved ``taus``.
    """
    stats: dict[str, Any] = {"num_steps": program.num_steps}
    if config.is_noop():
        stats.update(sparse_sites=[], mean_kept_fraction=1.0)
        return PassResult(program, modified=False, stats=stats, resolved_config=config)
    full = program.sole_full_variant("sparse")
    all_sites = attention_sites(full.module, config, _text_tokens(program))
    sites = [s for s in all_sites if s.dense_reason is None]
    stats.update(_site_stats(all_sites))
    stats["sparse_sites"] = [s.name for s in sites]
    dense_steps = min(config.dense_steps, program.num_steps)
    if not sites or dense_steps >= program.num_steps:
        stats["mean_kept_fraction"] = 1.0
        stats["note"] = "no eligible attention site" if not sites else "dense_steps covers every step"
        return PassResult(program, modified=False, stats=stats, resolved_config=config)
    kept: list[float] | None
    if config.taus is not None:
        if len(config.taus) != len(sites):
            raise InputError(
                f"sparse.taus has {len(config.taus)} values for {len(sites)} sparse sites {[s.name for s in sites]}"
            )
        taus = [float(t) for t in config.taus]
        kept = list(config.kept_fractions) if config.kept_fractions is not None else None
    else:
        if calib is None:
            raise InputError("sparse.l1_budget needs calibration data; pass a Calibrator or resolved taus")
        def compute() -> np.ndarray:
            calls = calib.denoiser_inputs(program, config.calibration_calls)
            return profile_sites(full.module, sites, calls, config)

        profile = np.asarray(calib.cached(
            "sparse-profile", program, compute, sites=[s.name for s in sites],
            block=[config.block_q, config.block_k], text=[[s.dense_prefix, s.dense_suffix] for s in sites],
            similarity=config.similarity_threshold, min_blocks=config.min_blocks,
            calls=config.calibration_calls, grid=list(TAU_GRID),
        ), dtype=np.float64)
        chosen = choose_taus(profile, config.l1_budget)
        taus = [TAU_GRID[i] for i in chosen]
        kept = [float(profile[s, i, 1]) for s, i in enumerate(chosen)]
        stats["l1_error"] = {s.name: float(profile[j, i, 0]) for j, (s, i) in enumerate(zip(sites, chosen, strict=True))}
        stats["l1_budget"] = config.l1_budget
    stats["taus"] = {s.name: t for s, t in zip(sites, taus, strict=True)}
    if kept is not None:
        stats["kept_fraction"] = {s.name: k for s, k in zip(sites, kept, strict=True)}
        stats["mean_kept_fraction"] = float(np.mean(kept))
    resolved = SparseConfig.from_dict({
        **config.to_dict(), "taus": list(taus), "kept_fractions": list(kept) if kept is not None else None,
    })
    # τ = 1 keeps every block: such a site would pay for the mask and the sparse kernel to compute
    # dense attention, so it keeps the original SDPA node.
    skipped = [i for i, tau in enumerate(taus) if tau >= 1.0]
    for i in skipped:
        stats["dense_sites"][sites[i].name] = "calibrated tau = 1: no block can be skipped within the budget"
    stats["sparse_sites"] = [s.name for i, s in enumerate(sites) if i not in skipped]
    if len(skipped) == len(sites):
        stats["note"] = "every site needs tau = 1"
        return PassResult(program, modified=False, stats=stats, resolved_config=resolved)
    keep = [i for i in range(len(sites)) if i not in skipped]
    sparse_module = sparsify_module(full.module, [sites[i] for i in keep], [taus[i] for i in keep], config,
                                    [kept[i] for i in keep] if kept is not None else None)
    variants = {"full": GraphVariant(sparse_module)}
    schedule = ("full",) * program.num_steps
    if dense_steps:
        variants["full_dense"] = dataclasses.replace(full, roles=full.roles | {DENSE})
        schedule = ("full_dense",) * dense_steps + ("full",) * (program.num_steps - dense_steps)
    stats["dense_steps"] = dense_steps
    new_program = program.replace(variants=variants, schedule=schedule)
    return PassResult(new_program, modified=True, stats=stats, resolved_config=resolved)
