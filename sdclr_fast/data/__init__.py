"""Long-tailed data sets held in memory, batch iteration and on-device augmentation.

Typical use::

    data = build_dataset("fashion-mnist-lt", ratio=100, seed=0)
    data.save_split(run_dir)                       # reproducible: build_dataset(..., split_file=run_dir)
    aug = TwoViewAugment(data.image_size, data.in_channels, data.mean, data.std).to(device)
    for batch in BatchIterator(data.train, 512, seed=0, device=device):
        v1, v2 = aug(batch.images)
"""
from __future__ import annotations

from .augment import TwoViewAugment, eval_transform
from .assemble import check_pretrain_set
from .base import PRETRAIN_SETS, ContrastiveData, ImageSet, check_image_size, load_split, save_split
from .loader import Batch, BatchIterator
from .splits import check_nonneg_int, check_ratio, long_tail_counts

DATASETS = ("fashion-mnist-lt", "cifar10-lt", "cifar100-lt", "imagefolder", "webdataset")


_DEFAULT_RATIO = object()


def build_dataset(name: str, root=None, *, ratio=_DEFAULT_RATIO, seed: int = 0, split: int = 0, image_size=None,
                  permute_classes: bool = True, split_file=None, pretrain_set=None, **options) -> ContrastiveData:
    """Load a data set and draw its long-tailed splits (SDCLR's protocol).

    The long-tailed set D_i follows n_i = floor(n_max * ratio^(-i / (C - 1))) over a seeded
    class permutation; the class-balanced set D_b of the same size (SDCLR's balanced baseline),
    the few-shot probe sets (``data.fewshot(shots)``, balanced subsets of D_i & D_b), the probe
    pool, the validation and test sets come with it. ``data.save_split(run_dir)`` writes
    split.json, and ``split_file=`` reproduces the split exactly.

    Args:
        name: one of ``DATASETS``: ``"fashion-mnist-lt"``, ``"cifar10-lt"``,
            ``"cifar100-lt"``, ``"imagefolder"``, ``"webdataset"``.
        root: where the files are. fashion-mnist-lt: a folder of IDX .gz files (default
            $SDCLR_FAST_FMNIST_DIR, else /usr/share/datasets/fashion-mnist); cifar10-lt /
            cifar100-lt: the folder holding cifar-10-batches-py / cifar-100-python (required);
            imagefolder: the folder holding train/<class>/ and test/ or val/ (required);
            webdataset: the training shards, a brace pattern such as
            'shards/train-{000000..000127}.tar' (required; streamed, see
            `sdclr_fast.data.webdataset`: it returns a ``StreamData`` without probe / test sets).
        ratio: imbalance factor n_max / n_min (>= 1); None keeps the training pool as it is.
            Default: 100, except for imagefolder and webdataset (None: such data is usually
            long-tailed already).
        seed: seeds every draw (CIFAR's 45k / 5k hold-out depends on it alone).
        split: index of the long-tailed draw (the SDCLR protocol uses five: 0-4).
        image_size: resize to this square size (default: native; imagefolder: 64).
        permute_classes: give the head / tail ranks to a permutation of the classes seeded by
            (seed, split), a different one for every split, as SDCLR's splits do (default);
            False gives class i rank i (None: the default). The order is ``data.class_order``
            and split.json's "class_order".
        split_file: a split.json (or its run folder) from ``save_split``; its indices, seed,
            split, ratio and pretrain_set replace the draws, so the run is reproduced exactly.
        pretrain_set: which set becomes ``data.train``, the one the method pretrains on:
            "long_tail" (D_i, the default) or "balanced" (D_b: floor(|D_i| / C) images of every
            class from the same pool, nested with D_i). Both are always there as
            ``data.long_tail`` and ``data.balanced_train``; ``data.class_counts`` (the
            evaluation groups) always counts D_i. None: "long_tail", or what ``split_file`` saved.
        **options: cifar: ``val_fraction`` (0.1); ``probe_per_class`` (CIFAR-100: 400, the 40k
            probe pool; CIFAR-10: None, all 4500); ``official_split``: SDCLR's ``split/``
            folder (or a dict of .npy files "train", "val", "D_i", "D_b", "S_b"), with
            ``split=k`` (1-5) loading split{k}_D_i / _D_b / _S_b, trainIdxList, valIdxList
            instead of drawing (see `sdclr_fast.data.cifar.build_cifar_lt`). With a
            ``split_file`` written from official files too, the split file wins (a resumed
            run); with one drawn otherwise, giving both is an error. imagefolder:
            ``train_list``, ``test_list``, ``grayscale``, ``workers``, ``fewshot_list`` (an
            explicit few-shot set, e.g. the official ImageNet-100-LT 1 % list). webdataset:
            ``train_list``, ``num_workers``, ``shuffle_buffer``.

    Returns:
        A ``ContrastiveData`` (images held in memory as uint8), or a ``StreamData`` for
        webdataset.

    Raises:
        ValueError: for an unknown data set or option, a bad ratio, seed, split, image size or
            pretrain_set, a split file written for another data set, a ratio on a stream.
        FileNotFoundError: when the data files are not where ``root`` says.

    Examples:
        >>> from sdclr_fast import build_dataset
        >>> data = build_dataset("fashion-mnist-lt", ratio=100, seed=0)   # Debian's dataset-fashion-mnist
        >>> len(data.train), data.num_classes, data.image_size
        (14886, 10, 28)
        >>> sorted(data.class_counts.tolist(), reverse=True)[:3]          # the head of the profile
        [6000, 3596, 2156]
    """
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    name = name.lower()
    if ratio is _DEFAULT_RATIO:
        ratio = None if name in ("imagefolder", "webdataset") else 100
    check_ratio(ratio)
    check_nonneg_int(seed, "seed")
    check_nonneg_int(split, "split")
    image_size = check_image_size(image_size)
    check_pretrain_set(pretrain_set)
    if split_file is not None:
        saved = load_split(split_file)  # fail before reading any image files
        if saved["dataset"] != name:
            raise ValueError(f"split_file was written for data set {saved['dataset']!r}, not {name!r}")
        if options.get("official_split") is not None:
            # A resumed run of an official split: the saved indices (read from those files) win.
            if not saved["config"].get("official_split"):
                raise ValueError("official_split was given, but split_file was not written from official "
                                 "split files; pass one of them, not both")
            options = {k: v for k, v in options.items() if k != "official_split"}
    common = dict(ratio=ratio, seed=seed, split=split, image_size=image_size,
                  permute_classes=True if permute_classes is None else bool(permute_classes),
                  split_file=split_file, pretrain_set=pretrain_set)
    cifar_opts = {"val_fraction", "probe_per_class", "official_split"}
    allowed = {"cifar10-lt": cifar_opts, "cifar100-lt": cifar_opts,
               "imagefolder": {"train_list", "test_list", "grayscale", "workers", "fewshot_list"},
               "webdataset": {"train_list", "num_workers", "shuffle_buffer"}}.get(name, set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown options {unknown} for dataset {name!r}; allowed: {sorted(allowed) or 'none'}")
    if name == "webdataset":
        if ratio is not None:
            raise ValueError(f"ratio={ratio!r}: a stream is not subsampled by a profile; give the keys to keep "
                             f"as train_list (one per line) or none for the whole stream")
        from .webdataset import build_webdataset

        return build_webdataset(root, image_size=image_size, seed=seed, **options)
    if name == "fashion-mnist-lt":
        from .fmnist import build_fashion_mnist_lt

        return build_fashion_mnist_lt(root, **common)
    if name in ("cifar10-lt", "cifar100-lt"):
        from .cifar import build_cifar_lt

        return build_cifar_lt(root, 10 if name == "cifar10-lt" else 100, **common, **options)
    from .imagefolder import build_imagefolder

    return build_imagefolder(root, **common, **options)


__all__ = [
    "DATASETS", "PRETRAIN_SETS", "Batch", "BatchIterator", "ContrastiveData", "ImageSet", "TwoViewAugment",
    "build_dataset", "eval_transform", "load_split", "long_tail_counts", "save_split",
]
