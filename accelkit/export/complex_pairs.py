"""Complex tensors as real ``(..., 2)`` pairs, so a graph that computes with complex numbers exports to ONNX.

Rotary tables are often complex (``torch.polar``, a complex buffer, ``view_as_complex(x) * freqs``), and the
ONNX exporter lowers no op on a complex value. :func:`complex_as_real_pairs` rewrites a captured graph so
that every complex value ``z`` is carried as ``torch.view_as_real(z)`` instead: real and imaginary parts in
a trailing dimension of 2. Then:

* ``view_as_complex`` and ``view_as_real`` vanish (the pair *is* the real view), ``polar`` becomes
  ``stack([abs * cos(angle), abs * sin(angle)], -1)``, ``complex`` a stack, ``real``/``imag`` a select;
* complex products, quotients, sums and conjugates become the real arithmetic on the two parts;
* ops that move elements (slice, select, index, split, cat, stack, reshape, expand, permute, pad ...) run on
  the pair with their dimension arguments counted from the front, so the trailing pair dimension is kept;
* complex buffers and constants become real pair buffers; higher-order ops whose subgraph follows the
  operands (``wrap_with_autocast``, ``wrap_with_set_grad_enabled``) have the subgraph rewritten with them.

The results are those of the PyTorch program up to float rounding (the same formulas in the same dtype).
The graph's own inputs and outputs stay as they were: a complex one is refused (runners feed real tensors).
An op on a complex value without a rule here is refused with its name, before anything is traced.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from accelkit.export.lowerings import OnnxExportError

__all__ = ["complex_as_real_pairs", "holds_complex"]

aten = torch.ops.aten
_REAL_DTYPE = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


def _value(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_complex(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return any(_is_complex(v) for v in value)
    return isinstance(value, torch.Tensor) and value.is_complex()


def _fetch(module: torch.nn.Module, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), module)


def _subgraph_arg(module: fx.GraphModule, node: fx.Node) -> int | None:
    """Position of the argument of ``node`` that names a subgraph (a higher-order op's body), if any."""
    for index, arg in enumerate(node.args):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            if isinstance(_fetch(module, arg.target), fx.GraphModule):
                return index
    return None


def holds_complex(module: fx.GraphModule) -> bool:
    """Whether a node of ``module`` (or of a subgraph it calls) has a complex value or reads a complex one."""
    for node in module.graph.nodes:
        if _is_complex(_value(node)):
            return True
        if node.op == "get_attr":
            attr = _fetch(module, node.target)
            if isinstance(attr, fx.GraphModule) and holds_complex(attr):
                return True
            if isinstance(attr, torch.Tensor) and attr.is_complex():
                return True
    return False


def complex_as_real_pairs(module: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``module`` that carries every complex value as a real ``(..., 2)`` pair.

    Returns ``module`` itself when it holds no complex value; never mutates it (weights are shared).

    Raises:
        OnnxExportError: a graph input or output is complex, or an op on a complex value has no rule.
    """
    if not holds_complex(module):
        return module
    return _PairRewriter(module, pair_inputs=None).build()


def _normalized(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _unique_name(taken: set[str], base: str) -> str:
    name, index = re.sub(r"[^0-9A-Za-z_]", "_", base), 0
    while f"{name}_{index}" in taken:
        index += 1
    taken.add(f"{name}_{index}")
    return f"{name}_{index}"


class _PairRewriter:
    """Copies one graph into a new one, node by node, replacing complex values by their pairs.

    Args:
        module: the graph module to rewrite.
        pair_inputs: placeholder positions that are fed pairs (a subgraph), or None for the top graph,
            whose inputs must be real.
    """

    def __init__(self, module: fx.GraphModule, pair_inputs: set[int] | None) -> None:
        self.module, self.pair_inputs, self.top = module, pair_inputs or set(), pair_inputs is None
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.pairs: set[fx.Node] = set()  # old nodes (or lists of them) carried as pairs
        self.pair_items: dict[fx.Node, set[int]] = {}  # old tuple-valued nodes: the items that are pairs
        self.new_attrs: dict[str, Any] = {}
        self.output_pairs: set[int] = set()

    # ------------------------------------------------------------ emitting

    def call(self, target: Any, /, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(target, args, kwargs)

    def new(self, arg: Any) -> Any:
        """``arg`` (old nodes, lists, numbers) mapped into the new graph."""
        return fx.map_arg(arg, lambda n: self.env[n])

    def is_pair(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg in self.pairs

    def parts(self, arg: fx.Node) -> tuple[fx.Node, fx.Node]:
        pair = self.env[arg]
        return self.call(aten.select.int, pair, -1, 0), self.call(aten.select.int, pair, -1, 1)

    def pack(self, real: Any, imag: Any) -> fx.Node:
        return self.call(aten.stack.default, [real, imag], -1)

    def promoted(self, arg: Any) -> fx.Node:
        """The pair of an old node: its own, or (real tensor) the tensor with a zero imaginary part."""
        if self.is_pair(arg):
            return self.env[arg]
        if not isinstance(arg, fx.Node):
            raise OnnxExportError(f"cannot carry the number {arg!r} as a complex pair here")
        real = self.env[arg]
        return self.pack(real, self.call(aten.zeros_like.default, real))

    # ------------------------------------------------------------ building

    def build(self) -> fx.GraphModule:
        placeholders = 0
        for node in self.module.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node, placeholders)
                placeholders += 1
            elif node.op == "get_attr":
                self._get_attr(node)
            elif node.op == "output":
                self._output(node)
            else:
                self._compute(node)
        for node in [n for n in self.graph.nodes if n.op == "get_attr" and not n.users]:
            self.graph.erase_node(node)  # a complex buffer or subgraph that was replaced
        attrs = {
            n.target: self.new_attrs[n.target]
            if n.target in self.new_attrs
            else _fetch(self.module, n.target)
            for n in self.graph.nodes
            if n.op == "get_attr"
        }
        self.graph.lint()
        return fx.GraphModule(attrs, self.graph, class_name=type(self.module).__name__)

    def _placeholder(self, node: fx.Node, position: int) -> None:
        pair = position in self.pair_inputs
        if self.top and _is_complex(_value(node)):
            raise OnnxExportError(
                f"graph input '{node.target}' is complex; an exported model takes real tensors: pass "
                "torch.view_as_real of it and view_as_complex inside the model"
            )
        self._record(node, self.graph.node_copy(node, self.new), pair)

    def _get_attr(self, node: fx.Node) -> None:
        attr = _fetch(self.module, node.target)
        if not (isinstance(attr, torch.Tensor) and attr.is_complex()):
            self.env[node] = self.graph.node_copy(node, self.new)
            return
        name = _unique_name(
            {n.target for n in self.module.graph.nodes if n.op == "get_attr"} | set(self.new_attrs),
            f"{node.target}_real_pair",
        )
        self.new_attrs[name] = torch.view_as_real(attr.detach().resolve_conj()).clone()
        self._record(node, self.graph.get_attr(name), pair=True)

    def _output(self, node: fx.Node) -> None:
        outputs = node.args[0]
        flat = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
        self.output_pairs = {i for i, value in enumerate(flat) if self.is_pair(value)}
        if self.top and self.output_pairs:
            raise OnnxExportError(
                "the graph returns a complex tensor; an exported model returns real tensors: return "
                "torch.view_as_real of it"
            )
        self.graph.node_copy(node, self.new)

    def _compute(self, node: fx.Node) -> None:
        if (
            isinstance(node.target, torch._ops.HigherOrderOperator)
            and _subgraph_arg(self.module, node) is not None
        ):
            self._higher_order(node)
            return
        touched = [n for n in node.all_input_nodes if n in self.pairs or n in self.pair_items]
        if not touched and not _is_complex(_value(node)):
            self.env[node] = self.graph.node_copy(node, self.new)
            return
        if node.op != "call_function":
            raise OnnxExportError(f"cannot export {node.op} '{node.target}' on a complex value ({node.name})")
        if node.target is aten._assert_tensor_metadata.default:
            return  # a dtype check of the complex value, which no longer exists
        if node.target is operator.getitem:
            source, index = node.args
            pair = source in self.pairs or index in self.pair_items.get(source, ())
            self._record(node, self.graph.node_copy(node, self.new), pair)
            return
        rule = _RULES.get(node.target) or (_same_op if node.target in _MOVES else None)
        if rule is None:
            raise OnnxExportError(
                f"cannot export {node.target} on a complex value ({node.name}): complex tensors are carried "
                "as real pairs for ONNX, and this op has no rule in accelkit/export/complex_pairs.py"
            )
        new, pair = rule(self, node)
        self._record(node, new, pair)

    def _higher_order(self, node: fx.Node) -> None:
        """A higher-order op whose subgraph argument is followed by that subgraph's operands."""
        position = _subgraph_arg(self.module, node)
        body = _fetch(self.module, node.args[position].target)
        operands = node.args[position + 1 :]
        pair_inputs = {i for i, arg in enumerate(operands) if self.is_pair(arg)}
        if not pair_inputs and not holds_complex(body):
            self.env[node] = self.graph.node_copy(node, self.new)
            return
        if any(isinstance(a, fx.Node) and a.op == "get_attr" for a in operands) or node.kwargs:
            raise OnnxExportError(f"cannot export {node.target} on complex values ({node.name})")
        rewriter = _PairRewriter(body, pair_inputs)
        name = _unique_name(set(self.new_attrs), f"{node.args[position].target}_real_pairs")
        self.new_attrs[name] = rewriter.build()
        args = [*self.new(node.args[:position]), self.graph.get_attr(name), *self.new(operands)]
        new = self.graph.call_function(node.target, tuple(args))
        new.meta = dict(node.meta)
        self.env[node] = new
        self.pair_items[node] = rewriter.output_pairs

    def _record(self, node: fx.Node, new: fx.Node, pair: bool) -> None:
        """Map ``node`` to ``new``, carrying the old metadata (the value as its real view when a pair)."""
        meta = dict(node.meta)
        value = meta.get("val")
        if pair and _is_complex(value):
            try:
                meta["val"] = (
                    [torch.view_as_real(v) for v in value] if isinstance(value, list | tuple)
                    else torch.view_as_real(value)
                )  # fmt: skip
            except (RuntimeError, TypeError):
                meta.pop("val")
        new.meta = meta
        self.env[node] = new
        if pair:
            self.pairs.add(node)


# ---------------------------------------------------------------- rules: (rewriter, node) -> (node, is pair)

Rule = Callable[[_PairRewriter, fx.Node], tuple[fx.Node, bool]]


def _named(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name (positional ones included)."""
    schema = node.target._schema
    named = {schema.arguments[i].name: arg for i, arg in enumerate(node.args)}
    return {**named, **node.kwargs}


def _rank(node: fx.Node) -> int:
    value = _value(node)
    if isinstance(value, list | tuple):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise OnnxExportError(
            f"no shape is known for the complex value {node.name}: cannot carry it as a pair"
        )
    return value.dim()


# Dimension arguments (counted on the complex tensor) by schema name; "dims" of permute lists every dim.
_DIM_NAMES = ("dim", "dim0", "dim1", "start_dim", "end_dim", "source", "destination")
_SHAPE_NAMES = ("size", "shape")
# Ops whose output rank is one more than the input's: their dim counts on the output.
_GROWS_RANK = (aten.unsqueeze.default, aten.stack.default)
_REDUCTIONS = (aten.sum.dim_IntList, aten.mean.dim)


def _same_op(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    """An op that moves elements: the same op on the pair, dims counted from the front, pair dim kept."""
    named = _named(node)
    source = next(a for a in node.all_input_nodes if rewriter.is_pair(a))
    rank = _rank(source) + (node.target in _GROWS_RANK)
    for key in ("tensors", "sequences"):  # cat, stack, pad_sequence: every tensor of the list as a pair
        if key in named:
            named[key] = [rewriter.promoted(a) for a in named[key]]
    if node.target in _REDUCTIONS and not named.get("dim"):
        named["dim"] = list(range(rank))  # None or [] reduces every dim, the pair dim excepted
    for key in _DIM_NAMES:
        value = named.get(key)
        if isinstance(value, int):
            named[key] = _normalized(value, rank)
        elif isinstance(value, list | tuple):
            named[key] = [_normalized(d, rank) for d in value]
    for key in _SHAPE_NAMES:
        if key in named:
            named[key] = [*named[key], 2]
    _adjust_special(node, named, rank)
    args = {k: v if k in ("tensors", "sequences") else rewriter.new(v) for k, v in named.items()}
    return rewriter.call(node.target, **args), True


def _adjust_special(node: fx.Node, named: dict[str, Any], rank: int) -> None:
    """Arguments of the moving ops whose meaning is not just a dim or a shape."""
    target = node.target
    if target is aten.permute.default:
        named["dims"] = [*(_normalized(d, rank) for d in named["dims"]), rank]
    elif target in (aten.flip.default, aten.roll.default):
        if not named.get("dims"):
            raise OnnxExportError(f"cannot carry {target} over every dim of a complex value ({node.name})")
        named["dims"] = [_normalized(d, rank) for d in named["dims"]]
    elif target is aten.repeat.default:
        named["repeats"] = [*named["repeats"], 1]
    elif target is aten.constant_pad_nd.default:
        if named.get("value", 0) != 0:
            raise OnnxExportError(f"cannot pad a complex value with {named['value']!r} ({node.name})")
        named["pad"] = [0, 0, *named["pad"]]
    elif target is aten.pad_sequence.default and named.get("padding_value", 0.0) != 0.0:
        raise OnnxExportError(f"cannot pad complex values with {named['padding_value']!r} ({node.name})")


_MOVES = {
    aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default,
    aten.lift_fresh_copy.default, aten.resolve_conj.default, aten.resolve_neg.default, aten.slice.Tensor,
    aten.select.int, aten.index.Tensor, aten.index_select.default, aten.narrow.default, aten.cat.default,
    aten.stack.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unsafe_split.Tensor,
    aten.chunk.default, aten.unbind.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.permute.default, aten.transpose.int, aten.movedim.int, aten.flatten.using_ints, aten.unflatten.int,
    aten.repeat.default, aten.roll.default, aten.flip.default, aten.pad_sequence.default,
    aten.constant_pad_nd.default, aten.sum.dim_IntList, aten.mean.dim, aten.zeros_like.default,
    aten.neg.default,
}  # fmt: skip


def _gather(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    """``gather`` of a complex tensor: the index picks both parts, so it gets the pair dim too."""
    named = _named(node)
    rank = _rank(named["self"])
    index = rewriter.call(aten.unsqueeze.default, rewriter.new(named["index"]), -1)
    index = rewriter.call(aten.expand.default, index, [-1] * rank + [2])
    return rewriter.call(aten.gather.default, rewriter.new(named["self"]), _normalized(named["dim"], rank),
                         index), True


def _new_complex(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    """``zeros``/``empty`` of a complex dtype: the same of its real dtype, with the pair dim."""
    named = _named(node)
    named["size"] = [*named["size"], 2]
    named["dtype"] = _REAL_DTYPE.get(named.get("dtype"), named.get("dtype"))
    return rewriter.call(node.target, **{k: rewriter.new(v) for k, v in named.items()}), True


def _copy(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    """``copy_`` into a complex tensor (or a view of one, as Lumina2 fills its rotary table)."""
    named = _named(node)
    if not rewriter.is_pair(named["self"]):
        raise OnnxExportError(f"cannot copy a complex value into a real tensor ({node.name})")
    named["self"], named["src"] = rewriter.env[named["self"]], rewriter.promoted(named["src"])
    return rewriter.call(node.target, **{k: rewriter.new(v) if k not in ("self", "src") else v
                                         for k, v in named.items()}), True


def _squeeze_all(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    shape = _value(node.args[0]).shape
    dims = [d for d in range(len(shape)) if shape[d] == 1]
    return rewriter.call(aten.squeeze.dims, rewriter.new(node.args[0]), dims), True


def _t(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    pair = rewriter.new(node.args[0])
    if _rank(node.args[0]) < 2:
        return rewriter.call(aten.alias.default, pair), True
    return rewriter.call(aten.transpose.int, pair, 0, 1), True


def _view_as_complex(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    return rewriter.call(aten.alias.default, rewriter.new(node.args[0])), True


def _view_as_real(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    return rewriter.call(aten.alias.default, rewriter.env[node.args[0]]), False


def _polar(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    magnitude, angle = rewriter.new(node.args[0]), rewriter.new(node.args[1])
    real = rewriter.call(aten.mul.Tensor, magnitude, rewriter.call(aten.cos.default, angle))
    imag = rewriter.call(aten.mul.Tensor, magnitude, rewriter.call(aten.sin.default, angle))
    return rewriter.pack(real, imag), True


def _complex(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    parts = rewriter.call(
        aten.broadcast_tensors.default, [rewriter.new(node.args[0]), rewriter.new(node.args[1])]
    )
    return rewriter.pack(
        rewriter.call(operator.getitem, parts, 0), rewriter.call(operator.getitem, parts, 1)
    ), True


def _part(index: int) -> Rule:
    def rule(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
        return rewriter.call(aten.select.int, rewriter.env[node.args[0]], -1, index), False

    return rule


def _abs(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    squares = rewriter.call(aten.mul.Tensor, rewriter.env[node.args[0]], rewriter.env[node.args[0]])
    return rewriter.call(aten.sqrt.default, rewriter.call(aten.sum.dim_IntList, squares, [-1])), False


def _angle(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    real, imag = rewriter.parts(node.args[0])
    return rewriter.call(aten.atan2.default, imag, real), False


def _conj(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    real, imag = rewriter.parts(node.args[0])
    return rewriter.pack(real, rewriter.call(aten.neg.default, imag)), True


def _ones_like(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    real, _ = rewriter.parts(node.args[0])
    return rewriter.pack(
        rewriter.call(aten.ones_like.default, real), rewriter.call(aten.zeros_like.default, real)
    ), True


def _complex_product(rewriter: _PairRewriter, a: tuple[Any, Any], b: tuple[Any, Any]) -> fx.Node:
    """(ar + i ai)(br + i bi) = (ar br - ai bi) + i (ar bi + ai br), each part a node or a number."""

    def mul(x: Any, y: Any) -> Any:
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            return (
                rewriter.call(aten.mul.Tensor, x, y)
                if isinstance(x, fx.Node)
                else rewriter.call(aten.mul.Tensor, y, x)
            )
        return x * y

    real = rewriter.call(aten.sub.Tensor, mul(a[0], b[0]), mul(a[1], b[1]))
    imag = rewriter.call(aten.add.Tensor, mul(a[0], b[1]), mul(a[1], b[0]))
    return rewriter.pack(real, imag)


def _mul(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    a, b = node.args[:2]
    if not rewriter.is_pair(a):
        a, b = b, a
    if not rewriter.is_pair(b) and not isinstance(b, fx.Node) and not rewriter.is_pair(a):
        a, b = b, a  # a real tensor times a complex number
        return _complex_product(rewriter, (rewriter.env[a], 0.0), (b.real, b.imag)), True
    if rewriter.is_pair(b):
        return _complex_product(rewriter, rewriter.parts(a), rewriter.parts(b)), True
    if isinstance(b, complex):
        return _complex_product(rewriter, rewriter.parts(a), (b.real, b.imag)), True
    factor = rewriter.call(aten.unsqueeze.default, rewriter.env[b], -1) if isinstance(b, fx.Node) else b
    return rewriter.call(aten.mul.Tensor, rewriter.env[a], factor), True


def _div(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    a, b = node.args[:2]
    if isinstance(b, int | float | complex):
        inverse = 1 / complex(b)
        return _complex_product(rewriter, rewriter.parts(a), (inverse.real, inverse.imag)), True
    if not rewriter.is_pair(b):
        divisor = rewriter.call(aten.unsqueeze.default, rewriter.env[b], -1)
        return rewriter.call(aten.div.Tensor, rewriter.env[a], divisor), True
    # a / b = a conj(b) / |b|^2
    br, bi = rewriter.parts(b)
    norm = rewriter.call(
        aten.add.Tensor, rewriter.call(aten.mul.Tensor, br, br), rewriter.call(aten.mul.Tensor, bi, bi)
    )
    product = _complex_product(
        rewriter,
        rewriter.parts(a) if rewriter.is_pair(a) else (rewriter.env[a], 0.0),
        (br, rewriter.call(aten.neg.default, bi)),
    )
    return rewriter.call(aten.div.Tensor, product, rewriter.call(aten.unsqueeze.default, norm, -1)), True


def _add(sign: int) -> Rule:
    """``add``/``sub`` (``sign`` -1) with ``alpha``: a number adds to the parts, a real tensor is promoted."""

    def rule(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
        named = _named(node)
        a, b, alpha = named["self"], named["other"], named.get("alpha", 1) * sign
        if isinstance(b, int | float | complex):
            real, imag = rewriter.parts(a)
            b = complex(b) * alpha
            return rewriter.pack(rewriter.call(aten.add.Tensor, real, b.real),
                                 rewriter.call(aten.add.Tensor, imag, b.imag)), True  # fmt: skip
        return rewriter.call(aten.add.Tensor, rewriter.promoted(a), rewriter.promoted(b), alpha=alpha), True

    return rule


def _where(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    condition = rewriter.call(aten.unsqueeze.default, rewriter.new(node.args[0]), -1)
    return rewriter.call(aten.where.self, condition, rewriter.promoted(node.args[1]),
                         rewriter.promoted(node.args[2])), True  # fmt: skip


def _convert(rewriter: _PairRewriter, node: fx.Node) -> tuple[fx.Node, bool]:
    """``to``/``_to_copy``: complex dtypes become their real ones; to a real dtype keeps the real part."""
    named = _named(node)
    source, dtype = named["self"], named.get("dtype")
    to_complex = dtype in _REAL_DTYPE or (dtype is None and rewriter.is_pair(source))
    if dtype in _REAL_DTYPE:
        named["dtype"] = _REAL_DTYPE[dtype]
    if rewriter.is_pair(source) and not to_complex:
        named["self"] = rewriter.call(aten.select.int, rewriter.env[source], -1, 0)
    else:
        named["self"] = rewriter.env[source]
    converted = rewriter.call(
        node.target, **{k: v if k == "self" else rewriter.new(v) for k, v in named.items()}
    )
    if to_complex and not rewriter.is_pair(source):
        return rewriter.pack(converted, rewriter.call(aten.zeros_like.default, converted)), True
    return converted, to_complex


_RULES: dict[Any, Rule] = {
    aten.view_as_complex.default: _view_as_complex,
    aten.view_as_real.default: _view_as_real,
    aten.polar.default: _polar,
    aten.complex.default: _complex,
    aten.real.default: _part(0),
    aten.imag.default: _part(1),
    aten.abs.default: _abs,
    aten.angle.default: _angle,
    aten.conj.default: _conj,
    aten._conj.default: _conj,
    aten.conj_physical.default: _conj,
    aten.ones_like.default: _ones_like,
    aten.mul.Tensor: _mul,
    aten.mul.Scalar: _mul,
    aten.div.Tensor: _div,
    aten.div.Scalar: _div,
    aten.add.Tensor: _add(1),
    aten.add.Scalar: _add(1),
    aten.sub.Tensor: _add(-1),
    aten.sub.Scalar: _add(-1),
    aten.where.self: _where,
    aten.squeeze.default: _squeeze_all,
    aten.gather.default: _gather,
    aten.zeros.default: _new_complex,
    aten.empty.memory_format: _new_complex,
    aten.copy_.default: _copy,
    aten.t.default: _t,
    aten.to.dtype: _convert,
    aten.to.dtype_layout: _convert,
    aten._to_copy.default: _convert,
}
