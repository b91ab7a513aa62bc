"""Block-sparse attention: reference, mask helpers, mask prediction, custom op (CPU); Triton kernel (GPU)."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from accelkit.kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
    dense_mask_from_indices,
    indices_from_dense_mask,
    predict_block_mask,
)
from accelkit.kernels.block_sparse_attention.reference import (
    _block_mean,
    _block_self_similarity,
    num_blocks,
    top_p_block_mask,
)

_ROOT = Path(__file__).resolve().parents[3]


def _all_ones(b, h, lq, lk, bq, bk, device="cpu"):
    mask = torch.ones(b, h, num_blocks(lq, bq), num_blocks(lk, bk), dtype=torch.bool, device=device)
    return indices_from_dense_mask(mask)


def _random_mask(b, h, nq, nk, keep, *, device="cpu", generator=None):
    return torch.rand(b, h, nq, nk, device=device, generator=generator) < keep


def _masked_attention_fp64(q, k, v, mask, bq, bk, scale):
    """Independent oracle: token-level mask built by loops over blocks, float64."""
    lq, lk = q.shape[2], k.shape[2]
    tok = torch.zeros(*q.shape[:2], lq, lk, dtype=torch.bool)
    for i in range(mask.shape[2]):
        for j in range(mask.shape[3]):
            tok[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk] = mask[:, :, i : i + 1, j : j + 1]
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~tok, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return p @ v.double()


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize(
    "lq,lk,d,bq,bk",
    [(256, 256, 64, 128, 64), (200, 200, 32, 128, 64), (100, 300, 16, 32, 16), (77, 45, 24, 16, 32)],
)
def test_reference_all_ones_equals_sdpa(lq, lk, d, bq, bk):
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, lq, d), torch.randn(2, 3, lk, d)
    v = torch.randn(2, 3, lk, d + 8)  # Dv may differ from D
    counts, indices = _all_ones(2, 3, lq, lk, bq, bk)
    out = block_sparse_attention_reference(q, k, v, counts, indices, block_q=bq, block_k=bk)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == (2, 3, lq, d + 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_reference_sparse_matches_fp64_oracle_partial_blocks_and_empty_rows():
    torch.manual_seed(1)
    b, h, lq, lk, d, bq, bk = 2, 2, 70, 53, 16, 16, 8
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
    nq, nk = num_blocks(lq, bq), num_blocks(lk, bk)
    mask = _random_mask(b, h, nq, nk, 0.4)
    mask[0, 0, 1] = False  # an empty query block -> zeros
    mask[1, 1, -1, -1] = True  # the partial last key block kept for the partial last query block
    counts, indices = indices_from_dense_mask(mask)
    out = block_sparse_attention_reference(q, k, v, counts, indices, block_q=bq, block_k=bk, scale=0.3)
    oracle = _masked_attention_fp64(q, k, v, mask, bq, bk, 0.3)
    torch.testing.assert_close(out.double(), oracle, atol=1e-5, rtol=1e-5)
    assert torch.all(out[0, 0, bq : 2 * bq] == 0)
    assert torch.isfinite(out).all()


def test_reference_ignores_padding_and_order_of_indices():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 1, 64, 8), torch.randn(1, 1, 128, 8), torch.randn(1, 1, 128, 8)
    counts = torch.tensor([[[2, 1]]], dtype=torch.int32)
    a = torch.tensor([[[[3, 0, 1, 1], [2, 3, 3, 3]]]], dtype=torch.int32)
    b = torch.tensor([[[[0, 3, 2, 2], [2, 0, 0, 0]]]], dtype=torch.int32)  # same sets, other order/padding
    out_a = block_sparse_attention_reference(q, k, v, counts, a, block_q=32, block_k=32)
    out_b = block_sparse_attention_reference(q, k, v, counts, b, block_q=32, block_k=32)
    torch.testing.assert_close(out_a, out_b)


def test_reference_rejects_bad_shapes():
    q = torch.randn(1, 1, 64, 8)
    counts, indices = _all_ones(1, 1, 64, 64, 32, 32)
    with pytest.raises(ValueError):
        block_sparse_attention_reference(q, q, q, counts[:, :, :1], indices, block_q=32, block_k=32)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_reference_matches_flex_attention_eager_mask_mod():
    """FlexAttention (the GPU oracle METHODS.md names) agrees; eager flex applies mask_mod only."""
    flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(11)
    b, h, length, d, bq, bk = 1, 2, 256, 16, 64, 32
    q, k, v = (torch.randn(b, h, length, d) for _ in range(3))
    mask = _random_mask(b, h, length // bq, length // bk, 0.4)
    mask[..., 0] = True  # flex defines empty rows differently (NaN/0); keep every row non-empty
    counts, indices = indices_from_dense_mask(mask)

    def mask_mod(bi, hi, qi, ki):
        return mask[bi, hi, qi // bq, ki // bk]

    bm = flex_mod.BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod)
    out = flex_mod.flex_attention(q, k, v, block_mask=bm)
    ref = block_sparse_attention_reference(q, k, v, counts, indices, block_q=bq, block_k=bk)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- mask helpers


def test_index_dense_mask_round_trip():
    torch.manual_seed(3)
    mask = _random_mask(2, 3, 5, 7, 0.5)
    mask[0, 0, 0] = False
    mask[0, 0, 1] = True
    counts, indices = indices_from_dense_mask(mask)
    assert counts.dtype == torch.int32 and indices.dtype == torch.int32
    assert indices.shape == (2, 3, 5, 7)
    torch.testing.assert_close(counts, mask.sum(-1).int())
    assert torch.equal(dense_mask_from_indices(counts, indices, 7), mask)
    # kept indices come first, ascending
    row = indices[1, 2, 3, : counts[1, 2, 3]].tolist()
    assert row == sorted(row) and all(mask[1, 2, 3, j] for j in row)


def test_dense_mask_from_narrow_padded_indices():
    counts = torch.tensor([[[1, 0, 2]]], dtype=torch.int32)
    indices = torch.tensor([[[[4, 4], [0, 0], [1, 3]]]], dtype=torch.int32)  # W = 2 < NK, junk padding
    mask = dense_mask_from_indices(counts, indices, 5)
    expected = torch.tensor([[[[0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 1, 0, 1, 0]]]], dtype=torch.bool)
    assert torch.equal(mask, expected)


# ---------------------------------------------------------------- mask prediction


@pytest.mark.parametrize(
    "tau,min_blocks,expected",
    [(0.7, 1, {0, 2}), (0.8, 1, {0, 2, 3}), (0.76, 1, {0, 2, 3}), (0.74, 1, {0, 2}), (0.0, 1, {0}),
     (0.0, 0, set()), (0.3, 3, {0, 2, 3}), (1.0, 1, {0, 1, 2, 3})],
)  # fmt: skip
def test_top_p_hand_computed(tau, min_blocks, expected):
    # sorted: 0.45 (0), 0.30 (2), 0.15 (3), 0.10 (1); mass before each: 0, 0.45, 0.75, 0.90
    probs = torch.tensor([0.45, 0.10, 0.30, 0.15])
    keep = top_p_block_mask(probs, tau, min_blocks)
    assert set(torch.nonzero(keep).flatten().tolist()) == expected


def _controlled_qk(probs: list[float], bq: int = 2, bk: int = 2):
    """q: one block of identical tokens [1, 0]; k block j: identical tokens [log p_j, 0] -> pooled P = p."""
    q = torch.tensor([1.0, 0.0]).expand(1, 1, bq, 2).clone()
    k = torch.stack([torch.tensor([math.log(p), 0.0]) for p in probs]).repeat_interleave(bk, 0)[None, None]
    return q, k


@pytest.mark.parametrize("tau,expected", [(0.7, [0, 2]), (0.8, [0, 2, 3]), (0.95, [0, 1, 2, 3]), (0.2, [0])])
def test_predict_block_mask_top_p_constructed(tau, expected):
    q, k = _controlled_qk([0.45, 0.10, 0.30, 0.15])
    counts, indices = predict_block_mask(q, k, block_q=2, block_k=2, tau=tau, scale=1.0)
    assert counts.shape == (1, 1, 1) and indices.shape == (1, 1, 1, 4)
    assert counts.item() == len(expected)
    assert sorted(indices[0, 0, 0, : counts.item()].tolist()) == expected


@pytest.mark.parametrize("tau,min_blocks", [(0.0, 1), (0.3, 1), (0.6, 2), (0.9, 1), (0.99, 4), (1.0, 1)])
def test_predict_fast_path_equals_dense_top_p_path(tau, min_blocks):
    # similarity_threshold=-1 marks no block dense but takes the dense-mask code path: same mask.
    torch.manual_seed(12)
    q, k = torch.randn(2, 3, 200, 16) * 3, torch.randn(2, 3, 333, 16) * 3
    kw = dict(block_q=32, block_k=16, tau=tau, min_blocks=min_blocks)
    c_fast, i_fast = predict_block_mask(q, k, **kw)
    c_slow, i_slow = predict_block_mask(q, k, similarity_threshold=-1.0, **kw)
    nk = num_blocks(333, 16)
    assert torch.equal(c_fast, c_slow)
    assert torch.equal(
        dense_mask_from_indices(c_fast, i_fast, nk), dense_mask_from_indices(c_slow, i_slow, nk)
    )


def test_predict_block_mask_min_blocks():
    torch.manual_seed(4)
    q, k = torch.randn(2, 2, 96, 16), torch.randn(2, 2, 150, 16)
    counts, _ = predict_block_mask(q, k, block_q=32, block_k=16, tau=0.0, min_blocks=3)
    assert counts.shape == (2, 2, 3)
    assert torch.all(counts == 3)
    counts, _ = predict_block_mask(q, k, block_q=32, block_k=16, tau=0.0, min_blocks=100)
    assert torch.all(counts == num_blocks(150, 16))  # clamped to NK
    c_lo, _ = predict_block_mask(q, k, block_q=32, block_k=16, tau=0.3)
    c_hi, _ = predict_block_mask(q, k, block_q=32, block_k=16, tau=0.9)
    assert torch.all(c_lo <= c_hi) and torch.all(c_lo >= 1)


def test_partial_block_pooling_uses_real_token_count():
    x = torch.arange(5 * 2, dtype=torch.float32).view(1, 1, 5, 2)
    pooled = _block_mean(x, 2)
    torch.testing.assert_close(pooled[0, 0, 2], x[0, 0, 4])  # last block holds one token
    torch.testing.assert_close(pooled[0, 0, 0], x[0, 0, :2].mean(0))
    sim = _block_self_similarity(x, 2)
    assert sim.shape == (1, 1, 3)
    torch.testing.assert_close(sim[0, 0, 2], torch.tensor(1.0))  # a single token is self-similar


def test_self_similarity_rule():
    torch.manual_seed(5)
    bq = bk = 8
    d = 16
    smooth = torch.randn(4, d)  # 4 blocks of identical tokens: similarity 1
    q = smooth.repeat_interleave(bq, 0)[None, None].clone()
    k = smooth.repeat_interleave(bk, 0)[None, None].clone()
    q[0, 0, bq : 2 * bq] = torch.randn(bq, d)  # query block 1 is not self-similar
    k[0, 0, 3 * bk :] = torch.randn(bk, d)  # key block 3 is not self-similar
    sim_q = _block_self_similarity(q, bq)[0, 0]
    assert sim_q[1] < 0.5 and torch.all(sim_q[[0, 2, 3]] > 0.99)
    base_counts, _ = predict_block_mask(q, k, block_q=bq, block_k=bk, tau=0.0, min_blocks=1)
    assert torch.all(base_counts == 1)
    counts, indices = predict_block_mask(
        q, k, block_q=bq, block_k=bk, tau=0.0, min_blocks=1, similarity_threshold=0.5
    )
    mask = dense_mask_from_indices(counts, indices, 4)[0, 0]
    assert mask[1].all()  # dense query block
    assert mask[:, 3].all()  # dense key block kept for every query block
    for row in (0, 2, 3):  # others: the dense key block plus one top-ranked similar block
        assert mask[row].sum() == 2


# ---------------------------------------------------------------- custom op


def test_op_cpu_runs_reference_and_logs_backend(caplog):
    torch.manual_seed(6)
    q, k, v = torch.randn(1, 2, 100, 16), torch.randn(1, 2, 90, 16), torch.randn(1, 2, 90, 16)
    nq, nk = num_blocks(100, 32), num_blocks(90, 16)
    counts, indices = indices_from_dense_mask(_random_mask(1, 2, nq, nk, 0.5))
    from accelkit.kernels.block_sparse_attention import op as op_mod

    op_mod._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger=op_mod.__name__):
        out = block_sparse_attention(q, k, v, counts, indices, block_q=32, block_k=16)
        block_sparse_attention(q, k, v, counts, indices, block_q=32, block_k=16)
    ref = block_sparse_attention_reference(q, k, v, counts, indices, block_q=32, block_k=16)
    torch.testing.assert_close(out, ref)
    msgs = [r.getMessage() for r in caplog.records if "block_sparse_attention" in r.getMessage()]
    assert len(msgs) == 1 and "reference" in msgs[0]
    direct = torch.ops.accelkit.block_sparse_attention(q, k, v, counts, indices, 32, 16, 0.25)
    torch.testing.assert_close(direct, block_sparse_attention_reference(
        q, k, v, counts, indices, block_q=32, block_k=16, scale=0.25))  # fmt: skip


def test_op_forced_triton_on_cpu_raises():
    q = torch.randn(1, 1, 32, 16)
    counts, indices = _all_ones(1, 1, 32, 32, 32, 16)
    with pytest.raises(RuntimeError, match="triton"):
        block_sparse_attention(q, q, q, counts, indices, block_q=32, block_k=16, backend="triton")
    with pytest.raises(ValueError):
        block_sparse_attention(q, q, q, counts, indices, block_q=32, block_k=16, backend="cuda")


def test_op_opcheck():
    torch.manual_seed(7)
    q, k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 48, 16), torch.randn(1, 2, 48, 8)
    counts, indices = indices_from_dense_mask(_random_mask(1, 2, 2, 3, 0.6))
    torch.library.opcheck(
        torch.ops.accelkit.block_sparse_attention.default,
        (q, k, v, counts, indices, 32, 16, 0.25),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


def test_op_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.randn(2, 3, 300, 72), torch.randn(2, 3, 500, 72), torch.randn(2, 3, 500, 40)
        counts = torch.zeros(2, 3, 3, dtype=torch.int32)
        indices = torch.zeros(2, 3, 3, 8, dtype=torch.int32)
        out = torch.ops.accelkit.block_sparse_attention(q, k, v, counts, indices, 128, 64, 0.1)
        assert out.shape == (2, 3, 300, 40) and out.dtype == q.dtype


def test_op_torch_export():
    class M(torch.nn.Module):
        def forward(self, q, k, v, counts, indices):
            return block_sparse_attention(q, k, v, counts, indices, block_q=32, block_k=16) * 2

    torch.manual_seed(8)
    q, k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 48, 16), torch.randn(1, 2, 48, 16)
    counts, indices = indices_from_dense_mask(_random_mask(1, 2, 2, 3, 0.6))
    ep = torch.export.export(M(), (q, k, v, counts, indices))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.accelkit.block_sparse_attention.default in targets
    out_node = next(
        n for n in ep.graph.nodes if n.target == torch.ops.accelkit.block_sparse_attention.default
    )
    assert tuple(out_node.meta["val"].shape) == (1, 2, 64, 16)
    torch.testing.assert_close(ep.module()(q, k, v, counts, indices), M()(q, k, v, counts, indices))


def test_module_import_does_not_import_triton():
    import subprocess

    code = (
        "import sys; import accelkit.kernels.block_sparse_attention as m; "
        "import accelkit.kernels.block_sparse_attention.triton; "
        "assert 'triton.language' not in sys.modules, 'triton imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_ROOT)


def test_bench_cpu_smoke():
    sys.path.insert(0, str(_ROOT / "benchmarks"))
    try:
        import bench_attention
    finally:
        sys.path.pop(0)
    t0 = time.perf_counter()
    report = bench_attention.main(["--cpu-smoke"])
    assert time.perf_counter() - t0 < 10
    methods = {r["method"] for r in report["results"]}
    assert {"sdpa_math", "reference_given_mask", "predict_block_mask", "reference+predict"} <= methods
    assert not any(r["error"] for r in report["results"])


# ---------------------------------------------------------------- Triton, no GPU needed


@pytest.mark.parametrize(
    "dtype,block_d,even,block_n",
    [
        ("bf16", 128, True, None),
        ("bf16", 128, False, None),
        ("fp16", 64, True, None),
        ("bf16", 128, True, 128),
    ],
)
def test_triton_kernel_compiles_for_sm90_with_wgmma(dtype, block_d, even, block_n, tmp_path):
    """Compile (no launch) for Hopper as the JIT would specialize contiguous inputs: wgmma, async
    copies (software pipelining of the KV loop) and no register spills. Needs triton, not a GPU."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from accelkit.kernels.block_sparse_attention._triton_kernel import _bsa_fwd
    from accelkit.kernels.block_sparse_attention.triton import default_config

    cfg = default_config(128, 64, block_d)
    if block_n is not None:
        cfg = dataclasses.replace(cfg, block_n=block_n)
    ones = {"s_qd", "s_kd", "s_vd", "s_od", "s_cq", "s_ij"}  # unit strides: the JIT makes them constexpr
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(_bsa_fwd.arg_names):
        if name in ("Q", "K", "V", "O"):
            sig[name], attrs[(i,)] = "*" + dtype, [["tt.divisibility", 16]]
        elif name in ("Counts", "Indices"):
            sig[name], attrs[(i,)] = "*i32", [["tt.divisibility", 16]]
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif name in ones:
            sig[name], const[name] = "constexpr", 1
        elif name.isupper() and name not in ("H", "Lq", "Lk", "D", "DV"):
            continue
        else:
            sig[name] = "i32"
            if name != "H":
                attrs[(i,)] = [["tt.divisibility", 16]]
    const.update(
        MASK_BQ=128, MASK_BK=64, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_d,
        EVEN_LK=even, EVEN_D=even,
    )  # fmt: skip
    for name in const:
        sig[name] = "constexpr"
    compiled = triton.compile(
        ASTSource(fn=_bsa_fwd, signature=sig, constexprs=const, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    assert "cp.async" in ptx  # K/V loads are pipelined
    assert ".local" not in ptx  # no local-memory arrays
    # Register spills show only after ptxas: ask the ptxas triton ships with for its resource report.
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    ptx_file = tmp_path / "kernel.ptx"
    ptx_file.write_text(ptx)
    report = subprocess.run(
        [get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(ptx_file), "-o", str(tmp_path / "k.cubin")],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    assert "0 bytes spill stores" in report, report


_INTERPRETER_CHECK = """
import torch
import triton.runtime.interpreter as interp

# triton 3.6's interpreter calls int() on 1-element arrays (a loop bound loaded from memory), which
# recent numpy rejects; give tensors an __index__ that takes the single element.
_orig = interp._patch_lang_tensor


def _patched(tensor, scope):
    _orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interp._patch_lang_tensor = _patched

from accelkit.kernels.block_sparse_attention.reference import (
    block_sparse_attention_reference, indices_from_dense_mask, num_blocks)
from accelkit.kernels.block_sparse_attention.triton import KernelConfig, block_sparse_attention_triton

worst = 0.0
cases = [  # B, H, Lq, Lk, D, Dv, block_q, block_k, config, dtype
    (2, 2, 300, 200, 72, 72, 128, 64, KernelConfig(64, 32, 4, 2), torch.float16),
    (1, 2, 256, 256, 64, 32, 128, 64, None, torch.float32),
    (1, 1, 130, 70, 32, 32, 64, 32, KernelConfig(32, 16, 4, 1), torch.float16),
    (1, 2, 257, 450, 64, 64, 128, 64, KernelConfig(128, 128, 8, 3), torch.float16),  # 2 blocks per tile
]
for b, h, lq, lk, d, dv, bq, bk, cfg, dt in cases:
    g = torch.Generator().manual_seed(lq)
    q, k = torch.randn(b, h, lq, d, generator=g).to(dt), torch.randn(b, h, lk, d, generator=g).to(dt)
    v = torch.randn(b, h, lk, dv, generator=g).to(dt)
    nq, nk = num_blocks(lq, bq), num_blocks(lk, bk)
    mask = torch.rand(b, h, nq, nk, generator=g) < 0.5
    mask[..., -1, -1] = True
    mask[0, 0, 0] = False
    counts, indices = indices_from_dense_mask(mask)
    valid = torch.arange(nk) < counts[..., None]  # shuffle the kept entries: order must not matter
    key = torch.where(valid, torch.rand(indices.shape, generator=g), 2.0)
    indices = torch.gather(indices, -1, torch.argsort(key, dim=-1)).contiguous()
    ref = block_sparse_attention_reference(q, k, v, counts, indices, block_q=bq, block_k=bk).float()
    out = torch.full((b, h, lq, dv), float("nan"), dtype=dt)
    block_sparse_attention_triton(q, k, v, counts, indices, block_q=bq, block_k=bk, config=cfg, out=out)
    assert not torch.isnan(out).any(), "unwritten output"
    assert torch.all(out[0, 0, :bq] == 0)
    worst = max(worst, ((out.float() - ref).norm() / ref.norm()).item())
assert worst < 2e-3, worst
print("worst", worst)
"""


def test_triton_kernel_in_interpreter_matches_reference():
    """Run the kernel itself on CPU through TRITON_INTERPRET=1 (fp16/fp32: the interpreter's bf16 dot is
    wrong). Needs triton, not a GPU; a subprocess so the interpreter mode cannot leak into GPU tests."""
    pytest.importorskip("triton")
    import os
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_CHECK], env=env, cwd=_ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]


# ---------------------------------------------------------------- Triton (GPU)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


GPU_SHAPES = [
    # B, H, Lq, Lk, D, Dv, block_q, block_k
    (1, 2, 1024, 1024, 128, 128, 128, 64),
    (2, 3, 1000, 1500, 64, 64, 128, 64),
    (1, 2, 777, 555, 72, 72, 128, 64),
    (1, 1, 300, 4100, 128, 128, 128, 64),
    (1, 2, 512, 520, 64, 64, 64, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_triton_matches_reference_bf16(shape, keep):
    from accelkit.kernels.block_sparse_attention.triton import block_sparse_attention_triton

    b, h, lq, lk, d, dv, bq, bk = shape
    g = torch.Generator(device="cuda").manual_seed(hash((shape, keep)) % 2**31)
    q = torch.randn(b, h, lq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, h, lk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, h, lk, dv, device="cuda", dtype=torch.bfloat16, generator=g)
    nq, nk = num_blocks(lq, bq), num_blocks(lk, bk)
    mask = _random_mask(b, h, nq, nk, keep, device="cuda", generator=g)
    mask[..., -1] |= mask[..., 0]  # exercise the partial last key block often
    mask[0, 0, 0] = False  # one empty query block -> zeros
    counts, indices = indices_from_dense_mask(mask)
    # shuffle the kept entries (the first `count` slots): the kernel must not depend on their order
    valid = torch.arange(nk, device="cuda") < counts[..., None].long()
    key = torch.where(valid, torch.rand(indices.shape, device="cuda", generator=g), 2.0)
    indices = torch.gather(indices, -1, torch.argsort(key, dim=-1)).contiguous()
    assert torch.equal(dense_mask_from_indices(counts, indices, nk), mask)
    ref = block_sparse_attention_reference(q, k, v, counts, indices, block_q=bq, block_k=bk).float()
    out = torch.full((b, h, lq, dv), float("nan"), device="cuda", dtype=torch.bfloat16)
    block_sparse_attention_triton(q, k, v, counts, indices, block_q=bq, block_k=bk, out=out)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "unwritten (poisoned) output elements"
    assert _rel(out, ref) < 1e-2
    assert torch.all(out[0, 0, :bq] == 0)


@pytest.mark.gpu
def test_triton_all_ones_matches_sdpa_fp16_noncontiguous():
    from accelkit.kernels.block_sparse_attention.triton import block_sparse_attention_triton

    torch.manual_seed(9)
    # (B, L, H, D) storage transposed to (B, H, L, D): strided inputs, as in diffusers attention
    q, k, v = (
        torch.randn(2, 700, 4, 64, device="cuda", dtype=torch.float16).transpose(1, 2) for _ in range(3)
    )
    counts, indices = _all_ones(2, 4, 700, 700, 128, 64, device="cuda")
    out = block_sparse_attention_triton(q, k, v, counts, indices)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert _rel(out, ref) < 5e-3


@pytest.mark.gpu
def test_op_cuda_dispatches_triton_and_predict_on_gpu():
    torch.manual_seed(10)
    q, k, v = (torch.randn(1, 4, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    counts, indices = predict_block_mask(q, k, tau=0.5, similarity_threshold=0.1)
    c_cpu, i_cpu = predict_block_mask(q.cpu(), k.cpu(), tau=0.5, similarity_threshold=0.1)
    agree = dense_mask_from_indices(counts.cpu(), indices.cpu(), 32) == dense_mask_from_indices(
        c_cpu, i_cpu, 32
    )
    assert agree.float().mean() > 0.99  # fp32 reductions may order differently on GPU
    out = block_sparse_attention(q, k, v, counts, indices, backend="triton")
    ref = block_sparse_attention_reference(q, k, v, counts, indices)
    assert _rel(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("block_m,block_n,num_warps", [(128, 128, 8), (64, 128, 4), (64, 64, 4)])
def test_triton_other_tiles_match_reference(block_m, block_n, num_warps):
    from accelkit.kernels.block_sparse_attention.triton import KernelConfig, block_sparse_attention_triton

    torch.manual_seed(13)
    b, h, lq, lk, d = 1, 3, 1000, 1300, 72
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for n in (lq, lk, lk))
    mask = _random_mask(b, h, num_blocks(lq, 128), num_blocks(lk, 64), 0.3, device="cuda")
    mask[..., -1, -1] = True
    counts, indices = indices_from_dense_mask(mask)
    out = torch.full((b, h, lq, d), float("nan"), device="cuda", dtype=torch.bfloat16)
    cfg = KernelConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=3)
    block_sparse_attention_triton(q, k, v, counts, indices, config=cfg, out=out)
    ref = block_sparse_attention_reference(q, k, v, counts, indices)
    assert not torch.isnan(out).any()
    assert _rel(out, ref) < 1e-2
