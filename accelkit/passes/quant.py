"""4-bit low-rank weight quantization (SVDQuant, arXiv 2411.05007) of the denoiser's linear layers.

Per ``aten.linear`` whose weight is a graph constant (fp64 on CPU):

1. *Smoothing*: ``λ_j = max|X_j|^α / max|W_j|^(1−α)`` over input channels ``j`` (``max|X_j|`` from the
   layer's inputs on calibration denoiser calls, CFG batch included), normalized by ``sqrt(max λ · min λ)``
   (quantization is scale-free per group/token; the normalization only keeps 16-bit storage in range).
   ``α = 0`` means *no smoothing* (``λ = 1``) and needs no activation statistics. ``W' = W · diag(λ)``.
2. *Low rank*: ``L = SVD_r(W')``, refined ``L ← SVD_r(W' − Q(W' − L))`` ``refine_iterations`` times,
   keeping the ``L`` with the smallest weight error ``‖W' − L − Q(W' − L)‖`` (early stop). ``L`` is stored
   as ``lora_up = U·√S`` ``(N, r)`` and ``lora_down = √S·Vᵀ·diag(1/λ)`` ``(r, K)``: the smoothing is folded
   into the down-projection, which therefore reads the raw activation.
3. *Residual*: ``R = W' − L``, symmetric INT4 per group of ``group_size`` input channels (packed two per
   byte, fp16 scales); the residual GEMM reads ``x / λ`` quantized per ``act_mode``.
4. *Choice of α* per layer from ``alpha_grid``: the smallest relative output error
   ``‖Y_q − Y‖ / ‖Y‖`` on a sample of the layer's calibration inputs, with the low-rank branch present.
   *Sensitivity* for ``keep_16bit`` is that same per-layer error: the ``keep_16bit`` worst layers stay 16-bit.

The graph keeps each quantized ``aten.linear`` node's metadata (``nn_module_stack``, ``val``) but calls
``torch.ops.accelkit.svdq_linear`` on new buffers of the cloned module (``get_attr``), so block
discovery and the cost model keep working; the original bias parameter is reused as is.

Replay without calibration: every new tensor goes into ``program.new_weights`` under
``quant.<layer path>.<packed|scales|lora_down|lora_up|smooth>`` (saved with the plan), and the resolved
config lists the chosen α per quantized layer (``alphas``) and the layers kept in 16 bits
(``kept_16bit``). With a resolved config the pass takes a layer's tensors from ``program.new_weights``
when they are there (no SVD at all); otherwise it recomputes them deterministically from the original
weights, which needs no data for ``α = 0`` and calibration data for ``α > 0`` (the activation maxima).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import fx

from accelkit.calibrate.source import CalibrationSource
from accelkit.capture.cost import get_attr_value
from accelkit.capture.graph import clone_graph_module, eliminate_dead_nodes
from accelkit.errors import InputError
from accelkit.families import GENERIC_KEEP_16BIT, traits_for
from accelkit.passes.base import (
    Choice,
    GraphVariant,
    IntRange,
    PassConfig,
    PassResult,
    Program,
    register_pass,
)
from accelkit.passes.hooks import PassHooks, PrecisionClaim

__all__ = [
    "ACT_MODES",
    "DEFAULT_SKIP_PATTERNS",
    "LayerSite",
    "QuantConfig",
    "QuantizedLinear",
    "RecordedInputs",
    "find_quant_sites",
    "quant",
    "quantized_bytes",
    "svdquant_weight",
]

aten = torch.ops.aten

ACT_MODES = ("w4a16", "w4a8", "w4a4")
TENSOR_NAMES = ("packed", "scales", "lora_down", "lora_up", "smooth")
# Embedders, final projections and time/text embedders stay 16-bit (SVDQuant keeps them on FLUX); the
# model family adds its own (accelkit.families: keep_16bit).
DEFAULT_SKIP_PATTERNS = GENERIC_KEEP_16BIT
# Rows of each layer's calibration input kept for the output-error search (spread over the calls).
SAMPLE_ROWS = 256
# How many recorded denoiser calls feed the statistics (spread over timesteps and prompts).
DEFAULT_CALLS = 8
# Above this smaller dimension the SVD is randomized (seeded): fp64 full SVDs of 3072x12288 are slow.
EXACT_SVD_MAX_DIM = 2048


@dataclass(frozen=True, kw_only=True)
class QuantConfig(PassConfig):
    """SVDQuant: 4-bit weights (INT4, per group) plus a 16-bit low-rank branch, per linear layer.

    Args:
        bits: 16 = no-op (the layers stay as they are), 4 = quantize.
        rank: rank of the low-rank branch (capped at ``min(N, K)`` of each layer).
        group_size: input channels per INT4 scale (and per ``w4a4`` activation scale).
        act_mode: ``"w4a16"`` (16-bit activations), ``"w4a8"`` (dynamic per-token FP8) or ``"w4a4"``
            (dynamic per-group INT4, fake-quantized: Hopper has no 4-bit tensor cores).
        alpha_grid: smoothing exponents tried per layer; ``0.0`` means no smoothing.
        keep_16bit: number of most sensitive layers (largest per-layer output error) left 16-bit.
        low_rank: False = plain per-group INT4 without the low-rank branch (the ablation).
        skip_patterns: layer paths left 16-bit: a path matches a pattern when equal to it, below it
            (``pattern.``) or by ``fnmatch`` glob, all from the model root.
        refine_iterations: ``L ← SVD_r(W' − Q(W' − L))`` refinement steps (early stop).
        alphas: resolved: ``(layer path, α)`` per quantized layer, in graph order; when given, exactly
            these layers are quantized, no search runs and ``keep_16bit``/``alpha_grid`` are not used.
        kept_16bit: resolved: the layers the sensitivity ranking kept 16-bit (informational).
    """

    bits: int = 16
    rank: int = 32
    group_size: int = 64
    act_mode: str = "w4a16"
    alpha_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    keep_16bit: int = 0
    low_rank: bool = True
    skip_patterns: tuple[str, ...] = DEFAULT_SKIP_PATTERNS
    refine_iterations: int = 2
    alphas: tuple[tuple[str, float], ...] | None = None
    kept_16bit: tuple[str, ...] | None = None

    SEARCH_SPACE: ClassVar = {
        "bits": Choice((16, 4)),
        "rank": Choice((16, 32, 64)),
        "group_size": Choice((32, 64, 128)),
        "act_mode": Choice(("w4a16", "w4a8")),
        "keep_16bit": IntRange(0, 8),
    }

    def __post_init__(self) -> None:
        def non_negative_int(name: str, positive: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
                kind = "positive" if positive else "non-negative"
                raise InputError(f"quant.{name} must be a {kind} integer, got {value!r}")

        if self.bits not in (4, 16):
            raise InputError(f"quant.bits must be 16 (no-op) or 4, got {self.bits!r}")
        non_negative_int("rank", positive=True)
        non_negative_int("group_size", positive=True)
        non_negative_int("keep_16bit")
        non_negative_int("refine_iterations")
        if self.group_size % 2:
            raise InputError(f"quant.group_size must be even (two INT4 values per byte), got {self.group_size}")
        if self.act_mode not in ACT_MODES:
            raise InputError(f"quant.act_mode must be one of {ACT_MODES}, got {self.act_mode!r}")
        if not self.alpha_grid or not all(
            isinstance(a, int | float) and not isinstance(a, bool) and 0.0 <= a <= 1.0 for a in self.alpha_grid
        ):
            raise InputError(f"quant.alpha_grid must be a non-empty list of numbers in [0, 1], got {self.alpha_grid!r}")
        if isinstance(self.skip_patterns, str) or not all(isinstance(p, str) for p in self.skip_patterns):
            raise InputError(f"quant.skip_patterns must be a list of strings, got {self.skip_patterns!r}")
        if self.alphas is not None:
            paths = [p for p, _ in self.alphas]
            if len(set(paths)) != len(paths):
                raise InputError("quant.alphas lists a layer twice")
            if not all(isinstance(a, int | float) and 0.0 <= a <= 1.0 for _, a in self.alphas):
                raise InputError(f"quant.alphas must map layer paths to numbers in [0, 1], got {self.alphas!r}")

    def is_noop(self) -> bool:
        return self.bits == 16 or (self.alphas is not None and len(self.alphas) == 0)


# ---------------------------------------------------------------- one layer


@dataclass(frozen=True)
class QuantizedLinear:
    """The stored form of one quantized linear (see :mod:`accelkit.kernels.svdq_linear.reference`).

    Args:
        packed: uint8 ``(N, K // 2)`` INT4 residual.
        scales: float16 ``(N, K // group_size)``.
        lora_down: ``(r, K)`` with ``1/smooth`` folded in.
        lora_up: ``(N, r)``.
        smooth: float32 ``(K,)``.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    lora_down: torch.Tensor
    lora_up: torch.Tensor
    smooth: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSOR_NAMES}


def _low_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U·√S, √S·Vᵀ)`` of the best rank-``rank`` approximation (deterministic)."""
    if min(matrix.shape) <= EXACT_SVD_MAX_DIM:
        # numpy's LAPACK: torch.linalg.svd was ~50x slower on small fp64 matrices on the test CPUs.
        u, s, vh = (torch.from_numpy(a) for a in np.linalg.svd(matrix.numpy(), full_matrices=False))
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(matrix, q=min(rank + 16, min(matrix.shape)), niter=4)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].t()
    root = s.sqrt()
    return u * root, root[:, None] * vh


def smoothing_factors(w: torch.Tensor, act_absmax: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """λ per input channel (float64 ``(K,)``); ones for ``alpha == 0`` (no smoothing)."""
    k = w.shape[1]
    if alpha == 0.0:
        return torch.ones(k, dtype=torch.float64)
    if act_absmax is None:
        raise InputError(f"smoothing with alpha={alpha} needs activation statistics (calibration)")
    x = act_absmax.double().clamp_min(1e-5) ** alpha
    wmax = w.double().abs().amax(0).clamp_min(1e-5) ** (1.0 - alpha)
    lam = x / wmax
    lam = lam / torch.sqrt(lam.max() * lam.min())
    return lam.clamp(1e-4, 1e4)


def svdquant_weight(
    w: torch.Tensor,
    act_absmax: torch.Tensor | None,
    *,
    alpha: float,
    rank: int,
    group_size: int,
    refine_iterations: int = 2,
    low_rank: bool = True,
    lora_dtype: torch.dtype | None = None,
) -> QuantizedLinear:
    """Quantize one ``(N, K)`` weight SVDQuant-style (see the module docstring); computed in float64.

    Args:
        w: the weight.
        act_absmax: ``max|X_j|`` per input channel, or None (only for ``alpha == 0``).
        alpha: smoothing exponent.
        rank: low-rank rank (capped at ``min(N, K)``).
        group_size: INT4 group size along ``K``.
        refine_iterations: refinement steps of the low-rank branch.
        low_rank: False = no low-rank branch (rank-0 factors).
        lora_dtype: dtype of the stored factors; ``w``'s dtype when None.
    """
    from accelkit.kernels.svdq_linear.reference import fake_quant_weight_int4, quantize_weight_int4

    n, k = w.shape
    lora_dtype = lora_dtype or w.dtype
    w64 = w.detach().double().cpu()
    lam = smoothing_factors(w64, act_absmax, alpha)
    smoothed = w64 * lam
    r = min(rank, n, k) if low_rank else 0
    up = torch.zeros(n, 0, dtype=torch.float64)
    down = torch.zeros(0, k, dtype=torch.float64)
    if r:
        up, down = _low_rank(smoothed, r)
        best = (smoothed - up @ down - fake_quant_weight_int4(smoothed - up @ down, group_size)).norm()
        for _ in range(refine_iterations):
            residual = smoothed - up @ down
            cand_up, cand_down = _low_rank(smoothed - fake_quant_weight_int4(residual, group_size), r)
            new_residual = smoothed - cand_up @ cand_down
            err = (new_residual - fake_quant_weight_int4(new_residual, group_size)).norm()
            if err >= best:
                break  # early stop: the refinement no longer lowers the weight error
            best, up, down = err, cand_up, cand_down
    # Round the factors to their storage dtype *before* quantizing the residual, so the residual
    # absorbs the factors' rounding error.
    up_s, down_s = up.to(lora_dtype), (down / lam).to(lora_dtype)
    residual = smoothed - up_s.double() @ (down_s.double() * lam)
    packed, scales = quantize_weight_int4(residual, group_size)
    return QuantizedLinear(packed, scales, down_s.contiguous(), up_s.contiguous(), lam.float())


def quantized_bytes(n: int, k: int, *, rank: int, group_size: int, lora_bytes: int = 2, scale_bytes: int = 2) -> int:
    """Stored bytes of one quantized ``(N, K)`` layer: packed INT4 + scales + low-rank factors + smooth."""
    return n * k // 2 + n * (k // group_size) * scale_bytes + rank * (n + k) * lora_bytes + 4 * k


# ---------------------------------------------------------------- sites


@dataclass(frozen=True)
class LayerSite:
    """One weight used by one or more ``aten.linear`` nodes.

    Args:
        path: module path (``transformer_blocks.0.attn.to_q``).
        weight: ``get_attr`` target of the weight.
        nodes: names of the linear nodes that use it.
        shape: ``(N, K)``.
        reason: why it is not quantized, or None when it is a candidate.
    """

    path: str
    weight: str
    nodes: tuple[str, ...]
    shape: tuple[int, int]
    reason: str | None = None


def _matches(path: str, patterns: Sequence[str]) -> str | None:
    for pattern in patterns:
        if path == pattern or path.startswith(pattern + ".") or fnmatch.fnmatchcase(path, pattern):
            return pattern
    return None


def find_quant_sites(module: fx.GraphModule, config: QuantConfig, family: str | None = None) -> list[LayerSite]:
    """Every linear weight of ``module`` in graph order, with the reason it is skipped (if it is).

    ``family`` (the denoiser class name) adds that family's 16-bit layers to ``config.skip_patterns``.
    """
    patterns = tuple(config.skip_patterns) + traits_for(family).keep_16bit
    by_weight: dict[str, list[str]] = {}
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        weight = node.args[1]
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            continue
        by_weight.setdefault(str(weight.target), []).append(node.name)
    sites = []
    for target, nodes in by_weight.items():
        tensor = get_attr_value(module, target)
        path = target.removesuffix(".weight")
        shape = tuple(int(s) for s in tensor.shape)
        reason = None
        pattern = _matches(path, patterns)
        if pattern is not None:
            reason = f"skip pattern '{pattern}'"
        elif tensor.dim() != 2 or not tensor.is_floating_point():
            reason = "not a 2-D float weight"
        elif shape[1] % config.group_size:
            reason = f"input dim {shape[1]} is not a multiple of group_size {config.group_size}"
        sites.append(LayerSite(path, target, tuple(nodes), shape if len(shape) == 2 else (0, 0), reason))
    return sites


# ---------------------------------------------------------------- calibration statistics


@dataclass
class RecordedInputs:
    """Calibration data given as flat denoiser inputs (instead of a :class:`CalibrationSource`).

    It answers the two questions quant asks: the denoiser inputs (all of them) and measurements
    (computed every time: nothing is cached).

    Args:
        calls: per denoiser call, the graph's flat tensor inputs (``DenoiserGraph.flat_inputs``).
    """

    calls: Sequence[Sequence[torch.Tensor]]

    def denoiser_inputs(self, program: Program, n: int) -> list[list[torch.Tensor]]:
        return [list(c) for c in self.calls]

    def cached(
        self, kind: str, program: Program, compute: Callable[[], np.ndarray], **parts: Any
    ) -> np.ndarray:
        return np.asarray(compute())


class _LinearInputRecorder(fx.Interpreter):
    """Runs the graph and records, for chosen linear nodes, ``max|X_j|`` and a row sample of ``X``."""

    def __init__(self, module: fx.GraphModule, node_to_path: Mapping[str, str], rows_per_call: int):
        super().__init__(module)
        self.node_to_path = node_to_path
        self.rows_per_call = rows_per_call
        self.absmax: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}

    def run_node(self, n: fx.Node) -> Any:
        path = self.node_to_path.get(n.name)
        if path is not None:
            x = self.env[n.args[0]].detach()
            rows = x.reshape(-1, x.shape[-1]).float()
            amax = rows.abs().amax(0)
            self.absmax[path] = torch.maximum(self.absmax[path], amax) if path in self.absmax else amax
            pick = torch.linspace(0, rows.shape[0] - 1, min(self.rows_per_call, rows.shape[0])).round().long()
            self.samples.setdefault(path, []).append(rows[pick].clone())
        return super().run_node(n)


def collect_activation_stats(
    module: fx.GraphModule, sites: Sequence[LayerSite], calls: Sequence[Sequence[torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per layer path: ``max|X_j|`` (float32 ``(K,)``) and up to :data:`SAMPLE_ROWS` input rows."""
    node_to_path = {name: s.path for s in sites for name in s.nodes}
    per_call = max(1, math.ceil(SAMPLE_ROWS / max(1, len(calls) * max(1, max(len(s.nodes) for s in sites)))))
    recorder = _LinearInputRecorder(module, node_to_path, per_call)
    with torch.no_grad():
        for inputs in calls:
            recorder.run(*inputs)
    samples = {p: torch.cat(v)[:SAMPLE_ROWS] for p, v in recorder.samples.items()}
    return recorder.absmax, samples


