"""The Triton kernel itself; imported only by :mod:`.triton` when a launch is needed (imports triton).

Kept at module level (not in a closure) so Triton's compiler resolves ``tl`` from the module globals.
See :mod:`.triton` for the algorithm. One body (:func:`_bsa_tile`), two entry points: :func:`_bsa_fwd`
(the PyTorch launcher's: strides and scale at run time) and :func:`_bsa_fwd_trt` (TensorRT's AOT plugin
convention: inputs, int32 extras, output; see :mod:`.tensorrt_plugin`).

Tiles along the keys: ``BLOCK_N <= MASK_BK`` walks each kept mask block in ``MASK_BK // BLOCK_N``
pieces; ``BLOCK_N > MASK_BK`` gathers ``BLOCK_N // MASK_BK`` kept mask blocks (any positions) into one
tile, so a 64-token mask can still run 128-wide tiles (fewer softmax rescales per FLOP). Loads are
by pointer, so a gathered tile costs the same as a contiguous one; only a tile that reaches past the
list's end (the last one when ``count`` is not a multiple) or past ``Lk`` is masked.
"""

import triton
import triton.language as tl


@triton.jit
def _attn_step(
    q, m_i, l_i, acc, k_base, v_base, offs_n, col_ok, d_ok, dv_ok, s_kn, s_vn, qk_scale,
    MASKED: tl.constexpr, MASK_D: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over a tile of keys at rows ``offs_n`` (base-2 exponentials)."""
    if MASKED:
        k = tl.load(k_base + offs_n[None, :] * s_kn, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
    elif MASK_D:
        k = tl.load(k_base + offs_n[None, :] * s_kn, mask=d_ok[:, None], other=0.0)
    else:
        k = tl.load(k_base + offs_n[None, :] * s_kn)
    qk = tl.dot(q, k) * qk_scale
    if MASKED:
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:
        # A tile with no valid key can leave m at -inf: shift by 0 then, so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new  # every column is a real key: m is finite from the first tile on
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED:
        v = tl.load(v_base + offs_n[:, None] * s_vn, mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
    elif MASK_D:
        v = tl.load(v_base + offs_n[:, None] * s_vn, mask=dv_ok[None, :], other=0.0)
    else:
        v = tl.load(v_base + offs_n[:, None] * s_vn)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return m_new, l_i, acc


@triton.jit
def _bsa_tile(
    Q, K, V, O, Counts, Indices,
    qk_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_cb, s_ch, s_cq,
    s_ib, s_ih, s_iq, s_ij,
    H, Lq, Lk, D, DV,
    MASK_BQ: tl.constexpr, MASK_BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_LK: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """The kernel body: one program = (tile of ``BLOCK_M`` query rows, batch·head). Both entry points
    (:func:`_bsa_fwd`, :func:`_bsa_fwd_trt`) inline it, so they compute the same thing."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64 so batch/head offsets cannot overflow int32 on long sequences or large batches.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    qblock = (pid_m * BLOCK_M) // MASK_BQ

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Lq
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    k_base = K + b * s_kb + h * s_kh + offs_d[:, None] * s_kd
    v_base = V + b * s_vb + h * s_vh + offs_dv[None, :] * s_vd
    count = tl.load(Counts + b * s_cb + h * s_ch + qblock * s_cq)
    idx_base = Indices + b * s_ib + h * s_ih + qblock * s_iq

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    if BLOCK_N <= MASK_BK:
        SUB: tl.constexpr = MASK_BK // BLOCK_N
        for it in range(0, count * SUB):
            kv_block = tl.load(idx_base + (it // SUB) * s_ij)
            offs_n = kv_block * MASK_BK + (it % SUB) * BLOCK_N + offs_n0
            m_i, l_i, acc = _attn_step(
                q, m_i, l_i, acc, k_base, v_base, offs_n, offs_n < Lk, d_ok, dv_ok, s_kn, s_vn, qk_scale,
                MASKED=not EVEN_LK, MASK_D=not EVEN_D,
            )  # fmt: skip
    else:
        PER: tl.constexpr = BLOCK_N // MASK_BK  # mask blocks gathered per tile
        piece = offs_n0 // MASK_BK
        within = offs_n0 % MASK_BK
        n_full = count // PER
        for t in range(0, n_full):
            kv_block = tl.load(idx_base + (t * PER + piece) * s_ij)
            offs_n = kv_block * MASK_BK + within
            m_i, l_i, acc = _attn_step(
                q, m_i, l_i, acc, k_base, v_base, offs_n, offs_n < Lk, d_ok, dv_ok, s_kn, s_vn, qk_scale,
                MASKED=not EVEN_LK, MASK_D=not EVEN_D,
            )  # fmt: skip
        if n_full * PER < count:  # last tile, partly past the end of the list
            slot = n_full * PER + piece
            in_list = slot < count
            kv_block = tl.load(idx_base + slot * s_ij, mask=in_list, other=0)
            offs_n = kv_block * MASK_BK + within
            m_i, l_i, acc = _attn_step(
                q, m_i, l_i, acc, k_base, v_base, offs_n, in_list & (offs_n < Lk), d_ok, dv_ok, s_kn, s_vn,
                qk_scale, MASKED=True, MASK_D=not EVEN_D,
            )  # fmt: skip

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_dv[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _bsa_fwd(
    Q, K, V, O, Counts, Indices,
    qk_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_cb, s_ch, s_cq,
    s_ib, s_ih, s_iq, s_ij,
    H, Lq, Lk, D, DV,
    MASK_BQ: tl.constexpr, MASK_BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_LK: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Entry point of the PyTorch launcher (:mod:`.triton`): any strides, scale at run time."""
    _bsa_tile(
        Q, K, V, O, Counts, Indices, qk_scale,
        s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_om, s_od,
        s_cb, s_ch, s_cq, s_ib, s_ih, s_iq, s_ij,
        H, Lq, Lk, D, DV,
        MASK_BQ=MASK_BQ, MASK_BK=MASK_BK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, EVEN_LK=EVEN_LK, EVEN_D=EVEN_D,
    )  # fmt: skip


@triton.jit
def _bsa_fwd_trt(
    Q, K, V, Counts, Indices,
    H, Lq, Lk, W,
    O,
    QK_SCALE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    MASK_BQ: tl.constexpr, MASK_BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_LK: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Entry point in TensorRT's AOT plugin launch convention: input pointers, int32 extras, output.

    A TensorRT AOT plugin launches ``(inputs..., extra int32 scalars..., outputs...)`` with linear
    (contiguous) tensors, so the strides follow from the shapes: q ``(B, H, Lq, D)``, k ``(B, H, Lk, D)``,
    v ``(B, H, Lk, DV)``, counts ``(B, H, NQ)``, indices ``(B, H, NQ, W)``, out ``(B, H, Lq, DV)`` with
    ``NQ = ceil(Lq / MASK_BQ)``. The softmax scale (already times log2(e)), the head dims and the
    block sizes are compile-time constants (one kernel per plugin attribute set).
    """
    NQ = (Lq + MASK_BQ - 1) // MASK_BQ
    # int64 per-head / per-batch strides: H * L * D can pass 2**31 on long sequences.
    s_qh = Lq.to(tl.int64) * D
    s_kh = Lk.to(tl.int64) * D
    s_vh = Lk.to(tl.int64) * DV
    s_oh = Lq.to(tl.int64) * DV
    s_ch = NQ.to(tl.int64)
    s_ih = NQ.to(tl.int64) * W
    _bsa_tile(
        Q, K, V, O, Counts, Indices, QK_SCALE,
        H * s_qh, s_qh, D, 1,
        H * s_kh, s_kh, D, 1,
        H * s_vh, s_vh, DV, 1,
        H * s_oh, s_oh, DV, 1,
        H * s_ch, s_ch, 1,
        H * s_ih, s_ih, W, 1,
        H, Lq, Lk, D, DV,
        MASK_BQ=MASK_BQ, MASK_BK=MASK_BK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, EVEN_LK=EVEN_LK, EVEN_D=EVEN_D,
    )  # fmt: skip
