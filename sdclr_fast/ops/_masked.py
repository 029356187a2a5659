"""The pieces masked_conv2d (ops/masked_conv.py) and masked_linear (ops/masked_linear.py)
share: the weight-tile map of a mask (`MaskTiles`, `build_tiles`, `default_block`), the per-mask
cache on the mask tensor (`cached`, `cached_tiles`, `mask_scale`), autocast's casts, the vmap
helpers of their Triton Functions, the error of a second derivative on the Triton path, and
the custom ops of their torch.compile route (`define_masked_ops`). Their backend flag comes
from ops/_op.py, as for every op."""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ._op import define_op

CACHE_ATTR = "_sdclr_fast_mask_tiles"


def default_block(out_per_group, in_per_group):
    """Weight tile (block_o, block_c) the kernels use for a group of that size: 32 where the
    group has >= 32 channels, else the next power of two (at least 16, the MMA minimum)."""
    def one(n):
        return 32 if n >= 32 else max(16, 1 << max(n - 1, 0).bit_length())
    return one(out_per_group), one(in_per_group)


def active_lists(occ):
    """occ (R, K) bool -> (idx (R, K) int32 with each row's active columns first, in order;
    count (R,) int32)."""
    count = occ.sum(1, dtype=torch.int32)
    order = torch.argsort((~occ).to(torch.int8), dim=1, stable=True)
    return order.to(torch.int32).contiguous(), count.contiguous()


@dataclass(frozen=True)
class MaskTiles:
    """Occupancy of a conv mask (a linear one: one tap, one group) per (block_o x block_c)
    weight tile and tap.

    occupancy[g, ot, tap, ct] is True where the tile holds at least one kept weight. The index
    lists derived from it drive the kernels (see kernels/masked_conv.py). Built by
    `prepare_mask`; immutable."""

    mask: torch.Tensor  # the mask as uint8, weight's shape, channels-last strides (see below)
    groups: int
    og: int
    cg: int
    block_o: int
    block_c: int
    o_tiles: int
    c_tiles: int
    taps: int
    kw: int
    occupancy: torch.Tensor  # (groups, o_tiles, taps, c_tiles) bool
    fwd_idx: torch.Tensor  # (g * o_tiles, taps * c_tiles): tap * c_tiles + ct, active first
    fwd_pk: torch.Tensor   # same layout: the packed-tile index (row of wgt_tiles) of each step
    fwd_cnt: torch.Tensor
    bwd_idx: torch.Tensor  # (g * c_tiles, taps * o_tiles): tap * o_tiles + ot, active first
    bwd_pk: torch.Tensor
    bwd_cnt: torch.Tensor
    wgt_tiles: torch.Tensor  # (n_active, 4) int32 rows (g, ot, tap, ct): the packed order
    _phases: dict = field(default_factory=dict, compare=False, repr=False)

    def phase_steps(self, stride, padding, dilation):
        """grad_input's K-loop lists (idx, pk, cnt) of a strided conv, one row per (g, phase,
        ct), phase = (h % stride_h, w % stride_w) of the input pixel, in `bwd_idx`'s format:
        only the taps whose rows of grad_y land on that phase (kh with (phase_h + pad_h -
        kh * dil_h) divisible by stride_h, likewise kw). Cached per geometry."""
        key = (tuple(stride), tuple(padding), tuple(dilation))
        got = self._phases.get(key)
        if got is None:
            with plain():
                got = _phase_lists(self.occupancy, self.kw, *key)
            # not cached while a CUDA graph is captured: the graph's memory pool owns them
            if not (self.occupancy.is_cuda and torch.cuda.is_current_stream_capturing()):
                self._phases[key] = got
        return got

    @property
    def tile_density(self):
        """Fraction of weight tiles the kernels compute (1.0 = no skipping)."""
        return self.wgt_tiles.shape[0] / max(self.occupancy.numel(), 1)


