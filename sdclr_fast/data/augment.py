"""Batched augmentation on the training device (kornia), instead of per-image CPU transforms,
and the input normalisation every model of a run sees."""
from __future__ import annotations

import dataclasses
import numbers

import torch
from torch import nn


INPUT_NORMS = ("imagenet", "dataset")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def input_stats(input_norm: str, data) -> tuple:
    """(mean, std) in [0, 1] units that a run's inputs are normalised with.

    input_norm: "imagenet" - ImageNet's mean / std, what the official SDCLR models apply inside
                the network (``NormalizeByChannelMeanStd`` in its models/resnet.py) whatever the
                data set; a 1-channel data set gets the mean of the three channels' values
                (0.449, 0.226). "dataset" - the statistics of the data set's training split
                (``data.mean`` / ``data.std`` as built; this package's default before the option).
    data:       a ContrastiveData / StreamData (its ``in_channels`` and, for "dataset", its
                statistics as built, kept across :func:`with_input_norm`).
    Raises ValueError for another ``input_norm`` or a channel count other than 1 or 3.
    """
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
    if input_norm == "dataset":
        stats = data.config.get("dataset_stats")
        return (tuple(stats[0]), tuple(stats[1])) if stats else (tuple(data.mean), tuple(data.std))
    if data.in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if data.in_channels == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    raise ValueError(f"input_norm='imagenet' needs 1- or 3-channel images, got {data.in_channels}")


def with_input_norm(data, input_norm: str):
    """A copy of ``data`` whose ``mean`` / ``std`` are :func:`input_stats` (``input_norm``); the
    images are shared, the data set's own statistics stay in ``config["dataset_stats"]`` so that
    applying another choice later still finds them.

    Normalising the [0, 1] output of the augmentation with these statistics is what the official
    models do as their first layer: every augmentation here acts before it, on [0, 1] images.
    """
    mean, std = input_stats(input_norm, data)
    own = data.config.get("dataset_stats") or [list(data.mean), list(data.std)]
    return dataclasses.replace(data, mean=tuple(mean), std=tuple(std),
                               config=dict(data.config, dataset_stats=own))


def _check_stats(mean, std, in_channels):
    mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
    std = torch.as_tensor(std, dtype=torch.float32).flatten()
    if mean.numel() != in_channels or std.numel() != in_channels:
        raise ValueError(f"mean and std must have in_channels={in_channels} entries, got {mean.numel()} and {std.numel()}")
    if not bool((std > 0).all()):
        raise ValueError(f"std must be positive, got {std.tolist()}")
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def _check_batch(x, in_channels, who):
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != in_channels:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who} expects a uint8 batch of shape (B, {in_channels}, H, W), got {got}")


