"""ONNX lowerings of ``accelkit::block_sparse_attention`` and ``accelkit::predict_block_mask``; imports onnxscript.

Imported when an export runs (the ops' registration names this module).

``accelkit::block_sparse_attention`` becomes a call to the ONNX local function
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
from onnxscript import opset21 as op
from onnxscript.values import Opset

from accelkit.kernels._onnx import FLOAT, const_f, const_i, custom_op, static_dim, to_float

from .registration import (
    BLOCK_SPARSE_ATTENTION_ATTRIBUTES,
    BLOCK_SPARSE_ATTENTION_FUNCTION,
    BLOCK_SPARSE_ATTENTION_INPUTS,
)

__all__ = [
    "BLOCK_SPARSE_ATTENTION_ATTRIBUTES",
    "BLOCK_SPARSE_ATTENTION_FUNCTION",
    "BLOCK_SPARSE_ATTENTION_INPUTS",
    "BlockSparseAttention",
    "finalize_model",
    "lower_block_sparse_attention",
    "lower_predict_block_mask",
]

_ACCELKIT = Opset(BLOCK_SPARSE_ATTENTION_FUNCTION[0], 1)
_BLOCK_SPARSE_ATTENTION_OP = custom_op(
    *BLOCK_SPARSE_ATTENTION_FUNCTION,
    BLOCK_SPARSE_ATTENTION_INPUTS,
    ("output",),
    (("block_q", int), ("block_k", int), ("scale", float)),
)


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
        x = op.Pad(x, const_i([0, 0, 0, 0, 0, 0, padding, 0]))
    grouped = op.Reshape(x, const_i([0, 0, blocks, block, depth]))
    return op.ReduceSum(grouped, const_i([3]), keepdims=0)


def _block_mean(x: Any, length: int, block: int, depth: int) -> Any:
    sizes = _block_sizes(length, block).reshape(-1, 1)
    return op.Div(_block_sum(x, length, block, depth), op.Constant(value=ir.tensor(sizes)))


def _block_self_similarity(x: Any, length: int, block: int, depth: int) -> Any:
    """Mean pairwise cosine similarity of the tokens in each block, ``(B, H, NB)`` (see the reference)."""
    norm = op.Sqrt(op.ReduceSumSquare(x, const_i([-1]), keepdims=1))
    unit = op.Div(x, op.Max(norm, const_f(1e-12)))
    sums = _block_sum(unit, length, block, depth)
    sizes = _block_sizes(length, block)
    return op.Div(
        op.ReduceSumSquare(sums, const_i([-1]), keepdims=0), op.Constant(value=ir.tensor(sizes * sizes))
    )


def _dense_blocks(length: int, block: int, prefix: int, suffix: int) -> np.ndarray:
    starts = np.arange(_num_blocks(length, block)) * block
    ends = np.minimum(starts + block, length)
    return (starts < prefix) | (ends > length - suffix)


def _or(a: Any | None, b: Any | None) -> Any | None:
    if a is None:
        return b
    return a if b is None else op.Or(a, b)


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
    lq = static_dim(q, 2, "predict_block_mask's q")
    lk = static_dim(k, 2, "predict_block_mask's k")
    depth = static_dim(q, 3, "predict_block_mask's q")
    nq, nk = _num_blocks(lq, block_q), _num_blocks(lk, block_k)
    qf, kf = to_float(q), to_float(k)
    pooled_q = op.Mul(_block_mean(qf, lq, block_q, depth), const_f(scale))
    pooled_k = _block_mean(kf, lk, block_k, depth)
    scores = op.MatMul(pooled_q, op.Transpose(pooled_k, perm=[0, 1, 3, 2]))  # (B, H, NQ, NK)
    keep_at_least = min(max(int(min_blocks), 0), nk)
    tau_const = const_f(float(tau))

    # dense_q: (NQ, 1) or (B, H, NQ, 1); dense_k: (NK,) or (B, H, 1, NK) -- both broadcast to the scores.
    dense_q = dense_k = None
    if dense_prefix or dense_suffix:
        rows = _dense_blocks(lq, block_q, dense_prefix, dense_suffix).reshape(nq, 1)
        cols = _dense_blocks(lk, block_k, dense_prefix, dense_suffix)
        dense_q, dense_k = op.Constant(value=ir.tensor(rows)), op.Constant(value=ir.tensor(cols))
    if similarity_threshold is not None:
        threshold = const_f(float(similarity_threshold))
        similar_q = op.Less(_block_self_similarity(qf, lq, block_q, depth), threshold)
        similar_k = op.Less(_block_self_similarity(kf, lk, block_k, depth), threshold)
        dense_q = _or(dense_q, op.Unsqueeze(similar_q, const_i([-1])))
        dense_k = _or(dense_k, op.Unsqueeze(similar_k, const_i([-2])))

    nk_const = const_i([nk])
    if dense_q is None and dense_k is None:
        # The reference's fast path: the kept set is a prefix of the probability order.
        probs = op.Softmax(scores, axis=-1)
        sorted_p, order = op.TopK(probs, nk_const, axis=-1, largest=1, sorted=1)
        mass_before = op.CumSum(sorted_p, const_i(-1), exclusive=1)
        kept = op.And(op.Less(mass_before, tau_const), op.Greater(sorted_p, const_f(0.0)))
        counts = op.ReduceSum(op.Cast(kept, to=ir.DataType.INT64), const_i([-1]), keepdims=0)
        counts = op.Max(counts, const_i(keep_at_least))
        return op.Cast(counts, to=ir.DataType.INT32), op.Cast(order, to=ir.DataType.INT32)

    if dense_k is not None:
        scores = op.Where(dense_k, const_f(float("-inf")), scores)
    probs = op.Softmax(scores, axis=-1)
    # A row whose key blocks are all dense has no pooled distribution (NaN); dense_k keeps them anyway.
    probs = op.Where(op.IsNaN(probs), const_f(0.0), probs)
    sorted_p, order = op.TopK(probs, nk_const, axis=-1, largest=1, sorted=1)
    mass_before = op.CumSum(sorted_p, const_i(-1), exclusive=1)
    kept_sorted = op.And(op.Less(mass_before, tau_const), op.Greater(sorted_p, const_f(0.0)))
    if keep_at_least:
        kept_sorted = op.Or(kept_sorted, op.Constant(value=ir.tensor(np.arange(nk) < keep_at_least)))
    kept = op.ScatterElements(op.Mul(probs, const_f(0.0)), order, op.Cast(kept_sorted, to=FLOAT), axis=-1)
    kept = _or(_or(op.Cast(kept, to=ir.DataType.BOOL), dense_k), dense_q)
    kept_f = op.Cast(kept, to=FLOAT)
    counts = op.Cast(op.ReduceSum(kept_f, const_i([-1]), keepdims=0), to=ir.DataType.INT32)
    # TopK breaks ties by the lower index: kept blocks first in ascending order, as the reference's
    # stable sort on "not kept" lists them.
    _, indices = op.TopK(kept_f, nk_const, axis=-1, largest=1, sorted=1)
    return counts, op.Cast(indices, to=ir.DataType.INT32)



def finalize_model(model: ir.Model) -> dict[str, Any]:
    """Attach the local function the graph calls (with the model's default opset), in place.

    Returns:
        ``{"sparse_attention_calls": number of calls}``.
    """
    domain, name = BLOCK_SPARSE_ATTENTION_FUNCTION
    calls = sum(1 for n in model.graph.all_nodes() if n.domain == domain and n.op_type == name)
    if calls:
        function = ir.serde.deserialize_function(BlockSparseAttention.to_function_proto())
        function.opset_imports[""] = model.opset_imports.get("", function.opset_imports[""])
        model.functions[function.identifier()] = function
        model.opset_imports[domain] = 1
    return {"sparse_attention_calls": calls}
