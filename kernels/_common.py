"""Helpers shared by the kernel files. nt_xent and info_nce are the same score-tile kernel
over different columns, and share its device pieces here (a tile of scores, the online
log-sum-exp, one column tile of the gradient) and its tile / launch configuration; the
@triton.jit functions are inlined into each kernel."""
import functools
import os

import torch
import triton
import triton.language as tl

MAX_BLOCK_D = 256


def interpreting():
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1, read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a, b):
    """Integer ceil-division. triton.cdiv is a constexpr function and costs ~6 us per host
    call, which adds up over the launches of a step."""
    return -(-a // b)


@triton.jit
def load_tile(u_ptr, offs_r, r_ok, offs_d, D, s_um, s_ud, UPCAST: tl.constexpr):
    """(rows, BLOCK_D) tile of u, zero outside the rows and past D, fp32 when UPCAST."""
    t = tl.load(u_ptr + offs_r.to(tl.int64)[:, None] * s_um + offs_d[None, :] * s_ud,
                mask=r_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def row_scale(r_ptr, offs_m, row_ok, scale, BLOCK_M: tl.constexpr, NORMALIZE: tl.constexpr):
    """Per-row factor of the scores: r_i / tau in base-2 units (scale = log2(e) / tau)."""
    if NORMALIZE:
        f = tl.load(r_ptr + offs_m, mask=row_ok, other=0.0) * scale
    else:
        f = tl.zeros((BLOCK_M,), dtype=tl.float32) + scale
    return f


@triton.jit
def scores(a_ptr, b_ptr, q, offs_m, offs_n, row_ok, col_ok, D, s_am, s_ad, s_bm, s_bd,
           rows_f, r_ptr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
           UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scores rows_f_m r_n (a_m . b_n) in fp32, r_n read from r_ptr with
    NORMALIZE. Returns (scores, r_n, column tile): with one D chunk `q` is the
    preloaded row tile of a, and the column tile of b is returned for the backward's dot."""
    offs_d = tl.arange(0, BLOCK_D)
    if D_CHUNKS == 1:
        k = load_tile(b_ptr, offs_n, col_ok, offs_d, D, s_bm, s_bd, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    else:
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in range(D_CHUNKS):
            d = c * BLOCK_D + offs_d
            qc = load_tile(a_ptr, offs_m, row_ok, d, D, s_am, s_ad, UPCAST)
            kc = load_tile(b_ptr, offs_n, col_ok, d, D, s_bm, s_bd, UPCAST)
            s = tl.dot(qc, tl.trans(kc), s, input_precision=PRECISION)
        k = s  # unused placeholder with D chunks
    s = s * rows_f[:, None]
    r_n = col_ok.to(tl.float32)  # the columns' factor without normalisation (never read)
    if NORMALIZE:
        r_n = tl.load(r_ptr + offs_n, mask=col_ok, other=0.0)
        s = s * r_n[None, :]
    return s, r_n, k


@triton.jit
def online_lse(m_i, l_i, s_masked):
    """One column tile of the online base-2 log-sum-exp (running max m, scaled sum l)."""
    m_new = tl.maximum(m_i, tl.max(s_masked, 1))
    # a row whose columns so far are all masked keeps m = -inf: shift by 0 there
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_shift) + tl.sum(tl.exp2(s_masked - m_shift[:, None]), 1)
    return m_new, l_i


@triton.jit
def accumulate(acc, a, r_n, k, b_ptr, offs_n, col_ok, d_out, D, s_bm, s_bd,
               NORMALIZE: tl.constexpr, D_CHUNKS: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    """acc += (a * r_n) @ b[offs_n, d_out]: one column tile of dL/d(normalised row) (before
    the 1/tau), with dL/dS_mn = a and the columns' normalisation r_n."""
    if NORMALIZE:
        a = a * r_n[None, :]
    if D_CHUNKS == 1:
        v = k
    else:
        v = load_tile(b_ptr, offs_n, col_ok, d_out, D, s_bm, s_bd, UPCAST)
    return tl.dot(a.to(v.dtype), v, acc, input_precision=PRECISION)


@triton.jit
def store_rows(out_ptr, acc, offs_m, row_ok, d_out, D, s_om, s_od):
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * s_om + d_out[None, :] * s_od, acc,
             mask=row_ok[:, None] & (d_out[None, :] < D))


def dot_precision(dtype):
    """fp32 follows torch.matmul's setting (IEEE unless allow_tf32); the interpreter is exact;
    16-bit inputs ignore it."""
    if dtype == torch.float32 and (interpreting() or not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def config(dtype, D, block_d=None, interp_block=32):
    """Tile sizes (meta) and launch options of a score-tile kernel. block_d overrides the D
    chunk (a power of two >= 16; tests use it to exercise the chunked path at small D);
    interp_block is the row / column tile in the interpreter (small, so that the tests' small
    shapes span several tiles). Cached: it runs on every launch."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return _config_cached(dtype, D, block_d, interpreting(), tf32, interp_block)


@functools.lru_cache(maxsize=256)
def _config_cached(dtype, D, block_d, interp, tf32, interp_block):
    if block_d is None:
        block_d = min(max(16, 1 << max(D - 1, 0).bit_length()), MAX_BLOCK_D)
    d_chunks = cdiv(D, block_d)
    if interp:
        block_m = block_n = interp_block
        launch = {}
    else:
        # 16-bit tiles at D <= 128 fit 128 x 64 with 8 warps; fp32 / wide tiles use 64 x 64.
        small = dtype != torch.float32 and block_d <= 128
        block_m, block_n = (128, 64) if small else (64, 64)
        launch = {"num_warps": 8 if small or block_d > 64 else 4, "num_stages": 2}
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, D_CHUNKS=d_chunks,
                UPCAST=interp, PRECISION=dot_precision(dtype))
    return meta, launch
