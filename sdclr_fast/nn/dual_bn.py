"""Dual batch normalisation: one set of affine parameters and running statistics per branch.

SDCLR's dense network and its pruned self-competitor share every conv and linear weight but
not their batch-norm layers: pruning shifts the activation statistics, so each branch keeps its
own. A `DualBatchNorm*d` holds two ordinary `nn.BatchNorm*d` children, ``dense`` and
``pruned``, and forwards through the one named by its `branch` attribute (set on all dual
modules at once by `SelfCompetitor`). Keeping real `_BatchNorm` children, rather than
reimplementing the normalisation, lets `nn.SyncBatchNorm.convert_sync_batchnorm` reach and
convert both of them for DDP.

`DualLayerNorm` is the transformer analogue (one LayerNorm affine pair per branch). It is not
in the SDCLR paper, which has ResNets only: it carries the dual-BN idea over to models whose
normalisation is LayerNorm, so that `self_competitor` can turn a ViT into a self-competitor.
`dual_norm(norm)` turns an existing normalisation layer of any class into its dual form with
both branches starting as copies of it.
"""
import copy

from torch import nn

__all__ = ["BRANCHES", "DualBatchNorm1d", "DualBatchNorm2d", "DualLayerNorm", "DualNorm",
           "check_branch", "dual_norm"]

BRANCHES = ("dense", "pruned")


def check_branch(branch):
    if branch not in BRANCHES:
        raise ValueError(f"branch must be 'dense' or 'pruned', got {branch!r}")
    return branch


class DualNorm(nn.Module):
    """Two normalisation layers, ``dense`` and ``pruned``, behind one module; the forward runs
    the one named by `branch`. The base of every dual layer here; on its own it wraps layers
    of any class (`dual_norm` uses it for e.g. timm's BatchNormAct2d, whose activation must be
    kept)."""

    def __init__(self, dense, pruned):
        super().__init__()
        if not isinstance(dense, nn.Module) or not isinstance(pruned, nn.Module):
            raise ValueError(f"dense and pruned must be nn.Modules, got {type(dense).__name__} "
                             f"and {type(pruned).__name__}")
        self.dense = dense
        self.pruned = pruned
        self._branch = "dense"

    @classmethod
    def from_norm(cls, norm):
        """The dual layer whose branches both start as copies of `norm` (parameters, running
        statistics, train / eval mode)."""
        out = cls.__new__(cls)
        DualNorm.__init__(out, copy.deepcopy(norm), copy.deepcopy(norm))
        if hasattr(norm, "num_features"):
            out.num_features = norm.num_features
        out.train(norm.training)
        return out

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
        return f"branch={self._branch}"


class _DualBatchNorm(DualNorm):
    _bn = None  # the nn.BatchNorm class of each branch

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        kw = dict(eps=eps, momentum=momentum, affine=affine,
                  track_running_stats=track_running_stats, device=device, dtype=dtype)
        super().__init__(self._bn(num_features, **kw), self._bn(num_features, **kw))
        self.num_features = num_features

    def extra_repr(self):
        return f"{self.num_features}, branch={self._branch}"


class DualBatchNorm2d(_DualBatchNorm):
    """Two `nn.BatchNorm2d` (``dense``, ``pruned``) behind one module: SDCLR's dual BN.

    The forward normalises (N, C, H, W) with the branch named by `branch` (``"dense"`` or
    ``"pruned"``; `SelfCompetitor` sets it on every dual layer at once). Each branch has its own
    affine parameters and running statistics; both are real BatchNorm children, so
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` converts them.

    Args:
        num_features: channels C of the input.
        eps: as nn.BatchNorm2d.
        momentum: as nn.BatchNorm2d.
        affine: as nn.BatchNorm2d.
        track_running_stats: as nn.BatchNorm2d.
        device: as nn.BatchNorm2d.
        dtype: as nn.BatchNorm2d.

    Raises:
        ValueError: when `branch` is set to anything but ``"dense"`` or ``"pruned"``.

    Examples:
        >>> import torch
        >>> from sdclr_fast import DualBatchNorm2d
        >>> bn = DualBatchNorm2d(8)
        >>> bn.branch = "pruned"
        >>> y = bn(torch.randn(4, 8, 5, 5))           # the pruned branch's statistics move
        >>> bool(bn.pruned.num_batches_tracked == 1), bool(bn.dense.num_batches_tracked == 0)
        (True, True)
    """

    _bn = nn.BatchNorm2d


class DualBatchNorm1d(_DualBatchNorm):
    """Two `nn.BatchNorm1d` (``dense``, ``pruned``) behind one module: dual BN in the projection heads.

    As `DualBatchNorm2d`, for (N, C) or (N, C, L) inputs.

    Args:
        num_features: channels C of the input.
        eps: as nn.BatchNorm1d.
        momentum: as nn.BatchNorm1d.
        affine: as nn.BatchNorm1d.
        track_running_stats: as nn.BatchNorm1d.
        device: as nn.BatchNorm1d.
        dtype: as nn.BatchNorm1d.

    Raises:
        ValueError: when `branch` is set to anything but ``"dense"`` or ``"pruned"``.

    Examples:
        >>> import torch
        >>> from sdclr_fast import DualBatchNorm1d
        >>> bn = DualBatchNorm1d(16)
        >>> bn(torch.randn(4, 16)).shape                 # the dense branch by default
        torch.Size([4, 16])
    """

    _bn = nn.BatchNorm1d


class DualLayerNorm(DualNorm):
    """Two `nn.LayerNorm` (``dense``, ``pruned``) behind one module; same arguments. The
    transformer analogue of dual BN (not from the SDCLR paper): the pruned branch keeps its own
    affine pair, since pruning shifts what each feature's scale and shift should be.

    Examples:
        >>> import torch
        >>> from sdclr_fast import DualLayerNorm
        >>> norm = DualLayerNorm(16)
        >>> norm.branch = "pruned"          # SelfCompetitor sets this on every dual layer
        >>> y = norm(torch.randn(2, 5, 16))  # the pruned branch's LayerNorm
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=None):
        kw = dict(eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                  dtype=dtype)
        super().__init__(nn.LayerNorm(normalized_shape, **kw), nn.LayerNorm(normalized_shape, **kw))

    @property
    def normalized_shape(self):
        return self.dense.normalized_shape

    def extra_repr(self):
        return f"{self.normalized_shape}, branch={self._branch}"


_EXACT = {nn.BatchNorm1d: DualBatchNorm1d, nn.BatchNorm2d: DualBatchNorm2d,
          nn.LayerNorm: DualLayerNorm}


def dual_norm(norm):
    """`norm` as a dual layer whose two branches start as copies of it: `DualBatchNorm1d`,
    `DualBatchNorm2d` or `DualLayerNorm` for those exact classes, a `DualNorm` of two copies
    for subclasses (which may change the forward, e.g. fuse an activation).

    Raises ValueError unless `norm` is a BatchNorm or LayerNorm (or a subclass)."""
    if not isinstance(norm, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
        raise ValueError(f"norm must be a BatchNorm or LayerNorm module, got {type(norm).__name__}")
    return _EXACT.get(type(norm), DualNorm).from_norm(norm)
