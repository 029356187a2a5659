"""Triton implicit-GEMM kernels for a convolution whose weight is multiplied by a 0/1 mask.

GEMMs per group g (Cg = C / groups, Og = O / groups, T = KH * KW taps, m a pixel (n, h, w)):
  forward      y[m, o]       = sum_{tap, c} x[m @ tap, c] * (w * mask)[o, c, tap]
  grad_input   dx[m, c]      = sum_{tap, o} dy[m @ tap, o] * (w * mask)[o, c, tap]
  grad_weight  dw[o, c, tap] = mask * sum_m dy[m, o] * x[m @ tap, c]
The weight is cut into BLOCK_O x BLOCK_C tiles per tap; the host lists, once per mask change,
the tiles that hold a kept weight (sdclr_fast.ops.masked_conv.MaskTiles: occupancy[g, ot, tap,
ct], its non-empty tiles `wgt_tiles` in (g, ot, tap, ct) order, and per output tile row the
(tap, k-tile) steps and packed-tile indices of the K loop). `pack` writes the masked weight of
only those tiles, once, into P (n_active, BLOCK_O, BLOCK_C) in the compute dtype, in
`wgt_tiles` order: the forward of out-channel tile ot reads its tiles as one contiguous run of
P, grad_input reads P[j] through its index list. The mask is applied there (a select, so
inf/nan in pruned weights never reach a product) and nowhere else in forward / grad_input.

`_conv_gemm_kernel` is the forward and (TRANSPOSED) the grad_input: rows m are output pixels,
the K loop walks only the non-empty tiles of the program's column tile, and each step reads
BLOCK_K contiguous channels of one tap (channels-last activations: unit channel stride, wide
pipelined loads). On Hopper with a Triton that has tensor descriptors the packed tiles are
loaded by TMA. grad_weight is its own GEMM over M, one program per (non-empty tile, slice of
M) with fp32 partials per slice (split-K, deterministic, no atomics).

Everything accumulates in fp32. Offsets that involve the batch index are int64.
Meta-parameters: BLOCK_M / num_warps / num_stages per kernel from the tuned table
(sdclr_fast.ops.masked_conv) when the host passes a config, else `default_config` on a GPU
(deterministic, so bench/kernel_report.py compiles exactly what runs) and one fixed config in
the interpreter.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting

try:  # host-side TMA descriptors (Triton >= 3.2); plain pointers where missing
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None


@triton.jit
def _pack_kernel(w_ptr, m_ptr, p_ptr, tiles_ptr, Og, Cg,
                 s_wo, s_wc, s_wh, s_ww, s_mo, s_mc, s_mh, s_mw,
                 KW: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
                 RNE_BF16: tl.constexpr):
    # P[j] = (w * mask)[tile j] in P's dtype, rounded to nearest even as torch's .to() does,
    # zero-padded past Og / Cg. RNE_BF16: fp32 -> bf16 rounded by hand (the interpreter's
    # own cast truncates).
    j = tl.program_id(0)
    g = tl.load(tiles_ptr + j * 4 + 0)
    ot = tl.load(tiles_ptr + j * 4 + 1)
    tap = tl.load(tiles_ptr + j * 4 + 2)
    ct = tl.load(tiles_ptr + j * 4 + 3)
    kh = tap // KW
    kw = tap % KW
    ar_o = tl.arange(0, BLOCK_O)
    ar_c = tl.arange(0, BLOCK_C)
    offs_o = ot * BLOCK_O + ar_o
    offs_c = ct * BLOCK_C + ar_c
    ok = (offs_o < Og)[:, None] & (offs_c < Cg)[None, :]
    o_glob = g * Og + offs_o
    wt = tl.load(w_ptr + (o_glob * s_wo)[:, None] + (offs_c * s_wc)[None, :] + kh * s_wh + kw * s_ww,
                 mask=ok, other=0.0)
    keep = tl.load(m_ptr + (o_glob * s_mo)[:, None] + (offs_c * s_mc)[None, :] + kh * s_mh
                   + kw * s_mw, mask=ok, other=0)
    wt = tl.where(keep != 0, wt, tl.zeros_like(wt))
    if RNE_BF16:
        bits = wt.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        wt = bits.to(tl.float32, bitcast=True)
    wt = wt.to(p_ptr.dtype.element_ty)
    tl.store(p_ptr + j.to(tl.int64) * (BLOCK_O * BLOCK_C) + ar_o[:, None] * BLOCK_C + ar_c[None, :], wt)


@triton.jit
def _conv_gemm_kernel(
    a_ptr, p_ptr, p_desc, out_ptr, b_ptr, idx_ptr, pk_ptr, cnt_ptr,
    N, AH, AW, OH, OW, KA, NO, N_T, IDX_W,
    s_an, s_ac, s_ah, s_aw,
    s_on, s_oc, s_oh, s_ow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    K_T: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, TRANSPOSED: tl.constexpr,
    PHASES_H: tl.constexpr, PHASES_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr, K_EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # out[m, n] (m over N x OH x OW, n over NO channels of group g) = sum over the listed
    # (tap, k-tile) steps of A[m @ tap, k-tile] @ W_tile, A with AH x AW pixels, KA channels.
    # Forward: A = x, out = y, P[j] is (BLOCK_N = out, BLOCK_K = in) and is read transposed.
    # TRANSPOSED (grad_input): A = dy, out = dx, P[j] is (BLOCK_K = out, BLOCK_N = in); output
    # pixel (h, w) receives dy[(h + pad - kh * dil) / stride] where that divides exactly.
    # b_ptr is then BLOCK_K zeros of A's dtype (no bias), and a row of A that falls outside
    # dy points at them instead of being masked: an unmasked async copy needs only the
    # pipeline's predicate, a masked one 3 more instructions per 16-byte row chunk (select
    # the source size, combine it with the pipeline's predicate, turn that back into a
    # predicate), 48 of the loop's ~250 at BLOCK_K = 128.
    # A's pixel of (row, tap) is (r_h + off_h(kh), r_w + off_w(kw)), so each row's base
    # address and its in-bounds taps (one bit per tap) are computed once, and a K step adds
    # one scalar offset: the loop holds little besides the loads and the MMA. K_T (k-tiles
    # per tap) is a constexpr so that decoding a step is a multiply by a constant, not an
    # integer division.
    # PHASES_H x PHASES_W > 1 (grad_input of a strided conv; = the stride): a program's rows
    # are the input pixels of one phase (h % stride_h, w % stride_w) = (p_h, p_w). Tap kh
    # reaches such a row exactly when stride_h divides p_h + pad_h - kh * dil_h, the same
    # for every row of the phase, so the host lists only those taps per phase
    # (MaskTiles.phase_steps), and the row of dy is hq + (p_h + pad_h - kh * dil_h) / stride_h
    # for h = hq * stride_h + p_h: linear in hq. No MMA is spent on rows a tap misses (3 in 4
    # at stride 2 in both directions).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_g = tl.program_id(2)  # g * PHASES_H * PHASES_W + phase
    PHASED: tl.constexpr = PHASES_H * PHASES_W > 1
    if PHASED:
        g = pid_g // (PHASES_H * PHASES_W)
        phase = pid_g % (PHASES_H * PHASES_W)
        p_h = phase // PHASES_W
        p_w = phase % PHASES_W
        QH = (OH + PHASES_H - 1) // PHASES_H  # rows per phase (the last may be short)
        QW = (OW + PHASES_W - 1) // PHASES_W
    else:
        g = pid_g
        QH = OH
        QW = OW

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N * QH * QW
    n = offs_m // (QH * QW)
    rem = offs_m % (QH * QW)
    hq = rem // QW
    wq = rem % QW
    if PHASED:
        oh = hq * PHASES_H + p_h
        ow = wq * PHASES_W + p_w
        m_ok = m_ok & (oh < OH) & (ow < OW)
        r_h = hq
        r_w = wq
        q_h = p_h + pad_h
        q_w = p_w + pad_w
    else:
        oh = hq
        ow = wq
        if TRANSPOSED:  # unit stride
            r_h = oh + pad_h
            r_w = ow + pad_w
            step_h = -dil_h
            step_w = -dil_w
        else:
            r_h = oh * stride_h - pad_h
            r_w = ow * stride_w - pad_w
            step_h = dil_h
            step_w = dil_w
    a_base = a_ptr + n.to(tl.int64) * s_an + (r_h * s_ah + r_w * s_aw)
    ar_k = tl.arange(0, BLOCK_K)
    ar_n = tl.arange(0, BLOCK_N)
    if TRANSPOSED:
        p_off = ar_k[:, None] * BLOCK_N + ar_n[None, :]
    else:
        p_off = ar_n[None, :] * BLOCK_K + ar_k[:, None]
    if KH * KW <= 32:
        tap_ok = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for th_ in tl.static_range(KH):
            if PHASED:  # a tap this phase misses gets a bit that is never read
                hh = r_h + (q_h - th_ * dil_h) // PHASES_H
            else:
                hh = r_h + th_ * step_h
            ok_h = m_ok & (hh >= 0) & (hh < AH)
            for tw_ in tl.static_range(KW):
                if PHASED:
                    ww = r_w + (q_w - tw_ * dil_w) // PHASES_W
                else:
                    ww = r_w + tw_ * step_w
                ok = ok_h & (ww >= 0) & (ww < AW)
                tap_ok = tap_ok | (ok.to(tl.int32) << (th_ * KW + tw_))

    row = pid_g * N_T + pid_n
    count = tl.load(cnt_ptr + row)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # step pointers carried by the loop: its counter stays 32-bit (6-12 fewer instructions
    # per step than indexing by i)
    idx_row = idx_ptr + row * IDX_W
    pk_row = pk_ptr + row * IDX_W
    for i in range(0, count):
        k = tl.load(idx_row)
        j = tl.load(pk_row)
        idx_row += 1
        pk_row += 1
        tap = k // K_T
        kt = k - tap * K_T
        kh = tap // KW
        kw = tap - kh * KW
        c0 = g * KA + kt * BLOCK_K
        if PHASED:  # exact: the phase's list holds only taps whose division has no remainder
            off_h = (q_h - kh * dil_h) // PHASES_H
            off_w = (q_w - kw * dil_w) // PHASES_W
        else:
            off_h = kh * step_h
            off_w = kw * step_w
        if KH * KW <= 32:
            sp_ok = ((tap_ok >> tap) & 1) != 0
        else:
            hh = r_h + off_h
            ww = r_w + off_w
            sp_ok = m_ok & (hh >= 0) & (hh < AH) & (ww >= 0) & (ww < AW)
        a_ptrs = (a_base + (off_h * s_ah + off_w * s_aw + c0 * s_ac))[:, None] + (ar_k * s_ac)[None, :]
        if K_EVEN:
            a_ok = sp_ok[:, None]
        else:
            a_ok = sp_ok[:, None] & (kt * BLOCK_K + ar_k < KA)[None, :]
        if TRANSPOSED:
            at = tl.load(tl.where(a_ok, a_ptrs, b_ptr + ar_k[None, :]))
        else:
            at = tl.load(a_ptrs, mask=a_ok, other=0.0)
        if USE_TMA:
            if TRANSPOSED:
                wt = p_desc.load([j * BLOCK_K, 0])
            else:
                wt = tl.trans(p_desc.load([j * BLOCK_N, 0]))
        else:
            wt = tl.load(p_ptr + j.to(tl.int64) * (BLOCK_N * BLOCK_K) + p_off)
        if UPCAST:
            at = at.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(at, wt, acc, input_precision=PRECISION)

    offs_n = pid_n * BLOCK_N + ar_n
    n_ok = offs_n < NO
    n_glob = g * NO + offs_n
    if HAS_BIAS:
        acc += tl.load(b_ptr + n_glob, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = (out_ptr + n.to(tl.int64)[:, None] * s_on + (n_glob * s_oc)[None, :]
           + (oh * s_oh + ow * s_ow)[:, None])
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _bwd_weight_kernel(
    x_ptr, dy_ptr, m_ptr, dw_ptr, tiles_ptr,
    N, H, W, Cg, Og, M_PER_SPLIT,
    s_xn, s_xc, s_xh, s_xw,
    s_dn, s_dc, s_dh, s_dw,
    s_mo, s_mc, s_mh, s_mw,
    s_gs, s_go, s_gc, s_gh, s_gw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    OH: tl.constexpr, OW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DY_FLAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program per (non-empty weight tile, slice of the M reduction); each slice writes its
    # own fp32 partial so the sum over slices is deterministic (no atomics). OH, OW are
    # constexprs: the loop splits every pixel index into (n, oh, ow), and division by a
    # constant is a multiply. DY_FLAT: dy is dense channels-last, pixel m sits at m * s_dw.
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    g = tl.load(tiles_ptr + pid_t * 4 + 0)
    ot = tl.load(tiles_ptr + pid_t * 4 + 1)
    tap = tl.load(tiles_ptr + pid_t * 4 + 2)
    ct = tl.load(tiles_ptr + pid_t * 4 + 3)
    if KH * KW == 1:  # a 1x1 conv's one tap: the mask's address then stays 16-aligned, so its
        # i8 load takes 16 channels a thread and the x tile shares that layout (8 rows a thread,
        # not 16); with tap's runtime offset the 128x128 tile spilled at 4 warps (issue #22)
        kh = 0
        kw = 0
    else:
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
        if DY_FLAT:
            dy_m = offs_m.to(tl.int64) * s_dw
        else:
            dy_m = n * s_dn + oh * s_dh + ow * s_dw
        dyt = tl.load(dy_ptr + (o_glob * s_dc)[:, None] + dy_m[None, :],
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


# ------------------------------------------------------------------ configurations
# What a kernel config sets: BLOCK_M and the launch options. The weight tile (BLOCK_O x
# BLOCK_C, i.e. BLOCK_N x BLOCK_K of the forward and BLOCK_K x BLOCK_N of grad_input) is fixed
# by the tile map the host built, so it is not tuned here but per layer by the sweep
# (bench/tune_masked_conv.py), which also times these candidates.
# (the sweep's list: every one compiles per shape specialisation, and it must finish in minutes)
CANDIDATES = [dict(BLOCK_M=bm, num_warps=nw, num_stages=ns) for bm, nw, ns in (
    (64, 4, 5), (128, 4, 4), (128, 4, 5), (128, 8, 5), (256, 8, 4), (256, 8, 5))]
WGT_CANDIDATES = [dict(BLOCK_M=bm, num_warps=nw, num_stages=ns) for bm, nw, ns in (
    (64, 4, 3), (128, 4, 3), (128, 4, 4), (256, 8, 3))]  # grad_weight: BLOCK_M is its reduction chunk
_INTERP = dict(BLOCK_M=32)  # the one interpreter config (several fail there)
# Without a tuned entry: the GEMM's K loop reads each step's indices from memory, which takes
# one stage of Triton's pipeline, so 5 stages keep the operand tiles 2 steps ahead (3 buffers);
# grad_weight's loop has no indirection (3 stages: 3 buffers, 2 tiles ahead).
_GEMM_STAGES, _GEMM_BUFFERS = 5, 3
_WGT_STAGES, _WGT_BUFFERS = 3, 3


def default_config(which, block_a, block_b, elsize, device):
    """BLOCK_M / num_warps / num_stages of `which` ("gemm": forward or grad_input with a
    (BLOCK_K = block_a) x (BLOCK_N = block_b) weight tile; "wgt": grad_weight with a
    block_a x block_b tile) where no tuned entry exists: the largest BLOCK_M whose pipeline
    buffers fit the device's shared memory per block. A 128-wide MMA (block_b >= 128) takes
    8 warps at any BLOCK_M: with 4, a 128-row tile holds its one warpgroup at 228-255
    registers on sm_90, and that warpgroup is the SM's only one (1 CTA per SM by shared
    memory); 8 warps issue about 40 % more per CTA there (sm_80, 64 rows: 20 % more) but leave
    two warps per scheduler to cover each other's stalls (bench/kernel_report.py)."""
    budget = _smem_per_block(_device_index(device)) - 8192  # headroom for the epilogue
    wide = 8 if block_b >= 128 else 4
    for bm, nw in ((256, 8), (128, wide), (64, wide)):
        if which == "gemm":
            need = _GEMM_BUFFERS * (bm * block_a + block_a * block_b) * elsize
            cfg = dict(BLOCK_M=bm, num_warps=nw, num_stages=_GEMM_STAGES)
        else:
            need = _WGT_BUFFERS * bm * (block_a + block_b) * elsize
            cfg = dict(BLOCK_M=min(bm, 128), num_warps=4, num_stages=_WGT_STAGES)
        if need <= budget:
            return cfg
    return cfg


