"""ONNX lowerings of accelkit's custom ops, registered by :func:`register_builtin_lowerings`.

Imported by :func:`accelkit.export.onnx.export_program_onnx` when an export runs (it imports
``onnxscript``, which ``import accelkit`` must not).

``accelkit::svdq_linear`` (see :mod:`accelkit.kernels.svdq_linear.reference` for the formula) becomes::

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
path of accelkit computes): the export refuses it before tracing (:func:`refuse_svdq_linear`).

The accelkit calls are emitted as plain nodes of custom domains (their schemas are built here and
never registered globally): a local function handed to the exporter would be inlined by its version
converter. ``accelkit::block_sparse_attention`` becomes a call to the ONNX local function
:data:`BLOCK_SPARSE_ATTENTION_FUNCTION` whose body is the masked dense reference (block mask expanded
to tokens, ``-inf`` outside it, softmax, rows with no kept key set to zeros, matmul with ``V``), so
onnxruntime runs it as is and a TensorRT build can swap the call for a plugin with the same inputs and
attributes (:data:`BLOCK_SPARSE_ATTENTION_INPUTS`, :data:`BLOCK_SPARSE_ATTENTION_ATTRIBUTES`); the
function definition is attached by :func:`finalize_model`, with the model's default opset.

``accelkit::predict_block_mask`` becomes plain ONNX ops (block mean pooling, pooled scores, softmax,
top-p through ``TopK`` + exclusive ``CumSum``, ``ScatterElements`` back to block order), specialized at
export time on the static arguments (τ, block sizes, dense token ranges, similarity threshold): the mask
is computed inside the graph from the same Q and K, so a sparse plan exports end to end.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset21 as op
from onnxscript.values import Op, Opset

from accelkit.export.onnx import OnnxExportError, onnx_lowerings, register_onnx_lowering

__all__ = [
    "ACCELKIT_DOMAIN",
    "BLOCK_SPARSE_ATTENTION_ATTRIBUTES",
    "BLOCK_SPARSE_ATTENTION_FUNCTION",
    "BLOCK_SPARSE_ATTENTION_INPUTS",
    "INT4_WEIGHT_FUNCTION",
    "finalize_model",
    "lower_block_sparse_attention",
    "lower_predict_block_mask",
    "lower_svdq_linear",
    "refuse_svdq_linear",
    "register_builtin_lowerings",
]

ACCELKIT_DOMAIN = "accelkit"
# (domain, name) of the local function a TensorRT plugin replaces; version 1 of the accelkit domain.
BLOCK_SPARSE_ATTENTION_FUNCTION = (ACCELKIT_DOMAIN, "BlockSparseAttention")
# Inputs, in order: q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv), int32 counts (B, H, NQ) and
# int32 indices (B, H, NQ, W); output (B, H, Lq, Dv) in q's type. Semantics: accelkit.kernels.block_sparse_attention.
BLOCK_SPARSE_ATTENTION_INPUTS = ("q", "k", "v", "kv_block_counts", "kv_block_indices")
# Attributes: block_q (int), block_k (int), scale (float, the softmax scale).
BLOCK_SPARSE_ATTENTION_ATTRIBUTES = ("block_q", "block_k", "scale")
# Private marker (packed, scales) -> (INT4 (K, N), float (K/g, N)) that finalize_model replaces by
# initializers; never left in a saved model.
INT4_WEIGHT_FUNCTION = ("accelkit.export", "Int4BlockWeight")

FP8_MAX = 448.0
_FLOAT = ir.DataType.FLOAT
_SIXTEEN_BIT = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

_ACCELKIT = Opset(ACCELKIT_DOMAIN, 1)


def _custom_op(
    domain: str, name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], attributes=()
) -> Op:
    """An onnxscript op of a custom domain, described by a schema that is never registered globally.

    The call is emitted as a plain node: a function registered with the exporter would be inlined by
    its version converter, so the accelkit local functions are attached by :func:`finalize_model`.
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


