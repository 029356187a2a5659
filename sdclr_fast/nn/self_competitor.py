"""SDCLR's self-competitor: one network with a dense and a pruned branch sharing all weights.

The dense branch is the backbone and head as they are (masks off, the dense BN of every dual
BN). The pruned branch multiplies every backbone conv weight by its mask (`MaskedConv2d`) and
uses the pruned BN. Conv and linear weights are the same tensors in both branches, so one
backward of a joint loss such as NT-Xent(z_dense(v1), z_pruned(v2)) gives the official code's
gradient (it needs three forwards and two backwards); pruned weights get gradient only through
the dense branch (d(w * m)/dw = m).

The branch is a flag set on every `MaskedConv2d` / `MaskedLinear` of the backbone and every
dual norm of the model for the duration of a call (`forward(x, branch=...)`, `features(x, branch=...)`) or of a
``with model.branch("pruned"):`` block. Outside those the model is in the dense branch.
"""
import contextlib
import fnmatch
import math

import torch
from torch import nn

from ..ops.prune import magnitude_masks
from .dual_bn import DualNorm, check_branch, dual_norm
from .heads import moclr_predictor, sdclr_head, simclr_head
from .masked_conv import MaskedConv2d
from .masked_linear import MaskedLinear
from .resnet import resnet18, resnet34, resnet50

__all__ = ["SelfCompetitor", "build_model", "self_competitor", "to_masked_convs", "ARCHS",
           "METHODS", "DEFAULT_EXCLUDE", "PRUNABLE"]

_MASKED = (MaskedConv2d, MaskedLinear)

ARCHS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
# The model each method trains: "moclr" is SimCLR's model (plain BN, SimCLR head) plus a
# predictor on the projection; its EMA target network is a training-time copy (train/moclr.py).
METHODS = ("simclr", "sdclr", "moclr")


def to_masked_convs(module):
    """Replace every plain `nn.Conv2d` inside `module` (in place; `module` itself when it is
    one) by a `MaskedConv2d` with the same parameters, so that a third-party backbone can serve
    as a self-competitor. Returns the module (the new one when `module` was a conv)."""
    if type(module) is nn.Conv2d:
        return MaskedConv2d.from_conv(module)
    for name, child in module.named_children():
        new = to_masked_convs(child)
        if new is not child:
            setattr(module, name, new)
    return module


PRUNABLE = ("conv", "linear")
# Never pruned by default (module names in the backbone, fnmatch patterns; a match excludes the
# module and everything inside it): a ViT's patch embedding and any classifier / head. The
# position embedding is a parameter, not a layer, and is never pruned.
DEFAULT_EXCLUDE = ("patch_embed*", "head*", "fc", "classifier*")


