"""Helpers shared by the kernel files. nt_xent and info_nce are the same score-tile kernel
over different columns, and share its device pieces here (a tile of scores, the online
log-sum-exp, the merge of column splits, one column tile of the gradient) and its tile /
launch configuration; the @triton.jit functions are inlined into each kernel.

Column splits (flash-decoding): when the row blocks alone would leave SMs idle, the column
range is cut into `splits` chunks of whole row blocks, one program per (row block, chunk).
A forward program stores its chunk's partial statistics (running max m, scaled sum l, the
positive sum / count, and m, l over the positives) in a (splits, NSTAT, rows) buffer that
one small merge program per row block combines in a fixed order; a backward program stores
its chunk's partial gradient in a (splits, rows, D) buffer that is summed. Both are
deterministic (no atomics)."""
import functools
import os

import torch
import triton
import triton.language as tl

MAX_BLOCK_D = 256
NSTAT = 6  # partial statistics per row and split: m, l, pos, cnt, m over positives, l over them
INTERP_SMS = 4  # the "SM count" in the interpreter: small shapes already split their columns
STATIC_SMS = 132  # H100 / H200: what a launch prepared off a GPU (the static report) plans for


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
def col_ptrs(b_ptr, s_bm, s_bd, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers of a (BLOCK_N, BLOCK_D) column tile at row 0, computed once outside a loop:
    load_cols moves them by a scalar per tile instead of recomputing 64-bit addresses."""
    return (b_ptr + tl.arange(0, BLOCK_N)[:, None].to(tl.int64) * s_bm
            + tl.arange(0, BLOCK_D)[None, :] * s_bd)


@triton.jit
def load_cols(ptrs, start, s_bm, D, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """The column tile of rows start.. (all in range), zero past D unless EVEN_D."""
    p = ptrs + tl.cast(start, tl.int64) * s_bm  # start may be a Python int in the interpreter
    if EVEN_D:
        t = tl.load(p)
    else:
        t = tl.load(p, mask=(tl.arange(0, BLOCK_D) < D)[None, :], other=0.0)
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
def col_scale(r_ptr, offs_n, col_ok, NORMALIZE: tl.constexpr):
    """The columns' inverse norms r_n (ones without normalisation; only read with it)."""
    if NORMALIZE:
        r_n = tl.load(r_ptr + offs_n, mask=col_ok, other=0.0)
    else:
        r_n = col_ok.to(tl.float32)
    return r_n


@triton.jit
def dots(a_ptr, b_ptr, q, offs_m, offs_n, row_ok, col_ok, D, s_am, s_ad, s_bm, s_bd,
         r_ptr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, UPCAST: tl.constexpr,
         PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) products t = (a_m . b_n) r_n in fp32, without the rows' factor (the
    caller folds it into the exponent's multiply-add). Returns (t, r_n, column tile): with one
    D chunk `q` is the preloaded row tile of a, and the column tile of b is returned for the
    backward's dot."""
    offs_d = tl.arange(0, BLOCK_D)
    if D_CHUNKS == 1:
        k = load_tile(b_ptr, offs_n, col_ok, offs_d, D, s_bm, s_bd, UPCAST)
        t = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    else:
        t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in range(D_CHUNKS):
            d = c * BLOCK_D + offs_d
            qc = load_tile(a_ptr, offs_m, row_ok, d, D, s_am, s_ad, UPCAST)
            kc = load_tile(b_ptr, offs_n, col_ok, d, D, s_bm, s_bd, UPCAST)
            t = tl.dot(qc, tl.trans(kc), t, input_precision=PRECISION)
        k = t  # unused placeholder with D chunks
    r_n = col_scale(r_ptr, offs_n, col_ok, NORMALIZE)
    if NORMALIZE:
        t = t * r_n[None, :]
    return t, r_n, k


@triton.jit
def whole_dots(a_ptr, b_ptr, kp, q, offs_m, row_ok, start, n_cols, D, s_am, s_ad, s_bm, s_bd,
               EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    """(products a_m . b_n, column tile) of a whole column tile start.. (every column below
    n_cols), without the columns' factor; with one D chunk the tile's pointers `kp` (col_ptrs)
    only move by start."""
    if D_CHUNKS == 1:
        k = load_cols(kp, start, s_bm, D, EVEN_D, UPCAST, BLOCK_D)
        t = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    else:
        offs_n = start + tl.arange(0, BLOCK_N)
        t, _, k = dots(a_ptr, b_ptr, q, offs_m, offs_n, row_ok, offs_n < n_cols, D, s_am, s_ad,
                       s_bm, s_bd, b_ptr, False, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST,
                       PRECISION)
    return t, k


@triton.jit
def scores(a_ptr, b_ptr, q, offs_m, offs_n, row_ok, col_ok, D, s_am, s_ad, s_bm, s_bd,
           rows_f, r_ptr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
           UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scores rows_f_m r_n (a_m . b_n) in fp32 (base-2 units), r_n and
    the column tile as in `dots`."""
    t, r_n, k = dots(a_ptr, b_ptr, q, offs_m, offs_n, row_ok, col_ok, D, s_am, s_ad, s_bm,
                     s_bd, r_ptr, NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, UPCAST,
                     PRECISION)
    return t * rows_f[:, None], r_n, k


@triton.jit
def online_lse(m_i, l_i, s_masked):
    """One column tile of the online base-2 log-sum-exp (running max m, scaled sum l) over
    scores that may be masked to -inf."""
    m_new = tl.maximum(m_i, tl.max(s_masked, 1))
    # a row whose columns so far are all masked keeps m = -inf: shift by 0 there
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_shift) + tl.sum(tl.exp2(s_masked - m_shift[:, None]), 1)
    return m_new, l_i


@triton.jit
def online_lse_full(m_i, l_i, t, f):
    """online_lse over a tile whose every score f_m t_mn is valid (f > 0): the max is taken
    over t and the rows' factor rides in the exponent's multiply-add, one multiply less per
    score; m stays finite after the first such tile."""
    m_new = tl.maximum(m_i, tl.max(t, 1) * f)
    p = tl.exp2(t * f[:, None] - m_new[:, None])
    return m_new, l_i * tl.exp2(m_i - m_new) + tl.sum(p, 1)


@triton.jit
def store_partial(part_ptr, split, R, offs_m, row_ok, m_i, l_i, pos, cnt, mp_i, lp_i):
    """One column split's statistics of its rows, merged by merge_partials."""
    base = part_ptr + split * (6 * R) + offs_m
    tl.store(base, m_i, mask=row_ok)
    tl.store(base + R, l_i, mask=row_ok)
    tl.store(base + 2 * R, pos, mask=row_ok)
    tl.store(base + 3 * R, cnt.to(tl.float32), mask=row_ok)
    tl.store(base + 4 * R, mp_i, mask=row_ok)
    tl.store(base + 5 * R, lp_i, mask=row_ok)


@triton.jit
def merge_partials(part_ptr, splits, R, offs_m, row_ok, BLOCK_M: tl.constexpr):
    """The statistics of all column splits of the rows offs_m, combined in split order:
    (m, l, pos, cnt, mp, lp) as one unsplit program would have them."""
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mp_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    lp_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s in range(0, splits):
        base = part_ptr + s * (6 * R) + offs_m
        m_s = tl.load(base, mask=row_ok, other=float("-inf"))
        l_s = tl.load(base + R, mask=row_ok, other=0.0)
        pos += tl.load(base + 2 * R, mask=row_ok, other=0.0)
        cnt += tl.load(base + 3 * R, mask=row_ok, other=0.0)
        m_i, l_i = _merge_lse(m_i, l_i, m_s, l_s)
        mp_s = tl.load(base + 4 * R, mask=row_ok, other=float("-inf"))
        lp_s = tl.load(base + 5 * R, mask=row_ok, other=0.0)
        mp_i, lp_i = _merge_lse(mp_i, lp_i, mp_s, lp_s)
    return m_i, l_i, pos, cnt.to(tl.int32), mp_i, lp_i


@triton.jit
def _merge_lse(m_a, l_a, m_b, l_b):
    m = tl.maximum(m_a, m_b)
    shift = tl.where(m == float("-inf"), 0.0, m)  # both empty: l stays 0
    return m, l_a * tl.exp2(m_a - shift) + l_b * tl.exp2(m_b - shift)


@triton.jit
def accumulate(acc, a, r_n, k, b_ptr, offs_n, col_ok, d_out, D, s_bm, s_bd,
               NORMALIZE: tl.constexpr, D_CHUNKS: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    """acc += (a * r_n) @ b[offs_n, d_out]: one column tile of dL/d(normalised row) (before
    the 1/tau), with dL/dS_mn = a and the columns' normalisation r_n."""
    if NORMALIZE:
        a = a * r_n[None, :]
    return accumulate_scaled(acc, a, k, b_ptr, offs_n, col_ok, d_out, D, s_bm, s_bd, D_CHUNKS,
                             UPCAST, PRECISION)


@triton.jit
def accumulate_scaled(acc, a, k, b_ptr, offs_n, col_ok, d_out, D, s_bm, s_bd,
                      D_CHUNKS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b[offs_n, d_out] for an `a` that already carries the columns' factor."""
    if D_CHUNKS == 1:
        v = k
    else:
        v = load_tile(b_ptr, offs_n, col_ok, d_out, D, s_bm, s_bd, UPCAST)
    return tl.dot(a.to(v.dtype), v, acc, input_precision=PRECISION)


@triton.jit
def store_rows(out_ptr, acc, offs_m, row_ok, d_out, D, s_om, s_od):
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * s_om + d_out[None, :] * s_od, acc,
             mask=row_ok[:, None] & (d_out[None, :] < D))


# ------------------------------------------------------------------ host side
def tf32_enabled():
    """Whether torch.matmul would use TF32 for fp32 CUDA inputs: the legacy flag
    (torch.backends.cuda.matmul.allow_tf32, which set_float32_matmul_precision('high' /
    'medium') sets), or where the newer fp32_precision API was mixed in (torch then refuses
    to answer through the legacy flag) the newer setting."""
    m = torch.backends.cuda.matmul
    try:
        return bool(m.allow_tf32)
    except RuntimeError:
        return getattr(m, "fp32_precision", "ieee") == "tf32"


def dot_precision(dtype):
    """fp32 follows torch.matmul's setting (IEEE unless TF32 is enabled, see tf32_enabled);
    the interpreter is exact; 16-bit inputs ignore it."""
    if dtype == torch.float32 and (interpreting() or not tf32_enabled()):
        return "ieee"
    return "tf32"


def config(dtype, D, block_d=None, interp_block=32, ieee_block=(64, 32)):
    """Tile sizes (meta) and launch options of a score-tile kernel. block_d overrides the D
    chunk (a power of two >= 16; tests use it to exercise the chunked path at small D);
    interp_block is the row / column tile in the interpreter (small, so that the tests' small
    shapes span several tiles); ieee_block the (rows, columns) tile of IEEE fp32 products.
    Returns (meta, launch, even_d): even_d = D is a multiple of the D chunk. Cached: it runs
    on every launch."""
    return _config_cached(dtype, D, block_d, interpreting(), dot_precision(dtype), interp_block,
                          ieee_block)


@functools.lru_cache(maxsize=256)
def _config_cached(dtype, D, block_d, interp, precision, interp_block, ieee_block):
    ieee = dtype == torch.float32 and precision == "ieee" and not interp
    if block_d is None:
        # IEEE fp32 products run on the FMA units with both operands in registers: 16-wide D
        # chunks and small tiles keep every kernel spill-free on sm_80 and sm_90 (the
        # backward then recomputes the scores once per 16 columns of its output)
        cap = 16 if ieee else MAX_BLOCK_D
        block_d = min(max(16, 1 << max(D - 1, 0).bit_length()), cap)
        if D > cap and not ieee:
            block_d = 32  # D in chunks: wider chunks of both operands spill on sm_80
    d_chunks = cdiv(D, block_d)
    if interp:
        block_m = block_n = interp_block
        launch = {}
    elif ieee:
        block_m, block_n = ieee_block
        launch = {"num_warps": 4, "num_stages": 2}
    else:
        # 16-bit tiles at D <= 128 fit 128 x 64 with 8 warps; TF32 / wide / chunked tiles use
        # 64 x 64 (4 warps only for one chunk of <= 64)
        small = dtype != torch.float32 and block_d <= 128 and d_chunks == 1
        block_m, block_n = (128, 64) if small else (64, 64)
        launch = {"num_warps": 4 if d_chunks == 1 and block_d <= 64 else 8, "num_stages": 2}
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, D_CHUNKS=d_chunks,
                UPCAST=interp, PRECISION=precision)
    even_d = D % block_d == 0  # constexpr of the kernels that take it (no D mask)
    return meta, launch, even_d


def sm_count(device):
    """Streaming multiprocessors the column splits of a launch on `device` plan for: the
    environment variable SDCLR_FAST_SMS where set (read at call time), INTERP_SMS in the
    interpreter, the device's own count on CUDA, and STATIC_SMS for a launch prepared off a
    GPU without the interpreter (the static kernel report compiling for H100)."""
    env = os.environ.get("SDCLR_FAST_SMS")
    if env:
        return int(env)
    if interpreting():
        return INTERP_SMS
    if device.type != "cuda":
        return STATIC_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _cuda_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def column_splits(row_blocks, cols, align, sms, splits=None):
    """(splits, chunk): the columns [0, cols) cut into `splits` chunks of `chunk` columns, a
    multiple of `align`, so that row_blocks * splits programs come close to filling `sms`
    SMs without a second partial wave (one program per SM: the score tiles use most of the
    registers). `splits` overrides the count (tests); it may come out lower so that no
    chunk is empty."""
    if splits is None:
        splits = max(1, sms // max(row_blocks, 1))
    chunk = max(align, cdiv(cdiv(max(cols, 1), splits), align) * align)
    return max(1, cdiv(cols, chunk)), chunk