_ALL_TENSORS = [f"tensor({t})" for t in (
    "float", "float16", "bfloat16", "double", "uint8", "int8", "int32", "int64", "bool", "int4", "float8e4m3fn",
)]  # fmt: skip
_BLOCK_SPARSE_ATTENTION_OP = _custom_op(
    *BLOCK_SPARSE_ATTENTION_FUNCTION,
    BLOCK_SPARSE_ATTENTION_INPUTS,
    ("output",),
    (("block_q", int), ("block_k", int), ("scale", float)),
)
_INT4_WEIGHT_OP = _custom_op(*INT4_WEIGHT_FUNCTION, ("packed", "scales"), ("weight", "scale"))


# ---------------------------------------------------------------- local functions


@onnxscript.script(opset=_ACCELKIT, default_opset=op)
def BlockSparseAttention(
    q, k, v, kv_block_counts, kv_block_indices, block_q: int, block_k: int, scale: float
):
    """Masked dense block-sparse attention (the reference, in fp32)."""
    lq = op.Shape(q, start=2, end=3)
    lk = op.Shape(k, start=2, end=3)
    bq = op.Constant(value_int=block_q)
    bk = op.Constant(value_int=block_k)
    one = op.Constant(value_int=1)
    nk = op.Div(op.Sub(op.Add(lk, bk), one), bk)
    # Block mask (B, H, NQ, NK) from the (count, indices) form: padding slots write an extra column.
    width = op.Squeeze(op.Shape(kv_block_indices, start=3, end=4))
    slots = op.Range(op.Constant(value_int=0), width, one)
    counts = op.Unsqueeze(op.Cast(kv_block_counts, to=7), op.Constant(value_ints=[-1]))
    target = op.Where(op.Less(slots, counts), op.Cast(kv_block_indices, to=7), nk)
    shape = op.Concat(op.Shape(kv_block_indices, start=0, end=3), op.Add(nk, one), axis=0)
    zeros = op.ConstantOfShape(shape)
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(target))
    scattered = op.ScatterElements(zeros, target, ones, axis=-1)
    block_mask = op.Slice(scattered, op.Constant(value_ints=[0]), nk, op.Constant(value_ints=[-1]))
    rows = op.Div(op.Range(op.Constant(value_int=0), op.Squeeze(lq), one), bq)
    cols = op.Div(op.Range(op.Constant(value_int=0), op.Squeeze(lk), one), bk)
    token_mask = op.Cast(op.Gather(op.Gather(block_mask, rows, axis=2), cols, axis=3), to=9)
    scores = op.MatMul(op.Cast(q, to=1), op.Transpose(op.Cast(k, to=1), perm=[0, 1, 3, 2]))
    scores = op.Mul(scores, op.Constant(value_float=scale))
    probs = op.Softmax(op.Where(token_mask, scores, op.Constant(value_float=float("-inf"))), axis=-1)
    # A query row with no kept key is all -inf (NaN after softmax); the op defines its output as zeros.
    kept_any = op.ReduceMax(op.Cast(token_mask, to=1), op.Constant(value_ints=[-1]), keepdims=1)
    probs = op.Where(op.Cast(kept_any, to=9), probs, op.Constant(value_float=0.0))
    return op.CastLike(op.MatMul(probs, op.Cast(v, to=1)), q)


# ---------------------------------------------------------------- helpers for traced lowerings


def _static_dim(value: Any, axis: int, what: str) -> int:
    shape = getattr(value, "shape", None)
    size = shape[axis] if shape is not None and len(shape) > abs(axis) - (axis < 0) else None
    if not isinstance(size, int):
        raise OnnxExportError(
            f"{what} needs a static size on axis {axis} to be lowered to ONNX (got {size!r}): export "
            "with the sequence length fixed (only the batch may be dynamic)"
        )
    return size


def _float(value: Any) -> Any:
    return value if value.dtype == _FLOAT else op.Cast(value, to=_FLOAT)


def _const_f(value: float) -> Any:
    return op.Constant(value=ir.tensor(np.array(value, dtype=np.float32)))


def _const_i(values: list[int] | int) -> Any:
    return op.Constant(value=ir.tensor(np.array(values, dtype=np.int64)))


