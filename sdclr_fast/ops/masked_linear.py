"""Mask-applied (pruned) linear layer: `masked_linear(x, weight, mask, bias=None)`.

Equal in value and gradients to `F.linear(x, weight * mask, bias)` (grad_weight = mask * dW):

* CUDA (fp32 / fp16 / bf16) when the mask empties enough weight tiles: Triton block-sparse
  GEMMs (kernels/masked_linear.py) for the forward, grad_input and grad_weight that walk only
  the non-empty (block_n x block_k) weight tiles. The tile map is the masked convolution's
  `MaskTiles` (one tap, one group), built once per mask change and cached on the mask tensor,
  keyed on its version counter: a mask fixed for an SDCLR epoch costs one small pass per
  epoch. Each forward packs the masked weight of the non-empty tiles once, in the compute
  dtype (also under autocast), and its backward reuses the packed tiles.
* CPU, float64, and CUDA masks that leave more than `DENSE_TILE_FRACTION` of the tiles
  occupied (unstructured masks at any sparsity SDCLR uses): plain autograd on
  `F.linear(x, weight * scale)`, `scale` the mask as 0/1 in the weight's dtype, cached with the
  mask; cuBLAS / oneDNN do the GEMM. Tile skipping only pays off where whole tiles are empty,
  e.g. `magnitude_masks(..., block=(32, 32))`.

The mask is captured at forward time (both paths hold their own copy). Pruned weights get zero
gradient. Non-finite values in pruned weights: the PyTorch path propagates them as
`F.linear(x, weight * mask)` does (nan * 0 = nan); the Triton kernels select instead of
multiplying, so there they contribute exactly zero.

Shapes: x (..., K) with any number of leading dims (a 1-d x gives a 1-d result, as F.linear);
weight and mask (N, K); bias (N,) or None; result (..., N).

torch.func: grad, vjp, jacrev and vmap work on both paths (the Triton path is autograd
Functions with vmap rules: a batch of x folds into the GEMM's rows). The Triton path is
differentiable once; forward mode is not implemented there.

torch.compile: a function calling masked_linear compiles with fullgraph=True. The PyTorch path
is traced as F.linear(x, weight * mask, bias); the Triton path and the CUDA default (whose
choice depends on the mask's tile density, a value the compiler cannot see) are the custom
ops sdclr_fast::masked_linear_fwd / masked_linear_bwd (fake implementations, registered
autograd), which run the eager code with the version-keyed tile cache, as masked_conv2d's do.

Testing switch: `_backend="triton"` or SDCLR_FAST_FORCE_TRITON=1 sends CPU tensors through the
kernels too (under TRITON_INTERPRET=1, set before Triton is imported).
"""
import torch
import torch.nn.functional as F

from ._masked import (MaskTiles, autocast_args, bias_grad, build_tiles, cached_tiles, check_block,
                      default_block, define_masked_ops, fold_batch, map_over_batch, mask_scale,
                      twice_error)
from ._op import TRITON_DTYPES, backend_choice, kernels

__all__ = ["masked_linear", "prepare_linear_mask", "DENSE_TILE_FRACTION"]

# Above this fraction of occupied weight tiles the CUDA default is cuBLAS on the masked copy.
# Not yet measured on a GPU (bench/bench_masked_linear.py measures it): a block-sparse GEMM
# over half the tiles does half the FLOPs at a lower efficiency than cuBLAS.
DENSE_TILE_FRACTION = 0.5


def _kernels():
    return kernels("masked_linear")


