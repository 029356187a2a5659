"""Triton implicit-GEMM kernels for a convolution whose weight is multiplied by a 0/1 mask.

The mask is applied in registers: each kernel loads a weight tile and the matching mask tile
and zeroes pruned entries before `tl.dot`, so no masked copy of the weight is ever written.

Layout of the GEMMs (per group g; Cg = C / groups, Og = O / groups, T = KH * KW taps):
  forward      y[m, o]   = sum_{tap, c}  x[m @ tap, c] * w[o, c, tap]      m = (n, oh, ow)
  grad_input   dx[m, c]  = sum_{tap, o}  dy[m @ tap, o] * w[o, c, tap]     m = (n, ih, iw)
  grad_weight  dw[o, c, tap] = sum_m     dy[m, o] * x[m @ tap, c]          m = (n, oh, ow)
The reduction dimension of the first two is ordered (tap, channel tile), so one step of the
K loop reads one contiguous in-channel (or out-channel) chunk of one tap. The weight is cut into
BLOCK_O x BLOCK_C tiles per tap; the host builds, once per mask, lists of the tiles that hold at
least one kept weight (see sdclr_fast.ops.masked_conv.MaskTiles):
  fwd_idx[g * O_T + ot, i]  = tap * C_T + ct   (the i-th non-empty tile of out-channel tile ot)
  bwd_idx[g * C_T + ct, i]  = tap * O_T + ot   (the i-th non-empty tile of in-channel tile ct)
  wgt_tiles[j]              = (g, ot, tap, ct) (the non-empty tiles, one grad_weight program each)
so every kernel loops over (or launches) only the non-empty tiles: empty tiles cost neither
loads nor MMA work, and their grad_weight entries stay zero.

All kernels accumulate in fp32 and address tensors through their strides (NCHW and
channels-last alike). Offsets that involve the batch index are computed in int64.
"""
import functools

import torch
import triton
import triton.language as tl

from ._host import cdiv, interpreting


@triton.jit
def _masked_weight_tile(w_ptr, m_ptr, rows, cols, row_ok, col_ok, kh, kw,
                        s_wr, s_wc, s_wh, s_ww, s_mr, s_mc, s_mh, s_mw, UPCAST: tl.constexpr):
    """Load w[rows, cols, kh, kw] * mask[rows, cols, kh, kw] as a (len(rows), len(cols)) tile.

    `rows`/`cols` are whatever weight dimensions the caller wants along each tile axis (the
    strides say which); pruned entries become exact zeros (also where the weight is inf/nan)."""
    ok = row_ok[:, None] & col_ok[None, :]
    wt = tl.load(w_ptr + rows[:, None] * s_wr + cols[None, :] * s_wc + kh * s_wh + kw * s_ww,
                 mask=ok, other=0.0)
    keep = tl.load(m_ptr + rows[:, None] * s_mr + cols[None, :] * s_mc + kh * s_mh + kw * s_mw,
                   mask=ok, other=0)
    if UPCAST:
        wt = wt.to(tl.float32)
    return tl.where(keep != 0, wt, tl.zeros_like(wt))


