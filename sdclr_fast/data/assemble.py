"""Turn a labelled train pool and a test set into a :class:`ContrastiveData` with the SDCLR splits."""
from __future__ import annotations

import numpy as np
import torch

from . import splits as S
from .base import PRETRAIN_SETS, ContrastiveData, ImageSet, channel_stats, load_split, resize_uint8


def check_pretrain_set(pretrain_set):
    """None (the default: "long_tail", or what a split file saved), "long_tail" or "balanced"."""
    if pretrain_set is not None and pretrain_set not in PRETRAIN_SETS:
        raise ValueError(f"pretrain_set must be one of {list(PRETRAIN_SETS)} (or None), got {pretrain_set!r}")
    return pretrain_set


def assemble(name: str, *, num_classes: int, class_names, train_images: torch.Tensor, train_labels: torch.Tensor,
             test_images: torch.Tensor, test_labels: torch.Tensor, val_images=None, val_labels=None,
             val_per_class: int = 0, ratio=100.0, seed: int = 0, split: int = 0, permute_classes: bool = True,
             image_size=None, split_file=None, lt_positions=None, config=None, pretrain_set=None,
             probe_per_class=None, official=None, fewshot_positions=None) -> ContrastiveData:
    """Draw (or reload) the splits and package them.

    val_per_class > 0 holds that many images per class of the train pool out as ``val`` (CIFAR's
    45k/5k split); otherwise ``val_images`` (if given) is used as is. ``lt_positions`` fixes the
    long-tailed training subset (a list file) instead of drawing it with ``ratio``.
    ``probe_per_class`` cuts the balanced probe pool to that many images per class (CIFAR-100:
    400 of the 450, the 40k pool), preferring the few-shot candidates D_i & D_b so that the
    few-shot set is a subset of it. ``official`` is a dict of position arrays "long_tail",
    "balanced" (or None), "fewshot" (or None), "probe", "val" (an official SDCLR split).
    ``fewshot_positions`` (positions into the train pool) is an explicit few-shot set, e.g. an
    official list drawn from the whole training set; a split file's saved one wins.
    ``pretrain_set`` ("long_tail" / "balanced") picks which set becomes ``train``.
    """
    config = dict(config or {})
    check_pretrain_set(pretrain_set)
    labels_np = train_labels.numpy()
    n_pool = train_images.shape[0]
    bal = few = None
    bal_reason = None
    if split_file is not None:
        saved = load_split(split_file)
        if saved["dataset"] != name:
            raise ValueError(f"split_file was written for data set {saved['dataset']!r}, not {name!r}")
        n_test = test_images.shape[0]
        checks = [("train", n_pool), ("probe_train", n_pool), ("test", n_test)]
        if val_per_class > 0 or official is not None:
            checks.append(("val", n_pool))
        for key in ("balanced_train", "fewshot_train"):
            if saved[key] is not None:
                checks.append((key, n_pool))
        for key, n in checks:
            arr = saved[key]
            if arr is None or (arr.size and (arr.min() < 0 or arr.max() >= n)):
                raise ValueError(f"split_file field {key!r} does not fit this data "
                                 f"(indices must lie in [0, {n})); was it written for other files?")
        lt, probe, test_pos = saved["train"], saved["probe_train"], saved["test"]
        hold = saved["val"] if (val_per_class > 0 or official is not None) else None
        order = saved["class_order"]
        counts = np.bincount(labels_np[lt], minlength=num_classes)
        if counts.tolist() != saved["train_class_counts"].tolist():
            raise ValueError("split_file's training class counts differ from these files' labels; "
                             "it was written for other data")
        if pretrain_set is not None and pretrain_set != saved["pretrain_set"]:
            raise ValueError(f"pretrain_set={pretrain_set!r} but split_file was written for "
                             f"pretrain_set={saved['pretrain_set']!r}; pass None (or that value) to reproduce it")
        pretrain_set = saved["pretrain_set"]
        bal, few = saved["balanced_train"], saved["fewshot_train"]
        # The few-shot draw and the report depend on these, so the saved ones win.
        for key in ("ratio", "seed", "split", "permute_classes", "val_per_class", "probe_per_class",
                    "official_split"):
            if key in saved["config"]:
                config[key] = saved["config"][key]
        seed, split = int(config.get("seed", seed)), int(config.get("split", split))
        if bal is None:  # a format-1 file: draw D_b from its D_i, deterministically
            pool = np.setdiff1d(np.arange(n_pool), hold) if hold is not None else np.arange(n_pool)
            bal, bal_reason = S.same_size_balanced(labels_np, pool, lt, num_classes, seed, split)
    elif official is not None:
        lt, probe, hold = official["long_tail"], official["probe"], official["val"]
        bal, few = official.get("balanced"), official.get("fewshot")
        order = _rank_by_count(np.bincount(labels_np[lt], minlength=num_classes))
        test_pos = np.arange(test_images.shape[0], dtype=np.int64)
        if bal is None:
            pool = np.union1d(probe, lt)
            bal, bal_reason = S.same_size_balanced(labels_np, pool, lt, num_classes, seed, split)
    else:
        if val_per_class > 0:
            keep, hold = S.stratified_holdout(labels_np, num_classes, val_per_class, seed)
        else:
            keep, hold = np.arange(len(labels_np), dtype=np.int64), None
        if lt_positions is not None:
            lt = np.sort(np.asarray(lt_positions, dtype=np.int64))
            order = _rank_by_count(np.bincount(labels_np[lt], minlength=num_classes))
        elif ratio is None:
            lt = np.sort(keep)
            order = _rank_by_count(np.bincount(labels_np[lt], minlength=num_classes))
        else:
            n_max = min(len(p) for p in S.indices_by_class(labels_np[keep], num_classes))
            lt, order = S.long_tail_subset(labels_np, keep, num_classes, ratio, seed, split,
                                           permute_classes=permute_classes, n_max=n_max)
        bal, bal_reason = S.same_size_balanced(labels_np, keep, lt, num_classes, seed, split)
        prefer = lt if bal is None else np.intersect1d(lt, bal)
        probe = S.balanced_subset(labels_np, keep, num_classes, seed, per_class=probe_per_class,
                                  prefer=prefer, split=split)
        test_pos = np.arange(test_images.shape[0], dtype=np.int64)
        if fewshot_positions is not None:
            few = np.sort(np.asarray(fewshot_positions, dtype=np.int64))

    pretrain_set = pretrain_set or "long_tail"
    if pretrain_set == "balanced" and bal is None:
        raise ValueError(f"pretrain_set='balanced' needs the balanced set D_b, but {bal_reason or 'there is none'}")
    config["pretrain_set"] = pretrain_set

    def make(images, labels, pos):
        s = ImageSet.from_pool(images, labels, pos)
        if image_size is not None and s.images.shape[-1] != image_size:
            s = ImageSet(resize_uint8(s.images, image_size), s.labels, s.indices)
        return s

    long_tail = make(train_images, train_labels, lt)
    if len(long_tail) == 0:
        raise ValueError(f"{name}: the long-tailed training split is empty")
    balanced = None if bal is None else make(train_images, train_labels, bal)
    train = balanced if pretrain_set == "balanced" else long_tail
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
        mean=mean, std=std, config=config, long_tail_train=long_tail, balanced_train=balanced,
        fewshot_train=None if few is None else make(train_images, train_labels, few))


def _rank_by_count(counts: np.ndarray) -> np.ndarray:
    """Classes from most to fewest images, ties by class index."""
    return np.lexsort((np.arange(len(counts)), -counts)).astype(np.int64)
