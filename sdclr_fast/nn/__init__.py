"""Modules: `MaskedConv2d`, dual batch norm, SDCLR's `SelfCompetitor`, ResNet backbones and
projection heads, and `build_model` (the model of a SimCLR / SDCLR run).

    model = build_model(arch="resnet18", method="sdclr", in_channels=3, width=64)
    kept = model.update_masks(sparsity=0.9)          # once per epoch, from the dense weights
    loss = nt_xent(model(v1, branch="dense"), model(v2, branch="pruned"), 0.2)
    loss.backward()                                  # one backward: SDCLR's gradient
    feats = model.features(x, branch="dense")        # what the linear probe sees
"""
from .dual_bn import BRANCHES, DualBatchNorm1d, DualBatchNorm2d, DualLayerNorm, DualNorm, dual_norm
from .heads import ProjectionHead, moclr_predictor, sdclr_head, simclr_head
from .masked_conv import MaskedConv2d
from .masked_linear import MaskedLinear
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50
from .self_competitor import (ARCHS, DEFAULT_EXCLUDE, METHODS, PRUNABLE, SelfCompetitor, build_model,
                              self_competitor, to_masked_convs)

__all__ = [
    "ARCHS", "BRANCHES", "DEFAULT_EXCLUDE", "METHODS", "PRUNABLE", "BasicBlock", "Bottleneck",
    "DualBatchNorm1d", "DualBatchNorm2d", "DualLayerNorm", "DualNorm", "MaskedConv2d",
    "MaskedLinear", "ProjectionHead", "ResNet", "SelfCompetitor",
    "build_model", "moclr_predictor", "resnet18", "resnet34", "resnet50", "sdclr_head", "simclr_head",
    "self_competitor", "to_masked_convs", "dual_norm",
]
