"""What accelkit knows about ``accelkit::svdq_linear`` beyond the kernel: cost, precision, ONNX lowering.

Imported by the package ``__init__`` (so the spec exists whenever the op does); the ONNX lowering
lives in :mod:`.onnx_lowering` and is imported only when an export runs.
"""

from __future__ import annotations

import math

from accelkit.kernels.registry import OnnxLowering, OpCall, OpFlops, OpSpec, PrecisionFacts, register_op

NAME = "accelkit::svdq_linear"
# Activation modes that run FP8 tensor-core dots whatever the output dtype.
FP8_ACT_MODES = ("w4a8", "w4a4")
# Activation modes with an ONNX form (w4a4's per-group INT4 activations are a fake-quantized reference).
LOWERED_ACT_MODES = ("w4a16", "w4a8")
# (domain, op_type) of the private marker the lowering emits on the packed weight (see .onnx_lowering).
INT4_WEIGHT_FUNCTION = ("accelkit.export", "Int4BlockWeight")


def svdq_linear_flops(call: OpCall) -> OpFlops | None:
    """4-bit GEMM x (N, K) plus the low-rank branch x (r, K) then (N, r).

    Its bytes are the stored (packed 4-bit, scales, factors) tensors, counted from the get_attr inputs
    like any weight.
    """
    x, down, out = call.shape("x"), call.shape("lora_down"), call.shape()
    if not (x and down and out):
        return None
    rows = math.prod(x[:-1])
    return OpFlops(flops=2.0 * rows * out[-1] * x[-1] + 2.0 * rows * down[0] * (x[-1] + out[-1]), kind="matmul")


def svdq_compute_dtype(call: OpCall) -> str | None:
    return "float8" if call.arg("act_mode") in FP8_ACT_MODES else None


def act_mode_refusal(act_mode: object) -> str | None:
    """Why ``act_mode`` has no ONNX lowering, or None."""
    if act_mode == "w4a4":
        return (
            "svdq_linear with act_mode='w4a4' has no ONNX lowering (its per-group INT4 activations are a "
            "fake-quantized reference only): quantize with quant.act_mode='w4a16' or 'w4a8' to export"
        )
    if act_mode not in LOWERED_ACT_MODES:
        return f"svdq_linear: unknown act_mode {act_mode!r}; quantize with quant.act_mode='w4a16' or 'w4a8'"
    return None


def refuse_svdq_linear(call: OpCall) -> str | None:
    """Why a graph call of the op cannot be lowered (its ``act_mode``), or None."""
    return act_mode_refusal(call.arg("act_mode"))


SPEC = register_op(
    OpSpec(
        name=NAME,
        flops=svdq_linear_flops,
        precision=PrecisionFacts(compute_dtype=svdq_compute_dtype, int4_weight_nodes=(INT4_WEIGHT_FUNCTION,)),
        onnx=OnnxLowering(
            module="accelkit.kernels.svdq_linear.onnx_lowering",
            function="lower_svdq_linear",
            finalize="finalize_model",
            refuse=refuse_svdq_linear,
        ),
    )
)
