"""SVDQuant 4-bit linear: packing, reference, op (fake / export / dispatch), Triton (interpreter, sm_90)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest
import torch

from accelkit.kernels.svdq_linear import (
    dequantize_weight_int4,
    fake_quant_weight_int4,
    pack_int4,
    quantize_act_fp8,
    quantize_act_int4,
    quantize_weight_int4,
    svdq_linear,
    svdq_linear_reference,
    unpack_int4,
)

_ROOT = Path(__file__).resolve().parents[3]


def _layer(n=48, k=128, r=8, g=32, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    packed, scales = quantize_weight_int4(w, g)
    down = (torch.randn(r, k, generator=gen) * 0.1).to(dtype)
    up = (torch.randn(n, r, generator=gen) * 0.1).to(dtype)
    smooth = torch.rand(k, generator=gen) + 0.5
    bias = torch.randn(n, generator=gen).to(dtype)
    return w, packed, scales, down, up, smooth, bias


def test_pack_unpack_round_trip_and_layout():
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32)
    assert torch.equal(unpack_int4(packed), q)
    # element 2j in the low nibble, 2j + 1 in the high nibble, two's complement
    assert pack_int4(torch.tensor([[-1, 3]], dtype=torch.int8)).item() == 0x3F
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8, 0]]))


def test_weight_quantization_error_is_within_half_a_step():
    w = torch.randn(16, 128) * torch.linspace(0.1, 10, 128)
    packed, scales = quantize_weight_int4(w, 32)
    assert scales.dtype == torch.float16 and scales.shape == (16, 4)
    deq = dequantize_weight_int4(packed, scales, 32)
    step = scales.float().repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(unpack_int4(packed).float() * step, deq)


def test_fake_quant_equals_the_packed_round_trip():
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(24, 256, generator=gen) * torch.logspace(-3, 2, 256)).double()
    w[0, :64] = 0.0  # an all-zero group
    packed, scales = quantize_weight_int4(w, 64)
    assert torch.equal(fake_quant_weight_int4(w, 64), dequantize_weight_int4(packed, scales, 64, torch.float64))


def test_activation_quantizers():
    x = torch.randn(7, 64) * 3
    q8, s8 = quantize_act_fp8(x)
    assert q8.dtype == torch.float8_e4m3fn and s8.shape == (7, 1)
    assert ((q8.float() * s8 - x).norm() / x.norm()) < 0.05
    q4, s4 = quantize_act_int4(x, 16)
    assert q4.dtype == torch.int8 and s4.shape == (7, 4) and q4.min() >= -8 and q4.max() <= 7


@pytest.mark.parametrize("act_mode", ["w4a16", "w4a8", "w4a4"])
def test_reference_equals_naive_dequantize_then_matmul(act_mode):
    w, packed, scales, down, up, smooth, bias = _layer()
    x = torch.randn(2, 5, 128)
    out = svdq_linear_reference(x, packed, scales, down, up, smooth, bias, group_size=32, act_mode=act_mode)
    assert out.shape == (2, 5, 48)
    xs = (x / smooth).reshape(-1, 128)
    if act_mode == "w4a8":
        q, s = quantize_act_fp8(xs)
        xs = q.float() * s
    elif act_mode == "w4a4":
        q, s = quantize_act_int4(xs, 32)
        xs = q.float() * s.repeat_interleave(32, dim=1)
    naive = xs @ dequantize_weight_int4(packed, scales, 32).t() + x.reshape(-1, 128) @ down.t() @ up.t() + bias
    torch.testing.assert_close(out.reshape(-1, 48), naive, rtol=1e-5, atol=1e-4)
    # fp16 input: fp32 accumulation, fp16 output
    half = svdq_linear_reference(x.half(), packed, scales, down, up, smooth, None, group_size=32, act_mode=act_mode)
    assert half.dtype == torch.float16


def test_reference_without_low_rank_and_shape_checks():
    w, packed, scales, _, _, smooth, _ = _layer()
    x = torch.randn(3, 128)
    out = svdq_linear_reference(x, packed, scales, torch.zeros(0, 128), torch.zeros(48, 0), smooth, None,
                                group_size=32, act_mode="w4a16")  # fmt: skip
    torch.testing.assert_close(out, (x / smooth) @ dequantize_weight_int4(packed, scales, 32).t())
    with pytest.raises(ValueError):
        svdq_linear_reference(x, packed, scales, torch.zeros(0, 128), torch.zeros(48, 0), smooth, None,
                              group_size=32, act_mode="w2a2")  # fmt: skip
    with pytest.raises(ValueError):
        svdq_linear_reference(x[:, :64], packed, scales, torch.zeros(0, 64), torch.zeros(48, 0), smooth[:64],
                              None, group_size=32, act_mode="w4a16")  # fmt: skip


def test_op_cpu_runs_reference_and_logs_once(caplog):
    from accelkit.kernels.svdq_linear import op as op_mod

    _, packed, scales, down, up, smooth, bias = _layer()
    x = torch.randn(4, 128)
    op_mod._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger=op_mod.__name__):
        out = svdq_linear(x, packed, scales, down, up, smooth, bias, group_size=32, act_mode="w4a8")
        svdq_linear(x, packed, scales, down, up, smooth, bias, group_size=32, act_mode="w4a8")
    ref = svdq_linear_reference(x, packed, scales, down, up, smooth, bias, group_size=32, act_mode="w4a8")
    torch.testing.assert_close(out, ref)
    msgs = [r.getMessage() for r in caplog.records if "svdq_linear" in r.getMessage()]
    assert len(msgs) == 1 and "reference" in msgs[0]
    with pytest.raises(RuntimeError, match="triton"):
        svdq_linear(x, packed, scales, down, up, smooth, bias, group_size=32, backend="triton")
    with pytest.raises(ValueError):
        svdq_linear(x, packed, scales, down, up, smooth, bias, group_size=32, backend="cuda")


def test_op_opcheck_fake_and_export():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, packed, scales, down, up, smooth, bias = _layer()
    x = torch.randn(2, 3, 128)
    torch.library.opcheck(
        torch.ops.accelkit.svdq_linear.default,
        (x, packed, scales, down, up, smooth, bias, 32, "w4a16"),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
    with FakeTensorMode() as mode:
        fx_ = torch.empty(5, 7, 128, dtype=torch.bfloat16)
        fake = [mode.from_tensor(t) for t in (packed, scales, down, up, smooth)]
        out = torch.ops.accelkit.svdq_linear(fx_, *fake, None, 32, "w4a8")
        assert out.shape == (5, 7, 48) and out.dtype == torch.bfloat16

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in zip(("packed", "scales", "down", "up", "smooth", "bias"),
                               (packed, scales, down, up, smooth, bias), strict=True):
                self.register_buffer(name, t)

        def forward(self, x):
            return svdq_linear(x, self.packed, self.scales, self.down, self.up, self.smooth, self.bias,
                               group_size=32, act_mode="w4a16") * 2  # fmt: skip

    ep = torch.export.export(M(), (x,))
    node = next(n for n in ep.graph.nodes if n.target == torch.ops.accelkit.svdq_linear.default)
    assert tuple(node.meta["val"].shape) == (2, 3, 48)
    torch.testing.assert_close(ep.module()(x), M()(x))


def test_module_import_does_not_import_triton():
    import subprocess

    code = (
        "import sys; import accelkit.kernels.svdq_linear as m; import accelkit.kernels.svdq_linear.triton; "
        "assert 'triton.language' not in sys.modules, 'triton imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_ROOT)


def test_bench_cpu_smoke():
    sys.path.insert(0, str(_ROOT / "benchmarks"))
    try:
        import bench_svdq
    finally:
        sys.path.pop(0)
    t0 = time.perf_counter()
    report = bench_svdq.main(["--cpu-smoke"])
    assert time.perf_counter() - t0 < 10
    assert {r["method"] for r in report["results"]} == {"bf16_mm", "svdq_w4a16", "svdq_w4a8"}
    assert not any(r["error"] for r in report["results"])


# ---------------------------------------------------------------- Triton, no GPU needed

_INTERPRETER_CHECK = """
import torch
from accelkit.kernels.svdq_linear.reference import quantize_weight_int4, svdq_linear_reference
from accelkit.kernels.svdq_linear.triton import KernelConfig, svdq_linear_triton

