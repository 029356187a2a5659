"""ResNet backbones built from `MaskedConv2d`, with plain or dual batch norm.

Every convolution (first conv and 1x1 shortcuts included) is a `MaskedConv2d`, so SDCLR's
global magnitude pruning covers exactly the conv weights of the backbone. The forward returns
the globally average-pooled features (B, feature_dim); there is no classifier (the linear probe
and the projection heads live elsewhere).

``cifar_stem=True`` is the small-image stem SDCLR and SimCLR use on CIFAR (3x3 conv, stride 1,
no max-pool); False is the ImageNet stem (7x7 conv stride 2, then 3x3 max-pool stride 2).
``width`` is the channel count of the first stage (64 in the standard networks).
"""
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .dual_bn import DualBatchNorm2d
from .masked_conv import MaskedConv2d

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50"]


def _conv(cin, cout, k, stride=1):
    return MaskedConv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


def _shortcut(cin, cout, stride, norm):
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), norm(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the first one carries the stride."""

    expansion = 1

    def __init__(self, cin, planes, stride, norm):
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride)
        self.bn1 = norm(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = norm(planes)
        self.shortcut = _shortcut(cin, planes, stride, norm)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, as in torchvision's "ResNet v1.5") -> 1x1 expanding by 4 (ResNet-50)."""

    expansion = 4

    def __init__(self, cin, planes, stride, norm):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = _conv(cin, planes, 1)
        self.bn1 = norm(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = norm(planes)
        self.conv3 = _conv(planes, cout, 1)
        self.bn3 = norm(cout)
        self.shortcut = _shortcut(cin, cout, stride, norm)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class ResNet(nn.Module):
    """ResNet feature extractor: stem, four stages (widths width * 1, 2, 4, 8, times the
    block's expansion), global average pooling. Attribute `feature_dim` is the output width."""

    def __init__(self, block, layers, *, in_channels=3, width=64, cifar_stem=True, dual_bn=True):
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise ValueError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        if not isinstance(layers, (list, tuple)) or len(layers) != 4:
            raise ValueError(f"layers must be four block counts, got {layers!r}")
        layers = [_positive_int(n, "layers[i]") for n in layers]
        in_channels = _positive_int(in_channels, "in_channels")
        width = _positive_int(width, "width")
        for name, flag in (("cifar_stem", cifar_stem), ("dual_bn", dual_bn)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        norm = DualBatchNorm2d if dual_bn else nn.BatchNorm2d
        self.in_channels, self.width, self.cifar_stem, self.dual_bn = in_channels, width, cifar_stem, dual_bn
        if cifar_stem:
            self.conv1 = _conv(in_channels, width, 3)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = _conv(in_channels, width, 7, stride=2)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = norm(width)
        cin = width
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1, norm))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.feature_dim = cin
        self._init_weights()

    def _init_weights(self):
        # torchvision's initialisation (He normal, fan-out, for convs; BN weight 1, bias 0).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a 4-d (N, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, the backbone expects in_channels="
                             f"{self.in_channels}")
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def resnet18(*, in_channels=3, width=64, cifar_stem=True, dual_bn=True):
    """ResNet-18 feature extractor (BasicBlock, [2, 2, 2, 2]): SDCLR's backbone.

    Stem, four stages of widths width x (1, 2, 4, 8), global average pooling; ``feature_dim``
    = 8 * width (512 at width 64). Its convolutions are plain nn.Conv2d; `build_model` /
    `self_competitor` turn them into `MaskedConv2d` for SDCLR.

    Args:
        in_channels: image channels (3 for RGB, 1 for Fashion-MNIST).
        width: channels of the first stage (64 is the standard ResNet-18).
        cifar_stem: a 3x3 stride-1 first conv without max-pool (small images, SDCLR's CIFAR
            network); False gives the ImageNet stem (7x7 stride 2 and a max-pool).
        dual_bn: `DualBatchNorm2d` everywhere (SDCLR) instead of `nn.BatchNorm2d`.

    Returns:
        A `ResNet` mapping (B, in_channels, H, W) images to (B, feature_dim) features.

    Raises:
        ValueError: for a non-positive in_channels or width, or flags that are not bools.

    Examples:
        >>> import torch, sdclr_fast
        >>> net = sdclr_fast.resnet18(in_channels=1, width=8)
        >>> net(torch.randn(2, 1, 16, 16)).shape
        torch.Size([2, 64])
    """
    return ResNet(BasicBlock, [2, 2, 2, 2], in_channels=in_channels, width=width,
                  cifar_stem=cifar_stem, dual_bn=dual_bn)


def resnet34(*, in_channels=3, width=64, cifar_stem=True, dual_bn=True):
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]); feature_dim = 8 * width."""
    return ResNet(BasicBlock, [3, 4, 6, 3], in_channels=in_channels, width=width,
                  cifar_stem=cifar_stem, dual_bn=dual_bn)


def resnet50(*, in_channels=3, width=64, cifar_stem=True, dual_bn=True):
    """ResNet-50 feature extractor (Bottleneck, [3, 4, 6, 3]): SDCLR's ImageNet-100-LT backbone.

    ``feature_dim`` = 32 * width (2048 at width 64). Arguments as `resnet18`; the ImageNet recipe
    uses ``cifar_stem=False``.

    Args:
        in_channels: image channels.
        width: channels of the first stage (64 is the standard ResNet-50).
        cifar_stem: a 3x3 stride-1 first conv without max-pool; False gives the ImageNet stem.
        dual_bn: `DualBatchNorm2d` everywhere (SDCLR) instead of `nn.BatchNorm2d`.

    Returns:
        A `ResNet` mapping (B, in_channels, H, W) images to (B, feature_dim) features.

    Raises:
        ValueError: for a non-positive in_channels or width, or flags that are not bools.

    Examples:
        >>> import torch, sdclr_fast
        >>> net = sdclr_fast.resnet50(width=8, cifar_stem=False)
        >>> net.feature_dim
        256
    """
    return ResNet(Bottleneck, [3, 4, 6, 3], in_channels=in_channels, width=width,
                  cifar_stem=cifar_stem, dual_bn=dual_bn)
