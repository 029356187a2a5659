"""Triton block-sparse GEMMs for a linear layer whose weight is multiplied by a 0/1 mask.

x (M, K), weight and mask (N, K), y (M, N):
  forward      y[m, n]  = sum_k x[m, k] * (w * mask)[n, k]
  grad_input   dx[m, k] = sum_n dy[m, n] * (w * mask)[n, k]
  grad_weight  dw[n, k] = mask * sum_m dy[m, n] * x[m, k]
The weight is cut into BLOCK_N x BLOCK_K tiles. The host (sdclr_fast.ops.masked_linear) lists,
once per mask change, the tiles that hold a kept weight: the same `MaskTiles` as the masked
convolution with one tap and one group (occupancy[0, nt, 0, kt]; per output tile row the
active K tiles and their packed index). `kernels.masked_conv.pack` writes the masked weight of
only those tiles into P (n_active, BLOCK_N, BLOCK_K) in the compute dtype (a select, so inf/nan
in pruned weights never reach a product); forward and grad_input read P, never the weight.

`_gemm_kernel` is the forward and (TRANSPOSED) the grad_input: a program owns a BLOCK_M x
BLOCK_N output tile and walks only the listed K tiles of its column tile (forward: the
non-empty K tiles of weight row tile nt; grad_input: the non-empty N tiles of weight column
tile kt, each P tile read untransposed). Programs are ordered in groups of GROUP_M row tiles so
that consecutive programs share their activation rows in L2 (Triton's matmul tutorial).
`_wgt_kernel` computes grad_weight on the non-empty tiles only, one program per (tile, slice of
M), each slice writing its own fp32 partial (deterministic, no atomics).

Everything accumulates in fp32; row offsets are int64 (M = batch x tokens is large).
Launch configs are the masked convolution's `default_config` for the same weight tile (the K
loop of both GEMMs reads its indices from memory like the convolution's), one interpreter
config under TRITON_INTERPRET=1.
"""

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting
# shared with the masked convolution: the tile packer (used by the op), the launch config
# (largest row tile whose pipeline buffers fit the GPU's shared memory) and the split of the
# grad_weight reduction
from .masked_conv import default_config, num_splits, pack  # noqa: F401


