"""onnxscript's graph optimizer for exported models, without the rewrites that change their results.

onnxscript (0.7) matches a pattern's constant with ``math.isclose(value, constant, abs_tol=1e-8)``, so its
no-op rules rewrite ``x + 1e-15`` (and ``x - 1e-15``) to ``x``. That removes an epsilon that guards a
division: where the sum it guards is exactly zero the model computes 0/0 = NaN and PyTorch computes 0
(Sana's linear attention divides by ``sum(relu(q) relu(k)) + 1e-15``, which is 0 for a query whose ReLU
features are all zero; with random weights that happens for some inputs and not others). The rules that
drop the addition of a tiny non-zero constant are found by trying each default rule on probe models
(``x + c``, ``c + x``, ``x - c`` with ``c = 1e-15``) and left out; everything else runs as
``torch.onnx.export(optimize=True)`` runs it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

__all__ = ["optimize_model", "result_changing_rules"]

# Far below the matcher's 1e-8 and far above float32's smallest normal: a typical division guard.
_PROBE_CONSTANT = 1e-15


def _probe(op_type: str, constant_first: bool) -> Any:
    """``y = op_type(x, c)`` (or ``(c, x)``) with ``c`` a float32 initializer, as an ``onnx_ir`` model."""
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    constant = numpy_helper.from_array(np.array(_PROBE_CONSTANT, dtype=np.float32), name="c")
    node = helper.make_node(op_type, ["c", "x"] if constant_first else ["x", "c"], ["y"])
    graph = helper.make_graph(
        [node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[constant],
    )  # fmt: skip
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _drops_tiny_constant(rule: Any) -> bool:
    for op_type, constant_first in (("Add", False), ("Add", True), ("Sub", False)):
        model = _probe(op_type, constant_first)
        if rule.apply_to_model(model) and not any(n.op_type == op_type for n in model.graph):
            return True
    return False


@functools.cache
def result_changing_rules() -> tuple[Any, ...]:
    """The default onnxscript rewrite rules that remove ``x + 1e-15`` or ``x - 1e-15`` (left out here)."""
    import onnxscript.rewriter

    return tuple(rule for rule in onnxscript.rewriter._DEFAULT_REWRITE_RULES if _drops_tiny_constant(rule))


@contextlib.contextmanager
def _default_rules_without(excluded: tuple[Any, ...]) -> Iterator[None]:
    """``optimize_ir`` reads the rule list from this module attribute at call time."""
    import onnxscript.rewriter

    rules = onnxscript.rewriter._DEFAULT_REWRITE_RULES
    onnxscript.rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if r not in excluded)
    try:
        yield
    finally:
        onnxscript.rewriter._DEFAULT_REWRITE_RULES = rules


def optimize_model(model: Any) -> None:
    """Optimize an ``onnx_ir.Model`` in place: constant folding, rewrites, fusions; local functions kept.

    The same passes as ``torch.onnx.export(optimize=True)``, without :func:`result_changing_rules`.
    """
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    with _default_rules_without(result_changing_rules()):
        onnxscript.optimizer.optimize_ir(model, inline=False)
    onnxscript.rewriter.onnx_fusions.fuse(model)