def self_competitor(model, head=None, *, prune=PRUNABLE, exclude=DEFAULT_EXCLUDE, dual_norms=True,
                    proj_dim=128, predictor=None):
    """Turn any image model into SDCLR's dense network + pruned self-competitor, in place.

    Converts, inside `model`: every `nn.Conv2d` into a `MaskedConv2d` ("conv" in `prune`),
    every `nn.Linear` into a `MaskedLinear` ("linear" in `prune`), unless the layer or a module
    around it matches a pattern of `exclude`; with `dual_norms`, every BatchNorm / LayerNorm
    (excluded parts included) into a dual layer whose two branches start as copies of it
    (`dual_norm`: statistics and affine parameters carried into both). Weights stay shared.

    Defaults: a CNN gets every conv pruned (stem and shortcuts included, as the official
    SDCLR code does) and its classifier (``fc``, ``classifier``, ``head``) left alone; a ViT
    gets its attention (qkv, proj) and MLP Linear weights pruned, not the patch embedding, the
    position embedding or the head. Subclasses of nn.Conv2d / nn.Linear (which may compute
    something else, e.g. weight standardisation, or whose weight is read by their parent, as
    nn.MultiheadAttention's out_proj) stay dense, as do excluded layers: `.excluded` on the
    result lists them all.

    Args:
        model: nn.Module mapping images to (B, D) features (e.g. a timm model built with
            ``num_classes=0``).
        head: projection head on the features; None builds SDCLR's 3-layer head with dual BN
            (SimCLR's 2-layer one with plain BN when dual_norms is False) from
            ``model.num_features`` or ``model.feature_dim``.
        prune: which kinds of layer to prune, a subset of ("conv", "linear").
        exclude: fnmatch patterns of module names in `model` never pruned.
        dual_norms: convert norms to dual ones (SDCLR); False keeps them shared (SimCLR).
        proj_dim: output size of the default head.
        predictor: optional module on the projection (MoCLR's).

    Returns:
        `SelfCompetitor` with `model` as its backbone (`.masked_layers()` is the pruning set),
        in `model`'s train / eval mode.

    Raises:
        ValueError: for an unknown kind in `prune`, a non-string pattern, a model without any
            layer to prune, or head=None on a model that does not tell its feature size.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from sdclr_fast.nn import sdclr_head, self_competitor
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> model = self_competitor(net, sdclr_head(8, 16))   # Conv2d -> MaskedConv2d, BN -> dual
        >>> kept = model.update_masks(0.9)                     # once per epoch
        >>> x = torch.randn(4, 3, 8, 8)
        >>> z_dense, z_pruned = model(x, branch="dense"), model(x, branch="pruned")
    """
    if not isinstance(model, nn.Module) or isinstance(model, SelfCompetitor):
        raise ValueError(f"model must be an nn.Module that is not yet a SelfCompetitor, got "
                         f"{type(model).__name__}")
    prune = (prune,) if isinstance(prune, str) else tuple(prune)
    if not set(prune) <= set(PRUNABLE):
        raise ValueError(f"prune must name kinds of {PRUNABLE}, got {prune!r}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    if not all(isinstance(p, str) for p in exclude):
        raise ValueError(f"exclude must be fnmatch patterns (str), got {exclude!r}")
    if head is None:
        dim = getattr(model, "num_features", None) or getattr(model, "feature_dim", None)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError("head: the model has no int num_features or feature_dim; pass a head "
                             "(an nn.Module from the features to the projection)")
        head = (sdclr_head if dual_norms else simclr_head)(dim, proj_dim)
    dense_only = []

    def convert(module, prefix, excluded):
        for name, child in list(module.named_children()):
            full = f"{prefix}.{name}" if prefix else name
            out = any(fnmatch.fnmatchcase(full, p) for p in exclude) or excluded
            new = child
            if isinstance(child, (nn.Conv2d, nn.Linear)) and not isinstance(child, _MASKED):
                conv = isinstance(child, nn.Conv2d)
                if (out or type(child) not in (nn.Conv2d, nn.Linear)
                        or ("conv" if conv else "linear") not in prune
                        or (conv and child.padding_mode != "zeros")):
                    dense_only.append(full)
                elif conv:
                    new = MaskedConv2d.from_conv(child)
                    new.train(child.training)
                else:
                    new = MaskedLinear.from_linear(child)
            elif dual_norms and isinstance(child, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                new = dual_norm(child)
            else:
                convert(child, full, out)
            if new is not child:
                setattr(module, name, new)

    convert(model, "", False)
    if dual_norms:  # heads are never pruned; their norms become dual
        for parent in list(head.modules()):
            for name, child in list(parent.named_children()):
                if (isinstance(child, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm))
                        and not isinstance(parent, DualNorm)):
                    setattr(parent, name, dual_norm(child))
    return SelfCompetitor(model, head, predictor, dense_only=dense_only).train(model.training)


class SelfCompetitor(nn.Module):
    """SDCLR's dense network and its pruned self-competitor around one ``backbone`` and ``head``.

    Weights are shared; the branch decides whether the masks apply and which half of every dual
    norm layer runs. ``model(x, branch="dense")`` / ``branch="pruned"`` (or
    ``with model.branch("pruned"):``) return the projection z = head(backbone(x)),
    ``model.features(x, branch=...)`` the backbone features. ``update_masks(sparsity, scope,
    block, random_fraction)`` recomputes every mask from the dense weights (SDCLR does this at
    the start of every epoch) and returns the fraction kept; ``masked_layers()``, ``masks()``,
    ``set_masks()`` and ``density()`` inspect and set them. `build_model` and `self_competitor`
    build one.

    Args:
        backbone: module mapping images to (B, D) features whose convolutions are all
            `MaskedConv2d` (see `to_masked_convs`, or `self_competitor` for any model); they and
            its `MaskedLinear` layers are the pruning set (first conv and 1x1 shortcuts
            included). Dual norm layers (`DualBatchNorm2d`, `DualLayerNorm`, ...) follow the
            branch; plain ones are shared by both branches (SimCLR models use the dense one only).
        head: module mapping (B, D) to the projection z; never pruned.
        predictor: optional module on the projection (MoCLR's), called by the training step as
            ``model.predictor(model(x))``.
        dense_only: names (in the backbone) of plain convs deliberately left unpruned (e.g. a
            ViT's patch embedding); listed in ``excluded``.

    Raises:
        ValueError: for a backbone or head that is not an nn.Module, a plain nn.Conv2d in the
            backbone not named in ``dense_only``, a backbone with nothing to prune, a predictor
            that is not a module; a branch other than ``"dense"`` / ``"pruned"``; masks whose
            keys are not the pruning set.

    Examples:
        >>> import torch, sdclr_fast
        >>> model = sdclr_fast.build_model("resnet18", method="sdclr", in_channels=1, width=8)
        >>> kept = model.update_masks(sparsity=0.9)          # from the current dense weights
        >>> round(kept, 2)
        0.1
        >>> v1, v2 = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
        >>> z_dense = model(v1, branch="dense")               # masks off, dense BN
        >>> z_pruned = model(v2, branch="pruned")             # masks on, pruned BN
        >>> sdclr_fast.nt_xent(z_dense, z_pruned).backward()  # one backward for both branches
    """

    def __init__(self, backbone, head, predictor=None, *, dense_only=()):
        super().__init__()
        if not isinstance(backbone, nn.Module) or not isinstance(head, nn.Module):
            raise ValueError(f"backbone and head must be nn.Modules, got {type(backbone).__name__} "
                             f"and {type(head).__name__}")
        dense_only = tuple(dense_only)
        plain = [n for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)
                 and not isinstance(m, MaskedConv2d) and n not in dense_only]
        if plain:
            raise ValueError(f"backbone: every conv must be a MaskedConv2d (convert with "
                             f"sdclr_fast.nn.to_masked_convs or self_competitor) or be named "
                             f"in dense_only; plain nn.Conv2d at {plain[:3]}")
        if not any(isinstance(m, _MASKED) for m in backbone.modules()):
            raise ValueError("backbone: has no MaskedConv2d or MaskedLinear to prune")
        if predictor is not None and not isinstance(predictor, nn.Module):
            raise ValueError(f"predictor must be an nn.Module or None, got {type(predictor).__name__}")
        self.backbone = backbone
        self.head = head
        self.predictor = predictor
        self.excluded = dense_only
        self._set_branch("dense")

    # ------------------------------------------------------------------ branches
    @property
    def active_branch(self):
        """The branch calls without an explicit `branch` run: 'dense' unless inside
        ``with model.branch("pruned")``."""
        return self._branch

    def _set_branch(self, name):
        # Walks the module tree on every switch (two per SDCLR step, well under a millisecond of
        # host time, overlapped with GPU work) rather than caching the modules, so that modules
        # replaced after construction (e.g. by hand) can never keep a stale branch. The dual BN
        # flag is written as the plain attribute, not through the `branch` property: dynamo in
        # torch 2.11 drops property setters on modules, and a compiled SDCLR step then ran the
        # pruned view through the dense BN (`name` is validated by every caller).
        pruned = name == "pruned"
        for m in self.backbone.modules():
            if isinstance(m, _MASKED):
                m.mask_enabled = pruned
            elif isinstance(m, DualNorm):
                m._branch = name
        for m in self.head.modules():
            if isinstance(m, DualNorm):
                m._branch = name
        self._branch = name

    @contextlib.contextmanager
    def branch(self, name):
        """Run the model (and `model.backbone`, `model.head` called directly) in branch `name`
        ('dense' or 'pruned') inside the block; the previous branch is restored afterwards."""
        check_branch(name)
        previous = self._branch
        self._set_branch(name)
        try:
            yield self
        finally:
            self._set_branch(previous)

    def _run(self, fn, x, branch):
        name = self._branch if branch is None else check_branch(branch)
        if name == self._branch:
            return fn(x)
        with self.branch(name):
            return fn(x)

    def forward(self, x, branch=None):
        """Projection z = head(backbone(x)) of branch 'dense' or 'pruned' (None: the active
        branch, 'dense' outside a `branch` block)."""
        return self._run(lambda t: self.head(self.backbone(t)), x, branch)

    def features(self, x, branch=None):
        """Backbone features (B, feature_dim) of branch 'dense' or 'pruned'."""
        return self._run(self.backbone, x, branch)

    # ------------------------------------------------------------------ masks
    def masked_layers(self):
        """{weight name in this model: MaskedConv2d or MaskedLinear} of the backbone, in module
        order: the pruning set."""
        return {f"backbone.{n}.weight" if n else "backbone.weight": m
                for n, m in self.backbone.named_modules() if isinstance(m, _MASKED)}

    def masked_convs(self):
        """{weight name in this model: MaskedConv2d} of the backbone, in module order (the
        pruning set of a CNN; `masked_layers` adds the MaskedLinear layers)."""
        return {n: m for n, m in self.masked_layers().items() if isinstance(m, MaskedConv2d)}

    def masks(self):
        """{weight name (as in `named_parameters`): bool mask buffer} of the pruning set
        (`masked_layers`). The buffers themselves (also in the state dict), not copies."""
        return {n: m.mask for n, m in self.masked_layers().items()}

    @torch.no_grad()
    def set_masks(self, masks):
        """Copy masks (e.g. from `prune_model(model.backbone, ...)`, keys with or without the
        "backbone." prefix) into the mask buffers; every layer of `masked_layers` must get one."""
        if not isinstance(masks, dict):
            raise ValueError(f"masks must be a dict {{weight name: mask}}, got {type(masks).__name__}")
        convs = self.masked_layers()
        given = {k if k.startswith("backbone.") else f"backbone.{k}": v for k, v in masks.items()}
        missing, unknown = sorted(set(convs) - set(given)), sorted(set(given) - set(convs))
        if missing or unknown:
            raise ValueError(f"masks: keys must be the backbone's masked weights; missing {missing[:3]}, "
                             f"unknown {unknown[:3]}")
        for name, conv in convs.items():
            conv.set_mask(given[name])

    @torch.no_grad()
    def update_masks(self, sparsity=0.9, scope="global", block=None, random_fraction=0.0, generator=None,
                     clip_block=False):
        """Recompute every mask of `masked_layers` from the current dense weights with
        `magnitude_masks` (SDCLR: one global threshold at index ceil(sparsity * n) of the sorted
        |w|, ties kept). scope: 'global' or 'layer'; block: None or (out, in) channel blocks
        (a linear weight (out, in) is blocked like a 1x1 conv); clip_block: allow a block larger
        than a layer in both channel dimensions (`magnitude_masks`), e.g. on a narrow test model.

        random_fraction: the official ``random_prune_percent``: that part of ``sparsity`` is
        pruned at random instead of by magnitude. The magnitude rule runs at sparsity -
        random_fraction, then every weight is dropped with probability ceil(random_fraction * n) /
        (n - ceil((sparsity - random_fraction) * n)) (torch's RNG, or ``generator``), so about
        ``sparsity`` of the weights end up pruned.
        Returns the fraction of conv weights kept (a float)."""
        if not (0 <= random_fraction <= sparsity):
            raise ValueError(f"random_fraction must lie in [0, sparsity={sparsity}], got {random_fraction!r}")
        convs = list(self.masked_layers().values())
        magnitude = sparsity - random_fraction
        # linear weights as (out, in, 1, 1): one weight layout for the block rule
        new = magnitude_masks([c.weight if c.weight.dim() == 4 else c.weight[:, :, None, None]
                               for c in convs], magnitude, scope=scope, block=block, clip_block=clip_block)
        new = [m.reshape(c.weight.shape) for m, c in zip(new, convs)]
        total = sum(c.mask.numel() for c in convs)
        if random_fraction > 0:
            n_magnitude = math.ceil(magnitude * total)
            p_drop = math.ceil(random_fraction * total) / max(total - n_magnitude, 1)
            new = [m & (torch.rand(m.shape, generator=generator, device=m.device if generator is None
                                   else generator.device) >= p_drop).to(m.device) for m in new]
        kept = 0
        for conv, mask in zip(convs, new):
            conv.mask.copy_(mask)
            kept += mask.sum()
        return float(kept) / total

    def density(self):
        """Fraction of the pruning set's weights the current masks keep."""
        convs = list(self.masked_layers().values())
        return float(sum(c.mask.sum() for c in convs)) / sum(c.mask.numel() for c in convs)

    def extra_repr(self):
        return f"active_branch={self._branch}"