@functools.lru_cache(maxsize=None)
def _smem_per_block(index):
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", 101376)


def _dot_precision(dtype):
    """fp32 follows PyTorch's cuDNN setting (TF32 unless torch.backends.cudnn.allow_tf32 is
    off); the interpreter is exact anyway. fp16/bf16 take the default (ignored for them)."""
    if dtype == torch.float32 and (interpreting() or not torch.backends.cudnn.allow_tf32):
        return "ieee"
    return "tf32"


def _config(dtype):
    """(dtype-dependent meta-parameters, interpreter launch config or None). Cached: it runs for
    every launch."""
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return _config_cached(dtype, interpreting(), tf32)


@functools.lru_cache(maxsize=64)
def _config_cached(dtype, interp, tf32):
    # The interpreter's bf16/fp16 arithmetic is unreliable: upcast tiles there. On a GPU the
    # 16-bit tiles go to the tensor cores as they are (fp32 accumulation either way).
    meta = dict(UPCAST=interp or dtype == torch.float32, PRECISION=_dot_precision(dtype))
    return meta, (dict(_INTERP) if interp else None)


def _launch(which, grid, args, const, dtype, cfg, device, tile):
    """Launch `which` ("gemm" or "wgt") with cfg (BLOCK_M, num_warps, num_stages), or the
    interpreter's config, or `default_config` for the weight tile `tile`."""
    meta, interp_cfg = _config(dtype)
    cfg = interp_cfg or cfg or default_config(which, *tile, dtype.itemsize, device)
    kernel = _conv_gemm_kernel if which == "gemm" else _bwd_weight_kernel
    kernel[grid](*args, **const, **meta, **cfg)


