"""Streams through blocks: which block input each block output is a residual update of.

Found in the graph, not from model knowledge: walking back from an output through residual adds,
scalar scalings, dtype casts, views and matching ``cat``/``slice`` pairs (the Flux single-stream
block concatenates text and image tokens and slices them apart again) must reach a block input of
the same shape and dtype. Pruning wires a removed block's outputs to these inputs; caching pairs a
span's outputs with the span inputs so that it can store residuals. Pairing by shape alone would
cross the Flux text and image streams whenever they hold the same number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from accelkit.capture.blocks import BlockIndex, find_blocks

aten = torch.ops.aten

# Ops a residual stream passes through unchanged in value (up to layout/dtype).
_PASS_THROUGH = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten._to_copy.default,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.clamp.default, aten.clip.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
    aten.permute.default, aten.transpose.int, aten.flatten.using_ints, aten.unflatten.int,
    aten.lift_fresh_copy.default, aten.type_as.default,  # Wan: (x.float() + y * gate).type_as(x)
}
# Ops whose region-free views keep element positions (a slice region can be carried through them).
_SAME_LAYOUT = {
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.clamp.default,
    aten.clip.default, aten.lift_fresh_copy.default, aten.type_as.default,
}


def _meta(node: Any) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _signature(node: fx.Node) -> tuple | None:
    value = _meta(node)
    return (tuple(value.shape), value.dtype) if value is not None else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


Region = tuple[int, int, int] | None  # (dim, start, stop) of a slice being tracked back, or None


def _skip_predecessors(node: fx.Node, region: Region) -> list[tuple[fx.Node, Region]]:
    """Values ``node`` passes through unchanged (the residual path), with the region they feed."""
    target = node.target
    value = _meta(node)
    if value is None:
        return []
    if target in (aten.add.Tensor, aten.sub.Tensor):
        # The residual is an operand of the output's own shape (for sub only the minuend).
        operands = node.args[:1] if target is aten.sub.Tensor else node.args[:2]
        return [(a, region) for a in operands
                if isinstance(a, fx.Node) and _meta(a) is not None and _meta(a).shape == value.shape]
    if target in (aten.mul.Tensor, aten.div.Tensor):
        # Scaling by a constant (UNet output_scale_factor) keeps the stream; a tensor gate does not.
        if len(node.args) >= 2 and _is_number(node.args[1]) and isinstance(node.args[0], fx.Node):
            return [(node.args[0], region)]
        return []
    if target in _PASS_THROUGH:
        source = node.args[0]
        if not isinstance(source, fx.Node):
            return []
        if region is not None and target not in _SAME_LAYOUT:
            return []
        return [(source, region)]
    if target is aten.slice.Tensor:
        source = node.args[0]
        source_value = _meta(source)
        if source_value is None:
            return []
        dim = node.args[1] if len(node.args) > 1 else 0
        start = node.args[2] if len(node.args) > 2 else 0
        stop = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        if not all(v is None or _is_number(v) for v in (dim, start, stop, step)) or step != 1:
            return []
        dim %= source_value.ndim
        size = int(source_value.shape[dim])
        start = 0 if start is None else (start + size if start < 0 else start)
        stop = size if stop is None else (stop + size if stop < 0 else stop)
        start, stop = max(0, min(start, size)), max(0, min(stop, size))
        if region is not None:
            if region[0] != dim:
                return []
            start, stop = start + region[1], start + region[2]
        return [(source, None if (start, stop) == (0, size) else (dim, start, stop))]
    if target is aten.cat.default:
        if region is None:
            return []
        dim = node.args[1] if len(node.args) > 1 else 0
        dim %= value.ndim
        if dim != region[0]:
            return []
        offset = 0
        for part in node.args[0]:
            part_value = _meta(part)
            if part_value is None:
                return []
            size = int(part_value.shape[dim]) if part_value.ndim == value.ndim else 0
            if offset <= region[1] and region[2] <= offset + size:
                inner = (dim, region[1] - offset, region[2] - offset)
                return [(part, None if (inner[1], inner[2]) == (0, size) else inner)]
            offset += size
        return []
    return []


def _residual_sources(output: fx.Node, members: set[str], inputs: set[str]) -> list[str]:
    """Block inputs that ``output`` is a residual update of, nearest first."""
    found: list[str] = []
    seen: set[tuple[str, Region]] = set()
    frontier: list[tuple[fx.Node, Region]] = [(output, None)]
    while frontier:
        following: list[tuple[fx.Node, Region]] = []
        for node, region in frontier:
            if (node.name, region) in seen:
                continue
            seen.add((node.name, region))
            if node.name in inputs:
                if region is None and node.name not in found:
                    found.append(node.name)
                continue
            if node.name not in members or node.op != "call_function":
                continue
            following.extend(_skip_predecessors(node, region))
        frontier = following
    return found


@dataclass(frozen=True)
class BlockPairing:
    """Whether a block can be removed and how its outputs map to its inputs.

    Args:
        name: block name, e.g. ``"transformer_blocks.3"``.
        index: position in the block index.
        pairs: ``(output node, input node)`` per block output when removable, else empty.
        reason: why the block is not removable (None when it is).
    """

    name: str
    index: int
    pairs: tuple[tuple[str, str], ...]
    reason: str | None = None

    @property
    def removable(self) -> bool:
        return self.reason is None


def pair_block_outputs(module: fx.GraphModule, blocks: BlockIndex, index: int) -> BlockPairing:
    """Pair every output of block ``index`` with the input it passes through (see module docstring)."""
    block = blocks[index]
    nodes = {n.name: n for n in module.graph.nodes}
    members = set(block.nodes)
    inputs = set(block.inputs)
    outputs = [name for name in block.outputs if nodes[name].op == "call_function"]
    if not outputs:
        return BlockPairing(block.name, index, (), "the block has no outputs")
    pairs: list[tuple[str, str]] = []
    used: set[str] = set()
    for name in outputs:
        output = nodes[name]
        shape = _signature(output)
        sources = [s for s in _residual_sources(output, members, inputs)
                   if s not in used and _signature(nodes[s]) == shape]
        if not sources:
            described = f"{list(shape[0])} {str(shape[1]).removeprefix('torch.')}" if shape else "non-tensor"
            return BlockPairing(
                block.name, index, (),
                f"output '{name}' ({described}) is not a residual update of any block input of that shape",
            )
        used.add(sources[0])
        pairs.append((name, sources[0]))
    return BlockPairing(block.name, index, tuple(pairs))


def removal_candidates(module: fx.GraphModule, blocks: BlockIndex | None = None) -> list[BlockPairing]:
    """A :class:`BlockPairing` for every block of ``module``, in block order."""
    blocks = find_blocks(module) if blocks is None else blocks
    return [pair_block_outputs(module, blocks, i) for i in range(len(blocks))]
