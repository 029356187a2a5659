"""Turn a labelled train pool and a test set into a :class:`ContrastiveData` with the SDCLR splits."""
from __future__ import annotations

import numpy as np
import torch

from . import splits as S
from .base import ContrastiveData, ImageSet, channel_stats, load_split, resize_uint8


def assemble(name: str, *, num_classes: int, class_names, train_images: torch.Tensor, train_labels: torch.Tensor,
             test_images: torch.Tensor, test_labels: torch.Tensor, val_images=None, val_labels=None,
             val_per_class: int = 0, ratio=100.0, seed: int = 0, split: int = 0, permute_classes: bool = False,
             image_size=None, split_file=None, lt_positions=None, config=None) -> ContrastiveData:
    """Draw (or reload) the splits and package them.

    val_per_class > 0 holds that many images per class of the train pool out as ``val`` (CIFAR's
    45k/5k split); otherwise ``val_images`` (if given) is used as is. ``lt_positions`` fixes the
    long-tailed training subset (a list file) instead of drawing it with ``ratio``.
    """
    config = dict(config or {})
    labels_np = train_labels.numpy()
    if split_file is not None:
        saved = load_split(split_file)
        if saved["dataset"] != name:
            raise ValueError(f"split_file was written for data set {saved['dataset']!r}, not {name!r}")
        n_pool, n_test = train_images.shape[0], test_images.shape[0]
        for key, n in (("train", n_pool), ("probe_train", n_pool), ("test", n_test)) + (
                (("val", n_pool),) if val_per_class > 0 else ()):
            arr = saved[key]
            if arr is None or (arr.size and (arr.min() < 0 or arr.max() >= n)):
                raise ValueError(f"split_file field {key!r} does not fit this data "
                                 f"(indices must lie in [0, {n})); was it written for other files?")
        lt, probe, test_pos = saved["train"], saved["probe_train"], saved["test"]
        hold = saved["val"] if val_per_class > 0 else None
        order = saved["class_order"]
        counts = np.bincount(labels_np[lt], minlength=num_classes)
        if counts.tolist() != saved["train_class_counts"].tolist():
            raise ValueError("split_file's training class counts differ from these files' labels; "
                             "it was written for other data")
        # The few-shot draw and the report depend on these, so the saved ones win.
        for key in ("ratio", "seed", "split", "permute_classes", "val_per_class"):
            if key in saved["config"]:
                config[key] = saved["config"][key]
    else:
        if val_per_class > 0:
            keep, hold = S.stratified_holdout(labels_np, num_classes, val_per_class, seed)
        else:
            keep, hold = np.arange(len(labels_np), dtype=np.int64), None
        if lt_positions is not None:
            lt = np.sort(np.asarray(lt_positions, dtype=np.int64))
            order = _rank_by_count(np.bincount(labels_np[lt], minlength=num_classes))
        else:
            n_max = min(len(p) for p in S.indices_by_class(labels_np[keep], num_classes))
            lt, order = S.long_tail_subset(labels_np, keep, num_classes, ratio, seed, split,
                                           permute_classes=permute_classes, n_max=n_max)
        probe = S.balanced_subset(labels_np, keep, num_classes, seed)
        test_pos = np.arange(test_images.shape[0], dtype=np.int64)

    def make(images, labels, pos):
        s = ImageSet.from_pool(images, labels, pos)
        if image_size is not None and s.images.shape[-1] != image_size:
            s = ImageSet(resize_uint8(s.images, image_size), s.labels, s.indices)
        return s

    train = make(train_images, train_labels, lt)
    if len(train) == 0:
        raise ValueError(f"{name}: the long-tailed training split is empty")
    if hold is not None:
        val = make(train_images, train_labels, hold)
    elif val_images is not None:
        val = make(val_images, val_labels, np.arange(val_images.shape[0]))
    else:
        val = None
    mean, std = channel_stats(train.images)
    return ContrastiveData(
        name=name, num_classes=num_classes, in_channels=train.images.shape[1],
        image_size=train.images.shape[-1], class_names=list(class_names),
        train=train, probe_train=make(train_images, train_labels, probe), val=val,
        test=make(test_images, test_labels, test_pos),
        class_order=torch.as_tensor(np.asarray(order), dtype=torch.int64),
        mean=mean, std=std, config=config)


def _rank_by_count(counts: np.ndarray) -> np.ndarray:
    """Classes from most to fewest images, ties by class index."""
    return np.lexsort((np.arange(len(counts)), -counts)).astype(np.int64)
