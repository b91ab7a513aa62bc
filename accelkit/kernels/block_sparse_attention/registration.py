"""What accelkit knows about the block-sparse attention ops beyond the kernels: cost, ONNX, TensorRT.

``accelkit::block_sparse_attention`` (the attention) and ``accelkit::predict_block_mask`` (the
SpargeAttn mask that feeds it). Imported by the package ``__init__``; the ONNX lowerings live in
:mod:`.onnx_lowering` and the TensorRT plugin in :mod:`.tensorrt_plugin`, both imported only when an
export or an engine build runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from accelkit.kernels.registry import OnnxLowering, OpCall, OpFlops, OpSpec, TensorRTPlugin, register_op

ATTENTION = "accelkit::block_sparse_attention"
MASK = "accelkit::predict_block_mask"

# (domain, name) of the ONNX local function the attention is exported as; version 1 of its domain.
BLOCK_SPARSE_ATTENTION_FUNCTION = ("accelkit", "BlockSparseAttention")
# Inputs, in order: q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv), int32 counts (B, H, NQ) and
# int32 indices (B, H, NQ, W); output (B, H, Lq, Dv) in q's type. Semantics: .reference.
BLOCK_SPARSE_ATTENTION_INPUTS = ("q", "k", "v", "kv_block_counts", "kv_block_indices")
# Attributes: block_q (int), block_k (int), scale (float, the softmax scale).
BLOCK_SPARSE_ATTENTION_ATTRIBUTES = ("block_q", "block_k", "scale")

# The plugin that replaces the local function when engines are built.
PLUGIN_NAMESPACE = "accelkit"
PLUGIN_NAME = "block_sparse_attention"
# The plugin's kernel is accelkit's Triton kernel, compiled to PTX while the engine is built
# (.tensorrt_plugin): without triton there is nothing to embed.
NEEDS_TRITON = "building engines for a sparse plan needs triton (pip install accelkit[gpu])"
# Where the sparse pass stores the calibrated mean kept share of a call's blocks (1.0 = unknown).
KEPT_FRACTION_META = "accelkit_kept_fraction"


def _dense_attention_flops(q: tuple[int, ...], k: tuple[int, ...]) -> float:
    # QK^T and PV: 2 * (2 * L_q * L_k * d) per batch-head.
    return 4.0 * math.prod(q[:-2]) * q[-2] * k[-2] * q[-1]


def attention_flops(call: OpCall) -> OpFlops | None:
    """Dense attention FLOPs times the kept share of the blocks (data-dependent: the calibrated mean)."""
    q, k = call.shape("q"), call.shape("k")
    if not (q and k):
        return None
    kept = float(call.meta.get(KEPT_FRACTION_META, 1.0))
    return OpFlops(flops=_dense_attention_flops(q, k) * kept, kind="attention")


def mask_flops(call: OpCall) -> OpFlops | None:
    """Pooling Q and K (one add per element) plus the pooled scores; bandwidth-bound in practice."""
    q, k = call.shape("q"), call.shape("k")
    if not (q and k):
        return None
    nq, nk = -(-q[-2] // int(call.arg("block_q"))), -(-k[-2] // int(call.arg("block_k")))
    pooled = 2.0 * math.prod(q[:-2]) * nq * nk * q[-1]
    return OpFlops(flops=float(math.prod(q) + math.prod(k)) + pooled, kind="memory")


def triton_missing() -> str | None:
    from accelkit.kernels._backend import triton_importable

    return None if triton_importable() else NEEDS_TRITON


def check_plugin_attributes(attributes: Mapping[str, Any]) -> str | None:
    """Why the plugin's Triton kernel cannot tile a node with these attributes, or None.

    The same check runs again inside the plugin's AOT implementation; this one fails before TensorRT
    is touched.
    """
    block_q, block_k = attributes.get("block_q"), attributes.get("block_k")
    if all(isinstance(b, int) and b > 0 and b % 16 == 0 for b in (block_q, block_k)):
        return None
    return (
        f"has block_q={block_q}, block_k={block_k}: the TensorRT plugin's Triton kernel needs positive "
        "multiples of 16"
    )


_LOWERINGS = "accelkit.kernels.block_sparse_attention.onnx_lowering"

ATTENTION_SPEC = register_op(
    OpSpec(
        name=ATTENTION,
        flops=attention_flops,
        onnx=OnnxLowering(module=_LOWERINGS, function="lower_block_sparse_attention", finalize="finalize_model"),
        tensorrt=TensorRTPlugin(
            onnx_function=BLOCK_SPARSE_ATTENTION_FUNCTION,
            namespace=PLUGIN_NAMESPACE,
            name=PLUGIN_NAME,
            register="accelkit.kernels.block_sparse_attention.tensorrt_plugin:register_plugin",
            unavailable=triton_missing,
            check_attributes=check_plugin_attributes,
        ),
    )
)
MASK_SPEC = register_op(
    OpSpec(name=MASK, flops=mask_flops, onnx=OnnxLowering(module=_LOWERINGS, function="lower_predict_block_mask"))
)
