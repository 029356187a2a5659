"""Triton kernels of the fused NT-Xent loss; the 2N x 2N similarity matrix is never stored.

Notation (see sdclr_fast/ops/nt_xent.py for the op around them): u is the (M, D) matrix of raw
rows, r_i = 1 / max(|u_i|, eps) their inverse norms (all ones without normalisation),
zhat_i = r_i u_i, S_ij = zhat_i . zhat_j / tau. The first R rows are the "query" rows whose
losses are wanted (R = M on one process; under a distributed gather the local rows are moved
to the front). key_i is an integer per row (int32 or int64): row j is a positive of row i iff key_j == key_i and
j != i (the two-view case uses the pair index i mod N as key, so each row has one positive).

forward, one program per BLOCK_M query rows, online log-sum-exp over BLOCK_N column tiles:
    lse_i  = log sum_{j != i} exp(S_ij)
    loss_i = lse_i - mean_{p in pos(i)} S_ip       ("out", SupCon L_out; the two-view loss)
    loss_i = lse_i - lsep_i,  lsep_i = log sum_{p in pos(i)} exp(S_ip)     ("in", POS_LSE)
and loss_i = 0 where row i has no positive. The loss is formed as (m_i - pos_i) + log l_i
(m_i the running max, l_i = sum exp(S - m_i)), so a row whose only column is its positive
gives exactly 0. Scores are kept in base-2 units (S * log2 e) so the exponentials are exp2.

backward, one program per BLOCK_M output rows k (all M rows) and per D chunk: with g_i the
upstream gradient of loss_i (0 for rows that are not queries or have no positive) and
gy_i = g_i / |pos(i)|, S symmetric gives
    dL/dzhat_k = (1/tau) sum_j A_kj zhat_j,
    A_kj = g_k P_kj + g_j P_jk - [j in pos(k)] (gy_k + gy_j),   P_ij = exp(S_ij - lse_i),
and with POS_LSE the positive term is [j in pos(k)] (g_k Q_kj + g_j Q_jk), Q_ij =
exp(S_ij - lsep_i) (lsep = +inf where a row has no positive, so Q = 0 there),
so each program owns its output rows and no atomics are needed. Rows beyond R only see the
query columns (j < R); their lse is +inf, which makes their P terms exactly 0. The chain rule
through the L2 normalisation runs in PyTorch on the (M, D) result.

Inputs stay in their dtype for tl.dot (fp32 accumulation): fp16/bf16 use the tensor cores,
fp32 uses IEEE products unless torch.backends.cuda.matmul.allow_tf32 is set (as torch.matmul
does). The interpreter's 16-bit arithmetic is unreliable, so tiles are upcast there.
D up to MAX_BLOCK_D is held in one register tile; larger D is processed in chunks (forward:
the dot is accumulated over chunks; backward: one program per output chunk, each recomputing
the scores).
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import accumulate, cdiv, config, load_tile, online_lse, row_scale, scores, store_rows

LOG2E = tl.constexpr(1.4426950408889634)  # globals in @jit code must be constexpr
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _nt_xent_fwd_kernel(
    u_ptr, r_ptr, key_ptr, scale_ptr, loss_ptr, lse2_ptr, lsep2_ptr, cnt_ptr,
    R, M, D, s_um, s_ud,
    NORMALIZE: tl.constexpr, POS_LSE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < R
    q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if D_CHUNKS == 1:
        q = load_tile(u_ptr, offs_m, row_ok, tl.arange(0, BLOCK_D), D, s_um, s_ud, UPCAST)
    # 1/tau is read from memory: a temperature schedule neither recompiles nor syncs.
    rows_f = row_scale(r_ptr, offs_m, row_ok, tl.load(scale_ptr) * LOG2E, BLOCK_M, NORMALIZE)
    key_i = tl.load(key_ptr + offs_m, mask=row_ok, other=-1)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_M,), dtype=tl.int32)
    mp_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # POS_LSE: over positives
    lp_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        s, _, _ = scores(u_ptr, u_ptr, q, offs_m, offs_n, row_ok, col_ok, D, s_um, s_ud, s_um,
                         s_ud, rows_f, r_ptr, NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS,
                         UPCAST, PRECISION)
        valid = col_ok[None, :] & (offs_n[None, :] != offs_m[:, None])
        m_i, l_i = online_lse(m_i, l_i, tl.where(valid, s, float("-inf")))
        key_j = tl.load(key_ptr + offs_n, mask=col_ok, other=-1)
        same = valid & (key_j[None, :] == key_i[:, None])
        cnt += tl.sum(same.to(tl.int32), 1)
        if POS_LSE:
            mp_i, lp_i = online_lse(mp_i, lp_i, tl.where(same, s, float("-inf")))
        else:
            pos += tl.sum(tl.where(same, s, 0.0), 1)

    has_pos = cnt > 0
    # (max - positive term) + log(sum): exactly 0 for a row whose only column is its positive
    if POS_LSE:
        lp_i = tl.where(has_pos, lp_i, 1.0)  # no positive: lp = 0, and the loss is 0 anyway
        loss = tl.where(has_pos, ((m_i - mp_i) + (tl.log2(l_i) - tl.log2(lp_i))) * LN2, 0.0)
        tl.store(lsep2_ptr + offs_m, tl.where(has_pos, mp_i + tl.log2(lp_i), float("inf")),
                 mask=row_ok)
    else:
        pos_mean = pos / tl.maximum(cnt, 1).to(tl.float32)
        loss = tl.where(has_pos, ((m_i - pos_mean) + tl.log2(l_i)) * LN2, 0.0)
    tl.store(loss_ptr + offs_m, loss, mask=row_ok)
    tl.store(lse2_ptr + offs_m, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(cnt_ptr + offs_m, cnt, mask=row_ok)


@triton.jit
def _nt_xent_bwd_kernel(
    u_ptr, r_ptr, key_ptr, scale_ptr, lse2_ptr, lsep2_ptr, g_ptr, gy_ptr, dz_ptr,
    R, M, D, s_um, s_ud, s_dm, s_dd,
    NORMALIZE: tl.constexpr, POS_LSE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if D_CHUNKS == 1:
        q = load_tile(u_ptr, offs_m, row_ok, offs_d, D, s_um, s_ud, UPCAST)
    inv_tau = tl.load(scale_ptr)
    rows_f = row_scale(r_ptr, offs_m, row_ok, inv_tau * LOG2E, BLOCK_M, NORMALIZE)
    key_k = tl.load(key_ptr + offs_m, mask=row_ok, other=-1)
    lse2_k = tl.load(lse2_ptr + offs_m, mask=row_ok, other=float("inf"))
    g_k = tl.load(g_ptr + offs_m, mask=row_ok, other=0.0)
    gy_k = tl.load(gy_ptr + offs_m, mask=row_ok, other=0.0)
    lsep2_k = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    if POS_LSE:
        lsep2_k = tl.load(lsep2_ptr + offs_m, mask=row_ok, other=float("inf"))
    d_out = chunk * BLOCK_D + offs_d

    # Rows that are not queries only pair with query columns (the g_j P_jk term).
    n_end = tl.where(pid * BLOCK_M < R, M, R)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        s, r_j, k = scores(u_ptr, u_ptr, q, offs_m, offs_n, row_ok, col_ok, D, s_um, s_ud,
                           s_um, s_ud, rows_f, r_ptr, NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_D,
                           D_CHUNKS, UPCAST, PRECISION)
        lse2_j = tl.load(lse2_ptr + offs_n, mask=col_ok, other=float("inf"))
        g_j = tl.load(g_ptr + offs_n, mask=col_ok, other=0.0)
        gy_j = tl.load(gy_ptr + offs_n, mask=col_ok, other=0.0)
        key_j = tl.load(key_ptr + offs_n, mask=col_ok, other=-1)
        # padding rows (past M) too: their zero scores minus a real column's lse would overflow
        valid = row_ok[:, None] & col_ok[None, :] & (offs_n[None, :] != offs_m[:, None])
        # The diagonal S_ii is left out of lse, so at small tau exp2(S_ii - lse_i) overflows:
        # mask before the exponent instead of discarding an inf afterwards.
        s = tl.where(valid, s, float("-inf"))
        a = (g_k[:, None] * tl.exp2(s - lse2_k[:, None])
             + g_j[None, :] * tl.exp2(s - lse2_j[None, :]))
        same = valid & (key_j[None, :] == key_k[:, None])
        if POS_LSE:
            lsep2_j = tl.load(lsep2_ptr + offs_n, mask=col_ok, other=float("inf"))
            qp = (g_k[:, None] * tl.exp2(s - lsep2_k[:, None])
                  + g_j[None, :] * tl.exp2(s - lsep2_j[None, :]))
            a = a - tl.where(same, qp, 0.0)
        else:
            a = a - tl.where(same, gy_k[:, None] + gy_j[None, :], 0.0)
        a = tl.where(valid, a, 0.0)
        acc = accumulate(acc, a, r_j, k, u_ptr, offs_n, col_ok, d_out, D, s_um, s_ud, NORMALIZE,
                         D_CHUNKS, UPCAST, PRECISION)
    store_rows(dz_ptr, acc * inv_tau, offs_m, row_ok, d_out, D, s_dm, s_dd)


# ------------------------------------------------------------------ launch helpers
def _config(dtype, D, block_d=None):
    return config(dtype, D, block_d, interp_block=32)


def forward(u, r, keys, inv_tau, R, normalize, block_d=None, pos_lse=False):
    """Per-row losses (R,) fp32, base-2 log-sum-exp (M,) fp32 (+inf beyond R), positive
    counts (R,) int32 for the first R rows of u (M, D) against all M rows, and with pos_lse
    ("in" form) the base-2 log-sum-exp over each row's positives (M,) (+inf where none and
    beyond R; None without pos_lse).

    r: (M,) fp32 inverse norms (ignored unless normalize); keys: (M,) int32 or int64; inv_tau: (1,)
    fp32 tensor on u's device."""
    M, D = u.shape
    meta, launch = _config(u.dtype, D, block_d)
    loss = torch.empty(R, device=u.device, dtype=torch.float32)
    # rows past R (other ranks' rows) are never queries: +inf there; the kernel writes the rest
    lse2 = (torch.empty(M, device=u.device, dtype=torch.float32) if M == R else
            torch.full((M,), float("inf"), device=u.device, dtype=torch.float32))
    lsep2 = None
    if pos_lse:
        lsep2 = (torch.empty(M, device=u.device, dtype=torch.float32) if M == R else
                 torch.full((M,), float("inf"), device=u.device, dtype=torch.float32))
    cnt = torch.empty(R, device=u.device, dtype=torch.int32)
    grid = (cdiv(R, meta["BLOCK_M"]),)
    wrap_triton(_nt_xent_fwd_kernel)[grid](
        u, r, keys, inv_tau, loss, lse2, lse2 if lsep2 is None else lsep2, cnt, R, M, D,
        u.stride(0), u.stride(1), NORMALIZE=normalize, POS_LSE=pos_lse, **meta, **launch)
    return loss, lse2, cnt, lsep2


def backward(u, r, keys, inv_tau, lse2, g, gy, R, normalize, block_d=None, lsep2=None):
    """dL/dzhat (M, D) fp32, where zhat is the normalised u (u itself without normalize).

    g, gy: (M,) fp32 upstream gradient of each row's loss and the same divided by the row's
    positive count (0 beyond R and for rows without positives). lsep2: the forward's
    log-sum-exp over positives for the "in" form (gy is then unused), None otherwise."""
    M, D = u.shape
    meta, launch = _config(u.dtype, D, block_d)
    dz = torch.empty((M, D), device=u.device, dtype=torch.float32)
    grid = (cdiv(M, meta["BLOCK_M"]), meta["D_CHUNKS"])
    wrap_triton(_nt_xent_bwd_kernel)[grid](
        u, r, keys, inv_tau, lse2, lse2 if lsep2 is None else lsep2, g, gy, dz, R, M, D,
        u.stride(0), u.stride(1), dz.stride(0), dz.stride(1), NORMALIZE=normalize,
        POS_LSE=lsep2 is not None, **meta, **launch)
    return dz
