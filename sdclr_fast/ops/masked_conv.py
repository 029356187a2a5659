"""Mask-applied (pruned) 2-d convolution: `masked_conv2d(x, weight, mask, ...)`.

Equal in value and gradients to `F.conv2d(x, weight * mask, bias, ...)`:

* CUDA (fp32 / fp16 / bf16), where the tuned table says Triton wins: Triton implicit-GEMM
  kernels (kernels/masked_conv.py) for the forward, grad_input and grad_weight that skip the
  weight tiles the mask empties. The tile map (`MaskTiles`) is built once per mask change and
  cached on the mask tensor (keyed on its version counter, not its data pointer), so a mask
  that stays fixed for an epoch, as in SDCLR, costs one small pass per epoch. Each forward
  packs the masked weight of the non-empty tiles once (one pass over those tiles, cast to the
  compute dtype there, also under autocast) and its backward reuses the packed tiles: in an
  SDCLR step, one pack per layer and optimiser step.
* CPU (and CUDA when the tiles are mostly occupied, or float64): plain autograd on
  `F.conv2d(x, weight * scale)`, `scale` the mask as 0/1 in the weight's dtype, cached with the
  mask (a float multiply is ~20x faster than a bool one on CPU). Autograd keeps the masked
  copy for backward, one weight-sized tensor: a custom autograd Function that recomputed it
  instead cost twice the host time of `F.conv2d` per call, and host time is what a small
  convolution on a GPU waits for. bfloat16 on the CPU runs this in float32 and rounds the
  output once (and autograd the gradients): torch 2.13's oneDNN bfloat16 weight gradient
  returns uninitialised memory for some grouped strided shapes (`_pytorch_path`).

The mask is captured at forward time: changing it in place before the backward does not change
the gradients of that forward (both paths hold their own copy of it).

Pruned weights get zero gradient. Non-finite values in pruned weights: the PyTorch path
propagates them exactly as `F.conv2d(x, weight * mask)` does (nan * 0 = nan); the Triton
kernels select instead of multiplying (an empty tile is never read), so there they contribute
exactly zero.

Tile skipping: the kernels cut the (out-channels x in-channels) plane of every tap into
`block` = (block_o, block_c) tiles (`block=` argument, else the tuned entry's, else (32, 32) where a group has at least 32 channels
(16, or the next power of two, below that). Block masks whose blocks are multiples of the tile,
e.g. `magnitude_masks(..., block=(32, 32))`, make most tiles empty at high sparsity; unstructured
masks at 90% leave almost every tile occupied (nothing to skip). `prepare_mask(mask,
block=...)` picks another tile (powers of two >= 16).

Dispatch on CUDA: the op looks the call up in the tuned table (`_masked_conv_tuned`,
kernels/masked_conv_tuned.json, written by bench/tune_masked_conv.py on a GPU: GPU name, dtype,
layer shape, sparsity bucket from the mask's tile density) and runs the Triton kernels, with the
tuned weight tile and kernel configs, only where the sweep measured them faster than cuDNN
(forward + both backward). No entry (another GPU or shape, a mask occupying more than 5/8 of
the tiles, e.g. unstructured) or a losing one: the PyTorch path (cuDNN).

Layout: the kernels take any strides, but on a GPU the 16-bit loads are only wide (and
software-pipelined) along a unit-stride channel dimension: use channels-last activations and
weights (`model.to(memory_format=torch.channels_last)`), as cuDNN prefers for tensor cores too.
NCHW inputs work at lower speed.

Unbatched input (C, H, W) gives (O, H', W'), as with F.conv2d.

torch.func: grad, vjp, jacrev and vmap work on both paths. The PyTorch path is plain autograd;
the Triton path is an autograd.Function with setup_context and vmap rules (a batch of x folds
into the convolution's N, anything else maps over the batch), and its backward is two more such
Functions, so vmap over the backward (jacrev, per-sample gradients) works too. The Triton path
is differentiable once: a second derivative (gradgradcheck, hessians) raises an error that
says to use _backend="torch", and forward mode (jvp, jacfwd) is not implemented there (torch
raises). A mask that a transform batches (vmap over masks) takes the PyTorch path, uncached.

torch.compile: a function calling masked_conv2d compiles with fullgraph=True (no graph break)
and recompiles nothing when only values change (a new batch of the same shape, an in-place
mask update, new weights). The PyTorch path is traced as F.conv2d(x, weight * mask); the
Triton path and the CUDA default (whose Triton-or-cuDNN choice depends on the mask's tile
density) are the custom ops sdclr_fast::masked_conv2d_fwd / masked_conv2d_bwd (plain
torch.library.custom_op, opaque to Inductor, fake implementations and a registered autograd
formula) that run the eager code with the version-keyed tile cache; see the torch.compile
section at the end of this file. Eager calls do not go through the ops (host time).

Testing switch: with SDCLR_FAST_FORCE_TRITON=1 (read at call time) or `_backend="triton"`,
CPU tensors go through the Triton kernels too; set TRITON_INTERPRET=1 before Triton is
imported so that they run in the interpreter.
"""
from functools import partial

