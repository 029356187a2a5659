"""`MaskedLinear`: a drop-in `nn.Linear` that carries a pruning mask.

The linear counterpart of `MaskedConv2d`: a persistent bool mask buffer of the weight's shape
(in the state dict), applied while `mask_enabled` is True through
`sdclr_fast.ops.masked_linear` (weight * mask, never materialised on CUDA where the mask
empties whole weight tiles; pruned weights get no gradient from the call), ignored while it is
False (the plain `nn.Linear` forward).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..ops.masked_linear import masked_linear
from .masked_conv import MaskedConv2d

__all__ = ["MaskedLinear"]


class MaskedLinear(nn.Linear):
    """`nn.Linear` whose forward applies `self.mask` while `self.mask_enabled` is True.

    Same constructor as `nn.Linear`. The mask starts all True and `mask_enabled` True;
    `SelfCompetitor` turns masks off for the dense branch and on for the pruned one.

    Examples:
        >>> import torch
        >>> from sdclr_fast import MaskedLinear
        >>> lin = MaskedLinear(8, 4)
        >>> lin.set_mask(torch.rand(4, 8) > 0.5)
        >>> y = lin(torch.randn(2, 8))     # F.linear(x, weight * mask, bias)
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("mask", torch.ones(self.weight.shape, dtype=torch.bool,
                                                device=self.weight.device))
        self.mask_enabled = True

    @classmethod
    def from_linear(cls, linear):
        """A MaskedLinear with `linear`'s shape and a copy of its parameters."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        out = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(linear.weight)
            if linear.bias is not None:
                out.bias.copy_(linear.bias)
        out.train(linear.training)
        return out

    # the same mask handling as MaskedConv2d (it reads only self.weight and self.mask)
    set_mask = MaskedConv2d.set_mask
    density = MaskedConv2d.density

    def forward(self, x):
        if not self.mask_enabled:
            return F.linear(x, self.weight, self.bias)
        return masked_linear(x, self.weight, self.mask, self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", mask_enabled={self.mask_enabled}"
