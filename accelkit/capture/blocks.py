"""Find the denoiser's repeated blocks, attention sites and linear sites in a captured graph.

Block membership comes from ``node.meta["nn_module_stack"]`` (``transformer_blocks.3``,
``single_transformer_blocks.7``, ``down_blocks.1``, ``mid_block``): model knowledge stays
declarative, no model forward is copied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

# Top-level children that hold the repeated computation: ModuleList items and the UNet mid block.
_LIST_ITEM = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\.(\d+)$")
_SINGLE_BLOCKS = ("mid_block",)


@dataclass(frozen=True)
class Block:
    """One repeated block of the denoiser.

    Args:
        name: module path, e.g. ``"transformer_blocks.3"``.
        group: the list it belongs to, e.g. ``"transformer_blocks"`` (``"mid_block"`` for the UNet mid).
        kind: the block's class name, e.g. ``"FluxTransformerBlock"``.
        nodes: names of the graph nodes (calls and weight reads) inside the block, in graph order.
        inputs: names of nodes outside the block that the block consumes (no weights).
        outputs: names of block nodes consumed outside the block, in graph order.
    """

    name: str
    group: str
    kind: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class SpanBoundary:
    """Values crossing into and out of a contiguous span of blocks.

    Args:
        inputs: nodes outside the span consumed inside it.
        carried: the subset of ``inputs`` not consumed after the span: the streams the span transforms
            (``temb`` and rotary embeddings are consumed by later blocks too, so they are not carried).
        outputs: span nodes consumed after the span.
    """

    inputs: tuple[str, ...]
    carried: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class BlockIndex:
    """The ordered repeated blocks of a captured denoiser."""

    blocks: tuple[Block, ...]

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def __getitem__(self, index: int) -> Block:
        return self.blocks[index]

    def counts(self) -> dict[str, int]:
        """Number of blocks per group, e.g. ``{"transformer_blocks": 2, "single_transformer_blocks": 4}``."""
        result: dict[str, int] = {}
        for block in self.blocks:
            result[block.group] = result.get(block.group, 0) + 1
        return result

    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.blocks)

    def span_boundary(self, module: fx.GraphModule, start: int, stop: int) -> SpanBoundary:
        """Boundary of blocks ``[start, stop)`` in ``module`` (whose node names match this index)."""
        if not 0 <= start < stop <= len(self.blocks):
            raise ValueError(f"span [{start}, {stop}) is outside the {len(self.blocks)} blocks")
        span_nodes = {n for block in self.blocks[start:stop] for n in block.nodes}
        nodes = {n.name: n for n in module.graph.nodes}
        order = {name: i for i, name in enumerate(nodes)}
        last_span_position = max(order[n] for n in span_nodes if n in order)
        inputs: list[str] = []
        outputs: list[str] = []
        for name in sorted(span_nodes, key=lambda n: order.get(n, -1)):
            node = nodes.get(name)
            if node is None:
                continue
            for arg in node.all_input_nodes:
                if arg.name not in span_nodes and arg.op != "get_attr" and arg.name not in inputs:
                    inputs.append(arg.name)
            # Weights (get_attr) are constants visible everywhere, never values the span produces:
            # DiT's final layer reuses transformer_blocks.0.norm1.emb's weights after the blocks.
            if node.op != "get_attr" and any(user.name not in span_nodes for user in node.users):
                outputs.append(name)
        carried = tuple(
            name for name in inputs if all(order[u.name] <= last_span_position for u in nodes[name].users)
        )
        inputs.sort(key=order.__getitem__)
        return SpanBoundary(inputs=tuple(inputs), carried=carried, outputs=tuple(outputs))


def _qualified_name(type_info: object) -> str:
    if isinstance(type_info, str):
        return type_info
    return f"{getattr(type_info, '__module__', '')}.{getattr(type_info, '__qualname__', '')}"


def _block_of_stack(stack: dict | None) -> tuple[str, str, str] | None:
    """(block path, group, class name) of the outermost repeated block in a module stack.

    ``torch.nn`` layers and the items of a ``Sequential`` (Z-Image's ``cap_embedder = Sequential(RMSNorm,
    Linear)``) are layers, not blocks; blocks are items of a ``ModuleList`` (or the UNet mid block).
    """
    if not stack:
        return None
    types = {str(path): _qualified_name(type_info) for path, type_info in stack.values()}
    for path, qualified in types.items():
        class_name = qualified.rsplit(".", 1)[-1]
        if qualified.startswith("torch.nn."):
            continue
        match = _LIST_ITEM.match(path)
        if match and types.get(match.group(1), "").endswith(".Sequential"):
            continue  # a layer of a Sequential (Linear, norm), not a repeated block
        if match:
            return path, match.group(1), class_name
        if path in _SINGLE_BLOCKS:
            return path, path, class_name
    return None


def _block_of_weight(target: str, known: dict[str, tuple[str, str]]) -> str | None:
    parts = target.split(".")
    for depth in (2, 1):
        prefix = ".".join(parts[:depth])
        if prefix in known:
            return prefix
    return None


def find_blocks(module: fx.GraphModule) -> BlockIndex:
    """Index the repeated blocks of a captured denoiser, in execution order."""
    membership: dict[str, str] = {}
    info: dict[str, tuple[str, str]] = {}
    order: list[str] = []
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        found = _block_of_stack(node.meta.get("nn_module_stack"))
        if found is None:
            continue
        path, group, class_name = found
        membership[node.name] = path
        if path not in info:
            info[path] = (group, class_name)
            order.append(path)
    for node in module.graph.nodes:
        if node.op == "get_attr":
            owner = _block_of_weight(str(node.target), info)
            if owner is not None:
                membership[node.name] = owner
    blocks = []
    for path in order:
        member_names = [n.name for n in module.graph.nodes if membership.get(n.name) == path]
        members = set(member_names)
        inputs: list[str] = []
        outputs: list[str] = []
        for node in module.graph.nodes:
            if node.name not in members or node.op != "call_function":
                continue
            for arg in node.all_input_nodes:
                if arg.name not in members and arg.op != "get_attr" and arg.name not in inputs:
                    inputs.append(arg.name)
            if any(user.name not in members for user in node.users):
                outputs.append(node.name)
        group, class_name = info[path]
        blocks.append(Block(path, group, class_name, tuple(member_names), tuple(inputs), tuple(outputs)))
    return BlockIndex(tuple(blocks))


def find_attention_sites(module: fx.GraphModule) -> tuple[str, ...]:
    """Names of the ``scaled_dot_product_attention`` nodes."""
    return tuple(
        n.name
        for n in module.graph.nodes
        if n.op == "call_function" and n.target is aten.scaled_dot_product_attention.default
    )


def find_linear_sites(module: fx.GraphModule) -> tuple[str, ...]:
    """Names of the ``aten.linear`` nodes."""
    return tuple(n.name for n in module.graph.nodes if n.op == "call_function" and n.target is aten.linear.default)


def node_module_path(node: fx.Node) -> str:
    """Innermost module path of a node (``transformer_blocks.0.attn.to_q``), or ``""``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return str(list(stack.values())[-1][0])
