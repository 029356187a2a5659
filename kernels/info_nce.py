"""Triton kernels of the fused InfoNCE loss; the (M, M + Q) logit matrix is never stored.

Notation (see sdclr_fast/ops/info_nce.py for the op around them): x (Cq, D) are the raw
query rows, y (Ck, D) the raw key rows (the local M rows first in both; more rows come from
other ranks under a distributed gather), n (Q, D) the raw negatives; r_* = 1 / max(|row|, eps)
their inverse norms (ones without normalisation), S_ij = r_i r_j x_i . y_j / tau. Keys kx, ky
(int32 or int64 per row): query i and key j are positives iff kx_i == ky_j (the row index when there
are no labels). Bank columns are never positives.

forward, one program per BLOCK_M anchor rows (the first M rows of the row matrix), online
log-sum-exp over BLOCK_N column tiles of the paired columns and then of the bank:
    lse_i  = log sum_{j in cols(i)} exp(S_ij)
    loss_i = lse_i - mean_{p in pos(i)} S_ip
cols(i) is every paired column, or only column i (DIAG_ONLY, in_batch_negatives=False: only
the diagonal tiles are visited), plus every bank column. The key -> query direction is the
same kernel with the roles of x and y swapped and no bank. Scores are kept in base-2 units
(S * log2 e) so the exponentials are exp2.

backward, one program per BLOCK_M output rows and per D chunk, columns in tiles:
    dL/dS_ij = g_i (P_ij - [j in pos(i)] / |pos(i)|) + h_j (P'_ji - [i in pos'(j)] / |pos'(j)|)
with g, h the upstream gradients of the query -> key and key -> query rows (0 beyond M and
for a direction not computed) and P, P' their softmaxes (P = exp(S - lse)). The kernel
computes dL/dxhat_i = (1/tau) sum_j dS_ij yhat_j for its rows; launched with the roles
swapped it gives dL/dyhat (rows = keys, columns = queries) and dL/dnhat (rows = bank,
columns = queries, only the g term), so each program owns its output rows and no atomics
are needed. Rows beyond M (other ranks' rows) only pair with the first M columns. The chain
rule through the L2 normalisation runs in PyTorch on the results.

Inputs stay in their dtype for tl.dot (fp32 accumulation): fp16/bf16 use the tensor cores,
fp32 uses IEEE products unless torch.backends.cuda.matmul.allow_tf32 is set. The
interpreter's 16-bit arithmetic is unreliable, so tiles are upcast there. D up to MAX_BLOCK_D
is held in one register tile; larger D is processed in chunks (forward: the dot accumulates
over chunks; backward: one program per output chunk, each recomputing the scores).
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import (NSTAT, accumulate, cdiv, col_ptrs, column_splits, config, load_tile,
                      merge_partials, online_lse, online_lse_full, row_scale, scores, sm_count,
                      store_partial, store_rows, whole_dots)

LOG2E = tl.constexpr(1.4426950408889634)  # globals in @jit code must be constexpr
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _diag_ranges(pid, lo, hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """INDEX_KEYS (row i's one positive is column i): the column tiles of the chunk [lo, hi)
    around row block pid's diagonal window [w0, w1). Returns e0, s1, full, ws, we, te: the
    whole tiles [lo, e0) before the window and [s1, full) after it, which need no test, the
    window's tiles [ws, we), and the partial last tile [full, te) unless the window holds it."""
    w0 = pid * BLOCK_M
    w1 = w0 + BLOCK_M
    full = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    te = tl.where((full >= w0) & (full < w1), full, hi)
    return tl.minimum(w0, full), tl.maximum(w1, lo), full, tl.maximum(lo, w0), tl.minimum(w1, hi), te


@triton.jit
def _whole_tiles(m_i, l_i, q, kp, x_ptr, c_ptr, r_ptr, offs_m, row_ok, rows_f, a, b, D,
                 s_xm, s_xd, s_cm, s_cd, NORMALIZE: tl.constexpr, EVEN_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 D_CHUNKS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """The log-sum-exp over the whole column tiles [a, b) of c, none a positive: no mask, the
    rows' factor in the exponent's multiply-add, and with one D chunk the tile's pointers `kp`
    moved by a scalar."""
    for start_n in range(a, b, BLOCK_N):
        t, _ = whole_dots(x_ptr, c_ptr, kp, q, offs_m, row_ok, start_n, b, D, s_xm, s_xd, s_cm,
                          s_cd, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
        if NORMALIZE:
            t = t * tl.load(r_ptr + start_n + tl.arange(0, BLOCK_N))[None, :]
        m_i, l_i = online_lse_full(m_i, l_i, t, rows_f)
    return m_i, l_i


@triton.jit
def _tested_tiles(m_i, l_i, pos, cnt, q, x_ptr, c_ptr, r_ptr, kc_ptr, key_i, offs_m, row_ok,
                  rows_f, a, b, hi, D, s_xm, s_xd, s_cm, s_cd, NORMALIZE: tl.constexpr,
                  DIAG_ONLY: tl.constexpr, INDEX_KEYS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """The column tiles [a, b) of c with every score tested: columns < hi, DIAG_ONLY's
    diagonal, and the positives (column i of row i with INDEX_KEYS, else equal keys)."""
    for start_n in range(a, b, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < hi
        s, _, _ = scores(x_ptr, c_ptr, q, offs_m, offs_n, row_ok, col_ok, D, s_xm, s_xd, s_cm,
                         s_cd, rows_f, r_ptr, NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS,
                         UPCAST, PRECISION)
        valid = col_ok[None, :]
        if DIAG_ONLY:
            valid = valid & (offs_n[None, :] == offs_m[:, None])
        m_i, l_i = online_lse(m_i, l_i, tl.where(valid, s, float("-inf")))
        if INDEX_KEYS:
            same = valid & (offs_n[None, :] == offs_m[:, None])
        else:
            key_j = tl.load(kc_ptr + offs_n, mask=col_ok, other=-1)
            same = valid & (key_j[None, :] == key_i[:, None])
        pos += tl.sum(tl.where(same, s, 0.0), 1)
        cnt += tl.sum(same.to(tl.int32), 1)
    return m_i, l_i, pos, cnt


@triton.jit
def _info_nce_fwd_kernel(
    x_ptr, rx_ptr, kx_ptr, y_ptr, ry_ptr, ky_ptr, n_ptr, rn_ptr, scale_ptr,
    loss_ptr, lse2_ptr, cnt_ptr, part_ptr,
    M, C, Q, CHUNK, D, s_xm, s_xd, s_ym, s_yd, s_nm, s_nd,
    NORMALIZE: tl.constexpr, DIAG_ONLY: tl.constexpr, HAS_N: tl.constexpr, SPLIT: tl.constexpr,
    INDEX_KEYS: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if D_CHUNKS == 1:
        q = load_tile(x_ptr, offs_m, row_ok, tl.arange(0, BLOCK_D), D, s_xm, s_xd, UPCAST)
    lo, hi, b_lo, b_hi = _chunk(pid, split, CHUNK, C, C, Q, pid * BLOCK_M < M, DIAG_ONLY, HAS_N,
                                BLOCK_M, BLOCK_N)
    # 1/tau is read from memory: a temperature schedule neither recompiles nor syncs.
    rows_f = row_scale(rx_ptr, offs_m, row_ok, tl.load(scale_ptr) * LOG2E, BLOCK_M, NORMALIZE)
    key_i = tl.load(kx_ptr + offs_m, mask=row_ok, other=-1)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_M,), dtype=tl.int32)
    if INDEX_KEYS:  # (never with DIAG_ONLY, which visits only the diagonal tiles)
        e0, s1, full, ws, we, te = _diag_ranges(pid, lo, hi, BLOCK_M, BLOCK_N)
        kp = col_ptrs(y_ptr, s_ym, s_yd, BLOCK_N, BLOCK_D)
        m_i, l_i = _whole_tiles(m_i, l_i, q, kp, x_ptr, y_ptr, ry_ptr, offs_m, row_ok, rows_f,
                                lo, e0, D, s_xm, s_xd, s_ym, s_yd, NORMALIZE, EVEN_D, BLOCK_M,
                                BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
        m_i, l_i = _whole_tiles(m_i, l_i, q, kp, x_ptr, y_ptr, ry_ptr, offs_m, row_ok, rows_f,
                                s1, full, D, s_xm, s_xd, s_ym, s_yd, NORMALIZE, EVEN_D, BLOCK_M,
                                BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
        m_i, l_i, pos, cnt = _tested_tiles(
            m_i, l_i, pos, cnt, q, x_ptr, y_ptr, ry_ptr, ky_ptr, key_i, offs_m, row_ok, rows_f,
            ws, we, hi, D, s_xm, s_xd, s_ym, s_yd, NORMALIZE, False, True, BLOCK_M, BLOCK_N,
            BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
        m_i, l_i, pos, cnt = _tested_tiles(
            m_i, l_i, pos, cnt, q, x_ptr, y_ptr, ry_ptr, ky_ptr, key_i, offs_m, row_ok, rows_f,
            full, te, hi, D, s_xm, s_xd, s_ym, s_yd, NORMALIZE, False, True, BLOCK_M, BLOCK_N,
            BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
    else:
        m_i, l_i, pos, cnt = _tested_tiles(
            m_i, l_i, pos, cnt, q, x_ptr, y_ptr, ry_ptr, ky_ptr, key_i, offs_m, row_ok, rows_f,
            lo, hi, hi, D, s_xm, s_xd, s_ym, s_yd, NORMALIZE, DIAG_ONLY, INDEX_KEYS, BLOCK_M,
            BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
    if HAS_N:
        # the bank: never a positive; its whole tiles, then the last, partial one
        b_full = b_lo + tl.maximum(b_hi - b_lo, 0) // BLOCK_N * BLOCK_N
        kp_n = col_ptrs(n_ptr, s_nm, s_nd, BLOCK_N, BLOCK_D)
        m_i, l_i = _whole_tiles(m_i, l_i, q, kp_n, x_ptr, n_ptr, rn_ptr, offs_m, row_ok, rows_f,
                                b_lo, b_full, D, s_xm, s_xd, s_nm, s_nd, NORMALIZE, EVEN_D,
                                BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
        for start_n in range(b_full, b_hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < b_hi
            s, _, _ = scores(x_ptr, n_ptr, q, offs_m, offs_n, row_ok, col_ok, D, s_xm, s_xd,
                             s_nm, s_nd, rows_f, rn_ptr, NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_D,
                             D_CHUNKS, UPCAST, PRECISION)
            m_i, l_i = online_lse(m_i, l_i, tl.where(col_ok[None, :], s, float("-inf")))
    if SPLIT:
        store_partial(part_ptr, split, M, offs_m, row_ok, m_i, l_i, pos, cnt, m_i, l_i)
    else:
        _finish(m_i, l_i, pos, cnt, offs_m, row_ok, loss_ptr, lse2_ptr, cnt_ptr)


@triton.jit
def _info_nce_merge_kernel(part_ptr, loss_ptr, lse2_ptr, cnt_ptr, M, splits,
                           BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    m_i, l_i, pos, cnt, _, _ = merge_partials(part_ptr, splits, M, offs_m, row_ok, BLOCK_M)
    _finish(m_i, l_i, pos, cnt, offs_m, row_ok, loss_ptr, lse2_ptr, cnt_ptr)


@triton.jit
def _finish(m_i, l_i, pos, cnt, offs_m, row_ok, loss_ptr, lse2_ptr, cnt_ptr):
    lse2 = m_i + tl.log2(l_i)
    loss = (lse2 - pos / tl.maximum(cnt, 1).to(tl.float32)) * LN2
    tl.store(loss_ptr + offs_m, loss, mask=row_ok)
    tl.store(lse2_ptr + offs_m, lse2, mask=row_ok)
    tl.store(cnt_ptr + offs_m, cnt, mask=row_ok)


@triton.jit
def _chunk(pid, split, CHUNK, C, C_ROWS, Q, LOCAL, DIAG_ONLY: tl.constexpr, HAS_N: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The columns of one split: the paired columns [lo, hi) and the bank columns [b_lo, b_hi)
    of the chunk [split * CHUNK, + CHUNK) of the virtual columns [paired; bank]. The paired part
    is all C columns, or with DIAG_ONLY only the row block's diagonal tiles (in split 0);
    rows past the local ones (LOCAL false) see the first C_ROWS paired columns and no bank."""
    c0 = split * CHUNK
    c1 = c0 + CHUNK
    if DIAG_ONLY:
        cv = 0
        lo = tl.where(split == 0, (pid * BLOCK_M) // BLOCK_N * BLOCK_N, 0)
        hi = tl.where(split == 0, tl.minimum((pid + 1) * BLOCK_M, C), 0)
    else:
        cv = C
        lo = c0
        hi = tl.minimum(c1, tl.where(LOCAL, C, C_ROWS))
    b_lo = 0
    b_hi = 0
    if HAS_N:
        b_lo = tl.maximum(c0 - cv, 0)
        b_hi = tl.where(LOCAL, tl.minimum(c1 - cv, Q), 0)
    return lo, hi, b_lo, b_hi


@triton.jit
def _grad_tiles(acc, q, x_ptr, y_ptr, ry_ptr, ky_ptr, key_x, offs_m, row_ok, rows_f, lse_x,
                g_x, gp_x, lsey_ptr, gy_ptr, gpy_ptr, a0, a1, hi, d_out, D, s_xm, s_xd, s_ym,
                s_yd, TESTED: tl.constexpr, NORMALIZE: tl.constexpr, X_ANCHOR: tl.constexpr,
                Y_ANCHOR: tl.constexpr, PAIRED: tl.constexpr, DIAG_ONLY: tl.constexpr,
                INDEX_KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """acc += dS @ yhat over the paired column tiles [a0, a1). TESTED: every score is tested
    (columns < hi, DIAG_ONLY's diagonal, the positives: column i of row i with INDEX_KEYS, else
    equal keys); otherwise the tiles are whole and hold no positive (nothing to test)."""
    for start_n in range(a0, a1, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < hi
        s, r_j, k = scores(x_ptr, y_ptr, q, offs_m, offs_n, row_ok, col_ok, D, s_xm, s_xd,
                           s_ym, s_yd, rows_f, ry_ptr, NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_D,
                           D_CHUNKS, UPCAST, PRECISION)
        if TESTED:
            valid = col_ok[None, :]
            if DIAG_ONLY:
                valid = valid & (offs_n[None, :] == offs_m[:, None])
            # masked before the exponent: exp2 of a masked score minus a finite lse may overflow
            s = tl.where(valid, s, float("-inf"))
        a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sub = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if X_ANCHOR:
            a += g_x[:, None] * tl.exp2(s - lse_x[:, None])
            sub += gp_x[:, None]
        if Y_ANCHOR:
            if TESTED:
                lse_y = tl.load(lsey_ptr + offs_n, mask=col_ok, other=float("inf"))
                g_y = tl.load(gy_ptr + offs_n, mask=col_ok, other=0.0)
                sub += tl.load(gpy_ptr + offs_n, mask=col_ok, other=0.0)[None, :]
            else:
                lse_y = tl.load(lsey_ptr + offs_n)
                g_y = tl.load(gy_ptr + offs_n)
            a += g_y[None, :] * tl.exp2(s - lse_y[None, :])
        if TESTED:
            if PAIRED:
                if INDEX_KEYS:
                    same = valid & (offs_n[None, :] == offs_m[:, None])
                else:
                    key_j = tl.load(ky_ptr + offs_n, mask=col_ok, other=-1)
                    same = valid & (key_j[None, :] == key_x[:, None])
                a -= tl.where(same, sub, 0.0)
            a = tl.where(valid, a, 0.0)
        acc = accumulate(acc, a, r_j, k, y_ptr, offs_n, col_ok, d_out, D, s_ym, s_yd, NORMALIZE,
                         D_CHUNKS, UPCAST, PRECISION)
    return acc


@triton.jit
def _info_nce_bwd_kernel(
    x_ptr, rx_ptr, kx_ptr, lsex_ptr, gx_ptr, gpx_ptr,
    y_ptr, ry_ptr, ky_ptr, lsey_ptr, gy_ptr, gpy_ptr,
    n_ptr, rn_ptr, scale_ptr, out_ptr,
    R, RL, C, CL, Q, CHUNK, D, s_xm, s_xd, s_ym, s_yd, s_nm, s_nd, s_os, s_om, s_od,
    NORMALIZE: tl.constexpr, X_ANCHOR: tl.constexpr, Y_ANCHOR: tl.constexpr,
    PAIRED: tl.constexpr, DIAG_ONLY: tl.constexpr, HAS_N: tl.constexpr,
    INDEX_KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[i] = (1/tau) sum_j dS_ij yhat_j (+ the bank columns) for the R rows of x.

    X_ANCHOR / Y_ANCHOR: whether the rows / the columns carry a direction's statistics (lse,
    upstream g, g / |pos|); PAIRED: the columns are the rows' batch counterparts (positives by
    key, DIAG_ONLY applies) rather than bank rows; INDEX_KEYS (PAIRED, not DIAG_ONLY): row i's
    one positive is column i, so only the diagonal window and a partial last tile are tested.
    Rows from RL on (not local) pair with the first CL columns only and skip the bank."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    chunk = tl.program_id(2)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < R
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if D_CHUNKS == 1:
        q = load_tile(x_ptr, offs_m, row_ok, offs_d, D, s_xm, s_xd, UPCAST)
    inv_tau = tl.load(scale_ptr)
    rows_f = row_scale(rx_ptr, offs_m, row_ok, inv_tau * LOG2E, BLOCK_M, NORMALIZE)
    lse_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
    g_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
    gp_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if X_ANCHOR:
        lse_x = tl.load(lsex_ptr + offs_m, mask=row_ok, other=float("inf"))
        g_x = tl.load(gx_ptr + offs_m, mask=row_ok, other=0.0)
        gp_x = tl.load(gpx_ptr + offs_m, mask=row_ok, other=0.0)
    key_x = offs_m
    if PAIRED and not INDEX_KEYS:
        key_x = tl.load(kx_ptr + offs_m, mask=row_ok, other=-1)
    d_out = chunk * BLOCK_D + offs_d
    local = pid * BLOCK_M < RL

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, hi, b_lo, b_hi = _chunk(pid, split, CHUNK, C, CL, Q, local, DIAG_ONLY, HAS_N, BLOCK_M,
                                BLOCK_N)
    if INDEX_KEYS:  # as in the forward: whole tiles around the row block's diagonal window
        e0, s1, full, ws, we, te = _diag_ranges(pid, lo, hi, BLOCK_M, BLOCK_N)
        acc = _grad_tiles(acc, q, x_ptr, y_ptr, ry_ptr, ky_ptr, key_x, offs_m, row_ok, rows_f,
                          lse_x, g_x, gp_x, lsey_ptr, gy_ptr, gpy_ptr, lo, e0, hi, d_out, D,
                          s_xm, s_xd, s_ym, s_yd, False, NORMALIZE, X_ANCHOR, Y_ANCHOR, PAIRED,
                          False, True, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
        acc = _grad_tiles(acc, q, x_ptr, y_ptr, ry_ptr, ky_ptr, key_x, offs_m, row_ok, rows_f,
                          lse_x, g_x, gp_x, lsey_ptr, gy_ptr, gpy_ptr, s1, full, hi, d_out, D,
                          s_xm, s_xd, s_ym, s_yd, False, NORMALIZE, X_ANCHOR, Y_ANCHOR, PAIRED,
                          False, True, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
        acc = _grad_tiles(acc, q, x_ptr, y_ptr, ry_ptr, ky_ptr, key_x, offs_m, row_ok, rows_f,
                          lse_x, g_x, gp_x, lsey_ptr, gy_ptr, gpy_ptr, ws, we, hi, d_out, D,
                          s_xm, s_xd, s_ym, s_yd, True, NORMALIZE, X_ANCHOR, Y_ANCHOR, PAIRED,
                          False, True, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
        acc = _grad_tiles(acc, q, x_ptr, y_ptr, ry_ptr, ky_ptr, key_x, offs_m, row_ok, rows_f,
                          lse_x, g_x, gp_x, lsey_ptr, gy_ptr, gpy_ptr, full, te, hi, d_out, D,
                          s_xm, s_xd, s_ym, s_yd, True, NORMALIZE, X_ANCHOR, Y_ANCHOR, PAIRED,
                          False, True, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
    else:
        acc = _grad_tiles(acc, q, x_ptr, y_ptr, ry_ptr, ky_ptr, key_x, offs_m, row_ok, rows_f,
                          lse_x, g_x, gp_x, lsey_ptr, gy_ptr, gpy_ptr, lo, hi, hi, d_out, D, s_xm,
                          s_xd, s_ym, s_yd, True, NORMALIZE, X_ANCHOR, Y_ANCHOR, PAIRED,
                          DIAG_ONLY, False, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST,
                          PRECISION)
    if HAS_N:  # bank columns: only the rows' own direction (X_ANCHOR), never positives
        for start_n in range(b_lo, b_hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < b_hi
            s, r_j, k = scores(x_ptr, n_ptr, q, offs_m, offs_n, row_ok, col_ok, D, s_xm, s_xd,
                               s_nm, s_nd, rows_f, rn_ptr, NORMALIZE, BLOCK_M, BLOCK_N,
                               BLOCK_D, D_CHUNKS, UPCAST, PRECISION)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            a = g_x[:, None] * tl.exp2(s - lse_x[:, None])
            acc = accumulate(acc, a, r_j, k, n_ptr, offs_n, col_ok, d_out, D, s_nm, s_nd,
                             NORMALIZE, D_CHUNKS, UPCAST, PRECISION)
    store_rows(out_ptr + split * s_os, acc * inv_tau, offs_m, row_ok, d_out, D, s_om, s_od)


# ------------------------------------------------------------------ launch helpers
def _config(dtype, D, block_d=None):
    # small interpreter tiles, so that the tests' small shapes span several row and column tiles
    # IEEE fp32: 32 x 32 tiles, the backward with both directions' statistics spills at 64 rows
    return config(dtype, D, block_d, interp_block=16, ieee_block=(32, 32))[:2]


def _strides(t):
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def plan(rows, C, Q, D, dtype, sms, diag_only=False, block_d=None, splits=None):
    """Launch plan for `rows` anchor rows against C paired columns (only their diagonal tiles
    with diag_only) and Q bank columns: (meta, launch options, grid, column chunk) of the
    forward (the grid gets a third axis of meta["D_CHUNKS"] in the backward). `sms`: the SM
    count the column splits fill; `splits` overrides their number. Device-free, so that a
    static report can compile exactly what a launch would run."""
    meta, launch = _config(dtype, D, block_d)
    row_blocks = cdiv(rows, meta["BLOCK_M"])
    cols = (0 if diag_only else C) + Q
    n, chunk = column_splits(row_blocks, cols, meta["BLOCK_N"], sms, splits)
    return meta, launch, (row_blocks, n), chunk


def forward(x, rx, kx, y, ry, ky, n, rn, inv_tau, M, normalize, diag_only, block_d=None,
            splits=None, index_keys=False):
    """Per-row losses (M,) fp32, base-2 log-sum-exp (x's rows,) fp32 (+inf beyond M) and
    positive counts (M,) int32 of the first M rows of x against the columns [y; n].

    rx, ry, rn: fp32 inverse norms (ignored unless normalize); kx, ky: int32 or int64 keys; n may be
    None; inv_tau: (1,) fp32 tensor on x's device; splits: the column split count (None: fill
    the device); index_keys: kx / ky are the row indices (no labels), so row i's one positive
    is column i and only the diagonal tiles test for it (diag_only visits only those anyway)."""
    D = x.shape[1]
    has_n = n is not None
    C, Q = y.shape[0], n.shape[0] if has_n else 0
    meta, launch, grid, chunk = plan(M, C, Q, D, x.dtype, sm_count(x.device), diag_only,
                                     block_d, splits)
    dev = x.device
    loss = torch.empty(M, device=dev, dtype=torch.float32)
    lse2 = (torch.empty(M, device=dev, dtype=torch.float32) if x.shape[0] == M else
            torch.full((x.shape[0],), float("inf"), device=dev, dtype=torch.float32))
    cnt = torch.empty(M, device=dev, dtype=torch.int32)
    split = grid[1] > 1
    part = torch.empty((grid[1], NSTAT, M) if split else (1,), device=dev, dtype=torch.float32)
    wrap_triton(_info_nce_fwd_kernel)[grid](
        x, rx, kx, y, ry, ky, n if has_n else x, rn if has_n else rx, inv_tau, loss, lse2, cnt,
        part, M, C, Q, chunk, D, *_strides(x), *_strides(y), *_strides(n),
        NORMALIZE=normalize, DIAG_ONLY=diag_only, HAS_N=has_n, SPLIT=split,
        INDEX_KEYS=index_keys and not diag_only, EVEN_D=D % meta["BLOCK_D"] == 0, **meta, **launch)
    if split:
        wrap_triton(_info_nce_merge_kernel)[(cdiv(M, 128),)](
            part, loss, lse2, cnt, M, grid[1], BLOCK_M=128)
    return loss, lse2, cnt


def _rows_grad(x, rx, kx, stats_x, y, ry, ky, stats_y, n, rn, inv_tau, RL, CL, normalize,
               paired, diag_only, block_d, splits=None, index_keys=False):
    """(1/tau) dS @ [yhat; nhat] for every row of x, fp32 (x's rows, D). stats_*: (lse2, g,
    g / |pos|) of the rows / columns, or None where they carry no direction."""
    R, D = x.shape
    has_n = n is not None
    C, Q = y.shape[0], n.shape[0] if has_n else 0
    meta, launch, grid, chunk = plan(R, C, Q, D, x.dtype, sm_count(x.device), diag_only,
                                     block_d, splits)
    grid = (*grid, meta["D_CHUNKS"])
    out = torch.empty((grid[1], R, D), device=x.device, dtype=torch.float32)
    sx = stats_x if stats_x is not None else (rx, rx, rx)  # placeholders, not read
    sy = stats_y if stats_y is not None else (ry, ry, ry)
    wrap_triton(_info_nce_bwd_kernel)[grid](
        x, rx, kx, *sx, y, ry, ky, *sy, n if has_n else x, rn if has_n else rx, inv_tau, out,
        R, RL, C, CL, Q, chunk, D, *_strides(x), *_strides(y), *_strides(n), out.stride(0),
        out.stride(1), out.stride(2), NORMALIZE=normalize, X_ANCHOR=stats_x is not None,
        Y_ANCHOR=stats_y is not None, PAIRED=paired, DIAG_ONLY=diag_only, HAS_N=has_n,
        INDEX_KEYS=index_keys and paired and not diag_only, **meta, **launch)
    return out[0] if grid[1] == 1 else out.sum(0)


def backward(x, rx, kx, y, ry, ky, n, rn, inv_tau, M, normalize, diag_only, symmetric,
             lse1, lse2, g, gpos, h, hpos, need_x, need_y, need_n, block_d=None,
             index_keys=False):
    """dL/dxhat, dL/dyhat, dL/dnhat (fp32; None where not needed) of the per-row losses.

    lse1 (x's rows,), lse2 (y's rows,): base-2 lse of each direction (+inf beyond M); g, gpos
    (M,): upstream gradient of the query rows and the same over the positive counts; h, hpos
    likewise for the key rows (None unless symmetric); index_keys as in `forward`."""
    def pad(v, rows):  # contiguous: an upstream gradient of a sum is an expanded scalar
        return v.contiguous() if rows == M else torch.cat([v, v.new_zeros(rows - M)])

    sx = (lse1, pad(g, x.shape[0]), pad(gpos, x.shape[0]))
    sy = (lse2, pad(h, y.shape[0]), pad(hpos, y.shape[0])) if symmetric else None
    dx = dy = dn = None
    if need_x:
        dx = _rows_grad(x, rx, kx, sx, y, ry, ky, sy, n, rn, inv_tau, M, M, normalize, True,
                        diag_only, block_d, index_keys=index_keys)
    if need_y:
        dy = _rows_grad(y, ry, ky, sy, x, rx, kx, sx, None, None, inv_tau, M, M, normalize,
                        True, diag_only, block_d, index_keys=index_keys)
    if need_n:
        dn = _rows_grad(n, rn, kx, None, x[:M], rx[:M], kx,
                        (lse1[:M], pad(g, M), pad(gpos, M)), None, None, inv_tau, 0, M,
                        normalize, False, False, block_d)
    return dx, dy, dn