import torch
import torch.nn.functional as F

from . import _masked_conv_tuned as _tuned
from ._masked import (MaskTiles, autocast_args, bias_grad, build_tiles, cached_tiles, check_block,
                      default_block, define_masked_ops, fold_batch, map_over_batch, mask_scale,
                      twice_error)
from ._op import TRITON_DTYPES, backend_choice, kernels

__all__ = ["masked_conv2d", "prepare_mask", "MaskTiles", "default_block"]

def _kernels():
    return kernels("masked_conv")


# ------------------------------------------------------------------ PyTorch path
def _pytorch_path(x, w, scale_of, bias, stride, padding, dilation, groups):
    """F.conv2d(x, w * scale_of(dtype), ...), the mask as 0/1 in `dtype`. On the CPU a
    bfloat16 call computes in float32, whose accumulation oneDNN's bfloat16 kernels use too, so
    the output is that of a correct bfloat16 kernel up to rounding."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        b = None if bias is None else bias.float()
        return _pytorch_path(x.float(), w.float(), scale_of, b, stride, padding, dilation,
                             groups).to(torch.bfloat16)
    return F.conv2d(x, w * scale_of(w.dtype), bias, stride, padding, dilation, groups)


def _unit_dilation(kernel, dilation):
    """Dilation 1 along a kernel side of size 1, where it changes nothing: torch 2.13's oneDNN
    convolution segfaults on e.g. a channels-last CPU input (2, 2, 6, 1), a (3, 1) kernel with
    bias, stride 2, padding 1 and dilation 2 (a width-1 kernel dilated by 2)."""
    return tuple(1 if k == 1 else d for k, d in zip(kernel, dilation))



# ------------------------------------------------------------------ argument checks
def _pair(value, name, minimum):
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = tuple(value)
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _resolve_padding(padding, kernel, stride, dilation):
    """(top/left padding, extra bottom/right padding). "same" pads like F.conv2d: the odd
    leftover of d * (k - 1) goes to the bottom/right."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            left = tuple(t // 2 for t in total)
            return left, tuple(t - 2 * lo for t, lo in zip(total, left))
        raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    return _pair(padding, "padding", 0), (0, 0)


