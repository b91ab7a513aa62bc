"""Capture a diffusers denoiser as a flat FX graph with ``torch.export`` (non-strict).

``torch.fx.symbolic_trace`` fails on every diffusers denoiser (data-dependent Python, ``**kwargs``,
dataclass outputs); ``torch.export(strict=False)`` captures them exactly. The exported program is
unlifted into a plain ``fx.GraphModule`` whose placeholders are the tensor keyword arguments, in a
recorded order, and whose output is a flat tuple. Tensors nested in dicts, lists and tuples (SDXL's
``added_cond_kwargs``, rotary embeddings passed as a tuple, Z-Image's list of latents, ControlNet
residuals) are graph inputs of their own, named by their path (``added_cond_kwargs.text_embeds``,
``image_rotary_emb.0``); the containers' other contents are part of the call signature. That flat calling convention is what passes
extend (extra state inputs/outputs) and what the runtime and the exporter drive.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from accelkit.capture.blocks import BlockIndex, find_attention_sites, find_blocks, find_linear_sites
from accelkit.capture.cost import NodeCost, get_attr_value, graph_costs
from accelkit.capture.specialize import input_values, python_reads_from_eager_call
from accelkit.errors import CaptureError, InputError
from accelkit.families import traits_for


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one graph input.

    Args:
        shape: the static shape the graph was captured for.
        dtype: the tensor's dtype, as a string such as ``"torch.float32"``.
    """

    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(int(s) for s in tensor.shape), str(tensor.dtype))

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


