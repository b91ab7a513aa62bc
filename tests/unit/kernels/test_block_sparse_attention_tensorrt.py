"""Tests of the block-sparse attention TensorRT plugin's AOT implementation (accelkit/kernels/block_sparse_attention/tensorrt_plugin.py).

On CPU: the TensorRT-convention kernel entry runs in Triton's interpreter against the reference; it
compiles to sm_90 PTX whose entry takes exactly TensorRT's arguments (and ptxas accepts it); the
aot_impl body, driven by a stand-in for ``tensorrt.plugin``, returns launch parameters and extras that
match the shapes. The ``trt`` test builds and runs a real engine and skips without TensorRT.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from accelkit.kernels.block_sparse_attention.tensorrt_plugin import (
    KERNEL_ARGUMENTS,
    KERNEL_EXTRAS,
    AotKernel,
    PluginBuildError,
    _drop_trailing_params,
    block_sparse_attention_launch,
    block_sparse_kernel_spec,
    ptx_entry,
    register_block_sparse_aot_impl,
)
from tests.unit.export.test_tensorrt import FakeDim, fake_tensorrt_plugin

_ROOT = Path(__file__).resolve().parents[3]
SM90 = ("cuda", 90, 32)


def _needs_triton():
    return pytest.importorskip("triton", reason="triton is not installed (CI does not install it)")


# ---------------------------------------------------------------- the kernel entry, interpreted

_INTERPRETER_CHECK = """
import dataclasses, torch
from accelkit.kernels.block_sparse_attention.tensorrt_plugin import KERNEL_ARGUMENTS, block_sparse_kernel_spec
from accelkit.kernels.block_sparse_attention._triton_kernel import _bsa_fwd_trt
from accelkit.kernels.block_sparse_attention.reference import (
    block_sparse_attention_reference, indices_from_dense_mask, num_blocks)

