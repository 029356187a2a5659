"""SDCLR's self-competitor: one network with a dense and a pruned branch sharing all weights.

The dense branch is the backbone and head as they are (masks off, the dense BN of every dual
BN). The pruned branch multiplies every backbone conv weight by its mask (`MaskedConv2d`) and
uses the pruned BN. Conv and linear weights are the same tensors in both branches, so one
backward of a joint loss such as NT-Xent(z_dense(v1), z_pruned(v2)) gives the official code's
gradient (it needs three forwards and two backwards); pruned weights get gradient only through
the dense branch (d(w * m)/dw = m).

The branch is a flag set on every `MaskedConv2d` of the backbone and every dual BN of the model
for the duration of a call (`forward(x, branch=...)`, `features(x, branch=...)`) or of a
``with model.branch("pruned"):`` block. Outside those the model is in the dense branch.
"""
import contextlib
import math

import torch
from torch import nn

from ..ops.prune import magnitude_masks
from .dual_bn import _DualBatchNorm, check_branch
from .heads import moclr_predictor, sdclr_head, simclr_head
from .masked_conv import MaskedConv2d
from .resnet import resnet18, resnet34, resnet50

__all__ = ["SelfCompetitor", "build_model", "to_masked_convs", "ARCHS", "METHODS"]

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


class SelfCompetitor(nn.Module):
    """Dense network + pruned self-competitor (SDCLR) around `backbone` and `head`.

    backbone: module mapping images to (B, D) features whose convolutions are all
    `MaskedConv2d` (see `to_masked_convs`); they are the pruning set (first conv and 1x1
    shortcuts included). head: module mapping (B, D) to the projection z; never pruned.
    BN layers of either that are `DualBatchNorm*d` follow the branch; plain BN is shared by both
    branches (SimCLR models, which only use the dense branch). predictor: optional module on
    the projection (MoCLR's), called by the training step as ``model.predictor(model(x))``.
    """

    def __init__(self, backbone, head, predictor=None):
        super().__init__()
        if not isinstance(backbone, nn.Module) or not isinstance(head, nn.Module):
            raise ValueError(f"backbone and head must be nn.Modules, got {type(backbone).__name__} "
                             f"and {type(head).__name__}")
        plain = [n for n, m in backbone.named_modules()
                 if isinstance(m, nn.Conv2d) and not isinstance(m, MaskedConv2d)]
        if plain:
            raise ValueError(f"backbone: every conv must be a MaskedConv2d (convert with "
                             f"sdclr_fast.nn.to_masked_convs); plain nn.Conv2d at {plain[:3]}")
        if not any(isinstance(m, MaskedConv2d) for m in backbone.modules()):
            raise ValueError("backbone: has no MaskedConv2d to prune")
        if predictor is not None and not isinstance(predictor, nn.Module):
            raise ValueError(f"predictor must be an nn.Module or None, got {type(predictor).__name__}")
        self.backbone = backbone
        self.head = head
        self.predictor = predictor
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
            if isinstance(m, MaskedConv2d):
                m.mask_enabled = pruned
            elif isinstance(m, _DualBatchNorm):
                m._branch = name
        for m in self.head.modules():
            if isinstance(m, _DualBatchNorm):
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
    def masked_convs(self):
        """{weight name in this model: MaskedConv2d} of the backbone, in module order."""
        return {f"backbone.{n}.weight" if n else "backbone.weight": m
                for n, m in self.backbone.named_modules() if isinstance(m, MaskedConv2d)}

    def masks(self):
        """{weight name (as in `named_parameters`): bool mask buffer} of the backbone convs.
        The buffers themselves (also in the state dict), not copies."""
        return {n: m.mask for n, m in self.masked_convs().items()}

    @torch.no_grad()
    def set_masks(self, masks):
        """Copy masks (e.g. from `prune_model(model.backbone, ...)`, keys with or without the
        "backbone." prefix) into the conv mask buffers; every backbone conv must get one."""
        if not isinstance(masks, dict):
            raise ValueError(f"masks must be a dict {{weight name: mask}}, got {type(masks).__name__}")
        convs = self.masked_convs()
        given = {k if k.startswith("backbone.") else f"backbone.{k}": v for k, v in masks.items()}
        missing, unknown = sorted(set(convs) - set(given)), sorted(set(given) - set(convs))
        if missing or unknown:
            raise ValueError(f"masks: keys must be the backbone conv weights; missing {missing[:3]}, "
                             f"unknown {unknown[:3]}")
        for name, conv in convs.items():
            conv.set_mask(given[name])

    @torch.no_grad()
    def update_masks(self, sparsity=0.9, scope="global", block=None, random_fraction=0.0, generator=None):
        """Recompute every backbone conv mask from the current dense weights with
        `magnitude_masks` (SDCLR: one global threshold at index ceil(sparsity * n) of the sorted
        |w|, ties kept). scope: 'global' or 'layer'; block: None or (out, in) channel blocks.

        random_fraction: the official ``random_prune_percent``: that part of ``sparsity`` is
        pruned at random instead of by magnitude. The magnitude rule runs at sparsity -
        random_fraction, then every weight is dropped with probability ceil(random_fraction * n) /
        (n - ceil((sparsity - random_fraction) * n)) (torch's RNG, or ``generator``), so about
        ``sparsity`` of the weights end up pruned.
        Returns the fraction of conv weights kept (a float)."""
        if not (0 <= random_fraction <= sparsity):
            raise ValueError(f"random_fraction must lie in [0, sparsity={sparsity}], got {random_fraction!r}")
        convs = list(self.masked_convs().values())
        magnitude = sparsity - random_fraction
        new = magnitude_masks([c.weight for c in convs], magnitude, scope=scope, block=block)
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
        """Fraction of backbone conv weights the current masks keep."""
        convs = list(self.masked_convs().values())
        return float(sum(c.mask.sum() for c in convs)) / sum(c.mask.numel() for c in convs)

    def extra_repr(self):
        return f"active_branch={self._branch}"


def build_model(arch="resnet18", method="sdclr", in_channels=3, width=64, cifar_stem=True,
                proj_dim=128, hidden_dim=None):
    """The model of a SimCLR, SDCLR or MoCLR run, always a `SelfCompetitor`.

    method 'sdclr': dual BN in backbone and head, 3-layer head feature_dim -> hidden -> hidden ->
    proj_dim; 'simclr': plain BN, 2-layer head feature_dim -> hidden -> proj_dim (only the dense
    branch is meant to be used); 'moclr': the 'simclr' model plus `predictor`, proj_dim -> hidden
    -> proj_dim (BYOL's predictor shape). arch: 'resnet18' (SDCLR's), 'resnet34' or 'resnet50';
    hidden_dim defaults to the backbone's feature_dim (512 for ResNet-18 at width 64)."""
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
