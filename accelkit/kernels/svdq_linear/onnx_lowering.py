"""ONNX lowering of ``accelkit::svdq_linear`` (see :mod:`.reference` for the formula); imports onnxscript.

Imported when an export runs (the op's registration names this module). The op becomes::

    x2 = Reshape(Cast(x, float), [-1, K]);  xs = x2 / smooth
    xa = xs                                          w4a16 (rounded through x's dtype when that is 16-bit)
    xa = DequantizeLinear(QuantizeLinear(xs, s, axis=0, output_dtype=FLOAT8E4M3FN, saturate=1), s, axis=0)
                                                     w4a8, s = max(amax(|xs|, -1) / 448, 1e-12) per token
    W  = DequantizeLinear(W_int4 (K, N), scale (K / g, N) float32, axis=0, block_size=g)
    y  = MatMul(xa, W) + Gemm(x2, lora_down, transB=1) @ lora_upᵀ + bias      reshaped to (..., N)

``W_int4`` is an INT4 initializer (symmetric: no zero point), stored transposed as ``(K, N)`` so the
MatMul reads it directly and the blocks run along ``K`` (the layout TensorRT's INT4 weight-only path and
ModelOpt's INT4 ONNX export use). The lowering cannot write it itself: when a lowering runs, the
op's packed weight is still a graph input of the exporter (its value arrives later), so it emits a
private marker node :data:`INT4_WEIGHT_FUNCTION` on the packed weight and scales, and
:func:`finalize_model` replaces each marker by the two initializers (unpacked once, at export time)
and drops the uint8 / fp16 originals. FP8 activation Q/DQ: onnxruntime 1.32's CPU kernels run
``QuantizeLinear`` to ``float8e4m3fn`` per axis with a computed scale, bit-exact with PyTorch's cast.
``w4a4`` has no lowering (its activations are per-group INT4, a fake-quantized reference that no GPU
path of accelkit computes): the export refuses it before tracing (``registration.refuse_svdq_linear``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript import opset21 as op

from accelkit.kernels._onnx import FLOAT, SIXTEEN_BIT, const_f, const_i, custom_op, static_dim, to_float
from accelkit.kernels.registry import LoweringError

from .registration import INT4_WEIGHT_FUNCTION, act_mode_refusal

__all__ = ["INT4_WEIGHT_FUNCTION", "finalize_model", "lower_svdq_linear"]

FP8_MAX = 448.0
_INT4_WEIGHT_OP = custom_op(*INT4_WEIGHT_FUNCTION, ("packed", "scales"), ("weight", "scale"))


def lower_svdq_linear(x, packed, scales, lora_down, lora_up, smooth, bias, group_size, act_mode):
    """``accelkit::svdq_linear`` -> INT4 block DequantizeLinear + MatMul + low-rank Gemm/MatMul (+ FP8 Q/DQ)."""
    refusal = act_mode_refusal(act_mode)
    if refusal:
        raise LoweringError(refusal)
    k = static_dim(x, -1, "svdq_linear's input")
    n = static_dim(packed, 0, "svdq_linear's packed weight")
    rank = static_dim(lora_down, 0, "svdq_linear's lora_down")
    x2 = op.Reshape(to_float(x), const_i([-1, k]))
    smoothed = op.Div(x2, to_float(smooth))
    if act_mode == "w4a8":
        # Dynamic per-token FP8 (e4m3): QuantizeLinear divides and rounds to nearest even, saturating at
        # ±448 like the reference's clamp; per-axis scales may be a computed tensor.
        amax = op.ReduceMax(op.Abs(smoothed), const_i([-1]), keepdims=0)
        token_scale = op.Max(op.Div(amax, const_f(FP8_MAX)), const_f(1e-12))
        quantized = op.QuantizeLinear(
            smoothed, token_scale, axis=0, saturate=1, output_dtype=ir.DataType.FLOAT8E4M3FN
        )
        activation = op.DequantizeLinear(quantized, token_scale, axis=0)
    elif x.dtype in SIXTEEN_BIT:
        activation = op.Cast(op.Cast(smoothed, to=x.dtype), to=FLOAT)  # a 16-bit GEMM operand
    else:
        activation = smoothed
    weight_int4, weight_scale = _INT4_WEIGHT_OP(packed, scales)
    weight = op.DequantizeLinear(weight_int4, weight_scale, axis=0, block_size=int(group_size))
    y = op.MatMul(activation, weight)
    if rank:
        # lora_down has 1/smooth folded in: it reads the raw activation.
        down = op.Gemm(x2, to_float(lora_down), transB=1)
        y = op.Add(y, op.Gemm(down, to_float(lora_up), transB=1))
    if bias is not None:
        y = op.Add(y, to_float(bias))
    lead = op.Shape(x, start=0, end=-1)
    y = op.Reshape(y, op.Concat(lead, const_i([n]), axis=0))
    return y if x.dtype == FLOAT else op.Cast(y, to=x.dtype)



def _unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 ``(N, K/2)`` -> int8 ``(N, K)`` in [-8, 7] (even index in the low nibble)."""
    nibbles = np.stack((packed & 0xF, packed >> 4), axis=-1).reshape(packed.shape[0], -1).astype(np.int8)
    return np.where(nibbles >= 8, nibbles - 16, nibbles).astype(np.int8)


