"""``accelkit inspect``: capture a model's denoiser and describe it (family, blocks, FLOPs, attention sites)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class BlockInfo:
    """One block of the denoiser graph: its share of the FLOPs and the bytes of its weights."""

    name: str
    kind: str
    flops: float
    flops_share: float
    weight_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "flops": self.flops, "flops_share": self.flops_share,
                "weight_bytes": self.weight_bytes}


@dataclass(frozen=True, kw_only=True)
class Inspection:
    """What :func:`inspect_model` found; :meth:`to_dict` is ``accelkit inspect --json``."""

    model: str
    family: str
    params: int
    inputs: dict[str, Any]
    flops_per_step: float
    blocks: tuple[BlockInfo, ...]
    #: attention node -> its token count (None where the graph does not say)
    attention_sites: dict[str, int | None]
    linear_sites: int
    generation: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "family": self.family, "params": self.params, "inputs": self.inputs,
            "flops_per_step": self.flops_per_step, "blocks": [b.to_dict() for b in self.blocks],
            "attention_sites": self.attention_sites, "linear_sites": self.linear_sites,
            "generation": self.generation,
        }


def inspect_model(model: str | None = None, *, height: int | None = None, width: int | None = None,
                  num_frames: int | None = None, call_args: Sequence[str] = ()) -> Inspection:
    """Load ``model`` (default: the embedded zoo:shapes), capture its denoiser once and describe it.

    ``call_args`` are ``KEY=VALUE`` pipeline call arguments (``--call-arg``); the other generation
    settings default to the model's.
    """
    from accelkit.loading import load_pipeline
    from accelkit.pipeline_io import parse_call_arguments, probe_and_capture
    from accelkit.search.settings import OptimizeSettings, _generation_defaults

    arguments = parse_call_arguments(list(call_args))
    loaded = load_pipeline(model)
    settings = OptimizeSettings(model=model, height=height, width=width, call_args=arguments, num_frames=num_frames)
    generation = _generation_defaults(loaded.pipe, settings, loaded.source)
    _, graph = probe_and_capture(loaded.pipe, generation)
    total = graph.total_flops() or 1.0
    return Inspection(
        model=loaded.model_id, family=graph.family, params=sum(p.numel() for p in loaded.denoiser.parameters()),
        inputs={n: s.to_dict() for n, s in zip(graph.input_names, graph.input_specs, strict=True)},
        flops_per_step=total, blocks=_blocks(graph, loaded.denoiser, total), attention_sites=_attention_tokens(graph),
        linear_sites=len(graph.linear_sites), generation=generation)


def _blocks(graph: Any, denoiser: Any, total: float) -> tuple[BlockInfo, ...]:
    rows = []
    for block in graph.blocks:
        flops = sum(graph.costs[n].flops for n in block.nodes if n in graph.costs)
        weight_bytes = sum(p.numel() * p.element_size() for name, p in denoiser.named_parameters()
                           if name.startswith(block.name + "."))
        rows.append(BlockInfo(name=block.name, kind=block.kind, flops=flops, flops_share=flops / total,
                              weight_bytes=weight_bytes))
    return tuple(rows)


def _attention_tokens(graph: Any) -> dict[str, int | None]:
    from accelkit.capture.cost import concrete_size

    tokens = {}
    for name in graph.attention_sites:
        node = next(n for n in graph.module.graph.nodes if n.name == name)
        value = node.args[0].meta.get("val")
        tokens[name] = concrete_size(value.shape[-2]) if value is not None else None
    return tokens
