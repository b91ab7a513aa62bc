"""Cost of a program: a roofline model per graph node, or measured latency.

On a shared 2-core CPU wall-clock timings are noise, so the default cost is a roofline estimate:
each node costs ``max(FLOPs / peak of its precision, bytes moved / bandwidth)`` on a target device
from a small table. Caching (fewer full steps), step reduction, pruning (fewer nodes) and lower
precision all show up in it. Costs count denoiser evaluations only: the text encoder and VAE run once
per image whatever the plan, and they are small next to the denoising loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import BuiltinFunctionType

import torch
from torch import fx

from accelkit.capture.cost import graph_costs
from accelkit.errors import InputError
from accelkit.kernels.registry import op_call
from accelkit.passes.base import Program

aten = torch.ops.aten

# Ops that only reinterpret memory: no bytes move.
_VIEW_OPS = {
    aten.view.default, aten.reshape.default, aten.permute.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.expand.default, aten.slice.Tensor, aten.select.int, aten.t.default,
    aten.transpose.int, aten.unflatten.int, aten.flatten.using_ints, aten.unbind.int, aten.chunk.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten._assert_tensor_metadata.default, aten.alias.default,
    aten.detach.default,
}


@dataclass(frozen=True)
class DeviceSpec:
    """Peak rates of a cost target.

    Args:
        name: table key.
        flops: peak dense FLOP/s by dtype name (``"float32"``, ``"bfloat16"``, ``"float8"``...).
        bandwidth: memory bandwidth in bytes/s.
        launch_overhead: seconds per node (kernel launch / dispatch).
    """

    name: str
    flops: dict[str, float]
    bandwidth: float
    launch_overhead: float


DEVICES: dict[str, DeviceSpec] = {
    # H100 SXM: measured here 798 TFLOP/s bf16 (8192^3 matmul) and ~3.0 TB/s device copy.
    "h100": DeviceSpec(
        "h100",
        {"float32": 400e12, "bfloat16": 798e12, "float16": 798e12, "float8": 1500e12, "int8": 1500e12},
        3.0e12,
        4e-6,
    ),
    # A 2-core AVX2 CPU: ~64 GFLOP/s fp32 per core with FMA, ~20 GB/s.
    "cpu": DeviceSpec("cpu", {"float32": 100e9, "bfloat16": 50e9, "float16": 50e9}, 20e9, 2e-6),
}


def device_spec(name: str) -> DeviceSpec:
    try:
        return DEVICES[name]
    except KeyError:
        raise InputError(f"unknown cost target '{name}': choose one of {', '.join(DEVICES)}") from None


def _dtype_name(node: fx.Node) -> str:
    # A custom op may compute in another precision than its output's (FP8 dots of a 4-bit linear).
    registered = op_call(node)
    if registered is not None and registered[0].precision.compute_dtype is not None:
        spec, call = registered
        compute = spec.precision.compute_dtype(call)
        if compute is not None:
            return compute
    value = node.meta.get("val")
    dtype = getattr(value, "dtype", torch.float32)
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return "float8"
    return str(dtype).removeprefix("torch.")


def module_cost(module: fx.GraphModule, spec: DeviceSpec) -> float:
    """Roofline seconds of one forward of ``module``."""
    total = 0.0
    costs = graph_costs(module)
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target in _VIEW_OPS or isinstance(node.target, BuiltinFunctionType):
            continue
        cost = costs.get(node.name)
        if cost is None:
            continue
        peak = spec.flops.get(_dtype_name(node), spec.flops["float32"])
        total += max(cost.flops / peak, cost.bytes / spec.bandwidth) + spec.launch_overhead
    return total


def module_flops(module: fx.GraphModule) -> float:
    return float(sum(c.flops for c in graph_costs(module).values()))


@dataclass(frozen=True)
class ProgramCost:
    """Cost of one whole generation under a program.

    Args:
        seconds: roofline (or measured) seconds of all denoiser evaluations.
        flops: FLOPs of all denoiser evaluations.
        per_variant: roofline seconds of one forward per variant.
    """

    seconds: float
    flops: float
    per_variant: dict[str, float]


def program_cost(program: Program, spec: DeviceSpec) -> ProgramCost:
    """Sum the per-step variant costs over the schedule."""
    per_variant = {name: module_cost(v.module, spec) for name, v in program.variants.items()}
    flops = {name: module_flops(v.module) for name, v in program.variants.items()}
    seconds = sum(per_variant[name] for name in program.schedule)
    total_flops = sum(flops[name] for name in program.schedule)
    return ProgramCost(seconds, total_flops, per_variant)


def measure_variant_latency(
    program: Program, kwargs: dict, *, warmup: int = 2, repeats: int = 7
) -> dict[str, float]:
    """Median wall-clock seconds of one forward of each variant on ``kwargs``' device.

    State inputs come from one run of the ``full`` variant on the same inputs; CUDA work is
    synchronized around each timed call. Warm-up runs are excluded.

    Args:
        program: the program whose variants to time.
        kwargs: one recorded denoiser call (tensors on the target device).
        warmup: untimed runs per variant.
        repeats: timed runs per variant (the median is returned).
    """
    import statistics
    import time

    from accelkit.runtime.executor import ProgramExecutor

    executor = ProgramExecutor(program)
    states: dict[str, list] = {}
    for name in dict.fromkeys(program.schedule):
        variant = program.variants[name]
        if variant.state_outputs:
            outputs = variant.module(*program.graph.flat_inputs(kwargs), *(
                states[s.removesuffix("@prev")][-1] for s in variant.state_inputs))
            for state_name, value in zip(variant.state_outputs, outputs[program.graph.num_user_outputs:],
                                         strict=True):
                states.setdefault(state_name, []).append(value)
    device = program.graph.flat_inputs(kwargs)[0].device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result: dict[str, float] = {}
    for name in dict.fromkeys(program.schedule):
        variant = program.variants[name]
        flat = list(program.graph.flat_inputs(kwargs))
        flat += [states[s.removesuffix("@prev")][-1] for s in variant.state_inputs]
        flat += [torch.tensor(0.0, device=device) for _ in variant.scalar_inputs]
        times = []
        with torch.no_grad():
            for index in range(warmup + repeats):
                synchronize()
                start = time.perf_counter()
                executor._module(variant.module)(*flat)
                synchronize()
                if index >= warmup:
                    times.append(time.perf_counter() - start)
        result[name] = statistics.median(times)
    return result


def measured_program_cost(program: Program, kwargs: dict, **timing) -> ProgramCost:
    """Like :func:`program_cost`, with measured per-variant latency instead of the roofline."""
    per_variant = measure_variant_latency(program, kwargs, **timing)
    flops = {name: module_flops(v.module) for name, v in program.variants.items()}
    seconds = sum(per_variant[name] for name in program.schedule)
    return ProgramCost(seconds, sum(flops[name] for name in program.schedule), per_variant)