def _device_index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _tma_ok(device_index):
    if TensorDescriptor is None or os.environ.get("SDCLR_FAST_MASKED_CONV_TMA", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_tma(device):
    """Whether the packed tiles go through TMA descriptors: a Hopper-or-newer GPU and a Triton
    that has them (SDCLR_FAST_MASKED_CONV_TMA=0 turns them off). Outside the interpreter a
    launch is a GPU launch, so torch.cuda answers for the device (bench/kernel_report.py
    answers as the GPU it compiles for)."""
    if interpreting():
        return False
    return _tma_ok(_device_index(device))


# ------------------------------------------------------------------ launch helpers
def pack(weight, tiles, dtype):
    """The masked weight of the non-empty tiles, (n_active, block_o, block_c) in `dtype`, in
    `tiles.wgt_tiles` order; one program per tile, empty tiles never read."""
    n = tiles.wgt_tiles.shape[0]
    p = torch.empty((n, tiles.block_o, tiles.block_c), device=weight.device, dtype=dtype)
    if n:
        _pack_kernel[(n,)](weight, tiles.mask, p, tiles.wgt_tiles, tiles.og, tiles.cg,
                           *weight.stride(), *tiles.mask.stride(), KW=weight.shape[3],
                           BLOCK_O=tiles.block_o, BLOCK_C=tiles.block_c,
                           RNE_BF16=interpreting() and weight.dtype == torch.float32
                           and dtype == torch.bfloat16)
    return p


def _gemm(a, packed, bias, out, tiles, geom, transposed, cfg):
    N, _, AH, AW = a.shape
    _, _, OH, OW = out.shape
    (sh, sw), (ph, pw), (dh, dw), groups = geom
    if transposed:
        bn, bk, ka, no, n_t, k_t = tiles.block_c, tiles.block_o, tiles.og, tiles.cg, tiles.c_tiles, tiles.o_tiles
        if (sh, sw) == (1, 1):
            idx, pk, cnt = tiles.bwd_idx, tiles.bwd_pk, tiles.bwd_cnt
        else:  # one list per (group, phase, column tile): see _conv_gemm_kernel
            idx, pk, cnt = tiles.phase_steps((sh, sw), (ph, pw), (dh, dw))
    else:
        bn, bk, ka, no, n_t, k_t = tiles.block_o, tiles.block_c, tiles.cg, tiles.og, tiles.o_tiles, tiles.c_tiles
        idx, pk, cnt = tiles.fwd_idx, tiles.fwd_pk, tiles.fwd_cnt
    tma = use_tma(a.device) and packed.shape[0] > 0
    desc = (TensorDescriptor.from_tensor(packed.view(-1, tiles.block_c), [tiles.block_o, tiles.block_c])
            if tma else packed)
    if transposed:  # the zero row that out-of-image rows of dy read (see _conv_gemm_kernel)
        bias_arg = _zeros(bk, a.dtype, a.device)
    else:
        bias_arg = bias.contiguous() if bias is not None else packed  # read at unit stride
    args = (a, packed, desc, out, bias_arg, idx, pk, cnt,
            N, AH, AW, OH, OW, ka, no, n_t, idx.shape[1],
            *a.stride(), *out.stride(), sh, sw, ph, pw, dh, dw)
    phases = (sh, sw) if transposed else (1, 1)
    const = dict(K_T=k_t, KH=tiles.taps // tiles.kw, KW=tiles.kw, TRANSPOSED=transposed,
                 PHASES_H=phases[0], PHASES_W=phases[1], HAS_BIAS=bias is not None,
                 USE_TMA=tma, K_EVEN=ka % bk == 0, BLOCK_N=bn, BLOCK_K=bk)
    rows = N * cdiv(OH, phases[0]) * cdiv(OW, phases[1])

    def grid(meta):
        return (cdiv(rows, meta["BLOCK_M"]), n_t, groups * phases[0] * phases[1])
    _launch("gemm", grid, args, const, a.dtype, cfg, a.device, (bk, bn))
    return out


def _zeros(n, dtype, device):
    """n zeros on `device`, one cached tensor per (n, dtype, device); a fresh one while a CUDA
    graph is being captured (a capture records the fill without running it)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=dtype, device=device)
    return _zeros_cached(n, dtype, device)


@functools.lru_cache(maxsize=None)
def _zeros_cached(n, dtype, device):
    with torch._C._DisableFuncTorch():  # a plain tensor even if first made inside grad / vmap
        return torch.zeros(n, dtype=dtype, device=device)


def forward(x, packed, bias, y, tiles, geom, cfg=None):
    """y <- conv(x, weight * mask) + bias from the packed tiles, into `y` (any strides)."""
    return _gemm(x, packed, bias, y, tiles, geom, False, cfg)


def backward_input(grad_y, packed, grad_x, tiles, geom, cfg=None):
    """grad_x <- conv_transpose(grad_y, weight * mask) from the packed tiles, into `grad_x`."""
    return _gemm(grad_y, packed, None, grad_x, tiles, geom, True, cfg)


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(n_tiles, m_total, block_m, device):
    """Slices of the M reduction per weight tile: enough programs to fill the GPU (layers with
    few weight tiles and a large batch, e.g. the stem), but at least 8 M-blocks per slice."""
    if interpreting():
        return 1 if m_total <= 4 * block_m else 2
    sms = _sm_count(_device_index(device))
    want = cdiv(4 * sms, max(n_tiles, 1))
    return max(1, min(want, m_total // (8 * block_m)))


def backward_weight(x, grad_y, mask, tiles, geom, out_dtype, splits=None, cfg=None):
    """mask * d(conv)/d(weight), shape of the weight, dtype `out_dtype`. Only non-empty tiles
    are computed; the others stay zero. cfg may carry "splits" (slices of M) beside BLOCK_M."""
    N, C, H, W = x.shape
    _, _, OH, OW = grad_y.shape
    (sh, sw), (ph, pw), (dh, dw), groups = geom
    O, Cg, KH, KW = mask.shape
    cfg = dict(cfg) if cfg else None
    if cfg and splits is None:
        splits = cfg.get("splits")
    if cfg:
        cfg.pop("splits", None)
    interp_cfg = _config(x.dtype)[1]
    cfg = cfg or (None if interp_cfg else default_config("wgt", tiles.block_o, tiles.block_c,
                                                         x.dtype.itemsize, x.device))
    block_m = (interp_cfg or cfg)["BLOCK_M"]  # split granularity
    m_total = N * OH * OW
    n_tiles = tiles.wgt_tiles.shape[0]
    if n_tiles == 0 or m_total == 0:
        return torch.zeros(mask.shape, device=x.device, dtype=out_dtype)
    if splits is None:
        splits = num_splits(n_tiles, m_total, block_m, x.device)
    m_per_split = cdiv(cdiv(m_total, splits), block_m) * block_m
    splits = cdiv(m_total, m_per_split)
    # fp32 partials, one slab per slice; tiles that are never launched stay zero.
    buf = torch.zeros((splits, O, Cg, KH, KW), device=x.device, dtype=torch.float32)
    args = (x, grad_y, mask, buf, tiles.wgt_tiles, N, H, W, Cg, tiles.og, m_per_split,
            *x.stride(), *grad_y.stride(), *mask.stride(), *buf.stride(),
            sh, sw, ph, pw, dh, dw)
    s_dn, _, s_dh, s_dw = grad_y.stride()
    dy_flat = s_dh == OW * s_dw and (N == 1 or s_dn == OH * OW * s_dw)
    const = dict(OH=OH, OW=OW, KH=KH, KW=KW, DY_FLAT=dy_flat, BLOCK_O=tiles.block_o, BLOCK_C=tiles.block_c)
    _launch("wgt", (n_tiles, splits), args, const, x.dtype, cfg, x.device,
            (tiles.block_o, tiles.block_c))
    dw_ = buf[0] if splits == 1 else buf.sum(0)
    return dw_.to(out_dtype)