# ------------------------------------------------------------------ checks and tile map
def _check(x, weight, mask, bias, weight_dtype=None):
    for name, t in (("x", x), ("weight", weight), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a 0-d tensor")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-d (out_features, in_features) tensor, got shape "
                         f"{tuple(weight.shape)}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask must have the weight's shape {tuple(weight.shape)}, got "
                         f"{tuple(mask.shape)}")
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be a bool or 0/1 tensor, got dtype {mask.dtype}")
    if (weight_dtype or weight.dtype) != x.dtype:  # under autocast: the dtype it is cast to
        raise ValueError(f"weight must have the dtype of x ({x.dtype}), got {weight.dtype}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight expects "
                         f"in_features = {weight.shape[1]}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},), got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        if bias.dtype != x.dtype:
            raise ValueError(f"bias must have the dtype of x ({x.dtype}), got {bias.dtype}")
    for name, t in (("weight", weight), ("mask", mask), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def prepare_linear_mask(mask, block=None):
    """The `MaskTiles` of a (out_features, in_features) mask for the kernels, computed once per
    mask change and cached on the mask (`masked_linear` calls this itself).

    block: the (block_n, block_k) weight tile, powers of two >= 16; default
    `default_block(out_features, in_features)` (32 x 32 where both sides have >= 32). Its
    `tile_density` is the fraction of tiles the kernels compute.

    Example: ``prepare_linear_mask(torch.ones(64, 48, dtype=torch.bool)).tile_density == 1.0``.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a 2-d tensor of the weight's shape, got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    block = check_block(default_block(*mask.shape) if block is None else block)

    def build(keep):
        # (N, K, 1, 1): the convolution's layout with one tap, read by the shared packer
        mask_u8 = keep.to(torch.uint8).contiguous()[:, :, None, None]
        return MaskTiles(mask=mask_u8, **build_tiles(keep[:, :, None, None], 1, block))
    return cached_tiles(mask, ("linear", block), build)


def _pack(weight, tiles, dtype):
    return _kernels().pack(weight[:, :, None, None], tiles, dtype)


# ------------------------------------------------------------------ autograd (Triton path)
_twice_error = twice_error("masked_linear", "F.linear(x, weight * mask, bias)")


class _MaskedLinearTriton(torch.autograd.Function):
    """Triton path on 2-d x: the mask is applied inside the kernels, empty tiles skipped."""

    @staticmethod
    def forward(x, weight, tiles, packed, bias):
        # packed: the masked tiles in x's dtype (None: packed here, e.g. for a batched weight)
        k = _kernels()
        if packed is None:
            packed = _pack(weight, tiles, x.dtype)
        y = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
        if y.numel():
            k.forward(x, packed, bias, y, tiles)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, tiles, packed, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.tiles, ctx.packed, ctx.has_bias = tiles, packed, bias is not None

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        need_x, need_w, _, _, need_b = ctx.needs_input_grad[:5]
        gx = _GradInput.apply(grad_y, weight, ctx.packed, ctx.tiles, x.shape[1]) if need_x else None
        gw = _GradWeight.apply(grad_y, x, ctx.tiles, weight.dtype) if need_w else None
        gb = None
        if need_b and ctx.has_bias:
            gb = bias_grad(grad_y, 0)
        return gx, gw, None, None, gb

    @staticmethod
    def vmap(info, in_dims, x, weight, tiles, packed, bias):
        if in_dims[0] is not None and in_dims[1] is None and in_dims[4] is None:
            xs, batch = fold_batch(x, in_dims[0])
            y = _MaskedLinearTriton.apply(xs, weight, tiles, packed, bias)
            return y.reshape(batch, -1, y.shape[-1]), 0
        return map_over_batch(_MaskedLinearTriton.apply, info, in_dims,
                              (x, weight, tiles, packed, bias))


class _GradInput(torch.autograd.Function):
    """d(loss)/dx of the Triton path: grad_y @ (weight * mask)."""

    @staticmethod
    def forward(grad_y, weight, packed, tiles, in_features):
        gx = torch.empty((grad_y.shape[0], in_features), device=grad_y.device, dtype=grad_y.dtype)
        if gx.numel():
            if packed is None:
                packed = _pack(weight, tiles, grad_y.dtype)
            _kernels().backward_input(grad_y, packed, gx, tiles)
        return gx

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    backward = _twice_error

    @staticmethod
    def vmap(info, in_dims, grad_y, weight, packed, tiles, in_features):
        if in_dims[0] is not None and in_dims[1] is None:  # e.g. jacrev: a batch of grad_y
            gys, batch = fold_batch(grad_y, in_dims[0])
            gx = _GradInput.apply(gys, weight, packed, tiles, in_features)
            return gx.reshape(batch, -1, in_features), 0
        return map_over_batch(_GradInput.apply, info, in_dims,
                              (grad_y, weight, packed, tiles, in_features))


class _GradWeight(torch.autograd.Function):
    """d(loss)/dweight of the Triton path: mask * grad_y^T @ x over the non-empty tiles."""

    @staticmethod
    def forward(grad_y, x, tiles, dtype):
        # rounded to x's dtype first, as the gradient of autocast's weight cast would be
        return _kernels().backward_weight(x, grad_y, tiles, x.dtype).to(dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    backward = _twice_error

    @staticmethod
    def vmap(info, in_dims, grad_y, x, tiles, dtype):
        return map_over_batch(_GradWeight.apply, info, in_dims, (grad_y, x, tiles, dtype))


# ------------------------------------------------------------------ dispatch
def _backend_for(x, mask, backend, block):
    """'triton' or 'torch'. auto: Triton on CUDA for fp32/fp16/bf16 when at most
    DENSE_TILE_FRACTION of the weight tiles are occupied; PyTorch everywhere else."""
    choice = backend_choice(x, backend, "x")
    if choice != "auto":
        return choice
    if not (x.is_cuda and x.dtype in TRITON_DTYPES):
        return "torch"
    return "triton" if prepare_linear_mask(mask, block).tile_density <= DENSE_TILE_FRACTION else "torch"


def masked_linear(x, weight, mask, bias=None, *, block=None, _backend="auto"):
    """`F.linear(x, weight * mask, bias)` without the masked weight copy on CUDA;
    grad_weight is mask * dW (pruned weights get no gradient from this op).

    Args:
        x: (..., in_features) floating-point tensor, any leading dims (also none).
        weight: (out_features, in_features), x's dtype (or float32 under autocast).
        mask: bool (or 0/1) tensor of the weight's shape, on x's device.
        bias: (out_features,) or None.
        block: (block_n, block_k) weight tile of the Triton kernels (powers of two >= 16),
            default `default_block`; match it to the pruning blocks.
        _backend: "auto", "triton" or "torch" (for tests and benches).

    Returns:
        (..., out_features) tensor of x's dtype.

    Raises:
        ValueError: naming the argument whose shape, dtype or device does not fit.

    Examples:
        >>> import torch
        >>> from sdclr_fast import masked_linear
        >>> w = torch.randn(3, 8, requires_grad=True)
        >>> mask = torch.rand(3, 8) > 0.5
        >>> y = masked_linear(torch.randn(2, 4, 8), w, mask)   # (2, 4, 3)
        >>> y.sum().backward()                                  # w.grad is 0 where mask is False
    """
    x, bias, wdt = autocast_args(x, weight, bias)
    _check(x, weight, mask, bias, wdt)
    if block is not None:
        block = check_block(block)
    lead, out_features = x.shape[:-1], weight.shape[0]
    if torch.compiler.is_compiling():
        return _compiled_call(x, weight, mask, bias, block, _backend, wdt)
    if torch._C._functorch.is_functorch_wrapped_tensor(mask):
        # batched by vmap (or wrapped by another transform): no per-mask cache can hold it
        if _backend == "triton":
            raise ValueError("mask: the Triton path takes a plain tensor; a mask batched by "
                             "torch.func.vmap needs _backend='auto' or 'torch'")
        w = weight.to(wdt or weight.dtype)
        return F.linear(x, w * mask.to(w.dtype), bias)
    if _backend_for(x, mask, _backend, block) == "triton":
        tiles = prepare_linear_mask(mask, block)
        packed = None  # a weight wrapped by torch.func is packed inside the Function
        if not torch._C._functorch.is_functorch_wrapped_tensor(weight):
            with torch.no_grad():
                packed = _pack(weight, tiles, x.dtype)
        y = _MaskedLinearTriton.apply(x.reshape(lead.numel(), x.shape[-1]), weight, tiles,
                                      packed, bias)
        return y.reshape(*lead, out_features)
    w = weight.to(wdt or weight.dtype)
    return F.linear(x, w * mask_scale(mask, w.dtype), bias)


# ------------------------------------------------------------------ torch.compile
# As masked_conv2d: the PyTorch path is traced as F.linear(x, weight * mask); the Triton path
# and the CUDA default are the custom ops below (opaque to Inductor; their tile map has
# data-dependent sizes and lives in the per-mask host cache).

def _route(x, mask, block, force):
    """The Triton path's tiles, or None for cuBLAS / oneDNN: the eager call's choice."""
    block = None if block is None else tuple(block)
    if force or _backend_for(x, mask, "auto", block) == "triton":
        return prepare_linear_mask(mask, block)
    return None


def _op_fwd(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
            block: list[int] | None, force: bool) -> torch.Tensor:
    tiles = _route(x, mask, block, force)
    if tiles is None:
        w = weight.to(x.dtype)
        return F.linear(x, w * mask_scale(mask, w.dtype), bias)
    return _MaskedLinearTriton.forward(x, weight, tiles, _pack(weight, tiles, x.dtype), bias)


def _op_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
            block: list[int] | None, force: bool, need_x: bool, need_w: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    tiles = _route(x, mask, block, force)
    gx = gw = x.new_empty(0)
    if tiles is None:
        scale = mask_scale(mask, x.dtype)
        if need_x:
            gx = grad_y @ (weight.to(x.dtype) * scale)
        if need_w:
            gw = (grad_y.t() @ x * scale).to(weight.dtype)
        return gx, gw
    if need_x:
        gx = _GradInput.forward(grad_y, weight, None, tiles, x.shape[1])
    if need_w:
        gw = _GradWeight.forward(grad_y, x, tiles, weight.dtype)
    return gx, gw


def _fake_fwd(x, weight, mask, bias, block, force):
    _check(x, weight, mask, bias, x.dtype if weight.dtype.is_floating_point else None)
    if x.dim() != 2:
        raise ValueError(f"masked_linear_fwd takes 2-d x (rows, in_features), got {tuple(x.shape)}")
    return x.new_empty((x.shape[0], weight.shape[0]))


def _fake_bwd(grad_y, x, weight, mask, block, force, need_x, need_w):
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty(0)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else x.new_empty(0)
    return gx, gw


_ops = define_masked_ops("masked_linear", _op_fwd, _op_bwd, _fake_fwd, _fake_bwd, bias_dims=0)


def _compiled_call(x, weight, mask, bias, block, backend, wdt):
    """masked_linear under torch.compile (arguments checked)."""
    w = weight.to(wdt or weight.dtype)
    # only a forced call (`_backend="triton"`, the env switch) is decided here: "auto" on CUDA
    # depends on the mask's tile density, which the op reads at run time
    forced = backend_choice(x, backend, "x") == "triton"
    if forced or (backend == "auto" and x.is_cuda and x.dtype in TRITON_DTYPES):
        y = _ops["fwd"](x.reshape(x.shape[:-1].numel(), x.shape[-1]), weight, mask, bias,
                        None if block is None else list(block), forced)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    keep = mask if mask.dtype == torch.bool else mask != 0
    return F.linear(x, w * keep.to(w.dtype), bias)
