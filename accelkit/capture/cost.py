"""FLOPs and bytes per graph node, from the fake tensors ``torch.export`` records in ``node.meta``.

These feed the ``inspect`` block table and the roofline cost model. Matrix products, convolutions and
attention carry the FLOPs; everything else is counted by the bytes it moves. A custom op's FLOPs come
from its cost formula in the op registry (:mod:`accelkit.kernels.registry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from accelkit.kernels.registry import op_call

aten = torch.ops.aten


@dataclass(frozen=True)
class NodeCost:
    """Cost of one graph node.

    Args:
        flops: floating-point operations (a multiply-add counts 2).
        bytes: activation bytes read and written plus the weight bytes the node reads.
        kind: ``"matmul"``, ``"attention"``, ``"conv"`` or ``"memory"``.
    """

    flops: float
    bytes: float
    kind: str


def _tensor_bytes(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(math.prod(concrete_size(s) for s in value.shape) * value.element_size())
    if isinstance(value, list | tuple):
        return float(sum(_tensor_bytes(v) for v in value))
    return 0.0


def _val(node) -> object:
    if isinstance(node, fx.Node):
        return node.meta.get("val")
    return None


def concrete_size(size) -> int:
    """An int for one dimension, also when it is symbolic.

    A data-dependent size (an unbacked symbol, e.g. the length of ``nonzero``'s result, which Mochi uses
    to drop padded text tokens) has no value at capture time; its upper bound from the shape
    environment is used instead, so the count is an estimate from above (0 when unbounded).
    """
    if isinstance(size, int):
        return size
    node = getattr(size, "node", None)
    hint = getattr(node, "hint", None)
    if hint is not None:
        return int(hint)
    try:
        upper = node.shape_env.bound_sympy(node.expr).upper
        return int(upper) if upper.is_finite else 0
    except (AttributeError, TypeError, ValueError):
        return 0


def _shape(node) -> tuple[int, ...] | None:
    value = _val(node)
    return tuple(concrete_size(s) for s in value.shape) if isinstance(value, torch.Tensor) else None


def get_attr_value(module: torch.nn.Module, target: str):
    """The object a ``get_attr`` node with ``target`` (``"blocks.0.attn.to_q.weight"``) reads."""
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _weight_tensor(module: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        target = get_attr_value(module, str(node.target))
        return target if isinstance(target, torch.Tensor) else None
    return None


def _input_bytes(module: fx.GraphModule, node: fx.Node) -> float:
    total = 0.0
    for arg in node.all_input_nodes:
        weight = _weight_tensor(module, arg)
        total += _tensor_bytes(weight) if weight is not None else _tensor_bytes(_val(arg))
    return total


def node_flops(node: fx.Node) -> tuple[float, str]:
    """FLOPs of one ``call_function`` node and its kind."""
    target = node.target
    out = _shape(node)
    if target is aten.linear.default:
        x, w = _shape(node.args[0]), _shape(node.args[1])
        if x and w:
            return 2.0 * math.prod(x[:-1]) * w[1] * w[0], "matmul"
    if target in (aten.mm.default, aten.bmm.default, aten.matmul.default, aten.addmm.default,
                  aten.baddbmm.default):
        a = _shape(node.args[1] if target in (aten.addmm.default, aten.baddbmm.default) else node.args[0])
        if a and out:
            return 2.0 * math.prod(out) * a[-1], "matmul"
    if target is aten.conv2d.default or target is aten.convolution.default:
        w = _shape(node.args[1])
        if w and out:
            return 2.0 * math.prod(out) * math.prod(w[1:]), "conv"
    if target is aten.scaled_dot_product_attention.default:
        q, k = _shape(node.args[0]), _shape(node.args[1])
        if q and k:
            # QK^T and PV: 2 * (2 * L_q * L_k * d) per batch-head.
            return 4.0 * math.prod(q[:-2]) * q[-2] * k[-2] * q[-1], "attention"
    registered = op_call(node)
    if registered is not None and registered[0].flops is not None:
        spec, call = registered
        counted = spec.flops(call)
        if counted is not None:
            return float(counted.flops), counted.kind
    return (float(math.prod(out)) if out else 0.0), "memory"


def graph_costs(module: fx.GraphModule) -> dict[str, NodeCost]:
    """FLOPs/bytes for every ``call_function`` node of ``module``."""
    costs: dict[str, NodeCost] = {}
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        flops, kind = node_flops(node)
        moved = _input_bytes(module, node) + _tensor_bytes(_val(node))
        costs[node.name] = NodeCost(flops=flops, bytes=moved, kind=kind)
    return costs


def weights_bytes(modules) -> int:
    """Bytes of the constants (weights, buffers) the graphs of ``modules`` read, each tensor once.

    Only tensors a ``get_attr`` node reaches count: a pruned block's parameters may still hang off the
    module but no longer belong to the model, and graph variants sharing a weight store it once.
    """
    seen: dict[tuple[int, int], int] = {}
    for module in modules:
        for node in module.graph.nodes:
            tensor = _weight_tensor(module, node)
            if tensor is None:
                continue
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else (id(tensor), 0)
            seen[key] = tensor.numel() * tensor.element_size()
    return int(sum(seen.values()))