@triton.jit
def _gemm_kernel(a_ptr, p_ptr, out_ptr, b_ptr, idx_ptr, pk_ptr, cnt_ptr,
                 M, NO, KA, N_T, IDX_W, s_am, s_ak, s_om, s_on,
                 TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # out[m, n] = sum over listed k tiles of A[m, k tile] @ W_tile; A has KA columns, out NO.
    # Forward: P[j] is (BLOCK_N = out, BLOCK_K = in), read transposed. TRANSPOSED: P[j] is
    # (BLOCK_K = out of the forward, BLOCK_N = in of the forward), read as it is.
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * N_T
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    a_rows = a_ptr + offs_m.to(tl.int64) * s_am
    ar_k = tl.arange(0, BLOCK_K)
    ar_n = tl.arange(0, BLOCK_N)
    if TRANSPOSED:
        p_off = ar_k[:, None] * BLOCK_N + ar_n[None, :]
    else:
        p_off = ar_n[None, :] * BLOCK_K + ar_k[:, None]

    count = tl.load(cnt_ptr + pid_n)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, count):
        kt = tl.load(idx_ptr + pid_n * IDX_W + i)
        j = tl.load(pk_ptr + pid_n * IDX_W + i)
        offs_k = kt * BLOCK_K + ar_k
        at = tl.load(a_rows[:, None] + (offs_k * s_ak)[None, :],
                     mask=m_ok[:, None] & (offs_k < KA)[None, :], other=0.0)
        wt = tl.load(p_ptr + j.to(tl.int64) * (BLOCK_N * BLOCK_K) + p_off)
        if UPCAST:
            at = at.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(at, wt, acc, input_precision=PRECISION)

    offs_n = pid_n * BLOCK_N + ar_n
    n_ok = offs_n < NO
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * s_om + (offs_n * s_on)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _wgt_kernel(x_ptr, dy_ptr, m_ptr, dw_ptr, tiles_ptr, M, N, K, M_PER_SPLIT,
                s_xm, s_xk, s_dm, s_dn, s_mn, s_mk, s_gs, s_gn, s_gk,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # dw tile (nt, kt) over rows [pid_s * M_PER_SPLIT, ...) of the reduction; tiles_ptr rows are
    # MaskTiles.wgt_tiles (g, nt, tap, kt) with g = tap = 0.
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    nt = tl.load(tiles_ptr + pid_t * 4 + 1)
    kt = tl.load(tiles_ptr + pid_t * 4 + 3)
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_ok = offs_k < K
    m_start = pid_s * M_PER_SPLIT
    m_end = tl.minimum(m_start + M_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        rows = offs_m.to(tl.int64)
        dyt = tl.load(dy_ptr + (offs_n * s_dn)[:, None] + (rows * s_dm)[None, :],
                      mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + (rows * s_xm)[:, None] + (offs_k * s_xk)[None, :],
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(dyt, xt, acc, input_precision=PRECISION)
    ok = n_ok[:, None] & k_ok[None, :]
    keep = tl.load(m_ptr + (offs_n * s_mn)[:, None] + (offs_k * s_mk)[None, :], mask=ok, other=0)
    acc = tl.where(keep != 0, acc, tl.zeros_like(acc))
    tl.store(dw_ptr + pid_s * s_gs + (offs_n * s_gn)[:, None] + (offs_k * s_gk)[None, :], acc,
             mask=ok)


# ------------------------------------------------------------------ configurations
_INTERP = dict(BLOCK_M=32)  # the one interpreter config
GROUP_M = 8


def _dot_precision(dtype):
    """fp32 follows F.linear's setting (TF32 where torch.backends.cuda.matmul.allow_tf32 is on);
    the interpreter is exact. fp16/bf16 take the default (ignored for them)."""
    if dtype == torch.float32 and (interpreting() or not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _config(which, tile, dtype, device):
    """BLOCK_M / num_warps / num_stages: the interpreter's, else `default_config` for the
    weight tile (gemm: (BLOCK_K, BLOCK_N); wgt: (BLOCK_N, BLOCK_K))."""
    if interpreting():
        return dict(_INTERP)
    return default_config(which, *tile, dtype.itemsize, device)


def _launch(which, grid, args, const, dtype, cfg):
    # The interpreter's bf16/fp16 arithmetic is unreliable: tiles are upcast there. On a GPU the
    # 16-bit tiles go to the tensor cores as they are (fp32 accumulation either way).
    meta = dict(UPCAST=interpreting() or dtype == torch.float32, PRECISION=_dot_precision(dtype))
    kernel = _gemm_kernel if which == "gemm" else _wgt_kernel
    kernel[grid](*args, **const, **meta, **cfg)


# ------------------------------------------------------------------ launch helpers
def _gemm(a, packed, bias, out, tiles, transposed):
    if transposed:  # grad_input: columns of out are the forward's in-features
        bn, bk, ka, no, n_t = tiles.block_c, tiles.block_o, tiles.og, tiles.cg, tiles.c_tiles
        idx, pk, cnt = tiles.bwd_idx, tiles.bwd_pk, tiles.bwd_cnt
    else:
        bn, bk, ka, no, n_t = tiles.block_o, tiles.block_c, tiles.cg, tiles.og, tiles.o_tiles
        idx, pk, cnt = tiles.fwd_idx, tiles.fwd_pk, tiles.fwd_cnt
    M = a.shape[0]
    bias_arg = bias.contiguous() if bias is not None else packed
    args = (a, packed, out, bias_arg, idx, pk, cnt, M, no, ka, n_t, idx.shape[1],
            *a.stride(), *out.stride())
    const = dict(TRANSPOSED=transposed, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=bk,
                 GROUP_M=GROUP_M)
    cfg = _config("gemm", (bk, bn), a.dtype, a.device)
    _launch("gemm", (cdiv(M, cfg["BLOCK_M"]) * n_t,), args, const, a.dtype, cfg)
    return out


def forward(x, packed, bias, y, tiles):
    """y (M, N) <- x (M, K) @ (weight * mask)^T + bias from the packed tiles."""
    return _gemm(x, packed, bias, y, tiles, False)


def backward_input(grad_y, packed, grad_x, tiles):
    """grad_x (M, K) <- grad_y (M, N) @ (weight * mask) from the packed tiles."""
    return _gemm(grad_y, packed, None, grad_x, tiles, True)


def backward_weight(x, grad_y, tiles, out_dtype):
    """mask * grad_y^T @ x, (N, K) in `out_dtype`; only non-empty tiles are computed."""
    M, K = x.shape
    N = grad_y.shape[1]
    n_tiles = tiles.wgt_tiles.shape[0]
    if n_tiles == 0 or M == 0:
        return torch.zeros((N, K), device=x.device, dtype=out_dtype)
    cfg = _config("wgt", (tiles.block_o, tiles.block_c), x.dtype, x.device)
    block_m = cfg["BLOCK_M"]
    splits = num_splits(n_tiles, M, block_m, x.device)
    m_per_split = cdiv(cdiv(M, splits), block_m) * block_m
    splits = cdiv(M, m_per_split)
    buf = torch.zeros((splits, N, K), device=x.device, dtype=torch.float32)
    mask = tiles.mask
    args = (x, grad_y, mask, buf, tiles.wgt_tiles, M, N, K, m_per_split, *x.stride(),
            *grad_y.stride(), mask.stride(0), mask.stride(1), *buf.stride())
    _launch("wgt", (n_tiles, splits), args, dict(BLOCK_N=tiles.block_o, BLOCK_K=tiles.block_c),
            x.dtype, cfg)
    return (buf[0] if splits == 1 else buf.sum(0)).to(out_dtype)
