"""The op registry: what the rest of accelkit knows about a custom op, registered next to the op.

Each op folder (``kernels/<op>/``) holds ``reference.py`` (truth), ``triton.py``, ``op.py`` (the
``torch.library`` custom op and its fake) and ``registration.py``, which calls :func:`register_op`
with an :class:`OpSpec`: the op's cost formula (FLOPs and kind, for the ``inspect`` table and the
roofline), its precision facts (the dtype its dot products run in, ONNX node types that carry INT4
weights), its ONNX lowering (a module path, imported only when an export runs, so this module and
``import accelkit`` never import onnxscript) and its TensorRT plugin descriptor.

``capture/cost.py``, ``search/cost.py``, ``export/onnx.py`` and ``export/tensorrt.py`` iterate this
registry; none of them names an op. They see a graph node through :class:`OpCall`, which binds the
node's arguments to the op schema's names (``call.arg("act_mode")``, not ``node.args[8]``).

Layering: this module imports only ``accelkit.errors`` (it sits below ``capture/``) and nothing heavier
than the standard library at import time.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from accelkit.errors import AccelkitError

__all__ = [
    "LoweringError",
    "OnnxLowering",
    "OpCall",
    "OpFlops",
    "OpSpec",
    "PrecisionFacts",
    "TensorRTPlugin",
    "load_builtin_ops",
    "load_object",
    "op_call",
    "op_spec",
    "register_op",
    "registered_ops",
    "unregister_op",
]


class LoweringError(AccelkitError):
    """An op call has no form in an export format (raised by lowerings; export turns it into its error)."""


@dataclass(frozen=True, kw_only=True)
class OpFlops:
    """What one call of an op computes.

    Args:
        flops: floating-point operations (a multiply-add counts 2).
        kind: ``"matmul"``, ``"attention"``, ``"conv"`` or ``"memory"`` (bandwidth-bound).
    """

    flops: float
    kind: str


@dataclass(frozen=True, kw_only=True)
class PrecisionFacts:
    """What precision an op computes in, where the output dtype does not say it.

    Args:
        compute_dtype: ``call -> dtype name or None``: the dtype its dot products run in when that is
            not its output's (``"float8"`` for an FP8-activation GEMM). The roofline prices the call
            at that dtype's peak; the ONNX check uses the low-precision tolerance for 8-bit compute.
        int4_weight_nodes: ``(domain, op_type)`` of ONNX nodes that carry INT4 weights (markers a
            lowering emits), so a precision report counts them before they are materialized.
    """

    compute_dtype: Callable[[OpCall], str | None] | None = None
    int4_weight_nodes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, kw_only=True)
class OnnxLowering:
    """Where an op's ONNX lowering lives and how to finish a model that calls it.

    Args:
        module: the module holding the lowering (it imports onnxscript; imported when an export runs).
        function: its onnxscript function with the op's signature (``custom_translation_table`` form).
        finalize: optional attribute of ``module``: ``onnx_ir.Model -> dict`` run in place after the
            exporter (materialize weights, attach local functions); its dict (counts) goes into the
            ONNX manifest entry of every variant, so it must return its keys with zeros when the op
            is absent.
        refuse: optional ``call -> reason or None`` for calls the lowering cannot handle (an argument
            value with no ONNX form), asked before anything is traced. Plain Python: no onnxscript.
    """

    module: str
    function: str
    finalize: str | None = None
    refuse: Callable[[OpCall], str | None] | None = None


@dataclass(frozen=True, kw_only=True)
class TensorRTPlugin:
    """How a TensorRT engine build replaces an op's ONNX local function with a plugin.

    Args:
        onnx_function: ``(domain, name)`` of the ONNX local function the lowering emits calls of.
        namespace: plugin namespace (``plugin_namespace`` attribute of the rewritten node).
        name: plugin name (the rewritten node's ``op_type``).
        version: plugin version.
        register: ``"module:function"`` taking ``(tensorrt.plugin module, plugin id)`` that registers
            the plugin's descriptor and implementation with TensorRT.
        unavailable: optional ``() -> reason or None``: why the plugin cannot be built here (a missing
            compiler), checked before TensorRT is touched.
        check_attributes: optional ``attributes -> reason or None`` for a node's attributes the plugin
            cannot build, checked before TensorRT is touched.
    """

    onnx_function: tuple[str, str]
    namespace: str
    name: str
    version: str = "1"
    register: str
    unavailable: Callable[[], str | None] | None = None
    check_attributes: Callable[[Mapping[str, Any]], str | None] | None = None

    @property
    def plugin_id(self) -> str:
        return f"{self.namespace}::{self.name}"


@dataclass(frozen=True, kw_only=True)
class OpSpec:
    """Everything accelkit's libraries know about one custom op.

    Args:
        name: the qualified op name, ``"namespace::op"`` (``"accelkit::svdq_linear"``).
        flops: optional ``call -> OpFlops``; without it a call counts as memory-bound (output elements).
        precision: precision facts.
        onnx: optional ONNX lowering; without it an export of a graph calling the op is refused.
        tensorrt: optional TensorRT plugin replacing the lowering's local function in engines.
    """

    name: str
    flops: Callable[[OpCall], OpFlops | None] | None = None
    precision: PrecisionFacts = field(default_factory=PrecisionFacts)
    onnx: OnnxLowering | None = None
    tensorrt: TensorRTPlugin | None = None

    def __post_init__(self) -> None:
        if "::" not in self.name:
            raise ValueError(f"op names are qualified as 'namespace::op', got {self.name!r}")


_REGISTRY: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    """Register (or replace) the spec of ``spec.name``; returns it."""
    _REGISTRY[spec.name] = spec
    return spec


def unregister_op(name: str) -> None:
    """Forget the spec of ``name`` (tests register toy ops and remove them)."""
    _REGISTRY.pop(name, None)


def registered_ops() -> dict[str, OpSpec]:
    """The registered specs by op name (a copy), in registration order."""
    return dict(_REGISTRY)


def load_builtin_ops() -> dict[str, OpSpec]:
    """Import every op package under ``accelkit/kernels/`` (registering its op and spec); the registry."""
    import accelkit.kernels as kernels

    for module in pkgutil.iter_modules(kernels.__path__):
        if module.ispkg:
            importlib.import_module(f"{kernels.__name__}.{module.name}")
    return registered_ops()


def op_name(target: Any) -> str | None:
    """``"namespace::op"`` of a ``torch.ops`` overload (a graph node's target), else None."""
    name = getattr(getattr(target, "_schema", None), "name", None)
    return name if isinstance(name, str) and "::" in name else None


def op_spec(target: Any) -> OpSpec | None:
    """The registered spec of a node target (an op overload), or None."""
    name = op_name(target)
    return _REGISTRY.get(name) if name is not None else None


def load_object(path: str, attribute: str | None = None) -> Any:
    """``module:attribute`` (or ``module`` plus ``attribute``) imported and looked up."""
    module_name, _, name = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute or name)


class OpCall:
    """One graph call of a registered op, its arguments bound to the op schema's names.

    Args:
        node: the ``torch.fx`` node (``call_function`` of an op overload).
    """

    def __init__(self, node: Any) -> None:
        self.node = node
        schema = node.target._schema
        values: dict[str, Any] = {}
        for index, argument in enumerate(schema.arguments):
            if index < len(node.args):
                values[argument.name] = node.args[index]
            elif argument.name in node.kwargs:
                values[argument.name] = node.kwargs[argument.name]
            elif argument.has_default_value():
                values[argument.name] = argument.default_value
        self.args: Mapping[str, Any] = values

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.node.meta

    def arg(self, name: str, default: Any = None) -> Any:
        """The argument ``name`` (an fx node for tensors, the value for constants)."""
        return self.args.get(name, default)

    def shape(self, name: str | None = None) -> tuple[int, ...] | None:
        """Static shape of argument ``name`` (the call's output when None), from the fake tensors."""
        value = self.node if name is None else self.args.get(name)
        fake = getattr(value, "meta", {}).get("val") if value is not None else None
        shape = getattr(fake, "shape", None)
        if shape is None or isinstance(fake, list | tuple):
            return None
        try:
            return tuple(int(s) for s in shape)
        except TypeError:  # a symbolic size
            return None

    def numel(self, name: str | None = None) -> float:
        shape = self.shape(name)
        return float(math.prod(shape)) if shape is not None else 0.0


def op_call(node: Any) -> tuple[OpSpec, OpCall] | None:
    """``(spec, bound call)`` for a ``call_function`` node of a registered op, else None."""
    if getattr(node, "op", None) != "call_function":
        return None
    spec = op_spec(node.target)
    return (spec, OpCall(node)) if spec is not None else None
