"""Modules: `MaskedConv2d`, dual batch norm, SDCLR's `SelfCompetitor`, ResNet backbones and
projection heads, and `build_model` (the model of a SimCLR / SDCLR run)."""
from .dual_bn import BRANCHES, DualBatchNorm1d, DualBatchNorm2d
from .heads import ProjectionHead, sdclr_head, simclr_head
from .masked_conv import MaskedConv2d
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50
from .self_competitor import ARCHS, METHODS, SelfCompetitor, build_model, to_masked_convs

__all__ = [
    "ARCHS", "BRANCHES", "METHODS", "BasicBlock", "Bottleneck", "DualBatchNorm1d",
    "DualBatchNorm2d", "MaskedConv2d", "ProjectionHead", "ResNet", "SelfCompetitor",
    "build_model", "resnet18", "resnet34", "resnet50", "sdclr_head", "simclr_head",
    "to_masked_convs",
]