worst = 0.0
for m, n, k, r, g, mode, dt, bias, cfg in [
    (37, 48, 128, 8, 32, "w4a16", torch.float32, True, KernelConfig(32, 32, 4, 1)),
    (64, 64, 128, 32, 64, "w4a16", torch.float16, False, KernelConfig(32, 32, 4, 1)),
    (20, 40, 64, 0, 16, "w4a8", torch.float32, True, KernelConfig(16, 32, 4, 1)),
    (33, 50, 128, 16, 32, "w4a4", torch.float16, True, KernelConfig(32, 32, 4, 1)),
    (33, 50, 128, 5, 32, "w4a8", torch.float16, True, KernelConfig(32, 16, 4, 1)),
]:
    gen = torch.Generator().manual_seed(m * n)
    x = torch.randn(m, k, generator=gen).to(dt)
    packed, scales = quantize_weight_int4(torch.randn(n, k, generator=gen), g)
    down = (torch.randn(r, k, generator=gen) * 0.1).to(dt)
    up = (torch.randn(n, r, generator=gen) * 0.1).to(dt)
    smooth = torch.rand(k, generator=gen) + 0.5
    b = torch.randn(n, generator=gen).to(dt) if bias else None
    ref = svdq_linear_reference(x, packed, scales, down, up, smooth, b, group_size=g, act_mode=mode).float()
    out = svdq_linear_triton(x, packed, scales, down, up, smooth, b, group_size=g, act_mode=mode,
                             config=cfg).float()
    worst = max(worst, ((out - ref).norm() / ref.norm()).item())
