"""Explicit casts where PyTorch promotes mixed operand dtypes and ONNX requires equal ones.

``torch.einsum`` of a float32 and a float64 tensor computes in float64 (HiDream's rotary table: float64
frequencies times float32 positions). The ONNX exporter keeps ``aten.einsum`` as one ONNX ``Einsum``, which
requires every operand to have the same type, and its own type-promotion pass covers elementwise ops
(``add``, ``cat``, ``where`` ...) but not einsum, so onnxruntime refuses the model at load ("Einsum bound to
different types"). :func:`cast_mixed_operands` casts each operand whose dtype differs from the op's
result dtype (PyTorch's promoted dtype, from the node's ``val`` meta) to that dtype before the op, so the
exported graph computes in the same dtypes as the PyTorch program: float64 stays float64.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

__all__ = ["cast_mixed_operands"]

aten = torch.ops.aten

# Ops that promote their operands' dtypes in PyTorch, are exported as one ONNX op whose inputs must share a
# type, and are not in the exporter's type-promotion rules: op -> position of the list of tensor operands.
_PROMOTING_LIST_OPERANDS: dict[Any, int] = {aten.einsum.default: 1}


def _dtype(node: Any) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _cast(graph: fx.Graph, operand: fx.Node, dtype: torch.dtype) -> fx.Node:
    cast = graph.call_function(aten._to_copy.default, (operand,), {"dtype": dtype})
    cast.meta = dict(operand.meta)
    cast.meta["val"] = operand.meta["val"].to(dtype)
    return cast


def cast_mixed_operands(graph: fx.Graph) -> bool:
    """Insert casts to the result dtype before mixed-dtype operands of promoting ops; True when any changed.

    Edits ``graph`` in place (the caller owns it: :func:`accelkit.export.onnx._prepare_module` passes a
    clone). Nodes without dtype meta are left as they are.
    """
    changed = False
    for node in list(graph.nodes):
        position = _PROMOTING_LIST_OPERANDS.get(node.target) if node.op == "call_function" else None
        result = _dtype(node)
        if position is None or result is None or len(node.args) <= position:
            continue
        operands = node.args[position]
        if not isinstance(operands, list | tuple):
            continue
        mixed = [o for o in operands if _dtype(o) is not None and _dtype(o) != result]
        if not mixed:
            continue
        with graph.inserting_before(node):
            casts = {o: _cast(graph, o, result) for o in mixed}
        args = list(node.args)
        args[position] = [casts.get(o, o) if isinstance(o, fx.Node) else o for o in operands]
        node.args = tuple(args)
        changed = True
    return changed
