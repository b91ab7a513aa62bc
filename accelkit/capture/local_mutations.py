"""Dead-code elimination across in-place writes into tensors the graph itself allocated.

Rotary embeddings in Wan and CogView4 fill a fresh buffer slice by slice (``out = empty_like(x);
out[..., 0::2] = ...``), which export records as ``empty_like`` -> ``slice`` -> ``copy_``. A mutating op
counts as a side effect, so plain dead-code elimination keeps every ``copy_`` and, through them, the whole
block computing the values written: a cached graph variant would still compute the blocks it skips. A write
is only observable through the written storage, though; when that storage was allocated inside the graph
and nothing outside the group of nodes aliasing it is used, the group is dead as a whole.
"""

from __future__ import annotations

from torch import fx


def _schema(node: fx.Node):
    return getattr(node.target, "_schema", None) if node.op == "call_function" else None


def _is_view(node: fx.Node) -> bool:
    """An op whose result aliases its first argument without writing it (``slice``, ``view``, ``select``)."""
    schema = _schema(node)
    if schema is None or schema.is_mutable or not schema.returns or not schema.arguments:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def _written_base(node: fx.Node) -> fx.Node | None:
    """The node whose storage a mutating ``node`` writes (through views), or None when unclear."""
    schema = _schema(node)
    written = [i for i, arg in enumerate(schema.arguments) if arg.alias_info is not None and arg.alias_info.is_write]
    if len(written) != 1 or written[0] >= len(node.args) or not isinstance(node.args[written[0]], fx.Node):
        return None
    base = node.args[written[0]]
    while _is_view(base) and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    return base


def _alias_group(base: fx.Node) -> set[fx.Node]:
    """``base``, every view of it (recursively) and every op writing into one of them."""
    group, stack = {base}, [base]
    while stack:
        for user in stack.pop().users:
            if user in group:
                continue
            schema = _schema(user)
            writes_it = schema is not None and schema.is_mutable and _written_base(user) is base
            if _is_view(user) or writes_it:
                group.add(user)
                stack.append(user)
    return group


def remove_dead_local_writes(graph: fx.Graph) -> int:
    """Erase groups of writes into graph-allocated tensors that nothing outside the group reads.

    Returns:
        How many nodes were removed.
    """
    removed = 0
    for node in reversed(list(graph.nodes)):
        if node.graph is not graph or node.users:
            continue  # erased already, or live
        schema = _schema(node)
        if schema is None or not schema.is_mutable:
            continue
        base = _written_base(node)
        # Graph inputs, weights and buffers are visible to the caller: writes into them stay.
        if base is None or base.op != "call_function" or (_schema(base) is not None and _schema(base).is_mutable):
            continue
        group = _alias_group(base)
        if any(user not in group for member in group for user in member.users):
            continue
        for member in sorted(group, key=_position(graph), reverse=True):
            graph.erase_node(member)
            removed += 1
    return removed


def _position(graph: fx.Graph):
    order = {node: index for index, node in enumerate(graph.nodes)}
    return order.__getitem__
