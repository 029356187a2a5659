"""Dual batch normalisation: one set of affine parameters and running statistics per branch.

SDCLR's dense network and its pruned self-competitor share every conv and linear weight but
not their batch-norm layers: pruning shifts the activation statistics, so each branch keeps its
own. A `DualBatchNorm*d` holds two ordinary `nn.BatchNorm*d` children, ``dense`` and
``pruned``, and forwards through the one named by its `branch` attribute (set on all dual
modules at once by `SelfCompetitor`). Keeping real `_BatchNorm` children, rather than
reimplementing the normalisation, lets `nn.SyncBatchNorm.convert_sync_batchnorm` reach and
convert both of them for DDP.
"""
from torch import nn

__all__ = ["BRANCHES", "DualBatchNorm1d", "DualBatchNorm2d", "check_branch"]

BRANCHES = ("dense", "pruned")


def check_branch(branch):
    if branch not in BRANCHES:
        raise ValueError(f"branch must be 'dense' or 'pruned', got {branch!r}")
    return branch


class _DualBatchNorm(nn.Module):
    _bn = None  # the nn.BatchNorm class of each branch

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        super().__init__()
        kw = dict(eps=eps, momentum=momentum, affine=affine,
                  track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.dense = self._bn(num_features, **kw)
        self.pruned = self._bn(num_features, **kw)
        self.num_features = num_features
        self._branch = "dense"

    @property
    def branch(self):
        """The branch whose parameters and statistics the forward uses: 'dense' or 'pruned'."""
        return self._branch

    @branch.setter
    def branch(self, value):
        self._branch = check_branch(value)

    def forward(self, x):
        return (self.pruned if self._branch == "pruned" else self.dense)(x)

    def extra_repr(self):
        return f"{self.num_features}, branch={self._branch}"


class DualBatchNorm2d(_DualBatchNorm):
    """Two `nn.BatchNorm2d` (``dense``, ``pruned``) behind one module; same arguments."""

    _bn = nn.BatchNorm2d


class DualBatchNorm1d(_DualBatchNorm):
    """Two `nn.BatchNorm1d` (``dense``, ``pruned``) behind one module; same arguments. Used in
    the projection heads."""

    _bn = nn.BatchNorm1d