def _check(x, weight, mask, bias, groups, weight_dtype=None):
    for name, t in (("x", x), ("weight", weight), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:  # an unbatched (C, H, W) input arrives here with N = 1
        raise ValueError(f"x must be a 3-d (C, H, W) or 4-d (N, C, H, W) tensor, got shape "
                         f"{tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be a 4-d (O, C/groups, KH, KW) tensor, got shape "
                         f"{tuple(weight.shape)}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask must have the weight's shape {tuple(weight.shape)}, got "
                         f"{tuple(mask.shape)}")
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be a bool or 0/1 tensor, got dtype {mask.dtype}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if (weight_dtype or weight.dtype) != x.dtype:  # under autocast: the dtype it is cast to
        raise ValueError(f"weight must have the dtype of x ({x.dtype}), got {weight.dtype}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    O, Cg = weight.shape[:2]
    if O % groups != 0:
        raise ValueError(f"groups={groups} must divide the weight's out-channels {O}")
    if x.shape[1] != Cg * groups:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects C/groups * groups = "
                         f"{Cg} * {groups} = {Cg * groups}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (O,):
            raise ValueError(f"bias must be None or a tensor of shape ({O},), got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        if bias.dtype != x.dtype:
            raise ValueError(f"bias must have the dtype of x ({x.dtype}), got {bias.dtype}")
    for name, t in (("weight", weight), ("mask", mask), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


# ------------------------------------------------------------------ tile-occupancy map
def prepare_mask(mask, groups=1, block=None):
    """The `MaskTiles` of a conv mask: which weight tiles the Triton kernels compute.

    Computed once per mask change and cached on the mask (keyed on its version counter, so an
    in-place update such as ``mask.copy_(new)`` is seen); `masked_conv2d` calls it itself, so
    call it only to inspect a mask's tiles or to build them ahead of the first step.

    Args:
        mask: (O, C / groups, KH, KW) bool (or 0/1) tensor.
        groups: the convolution's groups, a positive int dividing O.
        block: (block_o, block_c) powers of two >= 16; default
            ``default_block(O // groups, C / groups)``.

    Returns:
        A `MaskTiles` (immutable; ``tile_density`` is the fraction of tiles computed).

    Raises:
        ValueError: for a mask that is not 4-d, a bad ``groups`` or ``block``.

    Examples:
        >>> import torch, sdclr_fast
        >>> w = torch.randn(64, 64, 3, 3)
        >>> mask = sdclr_fast.magnitude_masks([w], 0.75, block=(32, 32))[0]
        >>> tiles = sdclr_fast.prepare_mask(mask)
        >>> tiles.tile_density                   # one of the four 32x32 tiles kept
        0.25
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(f"mask must be a 4-d tensor of the weight's shape, got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or mask.shape[0] % groups:
        raise ValueError(f"groups must be a positive int dividing out-channels {mask.shape[0]}, "
                         f"got {groups!r}")
    if block is None:
        block = default_block(mask.shape[0] // groups, mask.shape[1])
    block = check_block(block)

    def build(keep):
        # Channels-last (O, KH, KW, C) storage: a mask tile row is then contiguous along the
        # in-channels, so the kernels load it with wide, pipelinable copies.
        mask_u8 = keep.to(torch.uint8).contiguous(memory_format=torch.channels_last)
        return MaskTiles(mask=mask_u8, **build_tiles(keep, groups, block))
    return cached_tiles(mask, (groups, block), build)


# ------------------------------------------------------------------ autograd
def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


class _MaskedConv2dTriton(torch.autograd.Function):
    """Triton path: the mask is applied inside the kernels; empty tiles are skipped."""

    @staticmethod
    def forward(x, weight, tiles, packed, bias, stride, padding, dilation, groups, entry):
        # packed: the masked tiles in x's dtype (None: packed here, e.g. for a batched weight);
        # weight may be fp32 under autocast, x's dtype otherwise. entry: the tuned entry or None.
        k = _kernels()
        if packed is None:
            packed = k.pack(weight, tiles, x.dtype)
        N, _, H, W = x.shape
        O, _, KH, KW = weight.shape
        OH = _out_size(H, KH, stride[0], padding[0], dilation[0])
        OW = _out_size(W, KW, stride[1], padding[1], dilation[1])
        fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        y = torch.empty((N, O, OH, OW), device=x.device, dtype=x.dtype, memory_format=fmt)
        if y.numel():
            k.forward(x, packed, bias, y, tiles, (stride, padding, dilation, groups),
                      _tuned_cfg(entry, tiles, "fwd"))
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, tiles, packed, bias, stride, padding, dilation, groups, entry = inputs
        # The tiles (and their copy of the mask) are those of the mask as it was in forward.
        ctx.save_for_backward(x, weight)
        ctx.tiles, ctx.packed, ctx.entry = tiles, packed, entry
        ctx.conf = ((stride, padding, dilation, groups), bias is not None)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        geom, has_bias = ctx.conf
        need_x, need_w, _, _, need_b = ctx.needs_input_grad[:5]
        gx = None
        if need_x:
            fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
            gx = _GradInput.apply(grad_y, weight, ctx.packed, ctx.tiles, geom, x.shape, fmt,
                                  _tuned_cfg(ctx.entry, ctx.tiles, "bgi"))
        gw = None
        if need_w:
            gw = _GradWeight.apply(grad_y, x, ctx.tiles, geom, weight.dtype,
                                   _tuned_cfg(ctx.entry, ctx.tiles, "bgw"))
        gb = None
        if need_b and has_bias:
            gb = bias_grad(grad_y, (0, 2, 3))
        return gx, gw, None, None, gb, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, tiles, packed, bias, stride, padding, dilation, groups,
             entry):
        args = (x, weight, tiles, packed, bias, stride, padding, dilation, groups, entry)
        if in_dims[0] is not None and in_dims[1] is None and in_dims[4] is None:
            xs, batch = fold_batch(x, in_dims[0])
            y = _MaskedConv2dTriton.apply(xs, *args[1:])
            return y.reshape((batch, -1) + tuple(y.shape[1:])), 0
        return map_over_batch(_MaskedConv2dTriton.apply, info, in_dims, args)


_twice_error = twice_error("masked_conv2d", "F.conv2d(x, weight * mask)")


class _GradInput(torch.autograd.Function):
    """d(loss)/dx of the Triton path: conv_transpose(grad_y, weight * mask)."""

    @staticmethod
    def forward(grad_y, weight, packed, tiles, geom, x_shape, fmt, cfg):
        k = _kernels()
        gx = torch.empty(x_shape, device=grad_y.device, dtype=grad_y.dtype, memory_format=fmt)
        if gx.numel():
            if packed is None:
                packed = k.pack(weight, tiles, grad_y.dtype)
            k.backward_input(grad_y, packed, gx, tiles, geom, cfg)
        return gx

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    backward = _twice_error

    @staticmethod
    def vmap(info, in_dims, grad_y, weight, packed, tiles, geom, x_shape, fmt, cfg):
        if in_dims[0] is not None and in_dims[1] is None:  # e.g. jacrev: a batch of grad_y
            gys, batch = fold_batch(grad_y, in_dims[0])
            gx = _GradInput.apply(gys, weight, packed, tiles, geom,
                                  (gys.shape[0],) + tuple(x_shape[1:]), fmt, cfg)
            return gx.reshape((batch,) + tuple(x_shape)), 0
        return map_over_batch(_GradInput.apply, info, in_dims,
                              (grad_y, weight, packed, tiles, geom, x_shape, fmt, cfg))


class _GradWeight(torch.autograd.Function):
    """d(loss)/dweight of the Triton path: mask * dW, computed over the non-empty tiles."""

    @staticmethod
    def forward(grad_y, x, tiles, geom, dtype, cfg):
        # rounded to x's dtype first, as the gradient of autocast's weight cast would be
        gw = _kernels().backward_weight(x, grad_y, tiles.mask, tiles, geom, x.dtype, cfg=cfg)
        return gw.to(dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    backward = _twice_error

    @staticmethod
    def vmap(info, in_dims, grad_y, x, tiles, geom, dtype, cfg):
        return map_over_batch(_GradWeight.apply, info, in_dims,
                              (grad_y, x, tiles, geom, dtype, cfg))


def _is_channels_last(x):
    return (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)


def _tuned_cfg(entry, tiles, which):
    """The tuned kernel config ("fwd", "bgi", "bgw") of `entry` when it was tuned for these
    tiles' weight tile, else None (the kernels' default_config)."""
    if entry is None or tuple(entry["tile"]) != (tiles.block_o, tiles.block_c):
        return None
    return entry[which]


def _tuned_entry(x, weight, mask, geom):
    """The tuned-table entry of this CUDA call (None elsewhere or when there is none)."""
    if not (x.is_cuda and x.dtype in TRITON_DTYPES):
        return None
    stride, pad, dilation, groups = geom
    density = prepare_mask(mask, groups).tile_density
    return _tuned.lookup(x, weight, stride, pad, dilation, groups, density)


def _backend_for(x, mask, groups, backend, entry=None):
    """'triton' or 'torch'. auto: Triton on CUDA for fp32/fp16/bf16 where the tuned `entry`
    (`_tuned_entry`) measured Triton faster than cuDNN; cuDNN / oneDNN everywhere else."""
    choice = backend_choice(x, backend, "x")
    if choice != "auto":
        return choice
    if not (x.is_cuda and x.dtype in TRITON_DTYPES):
        return "torch"
    return "triton" if _tuned.triton_wins(entry) else "torch"


def masked_conv2d(x, weight, mask, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                  block=None, _backend="auto"):
    """``F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)`` without the masked weight copy.

    grad_weight is mask * dW: pruned weights get no gradient from this op. On CUDA
    (float32 / float16 / bfloat16) it runs the Triton implicit-GEMM kernels on the non-empty
    weight tiles where the tuned table (``kernels/masked_conv_tuned.json``) measured them faster
    than cuDNN for this GPU, shape and tile density, and cuDNN on ``weight * mask`` elsewhere
    (no entry, a mask that fills more than 5/8 of the tiles, or Triton lost the sweep); fp32
    uses TF32 when ``torch.backends.cudnn.allow_tf32`` is set, as F.conv2d does. Everything
    else (CPU, float64) runs ``F.conv2d`` on the weight times a cached 0/1 mask. Under
    torch.compile the call is traced (see the torch.compile page of the docs).

    Args:
        x: (N, C, H, W) input, NCHW or channels-last, or unbatched (C, H, W); floating point.
        weight: (O, C / groups, KH, KW), x's dtype (or float32 under autocast).
        mask: bool (or 0/1) tensor of the weight's shape, on x's device.
        bias: (O,) or None.
        stride: int or pair, >= 1.
        padding: int, pair, ``"same"`` or ``"valid"``.
        dilation: int or pair, >= 1.
        groups: a positive int dividing C and O.
        block: the Triton kernels' (block_o, block_c) weight tile, powers of two >= 16 (default
            `default_block`), e.g. to match coarser pruning blocks.
        _backend: ``"auto"``, ``"triton"`` or ``"torch"``, for tests and benches.

    Returns:
        (N, O, H', W') (or (O, H', W') for an unbatched input) in x's dtype, as F.conv2d.

    Raises:
        ValueError: naming the argument whose shape, dtype or device does not fit, a mask that
            does not match its weight, a bad stride, padding, dilation, groups or block.

    Examples:
        >>> import torch, sdclr_fast
        >>> x, w = torch.randn(2, 8, 6, 6), torch.randn(16, 8, 3, 3, requires_grad=True)
        >>> mask = sdclr_fast.magnitude_masks([w], 0.5)[0]
        >>> y = sdclr_fast.masked_conv2d(x, w, mask, padding=1)
        >>> torch.allclose(y, torch.nn.functional.conv2d(x, w * mask, padding=1), atol=1e-5)
        True
        >>> y.sum().backward()
        >>> bool((w.grad[~mask] == 0).all())     # pruned weights get no gradient
        True
    """
    x, bias, wdt = autocast_args(x, weight, bias)
    if isinstance(x, torch.Tensor) and x.dim() == 3:  # unbatched (C, H, W), as F.conv2d takes
        return masked_conv2d(x.unsqueeze(0), weight, mask, bias, stride, padding, dilation,
                             groups, block=block, _backend=_backend).squeeze(0)
    _check(x, weight, mask, bias, groups, wdt)
    stride = _pair(stride, "stride", 1)
    kernel = tuple(weight.shape[2:])
    dilation = _unit_dilation(kernel, _pair(dilation, "dilation", 1))
    pad, extra = _resolve_padding(padding, kernel, stride, dilation)
    if extra != (0, 0):  # asymmetric "same": the odd pixel goes bottom/right, as in F.conv2d
        x = F.pad(x, (0, extra[1], 0, extra[0]))
    H, W = x.shape[2:]
    for size, k, s, p, d, name in ((H, kernel[0], stride[0], pad[0], dilation[0], "height"),
                                   (W, kernel[1], stride[1], pad[1], dilation[1], "width")):
        if _out_size(size, k, s, p, d) < 1:
            raise ValueError(f"x {name} {size} (padded by {p} per side) is smaller than the "
                             f"dilated kernel {d * (k - 1) + 1}")
    if torch.compiler.is_compiling():  # the traced route: see "torch.compile" above
        return _compiled_call(x, weight, mask, bias, stride, pad, dilation, groups, block,
                              _backend, wdt)
    if torch._C._functorch.is_functorch_wrapped_tensor(mask):
        # batched by vmap (or wrapped by another transform): no per-mask cache can hold it
        if _backend == "triton":
            raise ValueError("mask: the Triton path takes a plain tensor; a mask batched by "
                             "torch.func.vmap needs _backend='auto' or 'torch'")
        return _pytorch_path(x, weight.to(wdt or weight.dtype), mask.to, bias, stride, pad,
                             dilation, groups)
    entry = _tuned_entry(x, weight, mask, (stride, pad, dilation, groups)) if _backend != "torch" else None
    if _backend_for(x, mask, groups, _backend, entry) == "triton":
        if block is None and entry is not None:
            block = tuple(entry["tile"])
        tiles = prepare_mask(mask, groups, block)
        packed = None  # a weight wrapped by torch.func is packed inside the Function
        if not torch._C._functorch.is_functorch_wrapped_tensor(weight):
            with torch.no_grad():
                packed = _kernels().pack(weight, tiles, x.dtype)
        return _MaskedConv2dTriton.apply(x, weight, tiles, packed, bias, stride, pad, dilation,
                                         groups, entry)
    return _pytorch_path(x, weight.to(wdt or weight.dtype), partial(mask_scale, mask), bias,
                         stride, pad, dilation, groups)


# ------------------------------------------------------------------ torch.compile
# Under torch.compile (`torch.compiler.is_compiling()`), `masked_conv2d` takes this route:
#  * the PyTorch path (CPU, float64, `_backend="torch"`, and a mask that a transform batches) is
#    traced as F.conv2d(x, weight * mask), which Dynamo and Inductor take natively (a float
#    mask's 0/1 values are not checked there: that would read a value);
#  * the Triton path (forced: `_backend="triton"` / SDCLR_FAST_FORCE_TRITON=1) and the CUDA
#    default (Triton or cuDNN, chosen per call from the tuned table and the mask's tile density,
#    a value the compiler cannot see) are the custom ops sdclr_fast::masked_conv2d_fwd /
#    masked_conv2d_bwd with fake implementations and a registered autograd formula. Their
#    implementations run the eager path's code: the tile map comes from the per-mask cache
#    (keyed on the mask's version counter, so an in-place mask update `mask.copy_(new)`
#    recompiles nothing and no data-pointer guard exists), then the same kernels.
#    They are plain torch.library.custom_op, opaque to Inductor, not triton_op: the tile map
#    has data-dependent sizes (the number of non-empty tiles) and lives in a host cache, which
#    a triton_op's trace over fake tensors cannot build or read.
#  The forward's mask: the traced path keeps its 0/1 copy for the backward, as eager does; the
#  custom ops save the mask itself (eager keeps a copy), so changing it in place between a
#  compiled forward and its backward makes autograd raise (version check) instead of using
#  the forward's mask. The ops carry the cudagraph_unsafe tag where torch has it
#  (their host-side cache and dispatch must run every call).

def _geom_of(stride, padding, dilation, groups):
    return (tuple(stride), tuple(padding), tuple(dilation), groups)


def _route(x, weight, mask, geom, block, force):
    """(tiles, tuned entry) of the Triton path, or (None, None) for cuDNN / oneDNN: the same
    choice as the eager call (`force`: the Triton path was forced)."""
    entry = _tuned_entry(x, weight, mask, geom)
    if not force and not _tuned.triton_wins(entry):
        return None, None
    if block is None and entry is not None:
        block = tuple(entry["tile"])
    return prepare_mask(mask, geom[3], None if block is None else tuple(block)), entry


def _out_format(x):
    return torch.channels_last if _is_channels_last(x) else torch.contiguous_format


def _op_fwd(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
            stride: list[int], padding: list[int], dilation: list[int], groups: int,
            block: list[int] | None, force: bool) -> torch.Tensor:
    geom = _geom_of(stride, padding, dilation, groups)
    tiles, entry = _route(x, weight, mask, geom, block, force)
    if tiles is None:
        w = weight.to(x.dtype)
        y = F.conv2d(x, w * mask_scale(mask, w.dtype), bias, *geom)
        return y.contiguous(memory_format=_out_format(x))
    packed = _kernels().pack(weight, tiles, x.dtype)
    return _MaskedConv2dTriton.forward(x, weight, tiles, packed, bias, *geom, entry)


def _op_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
            stride: list[int], padding: list[int], dilation: list[int], groups: int,
            block: list[int] | None, force: bool, need_x: bool, need_w: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    geom = _geom_of(stride, padding, dilation, groups)
    tiles, entry = _route(x, weight, mask, geom, block, force)
    gx = gw = x.new_empty(0)
    if tiles is None:
        scale = mask_scale(mask, x.dtype)
        gx_, gw_, _ = torch.ops.aten.convolution_backward(
            grad_y, x, weight.to(x.dtype) * scale, None, list(geom[0]), list(geom[1]),
            list(geom[2]), False, [0, 0], groups, [need_x, need_w, False])
        if need_x:
            gx = gx_.contiguous(memory_format=_out_format(x))
        if need_w:
            gw = (gw_ * scale).to(weight.dtype).contiguous()
        return gx, gw
    if need_x:
        gx = _GradInput.forward(grad_y, weight, None, tiles, geom, x.shape, _out_format(x),
                                _tuned_cfg(entry, tiles, "bgi"))
    if need_w:
        gw = _GradWeight.forward(grad_y, x, tiles, geom, weight.dtype,
                                 _tuned_cfg(entry, tiles, "bgw")).contiguous()
    return gx, gw


def _fake_fwd(x, weight, mask, bias, stride, padding, dilation, groups, block, force):
    # the eager call's shape / dtype / device checks (the weight may be fp32 under autocast)
    _check(x, weight, mask, bias, groups, x.dtype if weight.dtype.is_floating_point else None)
    if force and block is not None:
        check_block(block)
    N, _, H, W = x.shape
    O, _, KH, KW = weight.shape
    OH = _out_size(H, KH, stride[0], padding[0], dilation[0])
    OW = _out_size(W, KW, stride[1], padding[1], dilation[1])
    if OH < 1 or OW < 1:
        raise ValueError(f"x of spatial size {(H, W)} (padded by {tuple(padding)}) is smaller "
                         f"than the dilated kernel")
    return torch.empty((N, O, OH, OW), device=x.device, dtype=x.dtype,
                       memory_format=_out_format(x))


def _fake_bwd(grad_y, x, weight, mask, stride, padding, dilation, groups, block, force, need_x,
              need_w):
    gx = (torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_out_format(x))
          if need_x else x.new_empty(0))
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w \
        else x.new_empty(0)
    return gx, gw


_ops = define_masked_ops("masked_conv2d", _op_fwd, _op_bwd, _fake_fwd, _fake_bwd,
                         bias_dims=(0, 2, 3))


def _compiled_call(x, weight, mask, bias, stride, pad, dilation, groups, block, backend, wdt):
    """masked_conv2d under torch.compile (arguments checked and padding resolved)."""
    w = weight.to(wdt or weight.dtype)
    # without a tuned entry only a forced call (`_backend="triton"`, the env switch) says triton
    forced = backend_choice(x, backend, "x") == "triton"
    if block is not None:
        block = list(block)
    if forced or (backend == "auto" and x.is_cuda and x.dtype in TRITON_DTYPES):
        return _ops["fwd"](x, weight, mask, bias, list(stride), list(pad), list(dilation),
                           groups, block, forced)
    keep = mask if mask.dtype == torch.bool else mask != 0
    return _pytorch_path(x, w, keep.to, bias, stride, pad, dilation, groups)