assert worst < 2e-3, worst
print("worst", worst)
"""


def test_triton_kernel_in_interpreter_matches_reference():
    """TRITON_INTERPRET=1 on CPU, fp16/fp32 operands (the interpreter has no FP8 and a wrong BF16 dot; the
    W4A8/W4A4 paths then hold their quantized values in FP16, exactly). A subprocess keeps the mode local."""
    pytest.importorskip("triton")
    import os
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env, cwd=_ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("adtype,mode,fp8", [("bf16", 0, False), ("fp8e4nv", 1, True), ("fp8e4nv", 2, True)])
def test_triton_kernel_compiles_for_sm90_with_wgmma(adtype, mode, fp8, tmp_path):
    """Compile (no launch) for Hopper with the default 128x64 tile: wgmma (BF16, or e4m3 for W4A8/W4A4)
    and no register spills in ptxas' report. Needs triton, not a GPU."""
    triton = pytest.importorskip("triton")
    import subprocess

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from accelkit.kernels.svdq_linear._triton_kernel import _svdq_gemm
    from accelkit.kernels.svdq_linear.triton import default_config

    cfg = default_config(4096, 3072)
    ptrs = {"A": adtype, "AS": "fp32", "W": "u8", "WS": "fp16", "XD": "bf16", "UP": "bf16", "BIAS": "bf16",
            "OUT": "bf16"}  # fmt: skip
    ones = {"s_ak", "s_wk", "s_xdr", "s_upr", "s_on", "s_wsg"}  # unit strides: the JIT makes them constexpr
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(_svdq_gemm.arg_names):
        if name in ptrs:
            sig[name], attrs[(i,)] = "*" + ptrs[name], [["tt.divisibility", 16]]
        elif name in ones:
            sig[name], const[name] = "constexpr", 1
        elif name.isupper() and name not in ("M", "N", "K", "R"):
            continue
        else:
            sig[name] = "i32"
            if name != "R":
                attrs[(i,)] = [["tt.divisibility", 16]]
    const.update(GROUP=64, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=32, HAS_LORA=True, HAS_BIAS=True,
                 ACT_SCALE=mode, FP8=fp8)  # fmt: skip
    for name in const:
        sig[name] = "constexpr"
    compiled = triton.compile(
        ASTSource(fn=_svdq_gemm, signature=sig, constexprs=const, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    assert (".e4m3.e4m3" in ptx) == fp8
    ptx_file = tmp_path / "kernel.ptx"
    ptx_file.write_text(ptx)
    report = subprocess.run(
        [get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(ptx_file), "-o", str(tmp_path / "k.cubin")],
        capture_output=True, text=True, check=True,
    ).stderr  # fmt: skip
    assert "0 bytes spill stores" in report, report


# ---------------------------------------------------------------- Triton (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("act_mode", ["w4a16", "w4a8", "w4a4"])
@pytest.mark.parametrize("m,k,n", [(4096, 3072, 3072), (777, 3072, 12288), (40, 12288, 3072)])
def test_triton_matches_reference_bf16(act_mode, m, k, n):
    from accelkit.kernels.svdq_linear.triton import svdq_linear_triton

    gen = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
    packed, scales = quantize_weight_int4(torch.randn(n, k, generator=gen) / k**0.5, 64)
    down = (torch.randn(32, k, generator=gen) / k**0.5).to("cuda", torch.bfloat16)
    up = (torch.randn(n, 32, generator=gen) / 32**0.5).to("cuda", torch.bfloat16)
    smooth = (torch.rand(k, generator=gen) + 0.5).cuda()
    bias = torch.randn(n, generator=gen).to("cuda", torch.bfloat16)
    args = (x, packed.cuda(), scales.cuda(), down, up, smooth, bias)
    out = svdq_linear_triton(*args, group_size=64, act_mode=act_mode).float()
    ref = svdq_linear_reference(*args, group_size=64, act_mode=act_mode).float()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