@triton.jit
def _masked_conv_fwd_kernel(
    x_ptr, w_ptr, m_ptr, b_ptr, y_ptr, idx_ptr, cnt_ptr,
    N, H, W, OH, OW, Cg, Og, O_T, C_T, IDX_W,
    s_xn, s_xc, s_xh, s_xw,
    s_wo, s_wc, s_wh, s_ww,
    s_mo, s_mc, s_mh, s_mw,
    s_yn, s_yc, s_yh, s_yw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    g = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N * OH * OW
    n = offs_m // (OH * OW)
    rem = offs_m % (OH * OW)
    oh = rem // OW
    ow = rem % OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_rows = x_ptr + n.to(tl.int64) * s_xn  # (BLOCK_M,) pointers to each sample

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < Og
    o_glob = g * Og + offs_o
    arange_c = tl.arange(0, BLOCK_C)

    row = g * O_T + pid_o
    count = tl.load(cnt_ptr + row)
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for i in range(0, count):
        k = tl.load(idx_ptr + row * IDX_W + i)
        tap = k // C_T
        ct = k % C_T
        kh = tap // KW
        kw = tap % KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        sp_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs_c = ct * BLOCK_C + arange_c
        c_ok = offs_c < Cg
        xt = tl.load(x_rows[:, None] + ((g * Cg + offs_c) * s_xc)[None, :]
                     + (ih * s_xh + iw * s_xw)[:, None],
                     mask=sp_ok[:, None] & c_ok[None, :], other=0.0)
        # (BLOCK_C, BLOCK_O) tile: rows are in-channels, columns out-channels.
        wt = _masked_weight_tile(w_ptr, m_ptr, offs_c, o_glob, c_ok, o_ok, kh, kw,
                                 s_wc, s_wo, s_wh, s_ww, s_mc, s_mo, s_mh, s_mw, UPCAST)
        if UPCAST:
            xt = xt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)

    if HAS_BIAS:
        bias = tl.load(b_ptr + o_glob, mask=o_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    y_ptrs = (y_ptr + n.to(tl.int64)[:, None] * s_yn + (o_glob * s_yc)[None, :]
              + (oh * s_yh + ow * s_yw)[:, None])
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :])


