"""Fidelity to the official SDCLR code (VITA-Group/SDCLR): input normalisation, the crop's
interpolation, the method-aware ImageNet-100-LT recipe, its class groups and few-shot list, the
official CIFAR-100 S_b, the few-shot probe's val check period and the ImageNet-100 probe transforms."""
import dataclasses

import numpy as np
import pytest
import torch

from sdclr_fast.data import ContrastiveData, ImageSet, TwoViewAugment
from sdclr_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD, input_stats, with_input_norm

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_data(channels=3, n=12, classes=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % classes
    s = ImageSet(images, labels, torch.arange(n))
    return ContrastiveData(name="tiny", num_classes=classes, in_channels=channels, image_size=size,
                           class_names=[str(i) for i in range(classes)], train=s, probe_train=s, val=None, test=s,
                           class_order=torch.arange(classes), mean=(0.3,) * channels, std=(0.2,) * channels,
                           config={"seed": 0})


# ----------------------------------------------------------------------------- input normalisation

def test_input_norm_is_imagenet_by_default_and_keeps_dataset_stats():
    from sdclr_fast.train.config import PretrainConfig
    from sdclr_fast.train.run import run_data

    data = tiny_data()
    # official models/resnet.py: NormalizeByChannelMeanStd(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert input_stats("imagenet", data) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert input_stats("dataset", data) == ((0.3,) * 3, (0.2,) * 3)
    gray = tiny_data(channels=1)
    mean, std = input_stats("imagenet", gray)
    assert mean == pytest.approx((sum(IMAGENET_MEAN) / 3,)) and std == pytest.approx((sum(IMAGENET_STD) / 3,))
    net = with_input_norm(data, "imagenet")
    assert (net.mean, net.std) == (IMAGENET_MEAN, IMAGENET_STD) and net.train is data.train
    assert (data.mean, data.std) == ((0.3,) * 3, (0.2,) * 3)  # the original is left alone
    back = with_input_norm(with_input_norm(net, "imagenet"), "dataset")  # the data set's own stats survive
    assert (back.mean, back.std) == ((0.3,) * 3, (0.2,) * 3)
    # A run normalises with its config's choice, also for data handed in; old configs used the data set's.
    assert run_data(PretrainConfig(dataset="tiny"), "unused", data).mean == IMAGENET_MEAN
    old = {k: v for k, v in PretrainConfig(dataset="tiny").to_dict().items() if k != "input_norm"}
    assert run_data(PretrainConfig.from_dict(old), "unused", data).mean == (0.3,) * 3
    with pytest.raises(ValueError, match="input_norm"):
        input_stats("zca", data)
    with pytest.raises(ValueError, match="input_norm"):
        PretrainConfig(input_norm="zca")
    with pytest.raises(ValueError, match="1- or 3-channel"):
        input_stats("imagenet", tiny_data(channels=2))


def test_normalising_after_augmentation_equals_the_official_in_network_layer():
    """The official pipeline: augmentation on [0, 1] images, then the network's first layer
    (x - mean) / std. Here the augmentation ends with that normalisation: the same tensor."""
    aug = TwoViewAugment(8, 3, IMAGENET_MEAN, IMAGENET_STD)
    raw = TwoViewAugment(8, 3, (0.0,) * 3, (1.0,) * 3)
    x = tiny_data().train.images
    torch.manual_seed(3)
    v1, v2 = aug(x)
    torch.manual_seed(3)
    r1, r2 = raw(x)
    m, s = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(v1, (r1 - m) / s, rtol=0, atol=1e-6)
    torch.testing.assert_close(v2, (r2 - m) / s, rtol=0, atol=1e-6)


def test_crop_is_bicubic_and_saturates_like_a_pil_image():
    import kornia.augmentation as K
    from kornia.constants import Resample

    aug = TwoViewAugment(16, 3, (0.0,) * 3, (1.0,) * 3, jitter_p=0.0, grayscale_p=0.0, flip_p=0.0)
    crop = aug.ops[0]
    assert isinstance(crop, K.RandomResizedCrop) and crop.flags["resample"] == Resample.BICUBIC
    # A step edge: bicubic upsampling overshoots [0, 1] beside it (bilinear cannot); the output is clamped.
    x = torch.zeros(64, 3, 8, 8, dtype=torch.uint8)
    x[..., 4:] = 255
    unclamped = K.RandomResizedCrop((16, 16), scale=(0.1, 1.0), resample="bicubic")(x.float() / 255)
    assert float(unclamped.max()) > 1.0 or float(unclamped.min()) < 0.0
    torch.manual_seed(0)
    v1, _ = aug(x)
    assert float(v1.min()) >= 0.0 and float(v1.max()) <= 1.0
