"""The Triton kernel itself; imported only by :mod:`.triton` when a launch is needed (imports triton).

Kept at module level (not in a closure) so Triton's compiler resolves ``tl`` from the module globals.
See :mod:`.triton` for the algorithm.
"""

import triton
import triton.language as tl


@triton.jit
def _svdq_gemm(
    A, AS, W, WS, XD, UP, BIAS, OUT,
    M, N, K, R,
    s_am, s_ak, s_asm, s_asg, s_wn, s_wk, s_wsn, s_wsg,
    s_xdm, s_xdr, s_upn, s_upr, s_om, s_on,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_SCALE: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_M x BLOCK_N`` output tile; the K loop walks one weight group (``GROUP`` channels) per step.

    ``ACT_SCALE``: 0 = none (W4A16), 1 = per token (W4A8, applied once in the epilogue), 2 = per token and
    group (W4A4, applied per K step). ``FP8``: the weight's integer values enter the dot as e4m3 (exact
    for [-8, 7]) instead of the activation's own dtype.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, GROUP)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = A + offs_m[:, None] * s_am + offs_k[None, :] * s_ak
    # Each packed byte is read for both of its nibbles: element k lives in byte k // 2, shifted by 4*(k % 2).
    w_ptrs = W + offs_n[None, :] * s_wn + (offs_k[:, None] // 2) * s_wk
    shift = ((offs_k % 2) * 4)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP):
        a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
        p = tl.load(w_ptrs, mask=n_ok[None, :], other=0).to(tl.int32)
        q = (p >> shift) & 0xF
        q = tl.where(q >= 8, q - 16, q)
        if FP8:
            b = q.to(tl.float16).to(tl.float8e4nv)
        else:
            b = q.to(a.dtype)
        part = tl.dot(a, b)
        ws = tl.load(WS + offs_n * s_wsn + g * s_wsg, mask=n_ok, other=0.0).to(tl.float32)
        if ACT_SCALE == 2:
            act = tl.load(AS + offs_m * s_asm + g * s_asg, mask=m_ok, other=0.0)
            acc += part * act[:, None] * ws[None, :]
        else:
            acc += part * ws[None, :]
        a_ptrs += GROUP * s_ak
        w_ptrs += (GROUP // 2) * s_wk
    if ACT_SCALE == 1:
        act = tl.load(AS + offs_m * s_asm, mask=m_ok, other=0.0)
        acc = acc * act[:, None]
    if HAS_LORA:
        # Low-rank up-projection in the epilogue: (x L_downᵀ) tile times L_upᵀ tile.
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        xd = tl.load(XD + offs_m[:, None] * s_xdm + offs_r[None, :] * s_xdr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        up = tl.load(UP + offs_n[None, :] * s_upn + offs_r[:, None] * s_upr,
                     mask=n_ok[None, :] & r_ok[:, None], other=0.0)
        acc += tl.dot(xd, up)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_ptrs = OUT + offs_m[:, None] * s_om + offs_n[None, :] * s_on
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