def _constant(value: ir.Value, what: str) -> np.ndarray:
    tensor = value.const_value
    if tensor is None:
        raise LoweringError(
            f"svdq_linear's {what} '{value.name}' is not a constant of the exported graph: the quant "
            "pass stores it as a module buffer; export the program the pass returned"
        )
    return tensor.numpy()


def _materialize_int4_weights(model: ir.Model) -> tuple[int, int]:
    """Replace each ``Int4BlockWeight`` marker by INT4 / float32 initializers; returns (weights, bytes)."""
    import ml_dtypes

    domain, name = INT4_WEIGHT_FUNCTION
    graph = model.graph
    stored = 0
    done: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}
    for node in list(graph):
        if node.domain != domain or node.op_type != name:
            continue
        packed_value, scales_value = node.inputs
        key = (id(packed_value), id(scales_value))
        if key not in done:
            packed = _constant(packed_value, "packed weight")
            scales = _constant(scales_value, "scales")
            weight = np.ascontiguousarray(_unpack_int4(packed).T).astype(ml_dtypes.int4)
            scale = np.ascontiguousarray(scales.astype(np.float32).T)
            base = packed_value.name.removesuffix("packed").rstrip("_.") or packed_value.name
            new_weight = ir.Value(
                name=f"{base}_weight_int4", const_value=ir.Tensor(weight, dtype=ir.DataType.INT4)
            )
            new_scale = ir.Value(name=f"{base}_weight_scale", const_value=ir.tensor(scale))
            for value in (new_weight, new_scale):
                value.shape = ir.Shape(value.const_value.shape)
                value.type = ir.TensorType(value.const_value.dtype)
                graph.register_initializer(value)
            done[key] = (new_weight, new_scale)
            stored += (weight.size + 1) // 2
        for old, new in zip(node.outputs, done[key], strict=True):
            old.replace_all_uses_with(new)
        graph.remove(node, safe=True)
    # The packed uint8 / fp16 originals are read by nothing now: drop them so the file holds 4-bit only.
    originals = {i for pair in done for i in pair}
    for value in list(graph.initializers.values()):
        if id(value) in originals and not value.uses() and value not in graph.outputs:
            del graph.initializers[value.name]
    if any(n.domain == domain for n in graph.all_nodes()):
        raise LoweringError(f"an {domain}::{name} marker is left inside a subgraph: export a flat graph")
    model.opset_imports.pop(domain, None)
    return len(done), stored




def finalize_model(model: ir.Model) -> dict[str, Any]:
    """INT4 initializers for the quantized weights, in place; ``{"int4_weights": count}``."""
    weights, _ = _materialize_int4_weights(model)
    return {"int4_weights": weights}