cases = [  # B, H, Lq, Lk, D, Dv, block_q, block_k, dtype, narrow W, tile override
    (2, 3, 300, 200, 72, 72, 128, 64, torch.float16, False, None),   # partial blocks, D not a power of 2
    (1, 2, 256, 256, 64, 32, 64, 32, torch.float32, True, None),     # W = max count < NK, Dv != D
    (1, 2, 257, 450, 64, 64, 128, 64, torch.float16, False, 128),    # 2 mask blocks gathered per tile
]
worst = 0.0
for b, h, lq, lk, d, dv, bq, bk, dt, narrow, block_n in cases:
    g = torch.Generator().manual_seed(lq + lk)
    q, k = torch.randn(b, h, lq, d, generator=g).to(dt), torch.randn(b, h, lk, d, generator=g).to(dt)
    v = torch.randn(b, h, lk, dv, generator=g).to(dt)
    nq, nk = num_blocks(lq, bq), num_blocks(lk, bk)
    mask = torch.rand(b, h, nq, nk, generator=g) < 0.5
    mask[..., -1, -1] = True
    mask[0, 0, 0] = False  # an empty query block: zeros
    counts, indices = indices_from_dense_mask(mask)
    kept = torch.arange(nk) < counts[..., None]  # shuffle the kept entries: their order must not matter
    key = torch.where(kept, torch.rand(indices.shape, generator=g), 2.0)
    indices = torch.gather(indices, -1, torch.argsort(key, dim=-1))
    if narrow:
        indices = indices[..., : int(counts.max())]
    indices = indices.contiguous()
    scale = 0.7 / d ** 0.5
    spec = block_sparse_kernel_spec(
        {torch.float16: "fp16", torch.float32: "fp32"}[dt], d, dv, bq, bk, scale, key_length=lk)
    if block_n is not None:
        spec = dataclasses.replace(spec, block_n=block_n)
    out = torch.full((b, h, lq, dv), float("nan"), dtype=dt)
    runtime = {"Q": q, "K": k, "V": v, "Counts": counts, "Indices": indices,
               "H": h, "Lq": lq, "Lk": lk, "W": indices.shape[-1], "O": out}
    grid = (-(-lq // spec.block_m), b * h)  # what the plugin's launch parameters say
    _bsa_fwd_trt[grid](*[runtime[n] for n in KERNEL_ARGUMENTS], **spec.constexprs())
    ref = block_sparse_attention_reference(q, k, v, counts, indices, block_q=bq, block_k=bk, scale=scale)
    assert not torch.isnan(out).any(), "unwritten output"
    assert torch.all(out[0, 0, :bq] == 0), "empty query block must be zeros"
    worst = max(worst, ((out.float() - ref.float()).norm() / ref.float().norm()).item())
assert worst < 2e-3, worst
print("worst", worst)
"""


def test_tensorrt_entry_in_interpreter_matches_reference():
    """``_bsa_fwd_trt`` called in TensorRT's argument order matches the reference (fp16 / fp32: the
    interpreter's bf16 dot is wrong). A subprocess, so interpreter mode cannot leak into other tests."""
    _needs_triton()
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_CHECK], env=env, cwd=_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "worst" in done.stdout


# ---------------------------------------------------------------- ahead-of-time compile


def test_aot_compile_refuses_a_kernel_too_big_for_a_plugin_launch():
    _needs_triton()
    from accelkit.kernels.block_sparse_attention.tensorrt_plugin import (
        PluginBuildError,
        compile_block_sparse_kernel,
    )

    # fp32 K and V tiles of a head dim padded to 128 alone take 64 KiB: no tile or stage count fits.
    spec = block_sparse_kernel_spec("fp32", 72, 72, 128, 64, 1 / math.sqrt(72))
    with pytest.raises(PluginBuildError, match="fp16/bf16"):
        compile_block_sparse_kernel(spec, SM90)


@pytest.mark.parametrize(
    "dtype,d,lk", [("fp16", 64, 1024), ("bf16", 128, 1000), ("fp32", 32, None)], ids=["fp16", "bf16", "fp32"]
)
def test_aot_ptx_entry_takes_tensorrt_arguments(dtype, d, lk, tmp_path):
    _needs_triton()
    from triton.backends.nvidia.compiler import get_ptxas

    from accelkit.kernels.block_sparse_attention._triton_kernel import _bsa_fwd_trt
    from accelkit.kernels.block_sparse_attention.tensorrt_plugin import compile_block_sparse_kernel

    spec = block_sparse_kernel_spec(dtype, d, d, 128, 64, 1 / math.sqrt(d), key_length=lk)
    # Runtime arguments in TensorRT's order, everything else a compile-time constant of the spec.
    assert [n for n in _bsa_fwd_trt.arg_names if n not in spec.constexprs()] == list(KERNEL_ARGUMENTS)
    kernel = compile_block_sparse_kernel(spec, SM90)
    name, params = ptx_entry(kernel.ptx)
    assert name == kernel.name == "_bsa_fwd_trt"
    # inputs q, k, v, counts, indices (64-bit pointers); H, Lq, Lk, W (32-bit); out (pointer). Nothing else.
    kinds = [p.split()[1] for p in params]
    assert kinds == [".u64"] * 5 + [".u32"] * 4 + [".u64"], params
    assert all(".ptr" in params[i] for i in (0, 1, 2, 3, 4, 9))
    body = kernel.ptx[kernel.ptx.index(params[-1]) + len(params[-1]) :]
    for declaration in params:  # every argument TensorRT passes is read by the kernel
        assert f"[{declaration.split()[-1]}]" in body, declaration
    assert kernel.num_warps == spec.num_warps and 0 < kernel.shared <= 48 * 1024  # no opt-in launch needed
    assert spec.block_q % kernel.block_m == 0  # a tile never straddles two mask blocks
    if dtype != "fp32":
        assert "wgmma.mma_async" in kernel.ptx
    # The edited PTX is still valid: Triton's ptxas assembles it for sm_90a without spills.
    ptx_file = tmp_path / "kernel.ptx"
    ptx_file.write_text(kernel.ptx)
    report = subprocess.run(
        [get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(ptx_file), "-o", str(tmp_path / "k.cubin")],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert "0 bytes spill stores" in report.stderr, report.stderr


def test_hidden_parameters_are_dropped_only_when_unread():
    ptx = (
        ".version 8.7\n.target sm_90a\n.address_size 64\n"
        ".visible .entry f(\n\t.param .u64 .ptr .global .align 1 f_param_0,\n\t.param .u32 f_param_1,\n"
        "\t.param .u64 .ptr .global .align 1 f_param_2,\n\t.param .u64 .ptr .global .align 1 f_param_3\n)\n"
        ".reqntid 128\n{\n\tld.param.b64 %rd1, [f_param_0];\n\tld.param.b32 %r1, [f_param_1];\n"
        "\tld.param.b64 %rd2, [f_param_2];\n\tret;\n}\n"
    )
    name, params = ptx_entry(_drop_trailing_params(ptx, 3))
    assert name == "f" and [p.split()[-1] for p in params] == ["f_param_0", "f_param_1", "f_param_2"]
    with pytest.raises(PluginBuildError, match="reads its hidden parameter f_param_2"):
        _drop_trailing_params(ptx, 2)
    with pytest.raises(PluginBuildError, match="fewer than the 5"):
        _drop_trailing_params(ptx, 5)
    with pytest.raises(PluginBuildError, match="one .entry"):
        ptx_entry(ptx + ptx)


def test_kernel_spec_checks_and_constants():
    spec = block_sparse_kernel_spec("bf16", 72, 72, 128, 64, 0.125, key_length=4096)
    assert spec.qk_scale == pytest.approx(0.125 / math.log(2))
    assert spec.even_lk and spec.block_d == 128 and spec.constexprs()["EVEN_D"] is False
    assert not block_sparse_kernel_spec("fp16", 64, 64, 128, 64, 0.1, key_length=4100).even_lk
    assert not block_sparse_kernel_spec("fp16", 64, 64, 128, 64, 0.1, key_length=None).even_lk
    with pytest.raises(PluginBuildError, match="multiples of 16"):
        block_sparse_kernel_spec("fp16", 64, 64, 120, 64, 0.1)
    with pytest.raises(PluginBuildError, match="head dims"):
        block_sparse_kernel_spec("fp16", 512, 64, 128, 64, 0.1)
    with pytest.raises(PluginBuildError, match="fp16, bf16 or fp32"):
        block_sparse_kernel_spec("fp8", 64, 64, 128, 64, 0.1)


# ---------------------------------------------------------------- the aot_impl with a stand-in tensorrt.plugin


def _dtype(name):
    return types.SimpleNamespace(name=name)


def _desc(plugin, shape, dtype):
    dims = [d if isinstance(d, FakeDim) else FakeDim(d) for d in shape]
    return plugin.TensorDesc(dims, _dtype(dtype))


def _descs(plugin, *, b=None, h=4, lq=1000, lk=1024, d=64, dv=64, w=16, dtype="HALF", int_type="INT32"):
    batch = FakeDim(b, "B") if b is None else FakeDim(b)
    nq = math.ceil(lq / 128)
    return (
        _desc(plugin, (batch, h, lq, d), dtype),
        _desc(plugin, (batch, h, lk, d), dtype),
        _desc(plugin, (batch, h, lk, dv), dtype),
        _desc(plugin, (batch, h, nq), int_type),
        _desc(plugin, (batch, h, nq, w), int_type),
    )


def test_aot_impl_launch_parameters_follow_the_shapes():
    plugin = fake_tensorrt_plugin()
    compiled = []

    def fake_compile(spec, target):
        compiled.append((spec, target))
        return AotKernel(name="_bsa_fwd_trt", ptx="// ptx", shared=49152, num_warps=spec.num_warps)

    q, k, v, counts, indices = _descs(plugin)  # dynamic batch "B"
    out = _desc(plugin, tuple(q.shape_expr[:3]) + (v.shape_expr[3],), "HALF")
    name, ptx, launch, extras = block_sparse_attention_launch(
        plugin, q, k, v, counts, indices, 128, 64, 0.125, (out,), target=SM90, compile_kernel=fake_compile
    )
    assert (name, ptx) == (b"_bsa_fwd_trt", b"// ptx")
    ((spec, target),) = compiled
    assert target == SM90 and spec.dtype == "fp16" and spec.head_dim == spec.head_dim_v == 64
    assert spec.even_lk and spec.qk_scale == pytest.approx(0.125 * math.log2(math.e))
    # grid = (query tiles, batch * heads), still symbolic in the batch; block = warps * 32 threads.
    assert launch.grid_x.text == f"cdiv(1000,{spec.block_m})"
    assert launch.grid_x.value == math.ceil(1000 / spec.block_m)
    assert launch.grid_y.text == "(B*4)" and not launch.grid_y.is_constant
    assert launch.block_x == spec.num_warps * 32 and launch.shared_mem == 49152
    # The int32 extras in the kernel's order: H, Lq, Lk, W.
    assert isinstance(extras, plugin.SymIntExprs) and len(extras) == len(KERNEL_EXTRAS) == 4
    assert [e.expr.value for e in extras] == [4, 1000, 1024, 16]

    # A key length that is not a block multiple turns on masked key loads; bf16 maps to Triton's bf16.
    q, k, v, counts, indices = _descs(plugin, b=2, lk=1000, dtype="BF16")
    block_sparse_attention_launch(
        plugin, q, k, v, counts, indices, 128, 64, 0.1, (q,), target=SM90, compile_kernel=fake_compile
    )
    assert compiled[-1][0].dtype == "bf16" and not compiled[-1][0].even_lk


@pytest.mark.parametrize(
    "change,message",
    [
        ({"d": FakeDim(None, "D")}, "head dim must be a build-time constant"),
        ({"dtype": "INT8"}, "must share fp16, bf16 or fp32"),
        ({"int_type": "INT64"}, "kv_block_counts must be int32"),
    ],
)
def test_aot_impl_refuses_what_the_kernel_cannot_run(change, message):
    plugin = fake_tensorrt_plugin()
    q, k, v, counts, indices = _descs(plugin, **change)

    def never(spec, target):
        raise AssertionError("compiled despite bad inputs")

    with pytest.raises(PluginBuildError, match=message):
        block_sparse_attention_launch(
            plugin, q, k, v, counts, indices, 128, 64, 0.1, (q,), target=SM90, compile_kernel=never
        )


def test_aot_impl_registers_and_compiles_real_ptx(monkeypatch):
    """Registered through the stand-in's aot_impl checks, then called as TensorRT calls it (with the
    real Triton compile for sm_90): the launch parameters agree with the compiled kernel."""
    _needs_triton()
    from accelkit.kernels.block_sparse_attention import tensorrt_plugin as tensorrt_plugins

    plugin = fake_tensorrt_plugin()
    plugin.register("accelkit::block_sparse_attention")(_registered_desc(plugin))
    impl = register_block_sparse_aot_impl(plugin, "accelkit::block_sparse_attention")
    assert plugin.aot_impls["accelkit::block_sparse_attention"] is impl
    q, k, v, counts, indices = _descs(plugin, b=2, d=128, dv=128)
    monkeypatch.setattr(tensorrt_plugins, "build_target", lambda: SM90)  # no GPU here: as on an H100
    name, ptx, launch, extras = impl(q, k, v, counts, indices, 128, 64, 0.08, (q,), 0)
    kernel = tensorrt_plugins.compile_block_sparse_kernel(
        block_sparse_kernel_spec("fp16", 128, 128, 128, 64, 0.08, key_length=1024), SM90
    )
    assert name == kernel.name.encode() and ptx == kernel.ptx.encode()
    assert ptx_entry(ptx.decode())[0] == name.decode()
    assert launch.block_x == kernel.num_warps * 32 and launch.shared_mem == kernel.shared > 0
    assert launch.grid_y.value == 2 * 4 and [e.expr.value for e in extras] == [4, 1000, 1024, 16]


def _registered_desc(plugin):
    def desc(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k, scale):
        return q

    tensor = plugin.TensorDesc
    desc.__annotations__ = {
        **{n: tensor for n in ("q", "k", "v", "kv_block_counts", "kv_block_indices")},
        "block_q": int,
        "block_k": int,
        "scale": float,
        "return": tensor,
    }
    return desc


# ---------------------------------------------------------------- real TensorRT


@pytest.mark.trt
def test_real_engine_runs_the_plugin_and_matches_the_reference(tmp_path):
    """Build an fp16 engine for one block-sparse attention call (the plugin, compiled for this GPU),
    run it and compare with the reference on a random mask."""
    import torch
    from onnx import TensorProto, helper

    from accelkit.export.tensorrt import build_engines, read_engine_manifest, require_tensorrt
    from accelkit.kernels.block_sparse_attention.reference import (
        block_sparse_attention_reference,
        indices_from_dense_mask,
        num_blocks,
    )
    from tests.unit.export.test_tensorrt import _write_onnx_dir

    lowerings = pytest.importorskip("accelkit.kernels.block_sparse_attention.onnx_lowering")
    trt = require_tensorrt()
    b, h, lq, lk, d, bq, bk, scale = 2, 2, 384, 320, 64, 128, 64, 0.125
    nq, nk = num_blocks(lq, bq), num_blocks(lk, bk)
    domain, fname = lowerings.BLOCK_SPARSE_ATTENTION_FUNCTION
    call = helper.make_node(
        fname, ["q", "k", "v", "counts", "indices"], ["y"], domain=domain, block_q=bq, block_k=bk, scale=scale
    )
    inputs = [
        helper.make_tensor_value_info("q", TensorProto.FLOAT16, [b, h, lq, d]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT16, [b, h, lk, d]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT16, [b, h, lk, d]),
        helper.make_tensor_value_info("counts", TensorProto.INT32, [b, h, nq]),
        helper.make_tensor_value_info("indices", TensorProto.INT32, [b, h, nq, nk]),
    ]
    graph = helper.make_graph(
        [call], "bsa", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [b, h, lq, d])]
    )
    function = lowerings.BlockSparseAttention.to_function_proto()
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)],
        functions=[function],
    )
    _write_onnx_dir(tmp_path / "onnx", {"full": model}, {"input_specs": [{"shape": [b, h, lq, d]}]})
    manifest = build_engines(tmp_path / "onnx", tmp_path / "engines")
    assert manifest["models"][0]["plugins"] == {"accelkit::block_sparse_attention": 1}
    assert read_engine_manifest(tmp_path / "engines")["files"]

    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, lq, d, generator=g).half().cuda()
    k = torch.randn(b, h, lk, d, generator=g).half().cuda()
    v = torch.randn(b, h, lk, d, generator=g).half().cuda()
    mask = torch.rand(b, h, nq, nk, generator=g) < 0.4
    mask[0, 0, 0] = False
    counts, indices = (t.cuda() for t in indices_from_dense_mask(mask))
    out = torch.empty(b, h, lq, d, dtype=torch.float16, device="cuda")

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
        (tmp_path / "engines" / "full.engine").read_bytes()
    )
    context = engine.create_execution_context()
    for name, tensor in {"q": q, "k": k, "v": v, "counts": counts, "indices": indices, "y": out}.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    ref = block_sparse_attention_reference(q, k, v, counts, indices, block_q=bq, block_k=bk, scale=scale)
    error = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert error < 5e-3, error
    assert torch.all(out[0, 0, :bq] == 0)