def eval_transform(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 normalised ((x / 255 - mean) / std), on x's device."""
    c = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 4 else -1
    _check_batch(x, c, "eval_transform")
    m, s = _check_stats(mean, std, c)
    return (x.float().div_(255.0) - m.to(x.device)).div_(s.to(x.device))


def pad_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """The linear probe's augmentation in SDCLR (RandomCrop(size, padding) + horizontal flip):
    each uint8 image of the (B, C, H, W) batch is zero-padded by ``padding`` pixels, an H x W
    window is taken at a random offset, and it is flipped with probability 1/2. Offsets and
    flips are drawn on the CPU from ``generator`` (torch's global RNG when None)."""
    _check_batch(x, x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 4 else -1, "pad_crop_flip")
    if isinstance(padding, bool) or not isinstance(padding, numbers.Integral) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator)
    flips = torch.randint(0, 2, (b,), generator=generator).bool()
    xp = torch.nn.functional.pad(x, (padding,) * 4)
    rows = (offsets[0][:, None] + torch.arange(h)).to(x.device)          # (B, H)
    cols = (offsets[1][:, None] + torch.arange(w)).to(x.device)          # (B, W)
    cols = torch.where(flips.to(x.device)[:, None], cols.flip(1), cols)  # a flip reads the window backwards
    batch = torch.arange(b, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


class _Clamp01(nn.Module):
    """Bicubic interpolation overshoots; the official crop works on PIL images, which saturate."""

    def forward(self, x):
        return x.clamp(0.0, 1.0)


class TwoViewAugment(nn.Module):
    """SDCLR / SimCLR two-view augmentation of a uint8 batch, all on the batch's device (kornia).

    Per view and image, independently: random resized crop to ``image_size`` (area scale
    ``scale``, aspect 3/4-4/3, bicubic like torchvision's in the official code, clamped to
    [0, 1] as a PIL image would be), horizontal flip, colour jitter (brightness, contrast,
    saturation, hue) = ``jitter`` applied with probability ``jitter_p``, grayscale with
    probability ``grayscale_p``, optional Gaussian blur, then normalisation with ``mean`` /
    ``std``. For 1-channel images saturation, hue and grayscale are meaningless (a grey image has
    no colour), so only brightness and contrast jitter are applied. Both views come from one pass
    over a 2B batch. Randomness comes from torch's RNG: ``torch.manual_seed(s)`` before a call
    makes it repeatable.

    Args:
        image_size: side of the square output views, a positive int.
        in_channels: 1 or 3.
        mean: per-channel mean (``in_channels`` numbers) of the [0, 1] images.
        std: per-channel std (positive).
        scale: the crop's area range (lo, hi), 0 < lo <= hi <= 1; SDCLR's CIFAR recipe
            (0.1, 1), ImageNet (0.08, 1).
        jitter: colour-jitter strengths (brightness, contrast, saturation, hue), >= 0.
        jitter_p: probability of the colour jitter.
        grayscale_p: probability of grayscale.
        flip_p: probability of the horizontal flip.
        blur_p: probability of a Gaussian blur (sigma in [0.1, 2], kernel a tenth of the image;
            SDCLR's ImageNet recipe uses 0.5).

    Returns:
        Called on uint8 (B, C, H, W) images: (view1, view2), each float32
        (B, C, image_size, image_size).

    Raises:
        ValueError: naming the argument: a bad image_size, in_channels, scale, jitter or
            probability, mean / std of the wrong length or a non-positive std; in the forward, a
            batch that is not uint8 (B, in_channels, H, W).

    Examples:
        >>> import torch
        >>> from sdclr_fast import TwoViewAugment
        >>> aug = TwoViewAugment(16, 3, mean=[0.5] * 3, std=[0.25] * 3)
        >>> images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        >>> v1, v2 = aug(images)
        >>> v1.shape, v1.dtype
        (torch.Size([4, 3, 16, 16]), torch.float32)
    """

    def __init__(self, image_size: int, in_channels: int, mean, std, *, scale=(0.1, 1.0),
                 jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, flip_p=0.5, blur_p=0.0):
        super().__init__()
        import kornia.augmentation as K

        if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        if len(scale) != 2 or not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi <= 1, got {scale!r}")
        if len(jitter) != 4 or any(j < 0 for j in jitter):
            raise ValueError(f"jitter must be 4 non-negative strengths (b, c, s, h), got {jitter!r}")
        for name, p in (("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("flip_p", flip_p),
                        ("blur_p", blur_p)):
            if not (0 <= p <= 1):
                raise ValueError(f"{name} must lie in [0, 1], got {p!r}")
        self.image_size, self.in_channels = int(image_size), in_channels
        m, s = _check_stats(mean, std, in_channels)
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)
        b, c, sat, hue = jitter
        if in_channels == 1:
            sat, hue, grayscale_p = 0.0, 0.0, 0.0
        # The settings in effect (after the 1-channel adjustment), for logs and checks.
        self.jitter, self.jitter_p, self.grayscale_p = (b, c, sat, hue), jitter_p, grayscale_p
        ops = [K.RandomResizedCrop((self.image_size, self.image_size), scale=tuple(scale), resample="bicubic"),
               _Clamp01(), K.RandomHorizontalFlip(p=flip_p)]
        if jitter_p > 0 and any((b, c, sat, hue)):
            ops.append(K.ColorJitter(b, c, sat, hue, p=jitter_p))
        if grayscale_p > 0:
            ops.append(K.RandomGrayscale(p=grayscale_p))
        if blur_p > 0:
            # SDCLR's ImageNet recipe (after MoCo v2): Gaussian blur, sigma uniform in [0.1, 2],
            # kernel about a tenth of the image (odd).
            k = max(3, int(0.1 * self.image_size) // 2 * 2 + 1)
            ops.append(K.RandomGaussianBlur((k, k), (0.1, 2.0), p=blur_p))
        self.blur_p = blur_p
        self.ops = nn.Sequential(*ops)

    def forward(self, x: torch.Tensor):
        _check_batch(x, self.in_channels, "TwoViewAugment")
        b = x.shape[0]
        if b == 0:
            empty = x.new_empty((0, self.in_channels, self.image_size, self.image_size), dtype=torch.float32)
            return empty, empty.clone()
        x = x.float().div_(255.0)
        v = self.ops(torch.cat([x, x]))
        v = (v - self.mean.to(v.device)) / self.std.to(v.device)  # no-op once the module is on x's device
        return v[:b], v[b:]
