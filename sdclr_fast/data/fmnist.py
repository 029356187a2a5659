"""Fashion-MNIST from IDX files (Debian's dataset-fashion-mnist) and its long-tailed version."""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from .assemble import assemble

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "SDCLR_FAST_FMNIST_DIR"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_HOW_TO_GET = (f"install Debian's package with `apt-get install dataset-fashion-mnist` (it puts the IDX files "
               f"in {DEFAULT_DIR}), or set {ENV_VAR} (or pass root=) to a folder holding "
               f"{', '.join(v + '.gz' for v in FILES.values())}")


def fmnist_dir(root=None) -> Path:
    """The folder to read: ``root``, else $SDCLR_FAST_FMNIST_DIR, else Debian's location."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}.gz not found in {str(folder)!r}; {_HOW_TO_GET}")


def read_idx(path, expect_dims: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzipped) into a uint8 array.

    Checks the magic number (0x00 0x00 0x08 ndim), the dimension count and that the payload is
    exactly prod(dims) bytes; anything else raises ValueError naming the file.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"IDX file {str(path)!r} is corrupt or truncated ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"IDX file {str(path)!r} has a bad magic number (not an IDX file)")
    if raw[2] != 0x08:
        raise ValueError(f"IDX file {str(path)!r} has element type 0x{raw[2]:02x}; expected 0x08 (unsigned byte)")
    ndim = raw[3]
    if ndim != expect_dims:
        raise ValueError(f"IDX file {str(path)!r} has {ndim} dimensions; expected {expect_dims}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {str(path)!r} is truncated inside its header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        raise ValueError(f"IDX file {str(path)!r} holds {len(raw) - header} bytes of data; its header "
                         f"dims {dims} need {size} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fmnist(root=None):
    """(train_images, train_labels, test_images, test_labels) as torch tensors: uint8 (N, 1, 28, 28)
    and int64 (N,)."""
    folder = fmnist_dir(root)
    out = []
    for part in ("train", "test"):
        ipath, lpath = _find(folder, FILES[part + "_images"]), _find(folder, FILES[part + "_labels"])
        images, labels = read_idx(ipath, 3), read_idx(lpath, 1)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{str(ipath)!r} has {images.shape[0]} images but {str(lpath)!r} "
                             f"has {labels.shape[0]} labels")
        if labels.size and labels.max() >= len(CLASS_NAMES):
            raise ValueError(f"IDX file {str(lpath)!r} holds label {int(labels.max())}; "
                             f"Fashion-MNIST labels are 0..9")
        out += [torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))]
    return tuple(out)


def build_fashion_mnist_lt(root=None, *, ratio=100.0, seed=0, split=0, image_size=None,
                           permute_classes=True, split_file=None, pretrain_set=None):
    """Fashion-MNIST-LT: the exponential profile over the 60k training images.

    n_max is 6000 (the per-class size), so ratio 100 keeps 6000, 3596, ..., 60 images per
    rank (14,886 in all); the ranks go to a permutation of the classes seeded by (seed, split)
    (``permute_classes=False``: class i gets rank i). ``balanced_train`` is D_b (1488 per
    class), ``probe_train`` the full, balanced 60k set, ``test`` the 10k test set; no ``val``.
    """
    tr_x, tr_y, te_x, te_y = load_fmnist(root)
    config = dict(name="fashion-mnist-lt", root=str(fmnist_dir(root)), ratio=ratio, seed=seed, split=split,
                  permute_classes=permute_classes, image_size=image_size)
    return assemble("fashion-mnist-lt", num_classes=10, class_names=CLASS_NAMES, train_images=tr_x,
                    train_labels=tr_y, test_images=te_x, test_labels=te_y, ratio=ratio, seed=seed,
                    split=split, permute_classes=permute_classes, image_size=image_size,
                    split_file=split_file, config=config, pretrain_set=pretrain_set)