def build_tiles(keep, groups, block):
    """The `MaskTiles` fields (all but ``mask``) of a (O, C / groups, KH, KW) keep mask."""
    O, Cg, KH, KW = keep.shape
    og = O // groups
    bo, bc = block
    o_t, c_t, taps = -(-og // bo), -(-Cg // bc), KH * KW
    k = keep.detach().reshape(groups, og, Cg, taps) != 0
    k = F.pad(k, (0, 0, 0, c_t * bc - Cg, 0, o_t * bo - og))  # zero-pad to whole tiles
    occ = k.reshape(groups, o_t, bo, c_t, bc, taps).any(dim=4).any(dim=2)  # (g, ot, ct, tap)
    occ = occ.permute(0, 1, 3, 2).contiguous()  # (g, ot, tap, ct)
    fwd_idx, fwd_cnt = active_lists(occ.reshape(groups * o_t, taps * c_t))
    wgt_tiles = occ.nonzero().to(torch.int32).contiguous()
    fwd_pk = _ranks(occ).reshape(groups * o_t, taps * c_t).gather(1, fwd_idx.long())
    # unit stride: one phase that every tap reaches
    bwd_idx, bwd_pk, bwd_cnt = _phase_lists(occ, KW, (1, 1), (0, 0), (1, 1))
    return dict(groups=groups, og=og, cg=Cg, block_o=bo, block_c=bc, o_tiles=o_t, c_tiles=c_t,
                taps=taps, kw=KW, occupancy=occ, fwd_idx=fwd_idx,
                fwd_pk=fwd_pk.to(torch.int32).contiguous(), fwd_cnt=fwd_cnt, bwd_idx=bwd_idx,
                bwd_pk=bwd_pk, bwd_cnt=bwd_cnt, wgt_tiles=wgt_tiles)


def _ranks(occ):
    """Rank of every active tile in `wgt_tiles` order: its index in the packed weight."""
    return (occ.flatten().cumsum(0) - 1).reshape(occ.shape)


def _phase_lists(occ, kw, stride, padding, dilation):
    """grad_input's K-loop lists (idx, pk int32, cnt) of occupancy `occ` (g, ot, tap, ct): a row
    per (g, phase, ct) holding the (tap, ot) steps whose tap reaches the phase."""
    g, o_t, taps, c_t = occ.shape
    tap = torch.arange(taps, device=occ.device)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation

    def lands(s, pad, d, k):  # (s, taps): phase p receives tap k
        return (torch.arange(s, device=occ.device)[:, None] + pad - k[None, :] * d) % s == 0
    p = sh * sw
    match = (lands(sh, ph, dh, tap // kw)[:, None] & lands(sw, pw, dw, tap % kw)[None]).reshape(p, taps)
    occ_t = occ.permute(0, 3, 2, 1)  # (g, ct, tap, ot)
    occ_p = occ_t[:, None] & match[None, :, None, :, None]  # (g, phase, ct, tap, ot)
    idx, cnt = active_lists(occ_p.reshape(g * p * c_t, taps * o_t))
    rank = _ranks(occ).permute(0, 3, 2, 1)
    pk = rank[:, None].expand(g, p, c_t, taps, o_t).reshape(g * p * c_t, taps * o_t)
    pk = pk.gather(1, idx.long())
    return idx, pk.to(torch.int32).contiguous(), cnt


def plain():
    """Tensors derived from a plain mask stay plain under torch.func transforms (inside grad or
    vmap every new tensor is otherwise wrapped for that transform's level): the per-mask cache
    outlives the transform, and the kernels need real storage."""
    return torch._C._DisableFuncTorch()


def mask_key(mask):
    """What invalidates a mask's cache entry: its version counter (not the data pointer:
    torch.compile then needs no pointer guard), dtype, shape, strides and device."""
    return (mask._version, mask.dtype, tuple(mask.shape), tuple(mask.stride()), mask.device)


def as_keep(mask):
    """The mask as bool/uint8 `keep`; float/int masks must hold only 0 and 1."""
    if mask.dtype == torch.bool:
        return mask
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 and 1 (or be a bool tensor)")
    return mask != 0


def cached(mask):
    """Per-mask cache stored on the tensor itself: dropped with it, invalidated by any in-place
    change (version counter; a `.data` swap that bypasses it is not seen)."""
    key = mask_key(mask)
    entry = getattr(mask, CACHE_ATTR, None)
    if entry is None or entry["key"] != key:
        with plain():
            keep = as_keep(mask).detach()
        entry = {"key": key, "keep": keep, "tiles": {}}  # + scales by dtype
        try:
            setattr(mask, CACHE_ATTR, entry)
        except (AttributeError, RuntimeError):  # e.g. tensor subclasses without __dict__
            pass
    return entry


def mask_scale(mask, dtype):
    """The mask as 0/1 in `dtype`, a copy cached with the mask (one weight-sized tensor per mask
    change instead of a cast every call; a copy even when the mask has that dtype, so that the
    forward keeps its mask whatever happens to the caller's tensor)."""
    entry = cached(mask)
    scale = entry.get(dtype)
    if scale is None:
        with plain():
            scale = entry[dtype] = entry["keep"].to(dtype)
    return scale


def check_block(block):
    """``block`` as a tuple, checked: a pair of powers of two >= 16."""
    block = tuple(block)
    if len(block) != 2 or any(not isinstance(b, int) or b < 16 or b & (b - 1) for b in block):
        raise ValueError(f"block must be a pair of powers of two >= 16, got {block!r}")
    return block


def map_over_batch(fn, info, in_dims, args):
    """Generic vmap rule: fn on every slice of the batch, results stacked on dim 0. `args`
    holds tensors (batched where in_dims is not None) and plain values."""
    def part(b):  # in_dims mirrors args; a plain value's entry is None (or a tuple of them)
        return [a.select(d, b) if isinstance(a, torch.Tensor) and d is not None else a
                for a, d in zip(args, in_dims)]
    results = [fn(*part(b)) for b in range(info.batch_size)]
    return torch.stack(results), 0


def fold_batch(t, d):
    """(..., B at dim d, ...) with N behind it -> (B * N, ...): a vmap batch of x folded into
    the convolution's own batch."""
    t = t.movedim(d, 0)
    return t.reshape((t.shape[0] * t.shape[1],) + tuple(t.shape[2:])), t.shape[0]


def autocast_args(x, weight, bias):
    """Under autocast: x and bias cast to the autocast dtype, as autocast does for F.conv2d
    (activations usually arrive in it already), and that dtype returned for the weight, which
    the PyTorch path casts and the Triton path's pack converts (one pass). Else None."""
    if not isinstance(x, torch.Tensor) or x.dtype == torch.float64:
        return x, bias, None
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, bias, None
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        return t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    wdt = dt if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None
    return cast(x), cast(bias), wdt

def cached_tiles(mask, key, build):
    """The `MaskTiles` cached on `mask` under `key`, built by ``build(keep)`` (keep: the mask as
    bool, detached) on the first request after a mask change."""
    entry = cached(mask)
    tiles = entry["tiles"].get(key)
    if tiles is None:
        with plain():
            tiles = entry["tiles"][key] = build(entry["keep"])
    return tiles


def twice_error(op, dense):
    """The backward of the Triton path's gradient Functions: they are differentiable once."""
    def backward(*_):
        raise RuntimeError(f"{op}: the Triton path is differentiable once; for higher "
                           f"derivatives (gradgradcheck, hessians) call it with _backend='torch', "
                           f"which computes {dense}")
    return staticmethod(backward)


def bias_grad(grad_y, dims):
    """The bias gradient: grad_y summed over `dims` (all but the channel), in float32."""
    return grad_y.sum(dim=dims, dtype=torch.float32).to(grad_y.dtype)


def define_masked_ops(name, fwd, bwd, fwd_fake, bwd_fake, bias_dims):
    """The custom ops of a masked op's torch.compile route: ``sdclr_fast::<name>_fwd``
    ``(x, weight, mask, bias, *conf) -> y`` and ``<name>_bwd``
    ``(grad_y, x, weight, mask, *conf, need_x, need_w) -> (gx, gw)``, with the forward's
    autograd over the backward op (the bias gradient sums grad_y over `bias_dims`). Tagged
    cudagraph_unsafe: their host-side cache and dispatch must run every call."""
    ops = {"fwd": define_op(f"{name}_fwd", fwd, fwd_fake, cudagraph_unsafe=True),
           "bwd": define_op(f"{name}_bwd", bwd, bwd_fake, cudagraph_unsafe=True)}

    def setup_context(ctx, inputs, output):
        x, weight, mask, bias, *conf = inputs
        ctx.save_for_backward(x, weight, mask)
        ctx.conf, ctx.has_bias = conf, bias is not None

    def backward(ctx, grad_y):
        x, weight, mask = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        gx = gw = gb = None
        if need_x or need_w:
            gx, gw = ops["bwd"](grad_y, x, weight, mask, *ctx.conf, need_x, need_w)
        if need_b and ctx.has_bias:
            gb = bias_grad(grad_y, bias_dims)
        return (gx if need_x else None, gw if need_w else None, None, gb,
                *([None] * len(ctx.conf)))

    ops["fwd"].register_autograd(backward, setup_context=setup_context)
    return ops
