"""`MaskedConv2d`: a drop-in `nn.Conv2d` that carries a pruning mask.

The mask is a persistent bool buffer of the weight's shape (saved in the state dict, so a
checkpoint restores the self-competitor exactly; the official SDCLR code keeps it outside the
state dict). While `mask_enabled` is True the forward runs `sdclr_fast.ops.masked_conv2d`
(weight * mask, never materialised on CUDA; pruned weights get no gradient from this call);
while it is False the forward is the plain convolution and the mask is ignored.
"""
import torch
from torch import nn

from ..ops.masked_conv import masked_conv2d

__all__ = ["MaskedConv2d"]


class MaskedConv2d(nn.Conv2d):
    """`nn.Conv2d` whose forward applies ``self.mask`` while ``self.mask_enabled`` is True.

    Same constructor as `nn.Conv2d` (only ``padding_mode="zeros"``). The mask is a persistent
    bool buffer of the weight's shape (saved in the state dict); it starts all True and
    ``mask_enabled`` starts True, so on its own the module is a conv with a trivial pruning
    mask. While enabled the forward is `masked_conv2d` (pruned weights get no gradient from
    it); `SelfCompetitor` turns masks off for the dense branch and on for the pruned one.
    ``set_mask`` updates the mask in place, ``from_conv`` converts an existing conv.

    Args:
        in_channels: as nn.Conv2d.
        out_channels: as nn.Conv2d.
        kernel_size: as nn.Conv2d.
        stride: as nn.Conv2d.
        padding: as nn.Conv2d.
        dilation: as nn.Conv2d.
        groups: as nn.Conv2d.
        bias: as nn.Conv2d.
        padding_mode: only ``"zeros"``.
        device: as nn.Conv2d.
        dtype: as nn.Conv2d.

    Raises:
        ValueError: for another ``padding_mode``; ``set_mask`` for a mask of another shape or
            device, or with values other than 0 and 1.

    Examples:
        >>> import torch
        >>> from sdclr_fast import MaskedConv2d, magnitude_masks
        >>> conv = MaskedConv2d(8, 16, 3, padding=1)
        >>> conv.set_mask(magnitude_masks([conv.weight], 0.9)[0])
        >>> conv(torch.randn(2, 8, 6, 6)).shape
        torch.Size([2, 16, 6, 6])
        >>> conv.mask_enabled = False              # the dense branch: the plain convolution
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None):
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode: MaskedConv2d supports only 'zeros', got {padding_mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self.register_buffer("mask", torch.ones(self.weight.shape, dtype=torch.bool,
                                                device=self.weight.device))
        self.mask_enabled = True

    @classmethod
    def from_conv(cls, conv):
        """A MaskedConv2d with `conv`'s configuration and a copy of its parameters."""
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        out = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(conv.weight)
            if conv.bias is not None:
                out.bias.copy_(conv.bias)
        return out

    @torch.no_grad()
    def set_mask(self, mask):
        """Copy `mask` (bool, or a 0/1 tensor of any real dtype, of the weight's shape, on the
        weight's device) into the mask buffer in place: the buffer object stays the same, so
        optimisers, DDP and the masked conv's cache keep working (the cache follows the
        buffer's version counter)."""
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"mask must have the weight's shape {tuple(self.weight.shape)}, got "
                             f"{tuple(mask.shape)}")
        if mask.device != self.mask.device:
            raise ValueError(f"mask must be on the module's device {self.mask.device}, got {mask.device}")
        if mask.dtype != torch.bool:
            if mask.dtype.is_complex:
                raise ValueError(f"mask must be a bool or 0/1 tensor, got dtype {mask.dtype}")
            if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must hold only 0 and 1 (or be a bool tensor)")
            mask = mask != 0
        self.mask.copy_(mask)

    def density(self):
        """Fraction of weights the mask keeps."""
        return float(self.mask.sum()) / max(self.mask.numel(), 1)

    def forward(self, x):
        if not self.mask_enabled:
            return self._conv_forward(x, self.weight, self.bias)
        # eager and compiled alike: under torch.compile the op is a custom op with a fake
        # implementation, so the graph holds it whole and the block-sparse kernel still runs
        return masked_conv2d(x, self.weight, self.mask, self.bias, self.stride,
                             self.padding, self.dilation, self.groups)

    def extra_repr(self):
        return super().extra_repr() + f", mask_enabled={self.mask_enabled}"