def _relative_output_error(
    w: torch.Tensor, q: QuantizedLinear, sample: torch.Tensor, config: QuantConfig
) -> float:
    from accelkit.kernels.svdq_linear.reference import svdq_linear_reference

    x = sample.to(w.dtype)
    reference = x.double() @ w.detach().double().t()
    out = svdq_linear_reference(
        x, q.packed, q.scales, q.lora_down, q.lora_up, q.smooth, None,
        group_size=config.group_size, act_mode=config.act_mode,
    ).double()  # fmt: skip
    return float((out - reference).norm() / reference.norm().clamp_min(1e-30))


# ---------------------------------------------------------------- graph surgery


def _attr_name(path: str, tensor: str) -> str:
    return "quant_" + re.sub(r"[^0-9A-Za-z_]", "_", path) + "__" + tensor


def weight_key(path: str, tensor: str) -> str:
    """Key of a new tensor in ``Program.new_weights``: ``quant.<layer path>.<tensor>``."""
    return f"quant.{path}.{tensor}"


def replace_linears(
    module: fx.GraphModule,
    layers: Sequence[tuple[LayerSite, QuantizedLinear]],
    *,
    group_size: int,
    act_mode: str,
) -> fx.GraphModule:
    """A clone of ``module`` whose given linears call ``accelkit::svdq_linear`` on new buffers."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import accelkit.kernels.svdq_linear  # noqa: F401  (registers torch.ops.accelkit.svdq_linear)

    op = torch.ops.accelkit.svdq_linear.default
    fake_mode = FakeTensorMode()
    clone = clone_graph_module(module)
    graph = clone.graph
    nodes = {n.name: n for n in graph.nodes}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    for site, q in layers:
        first = min((nodes[name] for name in site.nodes), key=lambda n: order[n.name])
        attrs = {}
        with graph.inserting_before(first):
            for tensor_name, tensor in q.tensors().items():
                attr = _attr_name(site.path, tensor_name)
                clone.register_buffer(attr, tensor)
                attrs[tensor_name] = graph.get_attr(attr)
                # Like export's weight nodes: shapes for the cost model and for re-export.
                attrs[tensor_name].meta["val"] = fake_mode.from_tensor(tensor)
        for name in site.nodes:
            node = nodes[name]
            x = node.args[0]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            with graph.inserting_before(node):
                new = graph.call_function(
                    op, (x, *(attrs[t] for t in TENSOR_NAMES), bias, int(group_size), str(act_mode))
                )
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    eliminate_dead_nodes(graph)
    graph.lint()
    clone.recompile()
    return clone


# ---------------------------------------------------------------- the pass


@dataclass
class _Calibration:
    """Lazily computed statistics (activation maxima and samples), shared by the search and the build."""

    program: Program
    calib: CalibrationSource | RecordedInputs | None
    module: fx.GraphModule
    sites: Sequence[LayerSite]
    _absmax: dict[str, torch.Tensor] | None = None
    _samples: dict[str, torch.Tensor] | None = None
    recorded: bool = field(default=False)

    def _record(self) -> None:
        if self.calib is None:
            raise InputError(
                "quant needs calibration data to choose smoothing and 16-bit layers: pass a Calibrator, "
                "or a resolved config (alphas) with the plan's weights, or alpha_grid=(0.0,) and keep_16bit=0"
            )
        calls = self.calib.denoiser_inputs(self.program, DEFAULT_CALLS)
        self._absmax, self._samples = collect_activation_stats(self.module, self.sites, calls)
        self.recorded = True

    def _cached(self, kind: str, compute: Callable[[], np.ndarray], **parts: Any) -> np.ndarray:
        if self.calib is None:
            return np.asarray(compute())
        return np.asarray(self.calib.cached(kind, self.program, compute, **parts))

    def absmax(self) -> dict[str, torch.Tensor]:
        if self._absmax is None:
            def compute() -> np.ndarray:
                self._record()
                return np.concatenate([self._absmax[s.path].numpy() for s in self.sites])

            flat = torch.from_numpy(np.array(self._cached("quant-absmax", compute,
                                                          layers=[s.path for s in self.sites])))
            self._absmax, offset = {}, 0
            for s in self.sites:
                self._absmax[s.path] = flat[offset: offset + s.shape[1]].float()
                offset += s.shape[1]
        return self._absmax

    def samples(self) -> dict[str, torch.Tensor]:
        if self._samples is None:
            self._record()
        return self._samples


def describe(resolved: Mapping[str, Any], stats: Mapping[str, Any]) -> str | None:
    """The quantized layers and their format, in words."""
    quantized = stats.get("quantized") or []
    if not quantized:
        return None
    kept = stats.get("kept_16bit") or []
    branch = f"rank-{resolved['rank']} 16-bit branch" if resolved.get("low_rank", True) else "no low-rank branch"
    return (f"quantize {len(quantized)} linear layers to 4 bits ({resolved['act_mode'].upper()}, "
            f"group {resolved['group_size']}, {branch}"
            + (f"; {len(kept)} most sensitive kept 16-bit" if kept else "") + ")")


def precision(resolved: Mapping[str, Any]) -> PrecisionClaim:
    """4-bit weights, and FP8 activations for ``w4a8``: what an exported engine must keep."""
    act_mode = resolved.get("act_mode")
    return PrecisionClaim(fp8=act_mode == "w4a8", int4_weights=True, reason=f"quant.act_mode={act_mode}")


@register_pass(QuantConfig, name="quant", after=("steps", "prune"),
               hooks=PassHooks(describe=describe, precision=precision))
def quant(
    program: Program, config: QuantConfig, calib: CalibrationSource | RecordedInputs | None
) -> PassResult:
    """Replace the ``full`` variant's linear layers by SVDQuant 4-bit linears.

    Args:
        program: input program; must have only a stateless ``full`` variant (quant runs before cache).
        config: the quantization settings.
        calib: the calibration source, a :class:`RecordedInputs`, or None (enough for
            a resolved config whose tensors are in ``program.new_weights``, or for ``α = 0`` only).
    """
    if config.is_noop():
        return PassResult(program, modified=False, stats={"quantized": []}, resolved_config=config)
    full = program.sole_full_variant("quant")
    module = full.module
    sites = find_quant_sites(module, config, program.graph.family)
    by_path = {s.path: s for s in sites}
    candidates = [s for s in sites if s.reason is None]
    stats: dict[str, Any] = {"skipped": {s.path: s.reason for s in sites if s.reason is not None}}
    cal = _Calibration(program, calib, module, candidates)
    built: dict[tuple[str, float], QuantizedLinear] = {}

    def build(site: LayerSite, alpha: float) -> QuantizedLinear:
        key = (site.path, float(alpha))
        if key not in built:
            w = get_attr_value(module, site.weight)
            lora_dtype = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float32
            built[key] = svdquant_weight(
                w, cal.absmax()[site.path] if alpha else None, alpha=float(alpha), rank=config.rank,
                group_size=config.group_size, refine_iterations=config.refine_iterations,
                low_rank=config.low_rank, lora_dtype=lora_dtype,
            )  # fmt: skip
        return built[key]

    errors: dict[str, float] = {}
    if config.alphas is not None:
        unknown = [p for p, _ in config.alphas if p not in by_path]
        if unknown:
            raise InputError(f"quant.alphas names unknown linear layer(s) {unknown[:5]}")
        bad = {p: by_path[p].reason for p, _ in config.alphas if by_path[p].reason is not None}
        if bad:
            raise InputError(f"quant.alphas lists layers that cannot be quantized: {bad}")
        chosen = [(by_path[p], float(a)) for p, a in config.alphas]
        kept = list(config.kept_16bit or ())
    elif calib is None and tuple(config.alpha_grid) == (0.0,) and config.keep_16bit == 0:
        chosen = [(s, 0.0) for s in candidates]  # data-free: no smoothing, nothing ranked
        kept = []
    else:
        grid = [float(a) for a in config.alpha_grid]

        def compute_errors() -> np.ndarray:
            samples = cal.samples()
            table = np.zeros((len(candidates), len(grid)))
            for i, site in enumerate(candidates):
                w = get_attr_value(module, site.weight)
                for j, alpha in enumerate(grid):
                    table[i, j] = _relative_output_error(w, build(site, alpha), samples[site.path], config)
            return table

        table = cal._cached(
            "quant-errors", compute_errors, layers=[s.path for s in candidates], rank=config.rank,
            group_size=config.group_size, act_mode=config.act_mode, low_rank=config.low_rank, grid=grid,
            refine=config.refine_iterations,
        ).reshape(len(candidates), len(grid))  # fmt: skip
        best = table.argmin(1) if len(candidates) else np.zeros(0, dtype=int)
        errors = {s.path: float(table[i, best[i]]) for i, s in enumerate(candidates)}
        ranking = sorted(candidates, key=lambda s: -errors[s.path])
        kept = [s.path for s in ranking[: config.keep_16bit]]
        chosen = [(s, grid[int(best[i])]) for i, s in enumerate(candidates) if s.path not in kept]
        stats["errors_by_alpha"] = {s.path: dict(zip(map(str, grid), map(float, table[i]), strict=True))
                                    for i, s in enumerate(candidates)}
    layers: list[tuple[LayerSite, QuantizedLinear]] = []
    reused = 0
    for site, alpha in chosen:
        stored = {t: program.new_weights.get(weight_key(site.path, t)) for t in TENSOR_NAMES}
        n, k = site.shape
        if all(v is not None for v in stored.values()) and tuple(stored["packed"].shape) == (n, k // 2) \
                and tuple(stored["scales"].shape) == (n, k // config.group_size):
            layers.append((site, QuantizedLinear(**stored)))
            reused += 1
        else:
            layers.append((site, build(site, alpha)))
    resolved = QuantConfig.from_dict({
        **config.to_dict(), "alphas": [[s.path, a] for s, a in chosen], "kept_16bit": list(kept),
    })  # fmt: skip
    stats.update(
        quantized=[s.path for s, _ in chosen],
        alphas={s.path: a for s, a in chosen},
        kept_16bit=list(kept),
        errors=errors,
        reused_tensors=reused,
        calibrated=cal.recorded,
    )
    if not layers:
        return PassResult(program, modified=False, stats=stats, resolved_config=resolved)
    before = sum(get_attr_value(module, s.weight).numel() * get_attr_value(module, s.weight).element_size() for s, _ in layers)
    after = sum(sum(t.numel() * t.element_size() for t in q.tensors().values()) for _, q in layers)
    stats.update(weight_bytes_before=int(before), weight_bytes_after=int(after),
                 compression=float(before / after) if after else 0.0)
    new_module = replace_linears(module, layers, group_size=config.group_size, act_mode=config.act_mode)
    new_weights = dict(program.new_weights)
    for site, q in layers:
        for name, tensor in q.tensors().items():
            new_weights[weight_key(site.path, name)] = tensor
    variant = GraphVariant(new_module, full.state_inputs, full.state_outputs, full.scalar_inputs)
    new_program = program.replace(variants={"full": variant}, new_weights=new_weights)
    return PassResult(new_program, modified=True, stats=stats, resolved_config=resolved)