@dataclass
class DenoiserGraph:
    """A captured denoiser: flat graph + the structural index passes work from.

    Args:
        module: flat ``fx.GraphModule``; ``forward(*tensor_inputs) -> tuple`` of the user outputs.
        input_names: keyword names of the tensor inputs, in placeholder order.
        input_specs: shape/dtype per tensor input: the shape signature this graph is valid for.
        static_kwargs: keyword arguments holding no tensor, baked into the graph (``return_dict`` ...);
            a call with other values is refused.
        out_spec: pytree spec that rebuilds the denoiser's original output from the flat tuple.
        family: the denoiser class name, e.g. ``"FluxTransformer2DModel"``.
        blocks: ordered repeated blocks with their boundary nodes.
        attention_sites: names of ``scaled_dot_product_attention`` nodes.
        linear_sites: names of ``aten.linear`` nodes.
        costs: FLOPs and bytes per node name.
        nested_structure: per keyword argument that holds tensors inside a container, the container
            with each tensor replaced by :data:`TENSOR_SLOT` (part of the signature).
        input_values: the values of the inputs the capture was specialized to (the family's
            ``value_inputs``, see :mod:`accelkit.capture.specialize`), part of the signature.
    """

    module: fx.GraphModule
    input_names: tuple[str, ...]
    input_specs: tuple[TensorSpec, ...]
    static_kwargs: dict[str, Any]
    out_spec: pytree.TreeSpec
    family: str
    blocks: BlockIndex
    attention_sites: tuple[str, ...]
    linear_sites: tuple[str, ...]
    costs: dict[str, NodeCost] = field(repr=False)
    nested_structure: dict[str, Any] = field(default_factory=dict)
    input_values: dict[str, tuple] = field(default_factory=dict)

    @property
    def num_user_outputs(self) -> int:
        return self.out_spec.num_leaves

    def total_flops(self) -> float:
        return float(sum(c.flops for c in self.costs.values()))

    def signature(self) -> tuple:
        """Hashable shape signature: one capture serves exactly one signature."""
        return shape_signature_from_specs(self.input_names, self.input_specs, self.static_kwargs,
                                          self.nested_structure, self.input_values)

    def call_signature(self, kwargs: Mapping[str, Any]) -> tuple:
        """The signature of a denoiser call, comparable with :meth:`signature` (same specialized values)."""
        return shape_signature(kwargs, tuple(self.input_values))

    def flat_inputs(self, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Pick the graph's tensor inputs (nested ones included) out of a denoiser call's keyword arguments."""
        if all(name in kwargs for name in self.input_names):
            return [kwargs[name] for name in self.input_names]
        tensors = split_call(kwargs)[0]
        return [tensors[name] for name in self.input_names]

    def rebuild_output(self, flat_outputs: tuple[Any, ...] | list[Any], return_dict: bool) -> Any:
        """Turn the graph's flat user outputs back into what the denoiser returns."""
        output = pytree.tree_unflatten(list(flat_outputs[: self.num_user_outputs]), self.out_spec)
        if return_dict and isinstance(output, tuple):
            # Captured with return_dict=False, called with True: wrap as the family's output class
            # (UNet2DConditionOutput for UNets, Transformer2DModelOutput for transformers).
            return traits_for(self.family).output_class()(output[0])
        return output


TENSOR_SLOT = "<tensor>"


def _key_name(entry: Any) -> str:
    for attribute in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def split_call(kwargs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Split a denoiser call into graph inputs and constants.

    Returns:
        ``(tensors, statics, nested)``: every tensor by its path name, in the order ``torch.export``
        flattens the call (``added_cond_kwargs.text_embeds``); the arguments holding no tensor; and per
        argument with nested tensors, its container with :data:`TENSOR_SLOT` for each tensor.
    """
    tensors: dict[str, torch.Tensor] = {}
    statics: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
            continue
        leaves, _ = pytree.tree_flatten_with_path(value)
        if not any(isinstance(leaf, torch.Tensor) for _, leaf in leaves):
            statics[key] = value
            continue
        for path, leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                tensors[".".join([key, *(_key_name(p) for p in path)])] = leaf
        nested[key] = pytree.tree_map(lambda x: TENSOR_SLOT if isinstance(x, torch.Tensor) else x, value)
    return tensors, statics, nested


def _leaf_is_tensor(kwargs: Mapping[str, Any]) -> list[bool]:
    """Per leaf of the call as ``torch.export`` flattens it (one placeholder each): whether it is a tensor."""
    return [isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(dict(kwargs))]


def _static_key(value: Any) -> Any:
    """Hashable stand-in for a non-tensor kwarg; nested tensors are described by shape."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, Mapping):
        return tuple(sorted((k, _static_key(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_static_key(v) for v in value)
    return value


def shape_signature(kwargs: Mapping[str, Any], value_inputs: tuple[str, ...] = ()) -> tuple:
    """Hashable signature of a denoiser call: tensor shapes/dtypes (nested ones too) and the rest's values.

    ``value_inputs``: tensor inputs whose values count too (a capture specialized to them).
    """
    tensors, statics, nested = split_call(kwargs)
    names = tuple(tensors)
    specs = tuple(TensorSpec.of(t) for t in tensors.values())
    return shape_signature_from_specs(names, specs, statics, nested, input_values(kwargs, value_inputs))


def shape_signature_from_specs(
    names: tuple[str, ...], specs: tuple[TensorSpec, ...], statics: Mapping[str, Any],
    nested: Mapping[str, Any] | None = None, values: Mapping[str, tuple] | None = None,
) -> tuple:
    signature = (
        tuple(sorted(zip(names, ((s.shape, s.dtype) for s in specs), strict=True))),
        tuple(sorted((k, _static_key(v)) for k, v in statics.items())),
        tuple(sorted((k, _static_key(v)) for k, v in (nested or {}).items())),
    )
    return (*signature, tuple(sorted(values.items()))) if values else signature


def _flatten_module(exported: torch.export.ExportedProgram, leaf_is_tensor: list[bool]) -> fx.GraphModule:
    """Unlift an exported program into a GraphModule with one positional placeholder per tensor leaf."""
    module = exported.module()
    graph = module.graph
    # The unlifted module parses (args, kwargs) with a pytree codegen; passes need plain placeholders.
    graph._codegen = fx.graph.CodeGen()
    for node in list(graph.nodes):
        # export's input guards re-check shapes on every call; the runtime checks the signature once.
        if node.op == "call_module" and str(node.target) == "_guards_fn":
            graph.erase_node(node)
        # Metadata asserts count as side effects, which would keep every node they check alive through
        # dead-code elimination (a cached span must vanish); shapes are checked once per call instead.
        elif node.op == "call_function" and str(node.target).startswith("aten._assert_"):
            graph.erase_node(node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(leaf_is_tensor):
        raise CaptureError(
            f"the captured graph has {len(placeholders)} inputs but the call flattens to {len(leaf_is_tensor)} "
            "values; report the architecture"
        )
    # Placeholders follow the call's pytree leaves; non-tensor leaves were specialized into the graph.
    for node, is_tensor in zip(placeholders, leaf_is_tensor, strict=True):
        if is_tensor:
            continue
        if node.users:
            raise CaptureError(
                f"non-tensor input '{node.target}' is used by the captured graph; accelkit can only "
                "capture denoisers whose non-tensor arguments are constants"
            )
        graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    leaves, _ = pytree.tree_flatten(output.args[0])
    output.args = (tuple(leaves),)
    eliminate_dead_nodes(graph)
    # A fresh GraphModule drops the unlifted module's pytree pre-hooks and shares its parameters.
    flat = fx.GraphModule(module, graph, class_name=type(module).__name__)
    flat.recompile()
    return flat


def capture(denoiser: torch.nn.Module, kwargs: Mapping[str, Any]) -> DenoiserGraph:
    """Capture ``denoiser`` for one call signature.

    Args:
        denoiser: the pipeline's transformer or UNet (eval mode).
        kwargs: the exact keyword arguments the pipeline passes at one denoising step.

    Returns:
        The :class:`DenoiserGraph`; its module reproduces ``denoiser(**kwargs)`` exactly.

    Raises:
        CaptureError: when ``torch.export`` cannot capture the model; the message names the
            architecture and the first line of the underlying error.
    """
    tensors, statics, nested = split_call(kwargs)
    family = type(denoiser).__name__
    # Keep the signature order of the original kwargs so the flat graph is stable across calls.
    ordered = dict(kwargs)
    traits = traits_for(denoiser)
    strategy = traits.capture_strategy
    try:
        with torch.no_grad(), _no_traced_attribute_caches(denoiser), \
                (strategy(denoiser, ordered) if strategy is not None else nullcontext()), \
                (python_reads_from_eager_call(denoiser, ordered) if traits.value_inputs else nullcontext()):
            exported = torch.export.export(denoiser, (), ordered, strict=False)
    except Exception as error:  # noqa: BLE001 - any export failure becomes one clear message
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CaptureError(
            f"could not capture {family} with torch.export (non-strict): {first_line}. "
            "Report the architecture, or run without the passes that need a graph."
        ) from error
    tensor_names = list(tensors)
    module = _flatten_module(exported, _leaf_is_tensor(ordered))
    out_spec = exported.call_spec.out_spec
    blocks = find_blocks(module)
    return DenoiserGraph(
        module=module,
        input_names=tuple(tensor_names),
        input_specs=tuple(TensorSpec.of(tensors[n]) for n in tensor_names),
        static_kwargs=statics,
        out_spec=out_spec,
        family=family,
        blocks=blocks,
        attention_sites=find_attention_sites(module),
        linear_sites=find_linear_sites(module),
        costs=graph_costs(module),
        nested_structure=nested,
        input_values=input_values(ordered, traits.value_inputs),
    )


def _holds_fake_tensor(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(leaf, FakeTensor) for leaf in pytree.tree_leaves(value))


def _attribute_holders(denoiser: torch.nn.Module) -> list[Any]:
    """The submodules and the plain helper objects they hold (Z-Image's ``RopeEmbedder`` is no Module)."""
    holders: dict[int, Any] = {}
    for module in denoiser.modules():
        holders[id(module)] = module
        for value in vars(module).values():
            if not isinstance(value, torch.nn.Module | torch.Tensor | type) and hasattr(value, "__dict__"):
                holders.setdefault(id(value), value)
    return list(holders.values())


@contextmanager
def _no_traced_attribute_caches(denoiser: torch.nn.Module) -> Iterator[None]:
    """Roll back attributes that tracing filled with fake tensors.

    Models that compute a table on their first call and keep it (Z-Image's rotary embedder sets
    ``self.freqs_cis``) keep the tracer's fake tensors when that first call is the capture; the next
    capture of the same model (a new input shape) or an eager call would then read them. Such
    attributes get their value from before the capture back (or are removed when they are new).
    """
    before = {id(holder): (holder, dict(vars(holder))) for holder in _attribute_holders(denoiser)}
    try:
        yield
    finally:
        for holder, old in before.values():
            for key, value in list(vars(holder).items()):
                if (key not in old or old[key] is not value) and _holds_fake_tensor(value):
                    if key in old:
                        setattr(holder, key, old[key])
                    else:
                        delattr(holder, key)


def clone_graph_module(module: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with its own graph that shares the parameters of ``module``.

    Passes edit the clone, so the caller's program is never mutated and no weights are copied.
    """
    import copy

    new_graph = copy.deepcopy(module.graph)
    clone = fx.GraphModule(module, new_graph, class_name=type(module).__name__)
    clone.graph._codegen = fx.graph.CodeGen()
    clone.recompile()
    return clone


def replace_weights(module: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """A copy of ``module`` whose weights named in ``tensors`` (by get_attr target) are those tensors.

    The other weights stay shared with ``module``; ``module`` itself is not touched.

    Raises:
        InputError: a tensor names a weight the graph does not read, or differs in shape or dtype.
    """
    import copy

    targets = {str(n.target) for n in module.graph.nodes if n.op == "get_attr"}
    unknown = sorted(set(tensors) - targets)
    if unknown:
        raise InputError(f"recovered weights name {unknown[:3]}, which the pruned graph does not read: the plan's "
                         "weights belong to another pruning; rerun `accelkit distill` on this plan")
    root: dict[str, Any] = {}
    for target in targets:
        current = get_attr_value(module, target)
        replacement = tensors.get(target)
        if replacement is not None and (replacement.shape != current.shape or replacement.dtype != current.dtype):
            raise InputError(f"recovered weight '{target}' is {list(replacement.shape)} {replacement.dtype}, the graph "
                             f"reads {list(current.shape)} {current.dtype}: rerun `accelkit distill` on this plan")
        root[target] = current if replacement is None else replacement.to(current.device)
    graph = copy.deepcopy(module.graph)
    copied = fx.GraphModule(root, graph, class_name=type(module).__name__)
    copied.graph._codegen = fx.graph.CodeGen()
    copied.recompile()
    return copied


def replace_graph_signature(graph: DenoiserGraph, **changes: Any) -> DenoiserGraph:
    """Copy of ``graph`` with some fields replaced (dataclasses.replace for readability)."""
    return dataclasses.replace(graph, **changes)


def _schema(node: fx.Node) -> Any:
    return getattr(node.target, "_schema", None) if node.op == "call_function" else None


def _alias_root(node: fx.Node, roots: dict[fx.Node, fx.Node]) -> fx.Node:
    """The node whose storage ``node`` views (itself unless ``node`` is a view op such as ``slice``)."""
    schema = _schema(node)
    if schema is not None and not schema.is_mutable and schema.returns and node.args:
        alias = schema.returns[0].alias_info
        if alias is not None and not alias.is_write and isinstance(node.args[0], fx.Node):
            return roots.get(node.args[0], node.args[0])
    return node


def _mutated_roots(node: fx.Node, roots: dict[fx.Node, fx.Node]) -> list[fx.Node] | None:
    """Storage roots an in-place op writes; None when they cannot be told (treated as a side effect)."""
    schema = _schema(node)
    written = []
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
        if not isinstance(value, fx.Node):
            return None
        written.append(roots.get(value, value))
    return written or None


def eliminate_dead_nodes(graph: fx.Graph) -> int:
    """Remove nodes that do not contribute to the outputs; returns how many were removed.

    ``fx.Graph.eliminate_dead_code`` keeps random-seeded ops such as ``scaled_dot_product_attention``
    (tagged nondeterministic because of its dropout argument), which would keep a whole cached span
    alive. Liveness is traced back from the outputs instead. An in-place op is kept when it writes a
    graph input or weight, or storage some live node reads (through any view of it); one writing a
    dead intermediate goes with it (CogView4 writes rotary embeddings into a slice of each attention's
    query: kept, every cached block stayed alive).
    """
    roots: dict[fx.Node, fx.Node] = {}
    mutations: dict[fx.Node, list[fx.Node]] = {}
    live: set[fx.Node] = set()
    pending: list[fx.Node] = []
    for node in graph.nodes:
        roots[node] = _alias_root(node, roots)
        schema = _schema(node)
        if node.op in ("output", "placeholder") or node.op not in ("call_function", "call_method", "get_attr"):
            pending.append(node)
        elif schema is not None and schema.is_mutable:
            written = _mutated_roots(node, roots)
            if written is None or any(root.op in ("placeholder", "get_attr") for root in written):
                pending.append(node)  # a side effect visible outside the graph
            for root in written or ():
                mutations.setdefault(root, []).append(node)
    while pending:
        node = pending.pop()
        if node in live:
            continue
        live.add(node)
        pending.extend(node.all_input_nodes)
        # Reading a value (or a view of it) depends on every in-place write to its storage.
        pending.extend(mutations.get(roots[node], ()))
    removed = 0
    for node in reversed(list(graph.nodes)):
        if node not in live and not node.users:
            graph.erase_node(node)
            removed += 1
    return removed


_CAPTURES: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, DenoiserGraph]] = weakref.WeakKeyDictionary()


def capture_cached(denoiser: torch.nn.Module, kwargs: Mapping[str, Any]) -> DenoiserGraph:
    """:func:`capture`, memoized per denoiser and shape signature.

    A capture is valid for one signature (batch, resolution, token counts, dtypes); each new signature
    is captured once. The captured graph shares the denoiser's parameters, so in-place weight updates are
    seen; replacing parameter objects needs a fresh :func:`capture`.
    """
    per_module = _CAPTURES.setdefault(denoiser, {})
    key = shape_signature(kwargs, traits_for(denoiser).value_inputs)
    if key not in per_module:
        per_module[key] = capture(denoiser, kwargs)
    return per_module[key]