def build_model(arch="resnet18", method="sdclr", in_channels=3, width=64, cifar_stem=True,
                proj_dim=128, hidden_dim=None):
    """The model of a SimCLR, SDCLR or MoCLR run: always a `SelfCompetitor` around a ResNet.

    ``"sdclr"``: dual BN in backbone and head, 3-layer head feature_dim -> hidden -> hidden ->
    proj_dim. ``"simclr"``: plain BN, 2-layer head feature_dim -> hidden -> proj_dim (only the
    dense branch is meant to be used). ``"moclr"``: the SimCLR model plus a ``predictor``,
    proj_dim -> hidden -> proj_dim (BYOL's predictor shape). Both heads end in BN, as in the
    official SDCLR code.

    Args:
        arch: ``"resnet18"`` (SDCLR's), ``"resnet34"`` or ``"resnet50"``.
        method: ``"simclr"``, ``"sdclr"`` or ``"moclr"``.
        in_channels: image channels.
        width: channels of the backbone's first stage (64: the standard network).
        cifar_stem: the 3x3 stride-1 stem without max-pool (small images).
        proj_dim: projection size.
        hidden_dim: width of the head's hidden layers; default the backbone's feature_dim
            (512 for ResNet-18 at width 64).

    Returns:
        A `SelfCompetitor` with ``.method`` and ``.arch`` set.

    Raises:
        ValueError: for an unknown arch or method, and what the ResNet and head refuse.

    Examples:
        >>> import torch, sdclr_fast
        >>> model = sdclr_fast.build_model("resnet18", method="simclr", in_channels=3, width=8)
        >>> model(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 128])
        >>> model.features(torch.randn(2, 3, 16, 16)).shape      # what the linear probe sees
        torch.Size([2, 64])
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    backbone = ARCHS[arch](in_channels=in_channels, width=width, cifar_stem=cifar_stem,
                           dual_bn=method == "sdclr")
    make_head = sdclr_head if method == "sdclr" else simclr_head
    hidden = backbone.feature_dim if hidden_dim is None else hidden_dim
    predictor = moclr_predictor(proj_dim, hidden) if method == "moclr" else None
    model = SelfCompetitor(backbone, make_head(backbone.feature_dim, proj_dim, hidden_dim), predictor)
    model.method, model.arch = method, arch
    return model
