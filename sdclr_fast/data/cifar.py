"""CIFAR-10-LT / CIFAR-100-LT from the CIFAR python-pickle format (nothing is downloaded)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from . import splits as S
from .assemble import assemble

LAYOUT = {
    10: dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
             meta="batches.meta", label_key=b"labels", names_key=b"label_names"),
    100: dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
              label_key=b"fine_labels", names_key=b"fine_label_names"),
}


def cifar_dir(root, num_classes: int) -> Path:
    """``root`` may be the folder holding cifar-10-batches-py / cifar-100-python, or that folder."""
    lay = LAYOUT[num_classes]
    if root is None:
        raise FileNotFoundError(
            f"cifar{num_classes}-lt needs root=: a local folder holding {lay['folder']}/ in the CIFAR python "
            f"pickle format (the 'python version' archive from the CIFAR site, unpacked); nothing is downloaded")
    root = Path(root)
    for cand in (root / lay["folder"], root):
        if all((cand / f).is_file() for f in lay["train"] + lay["test"]):
            return cand
    raise FileNotFoundError(
        f"no CIFAR-{num_classes} python-pickle files ({', '.join(lay['train'] + lay['test'])}) under "
        f"{str(root)!r} or {str(root / lay['folder'])!r}; unpack the 'python version' archive there "
        f"(nothing can be downloaded)")


def _unpickle(path: Path) -> dict:
    # The CIFAR distribution format is pickle, which can run code when loaded: point root only at
    # files from the official archive (or another source you trust).
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as exc:
        raise ValueError(f"CIFAR file {str(path)!r} is not a readable pickle ({exc!r})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR file {str(path)!r} does not hold a dict")
    return obj


def _read_batches(folder: Path, files, label_key: bytes):
    images, labels = [], []
    for name in files:
        path = folder / name
        d = _unpickle(path)
        if b"data" not in d or label_key not in d:
            raise ValueError(f"CIFAR file {str(path)!r} lacks the keys b'data' and {label_key!r}")
        x = np.asarray(d[b"data"])
        y = np.asarray(d[label_key])
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise ValueError(f"CIFAR file {str(path)!r}: data must be uint8 of shape (N, 3072), "
                             f"got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"CIFAR file {str(path)!r}: {y.shape} labels for {x.shape[0]} images")
        images.append(x.reshape(-1, 3, 32, 32))
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_cifar(root, num_classes: int):
    """(train_images, train_labels, test_images, test_labels, class_names); images uint8 (N, 3, 32, 32)."""
    if num_classes not in LAYOUT:
        raise ValueError(f"num_classes must be 10 or 100 for CIFAR, got {num_classes!r}")
    lay = LAYOUT[num_classes]
    folder = cifar_dir(root, num_classes)
    tr_x, tr_y = _read_batches(folder, lay["train"], lay["label_key"])
    te_x, te_y = _read_batches(folder, lay["test"], lay["label_key"])
    for part, y in (("train", tr_y), ("test", te_y)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"CIFAR-{num_classes} {part} labels must lie in [0, {num_classes}), "
                             f"got [{y.min()}, {y.max()}]")
    names = [str(i) for i in range(num_classes)]
    meta = folder / lay["meta"]
    if meta.is_file():
        m = _unpickle(meta)
        raw = m.get(lay["names_key"])
        if raw is not None and len(raw) == num_classes:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw]
    return (torch.from_numpy(tr_x), torch.from_numpy(tr_y), torch.from_numpy(te_x), torch.from_numpy(te_y), names)


def cifar_protocol_split(labels: np.ndarray, num_classes: int, *, ratio=100.0, seed=0, split=0,
                         permute_classes=False, val_fraction=0.1):
    """The SDCLR split of a CIFAR train set, from its labels alone.

    Holds ``val_fraction`` of every class out (500 / 50 per class: the 45k / 5k split, seeded by
    ``seed`` only), then draws the long-tailed subset of the rest with n_max = the per-class pool
    size (4500 / 450), seeded by (seed, split). Returns (long_tail, probe_pool, val, class_order).
    """
    labels = np.asarray(labels)
    per = [len(p) for p in S.indices_by_class(labels, num_classes)]
    hold = int(min(per) * val_fraction)
    keep, val = S.stratified_holdout(labels, num_classes, hold, seed)
    lt, order = S.long_tail_subset(labels, keep, num_classes, ratio, seed, split, permute_classes)
    return lt, S.balanced_subset(labels, keep, num_classes, seed), val, order


def build_cifar_lt(root, num_classes: int, *, ratio=100.0, seed=0, split=0, image_size=None,
                   permute_classes=False, split_file=None, val_fraction=0.1):
    """CIFAR-{10,100}-LT per the SDCLR protocol (see :func:`cifar_protocol_split`).

    ``split`` (0-4 in the protocol, any int >= 0 works) picks one of the seeded long-tailed
    draws; the 45k/5k split and therefore ``val`` and ``probe_train`` (the balanced 45k) are
    shared by all splits of a seed. ``test`` is the 10k test set.
    """
    if not (0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction!r}")
    S.check_ratio(ratio)
    tr_x, tr_y, te_x, te_y, names = load_cifar(root, num_classes)
    name = f"cifar{num_classes}-lt"
    per = [len(p) for p in S.indices_by_class(tr_y.numpy(), num_classes)]
    val_per_class = int(min(per) * val_fraction)
    config = dict(name=name, root=str(root), ratio=ratio, seed=seed, split=split,
                  permute_classes=permute_classes, image_size=image_size, val_per_class=val_per_class)
    return assemble(name, num_classes=num_classes, class_names=names, train_images=tr_x, train_labels=tr_y,
                    test_images=te_x, test_labels=te_y, val_per_class=val_per_class, ratio=ratio, seed=seed,
                    split=split, permute_classes=permute_classes, image_size=image_size,
                    split_file=split_file, config=config)