def _num_blocks(length: int, block: int) -> int:
    return -(-int(length) // int(block))


def _block_sizes(length: int, block: int) -> np.ndarray:
    sizes = np.full(_num_blocks(length, block), float(block), dtype=np.float32)
    sizes[-1] = float(length - (len(sizes) - 1) * block)
    return sizes


def _block_sum(x: Any, length: int, block: int, depth: int) -> Any:
    """fp32 sums over blocks of ``block`` tokens along axis 2 of ``(B, H, L, depth)``, zero-padded tail."""
    blocks = _num_blocks(length, block)
    padding = blocks * block - length
    if padding:
        x = op.Pad(x, _const_i([0, 0, 0, 0, 0, 0, padding, 0]))
    grouped = op.Reshape(x, _const_i([0, 0, blocks, block, depth]))
    return op.ReduceSum(grouped, _const_i([3]), keepdims=0)


def _block_mean(x: Any, length: int, block: int, depth: int) -> Any:
    sizes = _block_sizes(length, block).reshape(-1, 1)
    return op.Div(_block_sum(x, length, block, depth), op.Constant(value=ir.tensor(sizes)))


def _block_self_similarity(x: Any, length: int, block: int, depth: int) -> Any:
    """Mean pairwise cosine similarity of the tokens in each block, ``(B, H, NB)`` (see the reference)."""
    norm = op.Sqrt(op.ReduceSumSquare(x, _const_i([-1]), keepdims=1))
    unit = op.Div(x, op.Max(norm, _const_f(1e-12)))
    sums = _block_sum(unit, length, block, depth)
    sizes = _block_sizes(length, block)
    return op.Div(
        op.ReduceSumSquare(sums, _const_i([-1]), keepdims=0), op.Constant(value=ir.tensor(sizes * sizes))
    )


def _dense_blocks(length: int, block: int, prefix: int, suffix: int) -> np.ndarray:
    starts = np.arange(_num_blocks(length, block)) * block
    ends = np.minimum(starts + block, length)
    return (starts < prefix) | (ends > length - suffix)


def _or(a: Any | None, b: Any | None) -> Any | None:
    if a is None:
        return b
    return a if b is None else op.Or(a, b)


# ---------------------------------------------------------------- lowerings


_LOWERED_ACT_MODES = ("w4a16", "w4a8")


def _svdq_act_mode_refusal(act_mode: Any) -> str | None:
    if act_mode == "w4a4":
        return (
            "svdq_linear with act_mode='w4a4' has no ONNX lowering (its per-group INT4 activations are a "
            "fake-quantized reference only): quantize with quant.act_mode='w4a16' or 'w4a8' to export"
        )
    if act_mode not in _LOWERED_ACT_MODES:
        return f"svdq_linear: unknown act_mode {act_mode!r}; quantize with quant.act_mode='w4a16' or 'w4a8'"
    return None


def refuse_svdq_linear(node: Any) -> str | None:
    """Why an ``accelkit::svdq_linear`` graph node cannot be lowered (its ``act_mode``), or None."""
    act_mode = node.args[8] if len(node.args) > 8 else node.kwargs.get("act_mode")
    return _svdq_act_mode_refusal(act_mode)


def lower_svdq_linear(x, packed, scales, lora_down, lora_up, smooth, bias, group_size, act_mode):
    """``accelkit::svdq_linear`` -> INT4 block DequantizeLinear + MatMul + low-rank Gemm/MatMul (+ FP8 Q/DQ)."""
    refusal = _svdq_act_mode_refusal(act_mode)
    if refusal:
        raise OnnxExportError(refusal)
    k = _static_dim(x, -1, "svdq_linear's input")
    n = _static_dim(packed, 0, "svdq_linear's packed weight")
    rank = _static_dim(lora_down, 0, "svdq_linear's lora_down")
    x2 = op.Reshape(_float(x), _const_i([-1, k]))
    smoothed = op.Div(x2, _float(smooth))
    if act_mode == "w4a8":
        # Dynamic per-token FP8 (e4m3): QuantizeLinear divides and rounds to nearest even, saturating at
        # ±448 like the reference's clamp; per-axis scales may be a computed tensor.
        amax = op.ReduceMax(op.Abs(smoothed), _const_i([-1]), keepdims=0)
        token_scale = op.Max(op.Div(amax, _const_f(FP8_MAX)), _const_f(1e-12))
        quantized = op.QuantizeLinear(
            smoothed, token_scale, axis=0, saturate=1, output_dtype=ir.DataType.FLOAT8E4M3FN
        )
        activation = op.DequantizeLinear(quantized, token_scale, axis=0)
    elif x.dtype in _SIXTEEN_BIT:
        activation = op.Cast(op.Cast(smoothed, to=x.dtype), to=_FLOAT)  # a 16-bit GEMM operand
    else:
        activation = smoothed
    weight_int4, weight_scale = _INT4_WEIGHT_OP(packed, scales)
    weight = op.DequantizeLinear(weight_int4, weight_scale, axis=0, block_size=int(group_size))
    y = op.MatMul(activation, weight)
    if rank:
        # lora_down has 1/smooth folded in: it reads the raw activation.
        down = op.Gemm(x2, _float(lora_down), transB=1)
        y = op.Add(y, op.Gemm(down, _float(lora_up), transB=1))
    if bias is not None:
        y = op.Add(y, _float(bias))
    lead = op.Shape(x, start=0, end=-1)
    y = op.Reshape(y, op.Concat(lead, _const_i([n]), axis=0))
    return y if x.dtype == _FLOAT else op.Cast(y, to=x.dtype)


def lower_block_sparse_attention(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k, scale):
    """``accelkit::block_sparse_attention`` -> a call of the local function ``accelkit.BlockSparseAttention``."""
    return _BLOCK_SPARSE_ATTENTION_OP(
        q,
        k,
        v,
        kv_block_counts,
        kv_block_indices,
        block_q=int(block_q),
        block_k=int(block_k),
        scale=float(scale),
    )


def lower_predict_block_mask(
    q, k, block_q, block_k, tau, min_blocks, similarity_threshold, dense_prefix, dense_suffix, scale
):
    """``accelkit::predict_block_mask`` -> pooling, pooled softmax and top-p in plain ONNX ops."""
    lq = _static_dim(q, 2, "predict_block_mask's q")
    lk = _static_dim(k, 2, "predict_block_mask's k")
    depth = _static_dim(q, 3, "predict_block_mask's q")
    nq, nk = _num_blocks(lq, block_q), _num_blocks(lk, block_k)
    qf, kf = _float(q), _float(k)
    pooled_q = op.Mul(_block_mean(qf, lq, block_q, depth), _const_f(scale))
    pooled_k = _block_mean(kf, lk, block_k, depth)
    scores = op.MatMul(pooled_q, op.Transpose(pooled_k, perm=[0, 1, 3, 2]))  # (B, H, NQ, NK)
    keep_at_least = min(max(int(min_blocks), 0), nk)
    tau_const = _const_f(float(tau))

    # dense_q: (NQ, 1) or (B, H, NQ, 1); dense_k: (NK,) or (B, H, 1, NK) -- both broadcast to the scores.
    dense_q = dense_k = None
    if dense_prefix or dense_suffix:
        rows = _dense_blocks(lq, block_q, dense_prefix, dense_suffix).reshape(nq, 1)
        cols = _dense_blocks(lk, block_k, dense_prefix, dense_suffix)
        dense_q, dense_k = op.Constant(value=ir.tensor(rows)), op.Constant(value=ir.tensor(cols))
    if similarity_threshold is not None:
        threshold = _const_f(float(similarity_threshold))
        similar_q = op.Less(_block_self_similarity(qf, lq, block_q, depth), threshold)
        similar_k = op.Less(_block_self_similarity(kf, lk, block_k, depth), threshold)
        dense_q = _or(dense_q, op.Unsqueeze(similar_q, _const_i([-1])))
        dense_k = _or(dense_k, op.Unsqueeze(similar_k, _const_i([-2])))

    nk_const = _const_i([nk])
    if dense_q is None and dense_k is None:
        # The reference's fast path: the kept set is a prefix of the probability order.
        probs = op.Softmax(scores, axis=-1)
        sorted_p, order = op.TopK(probs, nk_const, axis=-1, largest=1, sorted=1)
        mass_before = op.CumSum(sorted_p, _const_i(-1), exclusive=1)
        kept = op.And(op.Less(mass_before, tau_const), op.Greater(sorted_p, _const_f(0.0)))
        counts = op.ReduceSum(op.Cast(kept, to=ir.DataType.INT64), _const_i([-1]), keepdims=0)
        counts = op.Max(counts, _const_i(keep_at_least))
        return op.Cast(counts, to=ir.DataType.INT32), op.Cast(order, to=ir.DataType.INT32)

    if dense_k is not None:
        scores = op.Where(dense_k, _const_f(float("-inf")), scores)
    probs = op.Softmax(scores, axis=-1)
    # A row whose key blocks are all dense has no pooled distribution (NaN); dense_k keeps them anyway.
    probs = op.Where(op.IsNaN(probs), _const_f(0.0), probs)
    sorted_p, order = op.TopK(probs, nk_const, axis=-1, largest=1, sorted=1)
    mass_before = op.CumSum(sorted_p, _const_i(-1), exclusive=1)
    kept_sorted = op.And(op.Less(mass_before, tau_const), op.Greater(sorted_p, _const_f(0.0)))
    if keep_at_least:
        kept_sorted = op.Or(kept_sorted, op.Constant(value=ir.tensor(np.arange(nk) < keep_at_least)))
    kept = op.ScatterElements(op.Mul(probs, _const_f(0.0)), order, op.Cast(kept_sorted, to=_FLOAT), axis=-1)
    kept = _or(_or(op.Cast(kept, to=ir.DataType.BOOL), dense_k), dense_q)
    kept_f = op.Cast(kept, to=_FLOAT)
    counts = op.Cast(op.ReduceSum(kept_f, _const_i([-1]), keepdims=0), to=ir.DataType.INT32)
    # TopK breaks ties by the lower index: kept blocks first in ascending order, as the reference's
    # stable sort on "not kept" lists them.
    _, indices = op.TopK(kept_f, nk_const, axis=-1, largest=1, sorted=1)
    return counts, op.Cast(indices, to=ir.DataType.INT32)


_BUILTIN = {
    "accelkit::svdq_linear": (lower_svdq_linear, refuse_svdq_linear),
    "accelkit::block_sparse_attention": (lower_block_sparse_attention, None),
    "accelkit::predict_block_mask": (lower_predict_block_mask, None),
}


def register_builtin_lowerings() -> None:
    """Register the lowerings of this module for ops that have none yet (a user's own stays)."""
    registered = onnx_lowerings()
    for name, (fn, refuse) in _BUILTIN.items():
        if name not in registered:
            register_onnx_lowering(name, fn, refuse=refuse)


# ---------------------------------------------------------------- after the exporter


def _unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 ``(N, K/2)`` -> int8 ``(N, K)`` in [-8, 7] (even index in the low nibble)."""
    nibbles = np.stack((packed & 0xF, packed >> 4), axis=-1).reshape(packed.shape[0], -1).astype(np.int8)
    return np.where(nibbles >= 8, nibbles - 16, nibbles).astype(np.int8)


def _constant(value: ir.Value, what: str) -> np.ndarray:
    tensor = value.const_value
    if tensor is None:
        raise OnnxExportError(
            f"svdq_linear's {what} '{value.name}' is not a constant of the exported graph: the quant "
            "pass stores it as a module buffer; export the program the pass returned"
        )
    return tensor.numpy()


def _attach_functions(model: ir.Model) -> int:
    """Add the accelkit local functions the graph calls (with the model's default opset); returns the calls."""
    domain, name = BLOCK_SPARSE_ATTENTION_FUNCTION
    calls = sum(1 for n in model.graph.all_nodes() if n.domain == domain and n.op_type == name)
    if calls:
        function = ir.serde.deserialize_function(BlockSparseAttention.to_function_proto())
        function.opset_imports[""] = model.opset_imports.get("", function.opset_imports[""])
        model.functions[function.identifier()] = function
        model.opset_imports[domain] = 1
    return calls


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
        raise OnnxExportError(f"an {domain}::{name} marker is left inside a subgraph: export a flat graph")
    model.opset_imports.pop(domain, None)
    return len(done), stored


def finalize_model(model: ir.Model) -> dict[str, Any]:
    """Finish an exported model in place: INT4 initializers for the quantized weights, local functions.

    Returns:
        ``{"int4_weights": count, "int4_bytes": bytes of packed INT4 data, "sparse_attention_calls": n}``.
    """
    weights, stored = _materialize_int4_weights(model)
    calls = _attach_functions(model)
    return {"int4_weights": weights, "int4_bytes": stored, "sparse_attention_calls": calls}
