"""Which ONNX lowering each custom op of a graph gets: the op registry's, or one registered here.

This module imports no onnxscript (a lowering's own module does, when it is loaded for an export), and
:mod:`accelkit.export.onnx` imports it, never the other way round. An op's lowering is normally
declared by its registration (``kernels/<op>/registration.py``, :class:`~accelkit.kernels.registry.
OnnxLowering`); :func:`register_onnx_lowering` adds or overrides one without an op spec (a user's own
op, or a replacement for a built-in lowering).

Any op of the ``accelkit`` namespace, and any registered op, needs a lowering: a graph holding one
without is refused before anything is traced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx

from accelkit.errors import AccelkitError
from accelkit.kernels.registry import (
    LoweringError,
    OpCall,
    load_builtin_ops,
    load_object,
    op_name,
    op_spec,
    registered_ops,
)

__all__ = [
    "CUSTOM_NAMESPACE",
    "LoweringError",
    "OnnxExportError",
    "finalize_model",
    "onnx_lowerings",
    "register_onnx_lowering",
    "translation_table",
]

# Ops of this namespace are accelkit's own: refused without a lowering even when no spec is registered.
CUSTOM_NAMESPACE = "accelkit"


class OnnxExportError(AccelkitError):
    """A graph variant could not be exported to ONNX or its model disagrees with PyTorch."""


# Lowerings registered here (without an op spec, or overriding the spec's), by qualified op name.
_LOWERINGS: dict[str, Callable[..., Any]] = {}
# Per op: node -> the reason it cannot be lowered (None when it can), asked before any tracing.
_REFUSALS: dict[str, Callable[[fx.Node], str | None]] = {}


def _qualified(name: str) -> str:
    return name if "::" in name else f"{CUSTOM_NAMESPACE}::{name}"


def register_onnx_lowering(
    op_name: str, fn: Callable[..., Any], *, refuse: Callable[[fx.Node], str | None] | None = None
) -> Callable[..., Any]:
    """Register the ONNX lowering of a custom op (over the one its op spec declares, if any).

    Args:
        op_name: ``"namespace::op"`` (``"<op>"`` alone means the accelkit namespace); an overload is
            named ``"namespace::op.overload"``, the plain name covers the default overload.
        fn: an onnxscript function with the op's signature, as ``torch.onnx.export``'s
            ``custom_translation_table`` takes it.
        refuse: optional ``node -> reason or None``: graph nodes of the op this lowering cannot handle
            (an argument value it has no ONNX form for), refused before anything is traced.

    Returns:
        ``fn`` (so it can be used as a decorator via ``functools.partial``).
    """
    _LOWERINGS[_qualified(op_name)] = fn
    if refuse is not None:
        _REFUSALS[_qualified(op_name)] = refuse
    else:
        _REFUSALS.pop(_qualified(op_name), None)
    return fn


def onnx_lowerings() -> dict[str, Callable[..., Any]]:
    """Every lowering an export can use, by qualified op name: the registered ops' and this module's."""
    lowerings = {
        name: load_object(spec.onnx.module, spec.onnx.function)
        for name, spec in load_builtin_ops().items()
        if spec.onnx is not None
    }
    return {**lowerings, **_LOWERINGS}


def _overload_name(target: Any) -> str | None:
    """``"ns::op"`` or ``"ns::op.overload"`` of a node target that is a custom op, else None."""
    name = op_name(target)
    if name is None or (getattr(target, "namespace", None) != CUSTOM_NAMESPACE and op_spec(target) is None):
        return None
    overload = getattr(target, "_overloadname", "default")
    return name if overload in ("", "default") else f"{name}.{overload}"


def _lowering(node: fx.Node) -> tuple[Callable[..., Any] | None, str | None]:
    """``(lowering, refusal reason)`` of one custom-op node: (None, None) when it has no lowering."""
    name = _overload_name(node.target)
    base = name if name in _LOWERINGS else name.split(".")[0]
    if base in _LOWERINGS:
        refuse = _REFUSALS.get(base)
        return _LOWERINGS[base], refuse(node) if refuse is not None else None
    spec = op_spec(node.target)
    if spec is None or spec.onnx is None:
        return None, None
    reason = spec.onnx.refuse(OpCall(node)) if spec.onnx.refuse is not None else None
    return load_object(spec.onnx.module, spec.onnx.function), reason


def translation_table(module: fx.GraphModule) -> dict[Any, Callable[..., Any]]:
    """Lowerings for the custom ops ``module`` calls; refuse ops that have none or calls they cannot lower."""
    table: dict[Any, Callable[..., Any]] = {}
    missing: list[str] = []
    for node in module.graph.nodes:
        if node.op != "call_function" or _overload_name(node.target) is None:
            continue
        fn, reason = _lowering(node)
        if reason:
            raise OnnxExportError(reason)
        if fn is None:
            name = _overload_name(node.target)
            if name not in missing:
                missing.append(name)
            continue
        table[node.target] = fn
    if missing:
        raise OnnxExportError(
            f"no ONNX lowering for {', '.join(missing)}: register one with "
            "accelkit.export.onnx.register_onnx_lowering(name, onnxscript_function), or export a program "
            "made without the pass that inserted it"
        )
    return table


def finalize_model(model: Any) -> dict[str, Any]:
    """Run every registered op's ``finalize`` on an exported ``onnx_ir.Model`` (in place); their stats.

    Every finalizer runs whether or not the model calls its op, so the manifest always has its fields.

    Raises:
        OnnxExportError: a finalizer refused the model.
    """
    stats: dict[str, Any] = {}
    for spec in registered_ops().values():
        if spec.onnx is None or spec.onnx.finalize is None:
            continue
        try:
            stats.update(load_object(spec.onnx.module, spec.onnx.finalize)(model))
        except LoweringError as error:
            raise OnnxExportError(str(error)) from error
    return stats
