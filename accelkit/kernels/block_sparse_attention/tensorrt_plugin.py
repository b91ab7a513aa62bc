"""The ``accelkit::block_sparse_attention`` TensorRT plugin: descriptor and ahead-of-time implementation.

:func:`register_plugin` (named by the op's registration, called by
:func:`accelkit.export.tensorrt.register_tensorrt_plugins`) registers the descriptor (inputs,
attributes, output shape :func:`block_sparse_attention_output_shape`) and, when triton imports, the AOT
implementation below.

When an engine is built, TensorRT asks the plugin's AOT implementation (``tensorrt.plugin.aot_impl``)
for a compiled kernel, its launch parameters and the scalar arguments to pass; the kernel is embedded
in the engine and launched by TensorRT without Python. The kernel is accelkit's Triton block-sparse
attention (:mod:`._triton_kernel`) through its entry point
``_bsa_fwd_trt``, compiled to PTX for the build GPU's compute capability, once per plugin attribute set.

Launch convention (what TensorRT passes, in this order; see :data:`KERNEL_ARGUMENTS`)::

    q, k, v, kv_block_counts, kv_block_indices      input pointers (q/k/v one float type, int32 mask)
    H, Lq, Lk, W                                    int32 extras: heads, query / key length, index width
    out                                             output pointer (B, H, Lq, Dv) in q's type

All tensors are linear (contiguous), so strides follow from the shapes. The softmax scale, the head
dims (static in accelkit's exports) and the mask block sizes are compile-time constants. Grid:
``(ceil(Lq / BLOCK_M), B * H)``; block: ``num_warps * 32`` threads; shared memory from Triton.

Triton (3.3 on) appends two hidden pointer parameters (global and profile scratch) to every kernel's
PTX entry, which its own launcher fills; TensorRT passes only the arguments above. The kernel needs no
scratch (checked: both sizes are 0 and the body never loads those parameters), so they are removed
from the entry's parameter list and the launch matches the declaration exactly.

Nothing here imports ``tensorrt`` or ``triton`` at import time. The compile and the returned launch
description are tested on CPU (PTX for ``sm_90``, a stand-in for ``tensorrt.plugin``); the engine build
itself needs a GPU and TensorRT >= 10.9.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AotKernel",
    "BlockSparseKernelSpec",
    "KERNEL_ARGUMENTS",
    "KERNEL_EXTRAS",
    "KERNEL_INPUTS",
    "KERNEL_OUTPUTS",
    "PluginBuildError",
    "block_sparse_attention_launch",
    "block_sparse_attention_output_shape",
    "block_sparse_kernel_spec",
    "build_target",
    "compile_block_sparse_kernel",
    "ptx_entry",
    "register_block_sparse_aot_impl",
    "register_plugin",
]

# The kernel's runtime parameters in TensorRT's order: inputs, int32 extras, outputs.
KERNEL_INPUTS = ("Q", "K", "V", "Counts", "Indices")
KERNEL_EXTRAS = ("H", "Lq", "Lk", "W")
KERNEL_OUTPUTS = ("O",)
KERNEL_ARGUMENTS = KERNEL_INPUTS + KERNEL_EXTRAS + KERNEL_OUTPUTS
KERNEL_NAME = "_bsa_fwd_trt"

# TensorRT DataType names (pybind enum .name) -> Triton pointer element types.
_FLOAT_TYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}
_LOG2E = 1.4426950408889634
# TensorRT allocates plugin I/O with (at least) 256-byte alignment; 16 is all the vector loads need.
_POINTER_ALIGNMENT = 16


class PluginBuildError(ValueError):
    """The plugin cannot be built for these inputs or attributes (TensorRT reports it as a build error)."""


@dataclass(frozen=True)
class BlockSparseKernelSpec:
    """Everything one compiled ``_bsa_fwd_trt`` depends on (one PTX per distinct spec).

    Args:
        dtype: Triton element type of q, k, v and the output (``"fp16"``, ``"bf16"``, ``"fp32"``).
        head_dim: ``D`` of q and k.
        head_dim_v: ``Dv`` of v and the output.
        block_q: query block size of the mask.
        block_k: key/value block size of the mask.
        qk_scale: the softmax scale times log2(e) (the kernel uses base-2 exponentials).
        even_lk: the key length is a known multiple of ``block_k`` (no masked key loads).
        block_m: query rows per program.
        block_n: key rows per inner step.
        num_warps: warps per program.
        num_stages: software-pipelining depth of the KV loop.
    """

    dtype: str
    head_dim: int
    head_dim_v: int
    block_q: int
    block_k: int
    qk_scale: float
    even_lk: bool
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def block_d(self) -> int:
        return _next_pow2(self.head_dim)

    @property
    def block_dv(self) -> int:
        return _next_pow2(self.head_dim_v)

    def constexprs(self) -> dict[str, Any]:
        """The compile-time arguments of ``_bsa_fwd_trt``."""
        return {
            "QK_SCALE": self.qk_scale,
            "D": self.head_dim,
            "DV": self.head_dim_v,
            "MASK_BQ": self.block_q,
            "MASK_BK": self.block_k,
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_D": self.block_d,
            "BLOCK_DV": self.block_dv,
            "EVEN_LK": self.even_lk,
            "EVEN_D": self.head_dim == self.block_d and self.head_dim_v == self.block_dv,
        }


def _next_pow2(x: int) -> int:
    # Same rule as the PyTorch launcher (accelkit.kernels.block_sparse_attention.triton): at least 16.
    return 1 << max(4, (int(x) - 1).bit_length())


def block_sparse_kernel_spec(
    dtype: str,
    head_dim: int,
    head_dim_v: int,
    block_q: int,
    block_k: int,
    scale: float,
    *,
    key_length: int | None = None,
) -> BlockSparseKernelSpec:
    """The kernel spec for one plugin instance, with the launcher's checks and default tiles.

    Args:
        dtype: ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        head_dim: ``D``.
        head_dim_v: ``Dv``.
        block_q: query block size of the mask (a multiple of 16).
        block_k: key block size of the mask (a multiple of 16).
        scale: the softmax scale (the plugin's ``scale`` attribute).
        key_length: ``Lk`` when it is a build-time constant (turns off masked key loads when it is a
            multiple of ``block_k``); None when dynamic.

    Raises:
        PluginBuildError: unsupported dtype, head dim over 256, or block sizes the kernel cannot tile.
    """
    from accelkit.kernels.block_sparse_attention.triton import default_config

    if dtype not in _FLOAT_TYPES.values():
        raise PluginBuildError(
            f"block-sparse attention plugin: q/k/v must be fp16, bf16 or fp32, got {dtype}"
        )
    if max(head_dim, head_dim_v) > 256 or min(head_dim, head_dim_v) < 1:
        raise PluginBuildError(
            f"block-sparse attention plugin: head dims 1..256 supported, got {head_dim}/{head_dim_v}"
        )
    if block_q % 16 or block_k % 16 or block_q <= 0 or block_k <= 0:
        raise PluginBuildError(
            f"block-sparse attention plugin: block_q and block_k must be positive multiples of 16 (tl.dot "
            f"tiles), got {block_q}, {block_k}"
        )
    if not math.isfinite(scale):
        raise PluginBuildError(f"block-sparse attention plugin: scale must be finite, got {scale}")
    config = default_config(block_q, block_k, max(head_dim, head_dim_v))
    return BlockSparseKernelSpec(
        dtype=dtype,
        head_dim=int(head_dim),
        head_dim_v=int(head_dim_v),
        block_q=int(block_q),
        block_k=int(block_k),
        qk_scale=float(scale) * _LOG2E,
        even_lk=key_length is not None and key_length % block_k == 0,
        block_m=config.block_m,
        block_n=config.block_n,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


# ---------------------------------------------------------------- compiling the kernel


@dataclass(frozen=True)
class AotKernel:
    """A compiled kernel as TensorRT takes it.

    Args:
        name: the PTX entry name.
        ptx: the PTX, its entry declaring exactly :data:`KERNEL_ARGUMENTS`.
        shared: dynamic shared memory per program, bytes.
        num_warps: warps per program (``block_x = num_warps * 32``).
        block_m: query rows per program (the spec's, or smaller when the spec's tile did not fit in
            shared memory); the launch grid divides the query length by it. None: the spec's.
    """

    name: str
    ptx: str
    shared: int
    num_warps: int
    block_m: int | None = None


_ENTRY = re.compile(r"\.entry\s+(?P<name>[\w$]+)\s*\((?P<params>[^)]*)\)", re.S)


def ptx_entry(ptx: str) -> tuple[str, list[str]]:
    """``(entry name, parameter declarations)`` of the single ``.entry`` of a PTX module."""
    entries = list(_ENTRY.finditer(ptx))
    if len(entries) != 1:
        raise PluginBuildError(f"expected one .entry in the PTX, found {len(entries)}")
    match = entries[0]
    params = [p.strip() for p in match.group("params").split(",") if p.strip()]
    return match.group("name"), params


def _drop_trailing_params(ptx: str, keep: int) -> str:
    """Remove the entry's parameters after the first ``keep`` (refusing any the body reads)."""
    name, params = ptx_entry(ptx)
    if len(params) < keep:
        raise PluginBuildError(
            f"PTX entry {name} has {len(params)} parameters, fewer than the {keep} expected"
        )
    match = _ENTRY.search(ptx)
    body = ptx[match.end() :]
    for declaration in params[keep:]:
        param = declaration.split()[-1]
        if re.search(rf"\[\s*{re.escape(param)}\s*(\+\s*\d+\s*)?\]", body):
            raise PluginBuildError(
                f"PTX entry {name} reads its hidden parameter {param}; TensorRT cannot pass it"
            )
    joined = ",\n\t".join(params[:keep])
    return f"{ptx[: match.start()]}.entry {name}(\n\t{joined}\n){body}"


def build_target() -> tuple[str, int, int]:
    """``(backend, arch, warp size)`` of the GPU engines are being built on (``("cuda", 90, 32)`` on H100)."""
    import torch

    if not torch.cuda.is_available():
        raise PluginBuildError(
            "compiling the block-sparse attention plugin needs the CUDA GPU the engine is built for"
        )
    major, minor = torch.cuda.get_device_capability(torch.cuda.current_device())
    return ("cuda", major * 10 + minor, 32)


DEFAULT_SHARED_MEMORY_LIMIT = 48 * 1024


@functools.lru_cache(maxsize=64)
def compile_block_sparse_kernel(spec: BlockSparseKernelSpec, target: tuple[str, int, int]) -> AotKernel:
    """Compile ``_bsa_fwd_trt`` for ``spec`` on ``target`` (``(backend, arch, warp size)``), once per process.

    Raises:
        PluginBuildError: the kernel would need Triton's scratch buffers (TensorRT cannot provide them).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from accelkit.kernels.block_sparse_attention._triton_kernel import _bsa_fwd_trt

    constexprs = spec.constexprs()
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for index, name in enumerate(_bsa_fwd_trt.arg_names):
        if name in ("Counts", "Indices"):
            signature[name] = "*i32"
        elif name in KERNEL_INPUTS or name in KERNEL_OUTPUTS:
            signature[name] = f"*{spec.dtype}"
        elif name in KERNEL_EXTRAS:
            signature[name] = "i32"
            continue
        else:
            signature[name] = "constexpr"
            continue
        attrs[(index,)] = [["tt.divisibility", _POINTER_ALIGNMENT]]
    runtime = [n for n in _bsa_fwd_trt.arg_names if signature[n] != "constexpr"]
    if tuple(runtime) != KERNEL_ARGUMENTS or set(constexprs) != set(_bsa_fwd_trt.arg_names) - set(runtime):
        raise PluginBuildError(
            f"_bsa_fwd_trt's parameters {_bsa_fwd_trt.arg_names} left TensorRT's convention"
        )
    # A kernel launched without cuFuncSetAttribute gets at most 48 KiB of dynamic shared memory, and
    # nothing says TensorRT opts an AOT plugin into more: shallower pipelining, then shorter query
    # tiles (any power of two dividing the mask's query block), until the kernel fits.
    tiles = [m for m in (spec.block_m, spec.block_m // 2, spec.block_m // 4) if m >= 16 and spec.block_q % m == 0]
    for block_m, num_stages in ((m, s) for m in tiles for s in range(spec.num_stages, 0, -1)):
        compiled = triton.compile(
            ASTSource(fn=_bsa_fwd_trt, signature=signature, constexprs={**constexprs, "BLOCK_M": block_m},
                      attrs=attrs),
            target=GPUTarget(*target),
            options={"num_warps": spec.num_warps, "num_stages": num_stages},
        )
        if int(compiled.metadata.shared) <= DEFAULT_SHARED_MEMORY_LIMIT:
            break
    else:
        raise PluginBuildError(
            f"the block-sparse attention kernel needs more than the {DEFAULT_SHARED_MEMORY_LIMIT} bytes of shared "
            "memory a plugin launch may use: export the plan in fp16/bf16 or lower sparse.block_q"
        )
    metadata = compiled.metadata
    if getattr(metadata, "global_scratch_size", 0) or getattr(metadata, "profile_scratch_size", 0):
        raise PluginBuildError(
            "the block-sparse attention kernel needs Triton scratch memory, which TensorRT cannot pass"
        )
    ptx = _drop_trailing_params(compiled.asm["ptx"], len(KERNEL_ARGUMENTS))
    return AotKernel(
        name=metadata.name, ptx=ptx, shared=int(metadata.shared), num_warps=int(metadata.num_warps),
        block_m=block_m,
    )


# ---------------------------------------------------------------- the aot_impl


def _dtype_name(dtype: Any) -> str:
    return str(getattr(dtype, "name", dtype)).rsplit(".", 1)[-1].upper()


def _constant_dim(expr: Any, what: str) -> int:
    if not expr.is_constant:
        raise PluginBuildError(
            f"block-sparse attention plugin: {what} must be a build-time constant (it sizes the kernel's tiles)"
        )
    return int(expr.constant_value())


def _known_dim(expr: Any) -> int | None:
    return int(expr.constant_value()) if expr.is_constant else None


def block_sparse_attention_launch(
    trtp: Any,
    q: Any,
    k: Any,
    v: Any,
    kv_block_counts: Any,
    kv_block_indices: Any,
    block_q: int,
    block_k: int,
    scale: float,
    outputs: Any,
    *,
    target: tuple[str, int, int] | None = None,
    compile_kernel: Callable[[BlockSparseKernelSpec, tuple[str, int, int]], AotKernel] | None = None,
) -> tuple[bytes, bytes, Any, Any]:
    """The body of the plugin's ``aot_impl``: compiled kernel, launch parameters and int32 extras.

    Args:
        trtp: the ``tensorrt.plugin`` module (tests pass a stand-in).
        q, k, v, kv_block_counts, kv_block_indices: the inputs' ``TensorDesc`` (symbolic shapes, dtypes).
        block_q, block_k, scale: the plugin attributes.
        outputs: the output ``TensorDesc`` tuple.
        target: ``(backend, arch, warp size)``; the build GPU's (:func:`build_target`) when None.
        compile_kernel: the compiler (:func:`compile_block_sparse_kernel` when None).

    Returns:
        ``(kernel name, PTX, trtp.KernelLaunchParams, trtp.SymIntExprs of H, Lq, Lk, W)``.
    """
    dtype = _FLOAT_TYPES.get(_dtype_name(q.dtype))
    names = {n: _dtype_name(t.dtype) for n, t in (("k", k), ("v", v), ("out", outputs[0]))}
    if dtype is None or any(name != _dtype_name(q.dtype) for name in names.values()):
        raise PluginBuildError(
            f"block-sparse attention plugin: q, k, v and the output must share fp16, bf16 or fp32, got "
            f"{_dtype_name(q.dtype)}, {names['k']}, {names['v']}, {names['out']}"
        )
    for what, desc in (("kv_block_counts", kv_block_counts), ("kv_block_indices", kv_block_indices)):
        if _dtype_name(desc.dtype) != "INT32":
            raise PluginBuildError(
                f"block-sparse attention plugin: {what} must be int32, got {_dtype_name(desc.dtype)}"
            )
    qs, ks, vs, ins = q.shape_expr, k.shape_expr, v.shape_expr, kv_block_indices.shape_expr
    if not (len(qs) == len(ks) == len(vs) == len(ins) == 4 and len(kv_block_counts.shape_expr) == 3):
        raise PluginBuildError("block-sparse attention plugin: q, k, v, indices must be 4-d and counts 3-d")
    spec = block_sparse_kernel_spec(
        dtype,
        _constant_dim(qs[3], "q's head dim"),
        _constant_dim(vs[3], "v's head dim"),
        int(block_q),
        int(block_k),
        float(scale),
        key_length=_known_dim(ks[2]),
    )
    kernel = (compile_kernel or compile_block_sparse_kernel)(spec, target or build_target())

    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(qs[2], kernel.block_m or spec.block_m)  # query tiles
    launch.grid_y = qs[0] * qs[1]  # batch * heads
    launch.block_x = kernel.num_warps * 32
    launch.shared_mem = kernel.shared
    # Same order as KERNEL_EXTRAS (the kernel's int32 parameters between inputs and output).
    extras = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (qs[1], qs[2], ks[2], ins[3])])
    return kernel.name.encode(), kernel.ptx.encode(), launch, extras


def register_block_sparse_aot_impl(trtp: Any, plugin_id: str) -> Callable[..., Any]:
    """Register :func:`block_sparse_attention_launch` as ``trtp.aot_impl(plugin_id)``; returns the function.

    ``trtp.aot_impl`` checks the parameter names (inputs, attributes, ``outputs``, ``tactic``) and
    requires a return annotation of real classes, which this module's postponed annotations would turn
    into strings: it is set as objects here.
    """

    def block_sparse_attention_aot_impl(
        q, k, v, kv_block_counts, kv_block_indices, block_q, block_k, scale, outputs, tactic
    ):
        return block_sparse_attention_launch(
            trtp, q, k, v, kv_block_counts, kv_block_indices, block_q, block_k, scale, outputs
        )

    block_sparse_attention_aot_impl.__annotations__ = {
        "return": tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]
    }
    trtp.aot_impl(plugin_id)(block_sparse_attention_aot_impl)
    return block_sparse_attention_aot_impl


# ---------------------------------------------------------------- the descriptor


def block_sparse_attention_output_shape(q_shape: Sequence[Any], v_shape: Sequence[Any]) -> tuple[Any, ...]:
    """Output shape of block-sparse attention: ``(B, H, Lq, Dv)`` from q ``(B, H, Lq, D)`` and v ``(B, H, Lk, Dv)``.

    Works on ints and on TensorRT's symbolic shape expressions alike (only indexing is used), so the
    plugin's shape function is this one.
    """
    if len(q_shape) != 4 or len(v_shape) != 4:
        raise ValueError(f"block-sparse attention takes 4-d q and v, got ranks {len(q_shape)} and {len(v_shape)}")
    return (q_shape[0], q_shape[1], q_shape[2], v_shape[3])


def register_plugin(trtp: Any, plugin_id: str) -> None:
    """Register the plugin's descriptor with ``trtp`` (``tensorrt.plugin``) and, when triton imports,
    its AOT implementation (which compiles the Triton kernel for the build GPU)."""

    def block_sparse_attention_desc(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k, scale):
        shape = block_sparse_attention_output_shape(list(q.shape_expr), list(v.shape_expr))
        return trtp.from_shape_expr(tuple(shape), dtype=q.dtype)

    # trtp.register reads the signature's annotations as classes (issubclass(annotation, TensorDesc));
    # this module's postponed annotations would hand it strings, so they are set as objects here.
    block_sparse_attention_desc.__annotations__ = {
        **{name: trtp.TensorDesc for name in ("q", "k", "v", "kv_block_counts", "kv_block_indices")},
        "block_q": int,
        "block_k": int,
        "scale": float,
        "return": trtp.TensorDesc,
    }
    trtp.register(plugin_id)(block_sparse_attention_desc)
    from accelkit.kernels._backend import triton_importable

    if triton_importable():
        register_block_sparse_aot_impl(trtp, plugin_id)