@triton.jit
def _masked_conv_bwd_input_kernel(
    dy_ptr, w_ptr, m_ptr, dx_ptr, idx_ptr, cnt_ptr,
    N, H, W, OH, OW, Cg, Og, O_T, C_T, IDX_W,
    s_dn, s_dc, s_dh, s_dw,
    s_wo, s_wc, s_wh, s_ww,
    s_mo, s_mc, s_mh, s_mw,
    s_xn, s_xc, s_xh, s_xw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Direct transposed convolution: input pixel (ih, iw) receives dy[oh, ow] through tap
    # (kh, kw) when ih + pad - kh * dil = oh * stride; the divisibility test handles stride > 1.
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    g = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N * H * W
    n = offs_m // (H * W)
    rem = offs_m % (H * W)
    ih = rem // W
    iw = rem % W
    dy_rows = dy_ptr + n.to(tl.int64) * s_dn

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < Cg
    arange_o = tl.arange(0, BLOCK_O)

    row = g * C_T + pid_c
    count = tl.load(cnt_ptr + row)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for i in range(0, count):
        k = tl.load(idx_ptr + row * IDX_W + i)
        tap = k // O_T
        ot = k % O_T
        kh = tap // KW
        kw = tap % KW
        th = ih + pad_h - kh * dil_h
        tw = iw + pad_w - kw * dil_w
        oh = th // stride_h
        ow = tw // stride_w
        sp_ok = (m_ok & (th >= 0) & (tw >= 0) & (th % stride_h == 0) & (tw % stride_w == 0)
                 & (oh < OH) & (ow < OW))
        offs_o = ot * BLOCK_O + arange_o
        o_ok = offs_o < Og
        o_glob = g * Og + offs_o
        dyt = tl.load(dy_rows[:, None] + (o_glob * s_dc)[None, :] + (oh * s_dh + ow * s_dw)[:, None],
                      mask=sp_ok[:, None] & o_ok[None, :], other=0.0)
        # (BLOCK_O, BLOCK_C) tile: rows are out-channels, columns in-channels.
        wt = _masked_weight_tile(w_ptr, m_ptr, o_glob, offs_c, o_ok, c_ok, kh, kw,
                                 s_wo, s_wc, s_wh, s_ww, s_mo, s_mc, s_mh, s_mw, UPCAST)
        if UPCAST:
            dyt = dyt.to(tl.float32)
        acc = tl.dot(dyt, wt, acc, input_precision=PRECISION)

    dx_ptrs = (dx_ptr + n.to(tl.int64)[:, None] * s_xn + ((g * Cg + offs_c) * s_xc)[None, :]
               + (ih * s_xh + iw * s_xw)[:, None])
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _masked_conv_bwd_weight_kernel(
    x_ptr, dy_ptr, m_ptr, dw_ptr, tiles_ptr,
    N, H, W, OH, OW, Cg, Og, M_PER_SPLIT,
    s_xn, s_xc, s_xh, s_xw,
    s_dn, s_dc, s_dh, s_dw,
    s_mo, s_mc, s_mh, s_mw,
    s_gs, s_go, s_gc, s_gh, s_gw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program per (non-empty weight tile, slice of the M reduction); each slice writes its
    # own fp32 partial so the sum over slices is deterministic (no atomics).
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    g = tl.load(tiles_ptr + pid_t * 4 + 0)
    ot = tl.load(tiles_ptr + pid_t * 4 + 1)
    tap = tl.load(tiles_ptr + pid_t * 4 + 2)
    ct = tl.load(tiles_ptr + pid_t * 4 + 3)
    kh = tap // KW
    kw = tap % KW

    offs_o = ot * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < Og
    o_glob = g * Og + offs_o
    offs_c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < Cg
    c_glob = g * Cg + offs_c

    M = N * OH * OW
    m_start = pid_s * M_PER_SPLIT
    m_end = tl.minimum(m_start + M_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        n = (offs_m // (OH * OW)).to(tl.int64)
        rem = offs_m % (OH * OW)
        oh = rem // OW
        ow = rem % OW
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        sp_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        dyt = tl.load(dy_ptr + (o_glob * s_dc)[:, None]
                      + (n * s_dn + oh * s_dh + ow * s_dw)[None, :],
                      mask=o_ok[:, None] & m_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + (n * s_xn + ih * s_xh + iw * s_xw)[:, None] + (c_glob * s_xc)[None, :],
                     mask=sp_ok[:, None] & c_ok[None, :], other=0.0)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(dyt, xt, acc, input_precision=PRECISION)

    ok = o_ok[:, None] & c_ok[None, :]
    keep = tl.load(m_ptr + (o_glob * s_mo)[:, None] + (offs_c * s_mc)[None, :] + kh * s_mh
                   + kw * s_mw, mask=ok, other=0)
    acc = tl.where(keep != 0, acc, tl.zeros_like(acc))
    dw_ptrs = (dw_ptr + pid_s * s_gs + (o_glob * s_go)[:, None] + (offs_c * s_gc)[None, :]
               + kh * s_gh + kw * s_gw)
    tl.store(dw_ptrs, acc, mask=ok)


# ------------------------------------------------------------------ launch helpers
# One configuration per kernel: autotuning with several configs does not run in the
# interpreter. BLOCK_O x BLOCK_C is the weight tile, chosen by the host per mask
# (sdclr_fast.ops.masked_conv.default_block / prepare_mask) and carried by the tile map.
_BLOCK_M_GPU = 128
_BLOCK_M_INTERP = 64
_NUM_WARPS = 4
_NUM_STAGES = 3


def _dot_precision(dtype):
    """fp32 follows PyTorch's cuDNN setting (TF32 unless torch.backends.cudnn.allow_tf32 is
    off); the interpreter is exact anyway. fp16/bf16 take the default (ignored for them)."""
    if dtype == torch.float32 and (interpreting() or not torch.backends.cudnn.allow_tf32):
        return "ieee"
    return "tf32"


def _config(dtype):
    """Kernel meta-parameters (BLOCK_M, UPCAST, PRECISION) and launch options for `dtype`.
    Cached: it runs for every launch."""
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return _config_cached(dtype, interpreting(), tf32)


@functools.lru_cache(maxsize=64)
def _config_cached(dtype, interp, tf32):
    # The interpreter's bf16/fp16 arithmetic is unreliable: upcast tiles there. On a GPU the
    # 16-bit tiles go to the tensor cores as they are (fp32 accumulation either way).
    meta = dict(BLOCK_M=_BLOCK_M_INTERP if interp else _BLOCK_M_GPU,
                UPCAST=interp or dtype == torch.float32, PRECISION=_dot_precision(dtype))
    launch = {} if interp else {"num_warps": _NUM_WARPS, "num_stages": _NUM_STAGES}
    return meta, launch


def forward(x, weight, mask, bias, y, tiles, geom):
    """y <- conv(x, weight * mask) + bias, written into the preallocated `y` (any strides)."""
    N, C, H, W = x.shape
    _, _, OH, OW = y.shape
    (sh, sw), (ph, pw), (dh, dw), groups = geom
    meta, launch = _config(x.dtype)
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it at unit stride
    grid = (cdiv(N * OH * OW, meta["BLOCK_M"]), tiles.o_tiles, groups)
    _masked_conv_fwd_kernel[grid](
        x, weight, mask, bias if bias is not None else weight, y, tiles.fwd_idx, tiles.fwd_cnt,
        N, H, W, OH, OW, tiles.cg, tiles.og, tiles.o_tiles, tiles.c_tiles, tiles.fwd_idx.shape[1],
        *x.stride(), *weight.stride(), *mask.stride(), *y.stride(),
        sh, sw, ph, pw, dh, dw,
        KW=weight.shape[3], HAS_BIAS=bias is not None,
        BLOCK_O=tiles.block_o, BLOCK_C=tiles.block_c, **meta, **launch,
    )
    return y


def backward_input(grad_y, weight, mask, grad_x, tiles, geom):
    """grad_x <- conv_transpose(grad_y, weight * mask), written into `grad_x` (any strides)."""
    N, C, H, W = grad_x.shape
    _, _, OH, OW = grad_y.shape
    (sh, sw), (ph, pw), (dh, dw), groups = geom
    meta, launch = _config(grad_y.dtype)
    grid = (cdiv(N * H * W, meta["BLOCK_M"]), tiles.c_tiles, groups)
    _masked_conv_bwd_input_kernel[grid](
        grad_y, weight, mask, grad_x, tiles.bwd_idx, tiles.bwd_cnt,
        N, H, W, OH, OW, tiles.cg, tiles.og, tiles.o_tiles, tiles.c_tiles, tiles.bwd_idx.shape[1],
        *grad_y.stride(), *weight.stride(), *mask.stride(), *grad_x.stride(),
        sh, sw, ph, pw, dh, dw,
        KW=weight.shape[3],
        BLOCK_O=tiles.block_o, BLOCK_C=tiles.block_c, **meta, **launch,
    )
    return grad_x


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(n_tiles, m_total, block_m, device):
    """Slices of the M reduction per weight tile: enough programs to fill the GPU (layers with
    few weight tiles and a large batch, e.g. the stem), but at least 8 M-blocks per slice."""
    if interpreting() or device.type != "cuda":
        return 1 if m_total <= 4 * block_m else 2
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = cdiv(4 * sms, max(n_tiles, 1))
    return max(1, min(want, m_total // (8 * block_m)))


def backward_weight(x, grad_y, mask, tiles, geom, out_dtype, splits=None):
    """mask * d(conv)/d(weight), shape of the weight, dtype `out_dtype`. Only non-empty tiles
    are computed; the others stay zero."""
    N, C, H, W = x.shape
    _, _, OH, OW = grad_y.shape
    (sh, sw), (ph, pw), (dh, dw), groups = geom
    O, Cg, KH, KW = mask.shape
    meta, launch = _config(x.dtype)
    block_m = meta["BLOCK_M"]
    m_total = N * OH * OW
    n_tiles = tiles.wgt_tiles.shape[0]
    if n_tiles == 0 or m_total == 0:
        return torch.zeros(mask.shape, device=x.device, dtype=out_dtype)
    if splits is None:
        splits = _num_splits(n_tiles, m_total, block_m, x.device)
    m_per_split = cdiv(cdiv(m_total, splits), block_m) * block_m
    splits = cdiv(m_total, m_per_split)
    # fp32 partials, one slab per slice; tiles that are never launched stay zero.
    buf = torch.zeros((splits, O, Cg, KH, KW), device=x.device, dtype=torch.float32)
    _masked_conv_bwd_weight_kernel[(n_tiles, splits)](
        x, grad_y, mask, buf, tiles.wgt_tiles,
        N, H, W, OH, OW, Cg, tiles.og, m_per_split,
        *x.stride(), *grad_y.stride(), *mask.stride(), *buf.stride(),
        sh, sw, ph, pw, dh, dw,
        KW=KW, BLOCK_O=tiles.block_o, BLOCK_C=tiles.block_c, **meta, **launch,
    )
    dw_ = buf[0] if splits == 1 else buf.sum(0)
    return dw_.to(out_dtype)
