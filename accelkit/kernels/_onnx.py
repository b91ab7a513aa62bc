"""Shared onnxscript helpers for the ONNX lowerings of accelkit's ops (``kernels/<op>/onnx_lowering.py``).

Imported only when an export runs: it imports ``onnxscript``, which ``import accelkit`` and the op
registry must not. The accelkit calls are emitted as plain nodes of custom domains (their schemas are
built here and never registered globally): a local function handed to the exporter would be inlined by
its version converter, so a lowering's local functions are attached by its ``finalize`` step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnx.defs import OpSchema
from onnxscript import opset21 as op
from onnxscript.values import Op, Opset

from accelkit.kernels.registry import LoweringError

__all__ = ["FLOAT", "SIXTEEN_BIT", "const_f", "const_i", "custom_op", "static_dim", "to_float"]

FLOAT = ir.DataType.FLOAT
SIXTEEN_BIT = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

_ALL_TENSORS = [f"tensor({t})" for t in (
    "float", "float16", "bfloat16", "double", "uint8", "int8", "int32", "int64", "bool", "int4", "float8e4m3fn",
)]  # fmt: skip


def custom_op(domain: str, name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], attributes=()) -> Op:
    """An onnxscript op of a custom domain, described by a schema that is never registered globally.

    The call is emitted as a plain node: a function registered with the exporter would be inlined by
    its version converter, so local functions are attached after the export.
    """
    kinds = {int: OpSchema.AttrType.INT, float: OpSchema.AttrType.FLOAT}
    schema = OpSchema(
        name,
        domain,
        1,
        inputs=[OpSchema.FormalParameter(n, f"T{i}") for i, n in enumerate(inputs)],
        outputs=[OpSchema.FormalParameter(n, f"R{i}") for i, n in enumerate(outputs)],
        type_constraints=[(f"T{i}", _ALL_TENSORS, "") for i in range(len(inputs))]
        + [(f"R{i}", _ALL_TENSORS, "") for i in range(len(outputs))],
        attributes=[OpSchema.Attribute(n, kinds[kind], "") for n, kind in attributes],
    )
    return Op(Opset(domain, 1), name, schema)


def static_dim(value: Any, axis: int, what: str) -> int:
    """The static size of ``value`` on ``axis`` (a traced lowering's input), or a one-line refusal."""
    shape = getattr(value, "shape", None)
    size = shape[axis] if shape is not None and len(shape) > abs(axis) - (axis < 0) else None
    if not isinstance(size, int):
        raise LoweringError(
            f"{what} needs a static size on axis {axis} to be lowered to ONNX (got {size!r}): export "
            "with the sequence length fixed (only the batch may be dynamic)"
        )
    return size


def to_float(value: Any) -> Any:
    return value if value.dtype == FLOAT else op.Cast(value, to=FLOAT)


def const_f(value: float) -> Any:
    return op.Constant(value=ir.tensor(np.array(value, dtype=np.float32)))


def const_i(values: list[int] | int) -> Any:
    return op.Constant(value=ir.tensor(np.array(values, dtype=np.int64)))
