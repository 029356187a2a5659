"""Projection heads (the MLP between backbone features and the contrastive loss).

As in the official SDCLR code, both heads end in BatchNorm: SimCLR Linear-BN-ReLU-Linear-BN
(512 -> 512 -> 128 on ResNet-18); SDCLR Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN
(512 -> 512 -> 512 -> 128), with dual BN so that the pruned branch keeps its own statistics in
the head too. The final BN centres and scales each branch's output before NT-Xent normalises it.
Linear layers followed by BN have no bias (BN's shift replaces it); ``last_bn=False`` gives the
plain Linear ending with a bias (SimCLR paper style).
"""
import numbers

from torch import nn

from .dual_bn import DualBatchNorm1d

__all__ = ["ProjectionHead", "simclr_head", "sdclr_head", "moclr_predictor"]


class ProjectionHead(nn.Module):
    """The MLP between backbone features and the contrastive loss (SimCLR / SDCLR heads).

    ``num_layers`` Linear layers: (num_layers - 1) x [Linear, BN, ReLU], then a Linear and, with
    ``last_bn`` (the default, as in the official SDCLR code), a final BN; in_dim -> hidden_dim ->
    ... -> hidden_dim -> out_dim. Linear layers followed by BN have no bias. `simclr_head` and
    `sdclr_head` build SDCLR's two heads.

    Args:
        in_dim: feature size of the backbone, a positive int.
        hidden_dim: width of the hidden layers, a positive int.
        out_dim: projection size, a positive int.
        num_layers: number of Linear layers, >= 1.
        dual_bn: BN layers are `DualBatchNorm1d` (SDCLR) instead of `nn.BatchNorm1d`.
        last_bn: end in BN (the official code) rather than in a Linear with a bias.

    Raises:
        ValueError: for sizes that are not positive ints, flags that are not bools, and (in the
            forward) an input that is not (B, in_dim).

    Examples:
        >>> import torch
        >>> from sdclr_fast import ProjectionHead
        >>> head = ProjectionHead(512, 512, 128, num_layers=3, dual_bn=True)   # SDCLR's head
        >>> head(torch.randn(4, 512)).shape
        torch.Size([4, 128])
    """

    def __init__(self, in_dim, hidden_dim, out_dim, num_layers=2, dual_bn=False, last_bn=True):
        super().__init__()
        for name, v in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim),
                        ("num_layers", num_layers)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name, v in (("dual_bn", dual_bn), ("last_bn", last_bn)):
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be a bool, got {v!r}")
        norm = DualBatchNorm1d if dual_bn else nn.BatchNorm1d
        layers, d = [], int(in_dim)
        for _ in range(int(num_layers) - 1):
            layers += [nn.Linear(d, int(hidden_dim), bias=False), norm(int(hidden_dim)), nn.ReLU(inplace=True)]
            d = int(hidden_dim)
        layers.append(nn.Linear(d, int(out_dim), bias=not last_bn))
        if last_bn:
            layers.append(norm(int(out_dim)))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.hidden_dim, self.out_dim = int(in_dim), int(hidden_dim), int(out_dim)
        self.num_layers, self.dual_bn, self.last_bn = int(num_layers), dual_bn, last_bn

    def forward(self, h):
        if h.dim() != 2 or h.shape[1] != self.in_dim:
            raise ValueError(f"h must be a (B, {self.in_dim}) tensor, got shape {tuple(h.shape)}")
        return self.net(h)


def simclr_head(in_dim, out_dim=128, hidden_dim=None):
    """SDCLR's SimCLR head, plain BN: in_dim -> hidden (default in_dim) -> out_dim, ending in BN."""
    return ProjectionHead(in_dim, in_dim if hidden_dim is None else hidden_dim, out_dim, num_layers=2, dual_bn=False)


def sdclr_head(in_dim, out_dim=128, hidden_dim=None):
    """SDCLR's 3-layer head, dual BN: in_dim -> hidden -> hidden -> out_dim, ending in BN."""
    return ProjectionHead(in_dim, in_dim if hidden_dim is None else hidden_dim, out_dim, num_layers=3, dual_bn=True)


def moclr_predictor(dim, hidden_dim):
    """MoCLR's / BYOL's predictor on the projection, plain BN: dim -> hidden_dim -> dim
    (Linear-BN-ReLU-Linear, no final BN, as BYOL's predictor)."""
    return ProjectionHead(dim, hidden_dim, dim, num_layers=2, dual_bn=False, last_bn=False)
