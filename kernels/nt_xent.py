"""Triton kernels of the fused NT-Xent loss; the 2N x 2N similarity matrix is never stored.

Notation (see sdclr_fast/ops/nt_xent.py for the op around them): zhat is the (M, D) matrix of
rows as the kernels see them: u_i / max(|u_i|, eps) in u's dtype, normalised once by the launch
helpers (the rows themselves without normalisation), S_ij = zhat_i . zhat_j / tau. The first R rows are the "query" rows whose
losses are wanted (R = M on one process; under a distributed gather the local rows are moved
to the front). key_i is an integer per row (int32 or int64): row j is a positive of row i iff
key_j == key_i and j != i (the two-view case uses the pair index i mod N as key, so each row
has one positive).

forward, one program per BLOCK_M query rows and column chunk (see _common: column splits),
online log-sum-exp over BLOCK_N column tiles:
    lse_i  = log sum_{j != i} exp(S_ij)
    loss_i = lse_i - mean_{p in pos(i)} S_ip       ("out", SupCon L_out; the two-view loss)
    loss_i = lse_i - lsep_i,  lsep_i = log sum_{p in pos(i)} exp(S_ip)     ("in", POS_LSE)
and loss_i = 0 where row i has no positive. The loss is formed as (m_i - pos_i) + log l_i
(m_i the running max, l_i = sum exp(S - m_i)), so a row whose only column is its positive
gives exactly 0. Scores are kept in base-2 units (S * log2 e) so the exponentials are exp2.

backward, one program per BLOCK_M output rows k (all M rows), column chunk and D chunk: with
g_i the upstream gradient of loss_i (0 for rows that are not queries or have no positive)
and gy_i = g_i / |pos(i)|, S symmetric gives
    dL/dzhat_k = (1/tau) sum_j A_kj zhat_j,
    A_kj = g_k P_kj + g_j P_jk - [j in pos(k)] (gy_k + gy_j),   P_ij = exp(S_ij - lse_i),
and with POS_LSE the positive term is [j in pos(k)] (g_k Q_kj + g_j Q_jk), Q_ij =
exp(S_ij - lsep_i) (lsep = +inf where a row has no positive, so Q = 0 there),
so each program owns its output rows and no atomics are needed. Rows beyond R only see the
query columns (j < R); their lse is +inf, which makes their P terms exactly 0. The chain rule
through the L2 normalisation runs in PyTorch on the (M, D) result. Normalising once in u's
dtype rounds zhat to it, an error of the size the same-dtype PyTorch loss makes anyway (its
matmul rounds S), and takes two multiplies per score and the column factors' loads out of
the loops.

Two views (PAIRED: the R = 2N query rows' keys are i mod N, N and M multiples of BLOCK_M; on
one process R = M, under a gather the other ranks' rows follow and are only negatives) know
where the masks fall: a query row block's diagonal and its positives (rows i +- N) each fill
one aligned BLOCK_M-wide window of columns, so only those tiles pay for the masks and the
positive sum; every other tile is all valid, and the other ranks' row blocks have no window.
Their backward also needs one exponential per score instead of two: with L = min lse and
w_i = g_i exp2(L - lse_i) over the query rows (0 for the others), A_kj = exp2(S_kj - L)
(w_k + w_j) off the masks, used while max lse - L < FAST_SPREAD keeps both factors in fp32's
range (for normalised rows that holds from tau ~ 0.05 up; smaller tau takes the
two-exponential form).

Inputs stay in their dtype for tl.dot (fp32 accumulation): fp16/bf16 use the tensor cores,
fp32 follows torch.matmul (TF32 where torch would use it, else IEEE products). The
interpreter's 16-bit arithmetic is unreliable, so tiles are upcast there. D up to
MAX_BLOCK_D is held in one register tile; larger D is processed in chunks (forward: the dot
is accumulated over chunks; backward: one program per output chunk, each recomputing the
scores).
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import (NSTAT, accumulate_scaled, cdiv, col_ptrs, column_splits, config, dots,
                      load_tile, merge_partials, online_lse, online_lse_full, scores, sm_count,
                      store_partial, store_rows, whole_dots)

LOG2E = tl.constexpr(1.4426950408889634)  # globals in @jit code must be constexpr
LN2 = tl.constexpr(0.6931471805599453)
FAST_SPREAD = tl.constexpr(64.0)


@triton.jit
def _windows(pid, c0, c1, H, R, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """PAIRED: the row block's diagonal window r0 and the window p0 of its positives (rows
    i +- H), which of them lie in the chunk [c0, c1), and how many plain tiles are left. A
    row block past the R query rows (another rank's rows, backward only) has no window:
    both start at column M, past every chunk."""
    r0 = pid * BLOCK_M
    p0 = tl.where(r0 < H, r0 + H, r0 - H)
    p0 = tl.where(r0 < R, p0, M)
    r0 = tl.where(r0 < R, r0, M)
    w_lo = tl.minimum(r0, p0)
    w_hi = tl.maximum(r0, p0)
    in_lo = (w_lo >= c0) & (w_lo < c1)
    in_hi = (w_hi >= c0) & (w_hi < c1)
    n_plain = (c1 - c0 - BLOCK_M * (in_lo.to(tl.int32) + in_hi.to(tl.int32))) // BLOCK_N
    return r0, p0, w_lo, w_hi, in_lo, in_hi, n_plain


@triton.jit
def _plain_start(t, c0, w_lo, w_hi, in_lo, in_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """First column of the t-th plain tile of the chunk: tiles in order, stepping over the
    windows that fall in it (w_lo < w_hi, both aligned to BLOCK_M)."""
    start = c0 + t * BLOCK_N
    start += tl.where(in_lo & (start >= w_lo), BLOCK_M, 0)
    start += tl.where(in_hi & (start >= w_hi), BLOCK_M, 0)
    return start


@triton.jit
def _window_start(t, r0, p0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """First column of the t-th tile of the two windows (diagonal first)."""
    per = BLOCK_M // BLOCK_N
    return tl.where(t < per, r0 + t * BLOCK_N, p0 + (t - per) * BLOCK_N)


@triton.jit
def _finish(m_i, l_i, pos, cnt, mp_i, lp_i, offs_m, row_ok, loss_ptr, lse2_ptr, lsep2_ptr,
            cnt_ptr, POS_LSE: tl.constexpr):
    """Store the losses, base-2 log-sum-exps and positive counts of the rows."""
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
def _nt_xent_fwd_kernel(
    z_ptr, key_ptr, scale_ptr, loss_ptr, lse2_ptr, lsep2_ptr, cnt_ptr, part_ptr,
    R, M, H, CHUNK, D, s_zm, s_zd,
    POS_LSE: tl.constexpr, PAIRED: tl.constexpr, SPLIT: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < R
    q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if D_CHUNKS == 1:
        q = load_tile(z_ptr, offs_m, row_ok, tl.arange(0, BLOCK_D), D, s_zm, s_zd, UPCAST)
    # 1/tau is read from memory: a temperature schedule neither recompiles nor syncs.
    f = tl.load(scale_ptr) * LOG2E
    rows_f = tl.zeros((BLOCK_M,), dtype=tl.float32) + f
    c0 = split * CHUNK
    c1 = tl.minimum(c0 + CHUNK, M)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_M,), dtype=tl.int32)
    mp_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # POS_LSE: over positives
    lp_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PAIRED:
        r0, p0, w_lo, w_hi, in_lo, in_hi, n_plain = _windows(pid, c0, c1, H, R, M, BLOCK_M,
                                                             BLOCK_N)
        kp = col_ptrs(z_ptr, s_zm, s_zd, BLOCK_N, BLOCK_D)
        for t in range(0, n_plain):
            start = _plain_start(t, c0, w_lo, w_hi, in_lo, in_hi, BLOCK_M, BLOCK_N)
            s, _ = whole_dots(z_ptr, z_ptr, kp, q, offs_m, offs_m < M, start, M, D, s_zm, s_zd,
                              s_zm, s_zd, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST,
                              PRECISION)
            m_i, l_i = online_lse_full(m_i, l_i, s, rows_f)
        partner = tl.where(offs_m < H, offs_m + H, offs_m - H)
        for t in range(0, 2 * (BLOCK_M // BLOCK_N)):
            start = _window_start(t, r0, p0, BLOCK_M, BLOCK_N)
            if (start >= c0) & (start < c1):
                offs_n = start + tl.arange(0, BLOCK_N)
                s, _, _ = scores(z_ptr, z_ptr, q, offs_m, offs_n, row_ok, offs_n < M, D, s_zm,
                                 s_zd, s_zm, s_zd, rows_f, z_ptr, False, BLOCK_M, BLOCK_N,
                                 BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
                s = tl.where(offs_n[None, :] != offs_m[:, None], s, float("-inf"))
                m_i, l_i = online_lse(m_i, l_i, s)
                pos += tl.sum(tl.where(offs_n[None, :] == partner[:, None], s, 0.0), 1)
        cnt += ((p0 >= c0) & (p0 < c1)).to(tl.int32)  # the one positive, in one chunk
    else:
        key_i = tl.load(key_ptr + offs_m, mask=row_ok, other=-1)
        for start_n in range(c0, c1, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < c1
            s, _, _ = scores(z_ptr, z_ptr, q, offs_m, offs_n, row_ok, col_ok, D, s_zm, s_zd,
                             s_zm, s_zd, rows_f, z_ptr, False, BLOCK_M, BLOCK_N, BLOCK_D,
                             D_CHUNKS, UPCAST, PRECISION)
            # the diagonal as column - row offsets within the tiles: the compiler then folds
            # the per-element test to constants against one scalar (the loop starts at the
            # split's runtime c0, and offs_n != offs_m compiled to 150 more instructions)
            rel = start_n - pid * BLOCK_M + tl.arange(0, BLOCK_N)
            valid = col_ok[None, :] & (rel[None, :] != tl.arange(0, BLOCK_M)[:, None])
            m_i, l_i = online_lse(m_i, l_i, tl.where(valid, s, float("-inf")))
            key_j = tl.load(key_ptr + offs_n, mask=col_ok, other=-1)
            same = valid & (key_j[None, :] == key_i[:, None])
            cnt += tl.sum(same.to(tl.int32), 1)
            if POS_LSE:
                mp_i, lp_i = online_lse(mp_i, lp_i, tl.where(same, s, float("-inf")))
            else:
                pos += tl.sum(tl.where(same, s, 0.0), 1)
    if SPLIT:
        store_partial(part_ptr, split, R, offs_m, row_ok, m_i, l_i, pos, cnt, mp_i, lp_i)
    else:
        _finish(m_i, l_i, pos, cnt, mp_i, lp_i, offs_m, row_ok, loss_ptr, lse2_ptr, lsep2_ptr,
                cnt_ptr, POS_LSE)


@triton.jit
def _nt_xent_merge_kernel(part_ptr, loss_ptr, lse2_ptr, lsep2_ptr, cnt_ptr, R, splits,
                          POS_LSE: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < R
    m_i, l_i, pos, cnt, mp_i, lp_i = merge_partials(part_ptr, splits, R, offs_m, row_ok, BLOCK_M)
    _finish(m_i, l_i, pos, cnt, mp_i, lp_i, offs_m, row_ok, loss_ptr, lse2_ptr, lsep2_ptr,
            cnt_ptr, POS_LSE)


@triton.jit
def _pair_weights(t, offs_n, g_k, w_k, f, low, lse2_k, g_ptr, w_ptr, lse2_ptr, M,
                  FAST: tl.constexpr):
    """A_kj without the positive term for products t (masked entries -inf):
    g_k P_kj + g_j P_jk, with one exponential per score in the FAST form
    exp2(S_kj - L) (w_k + w_j)."""
    col_ok = offs_n < M
    if FAST:
        w_j = tl.load(w_ptr + offs_n, mask=col_ok, other=0.0)
        a = tl.exp2(t * f - low) * (w_k[:, None] + w_j[None, :])
    else:
        s = t * f
        lse2_j = tl.load(lse2_ptr + offs_n, mask=col_ok, other=float("inf"))
        g_j = tl.load(g_ptr + offs_n, mask=col_ok, other=0.0)
        a = (g_k[:, None] * tl.exp2(s - lse2_k[:, None])
             + g_j[None, :] * tl.exp2(s - lse2_j[None, :]))
    return a


@triton.jit
def _pair_rows(acc, q, pid, c0, c1, H, R, offs_m, f, lse2_k, g_k, w_k, low,
               z_ptr, lse2_ptr, g_ptr, w_ptr, M, D, s_zm, s_zd, d_out,
               FAST: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """The PAIRED backward over the chunk [c0, c1): plain tiles, then the two windows with
    the diagonal masked and the positive term -(g_k + g_j) at j = partner(k) (query rows
    only: another rank's rows have neither)."""
    r0, p0, w_lo, w_hi, in_lo, in_hi, n_plain = _windows(pid, c0, c1, H, R, M, BLOCK_M, BLOCK_N)
    kp = col_ptrs(z_ptr, s_zm, s_zd, BLOCK_N, BLOCK_D)
    for t in range(0, n_plain):
        start = _plain_start(t, c0, w_lo, w_hi, in_lo, in_hi, BLOCK_M, BLOCK_N)
        s, k = whole_dots(z_ptr, z_ptr, kp, q, offs_m, offs_m < M, start, M, D, s_zm, s_zd,
                          s_zm, s_zd, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST,
                          PRECISION)
        offs_n = start + tl.arange(0, BLOCK_N)
        a = _pair_weights(s, offs_n, g_k, w_k, f, low, lse2_k, g_ptr, w_ptr, lse2_ptr, M, FAST)
        acc = accumulate_scaled(acc, a, k, z_ptr, offs_n, offs_n < M, d_out, D, s_zm, s_zd,
                                D_CHUNKS, UPCAST, PRECISION)
    partner = tl.where(offs_m < H, offs_m + H, offs_m - H)
    for t in range(0, 2 * (BLOCK_M // BLOCK_N)):
        start = _window_start(t, r0, p0, BLOCK_M, BLOCK_N)
        if (start >= c0) & (start < c1):
            offs_n = start + tl.arange(0, BLOCK_N)
            s, _, k = dots(z_ptr, z_ptr, q, offs_m, offs_n, offs_m < M, offs_n < M, D, s_zm,
                           s_zd, s_zm, s_zd, z_ptr, False, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS,
                           UPCAST, PRECISION)
            # S_ii is left out of lse: exp2(S_ii - lse_i) may overflow, mask before exp2
            s = tl.where(offs_n[None, :] != offs_m[:, None], s, float("-inf"))
            a = _pair_weights(s, offs_n, g_k, w_k, f, low, lse2_k, g_ptr, w_ptr, lse2_ptr, M,
                              FAST)
            g_j = tl.load(g_ptr + offs_n, mask=offs_n < M, other=0.0)
            a -= tl.where(offs_n[None, :] == partner[:, None], g_k[:, None] + g_j[None, :],
                          0.0)
            acc = accumulate_scaled(acc, a, k, z_ptr, offs_n, offs_n < M, d_out, D, s_zm,
                                    s_zd, D_CHUNKS, UPCAST, PRECISION)
    return acc


@triton.jit
def _nt_xent_bwd_kernel(
    z_ptr, key_ptr, scale_ptr, lse2_ptr, lsep2_ptr, g_ptr, gy_ptr, w_ptr, low_ptr,
    dz_ptr, R, M, H, CHUNK, D, s_zm, s_zd, s_ds, s_dm, s_dd,
    POS_LSE: tl.constexpr, PAIRED: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    chunk = tl.program_id(2)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if D_CHUNKS == 1:
        q = load_tile(z_ptr, offs_m, row_ok, offs_d, D, s_zm, s_zd, UPCAST)
    inv_tau = tl.load(scale_ptr)
    f = inv_tau * LOG2E
    lse2_k = tl.load(lse2_ptr + offs_m, mask=row_ok, other=float("inf"))
    g_k = tl.load(g_ptr + offs_m, mask=row_ok, other=0.0)
    d_out = chunk * BLOCK_D + offs_d
    c0 = split * CHUNK
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if PAIRED:
        # rows that are not queries only pair with query columns (the g_j P_jk term)
        c1 = tl.minimum(c0 + CHUNK, tl.where(pid * BLOCK_M < R, M, R))
        low = tl.load(low_ptr)
        w_k = tl.load(w_ptr + offs_m, mask=row_ok, other=0.0)
        if tl.load(low_ptr + 1) - low < FAST_SPREAD:
            acc = _pair_rows(acc, q, pid, c0, c1, H, R, offs_m, f, lse2_k, g_k, w_k, low, z_ptr,
                             lse2_ptr, g_ptr, w_ptr, M, D, s_zm, s_zd, d_out, True, EVEN_D,
                             BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
        else:
            acc = _pair_rows(acc, q, pid, c0, c1, H, R, offs_m, f, lse2_k, g_k, w_k, low, z_ptr,
                             lse2_ptr, g_ptr, w_ptr, M, D, s_zm, s_zd, d_out, False, EVEN_D,
                             BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
    else:
        rows_f = tl.zeros((BLOCK_M,), dtype=tl.float32) + f
        key_k = tl.load(key_ptr + offs_m, mask=row_ok, other=-1)
        gy_k = tl.load(gy_ptr + offs_m, mask=row_ok, other=0.0)
        lsep2_k = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
        if POS_LSE:
            lsep2_k = tl.load(lsep2_ptr + offs_m, mask=row_ok, other=float("inf"))
        # Rows that are not queries only pair with query columns (the g_j P_jk term).
        c1 = tl.minimum(c0 + CHUNK, tl.where(pid * BLOCK_M < R, M, R))
        for start_n in range(c0, c1, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < c1
            s, _, k = scores(z_ptr, z_ptr, q, offs_m, offs_n, row_ok, col_ok, D, s_zm, s_zd,
                             s_zm, s_zd, rows_f, z_ptr, False, BLOCK_M, BLOCK_N, BLOCK_D,
                             D_CHUNKS, UPCAST, PRECISION)
            lse2_j = tl.load(lse2_ptr + offs_n, mask=col_ok, other=float("inf"))
            g_j = tl.load(g_ptr + offs_n, mask=col_ok, other=0.0)
            gy_j = tl.load(gy_ptr + offs_n, mask=col_ok, other=0.0)
            key_j = tl.load(key_ptr + offs_n, mask=col_ok, other=-1)
            # padding rows (past M) too: their zero scores minus a real column's lse overflow
            valid = row_ok[:, None] & col_ok[None, :] & (offs_n[None, :] != offs_m[:, None])
            # The diagonal S_ii is left out of lse, so at small tau exp2(S_ii - lse_i)
            # overflows: mask before the exponent instead of discarding an inf afterwards.
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
            acc = accumulate_scaled(acc, a, k, z_ptr, offs_n, col_ok, d_out, D, s_zm, s_zd,
                                    D_CHUNKS, UPCAST, PRECISION)
    store_rows(dz_ptr + split * s_ds, acc * inv_tau, offs_m, row_ok, d_out, D, s_dm, s_dd)


# ------------------------------------------------------------------ launch helpers
def _config(dtype, D, block_d=None):
    return config(dtype, D, block_d, interp_block=32)


def paired_ok(M, R, meta):
    """Whether the PAIRED kernels apply to two views of R = 2N query rows (followed by the
    M - R rows of the other ranks under a gather): N and M multiples of the row tile (the
    windows are then aligned and every other tile is whole)."""
    bm = meta["BLOCK_M"]
    return R % 2 == 0 and (R // 2) % bm == 0 and M % bm == 0


def plan(M, R, D, dtype, sms, paired=False, block_d=None, splits=None):
    """Launch plan of the forward and backward for M rows (R queries) of width D: a dict with
    meta (the kernels' constexprs but POS_LSE / SPLIT), launch (num_warps, num_stages),
    fwd_grid, bwd_grid, fwd_chunk, bwd_chunk (columns per split). `sms`: the SM count the
    column splits fill; `paired`: two views (taken where the shape allows, see `paired_ok`);
    `splits` overrides the split count. Device-free, so that a static report can compile
    exactly what a launch runs."""
    meta, launch, even_d = _config(dtype, D, block_d)
    bm = meta["BLOCK_M"]
    meta = dict(meta, PAIRED=paired and paired_ok(M, R, meta), EVEN_D=even_d)
    # chunks of whole row tiles: the PAIRED windows never straddle two chunks
    nf, chunk_f = column_splits(cdiv(R, bm), M, bm, sms, splits)
    nb, chunk_b = column_splits(cdiv(M, bm) * meta["D_CHUNKS"], M, bm, sms, splits)
    return dict(meta=meta, launch=launch, fwd_grid=(cdiv(R, bm), nf),
                bwd_grid=(cdiv(M, bm), nb, meta["D_CHUNKS"]), fwd_chunk=chunk_f,
                bwd_chunk=chunk_b)


def normalized(u, r, normalize):
    """The rows the kernels take: u / max(|u|, eps) rounded once to u's dtype (r: fp32
    inverse norms), or u itself; contiguous."""
    if not normalize:
        return u.contiguous()
    return (u.float() * r[:, None]).to(u.dtype)


def forward(u, r, keys, inv_tau, R, normalize, block_d=None, pos_lse=False, paired=False,
            splits=None):
    """Per-row losses (R,) fp32, base-2 log-sum-exp (M,) fp32 (+inf beyond R), positive
    counts (R,) int32 for the first R rows of u (M, D) against all M rows, and with pos_lse
    ("in" form) the base-2 log-sum-exp over each row's positives (M,) (+inf where none and
    beyond R; None without pos_lse).

    r: (M,) fp32 inverse norms (ignored unless normalize); keys: (M,) int32 or int64; inv_tau:
    (1,) fp32 tensor on u's device; paired: two views, the query rows' keys i mod R/2 and the
    other rows' keys none of theirs, which takes the PAIRED kernels where the shape allows;
    splits: the column split count (None: fill the device)."""
    M, D = u.shape
    p = plan(M, R, D, u.dtype, sm_count(u.device), paired and not pos_lse, block_d, splits)
    z = normalized(u, r, normalize)
    dev = u.device
    loss = torch.empty(R, device=dev, dtype=torch.float32)
    # rows past R (other ranks' rows) are never queries: +inf there; the kernel writes the rest
    lse2 = (torch.empty(M, device=dev, dtype=torch.float32) if M == R else
            torch.full((M,), float("inf"), device=dev, dtype=torch.float32))
    lsep2 = None
    if pos_lse:
        lsep2 = (torch.empty(M, device=dev, dtype=torch.float32) if M == R else
                 torch.full((M,), float("inf"), device=dev, dtype=torch.float32))
    cnt = torch.empty(R, device=dev, dtype=torch.int32)
    grid = p["fwd_grid"]
    split = grid[1] > 1
    part = torch.empty((grid[1], NSTAT, R) if split else (1,), device=dev, dtype=torch.float32)
    outs = (loss, lse2, lse2 if lsep2 is None else lsep2, cnt)
    wrap_triton(_nt_xent_fwd_kernel)[grid](
        z, keys, inv_tau, *outs, part, R, M, R // 2, p["fwd_chunk"], D, z.stride(0),
        z.stride(1), POS_LSE=pos_lse, SPLIT=split, **p["meta"], **p["launch"])
    if split:
        wrap_triton(_nt_xent_merge_kernel)[(cdiv(R, 128),)](
            part, *outs, R, grid[1], POS_LSE=pos_lse, BLOCK_M=128)
    return loss, lse2, cnt, lsep2


def backward(u, r, keys, inv_tau, lse2, g, gy, R, normalize, block_d=None, lsep2=None,
             paired=False, splits=None):
    """dL/dzhat (M, D) fp32, where zhat is the normalised u (u itself without normalize).

    g, gy: (M,) fp32 upstream gradient of each row's loss and the same divided by the row's
    positive count (0 beyond R and for rows without positives). lsep2: the forward's
    log-sum-exp over positives for the "in" form (gy is then unused), None otherwise.
    paired / splits as in forward."""
    M, D = u.shape
    p = plan(M, R, D, u.dtype, sm_count(u.device), paired and lsep2 is None, block_d, splits)
    z = normalized(u, r, normalize)
    grid = p["bwd_grid"]
    dz = torch.empty((grid[1], M, D), device=u.device, dtype=torch.float32)
    w = low = lse2  # placeholders, not read
    if p["meta"]["PAIRED"]:
        # L = min lse and w = g exp2(L - lse): the one-exponential form (FAST_SPREAD); over
        # the query rows (the others' lse is +inf and their g 0, so their w is 0)
        low = torch.stack(torch.aminmax(lse2[:R]))
        w = g * torch.exp2(low[0] - lse2)
    wrap_triton(_nt_xent_bwd_kernel)[grid](
        z, keys, inv_tau, lse2, lse2 if lsep2 is None else lsep2, g, gy, w, low, dz, R, M,
        R // 2, p["bwd_chunk"], D, z.stride(0), z.stride(1), dz.stride(0), dz.stride(1),
        dz.stride(2), POS_LSE=lsep2 is not None, **p["meta"], **p["launch"])
    return dz[0] if grid[1] == 1 else dz.sum(0)
