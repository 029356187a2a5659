"""A class-per-folder image tree (ImageNet-LT / Places-LT style), decoded once into memory."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .assemble import assemble

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
DEFAULT_IMAGE_SIZE = 64


def scan_tree(folder: Path, class_names=None):
    """Sorted (relative-to-folder.parent path, label) pairs of ``folder/<class>/<image>``.

    Class indices follow the sorted folder names of the training tree (ImageNet-LT's label
    order); ``class_names`` forces that order onto another tree (the test tree).
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} not found")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if class_names is None:
        class_names = found
    extra = sorted(set(found) - set(class_names))
    if extra:
        raise ValueError(f"{str(folder)!r} has class folders {extra[:5]} that the training tree lacks")
    index = {c: i for i, c in enumerate(class_names)}
    items = []
    for c in found:
        for dirpath, _, files in os.walk(folder / c):
            for f in files:
                if f.lower().endswith(EXTENSIONS):
                    rel = os.path.relpath(os.path.join(dirpath, f), folder.parent)
                    items.append((rel.replace(os.sep, "/"), index[c]))
    items.sort()
    return items, list(class_names)


def read_list_file(path, root: Path, pool, name: str):
    """Positions in ``pool`` of the lines "relative/path label" of an ImageNet-LT style list file.

    Paths are relative to ``root``; each label must equal the label of the path's class folder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name} {str(path)!r} not found")
    where = {p: i for i, (p, _) in enumerate(pool)}
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{name} {str(path)!r} line {lineno}: expected 'relative/path label', got {line!r}")
        rel, label = parts[0].strip().replace("\\", "/"), int(parts[1])
        if rel not in where:
            raise ValueError(f"{name} {str(path)!r} line {lineno}: {rel!r} is not an image of the tree under "
                             f"{str(root)!r}")
        pos = where[rel]
        if pool[pos][1] != label:
            raise ValueError(f"{name} {str(path)!r} line {lineno}: label {label} but the folder of {rel!r} "
                             f"is class {pool[pos][1]}")
        out.append(pos)
    if not out:
        raise ValueError(f"{name} {str(path)!r} lists no images")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} {str(path)!r} lists an image more than once")
    return np.asarray(out, dtype=np.int64)


def _decode(path: Path, size: int, grayscale: bool) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = img.convert("L" if grayscale else "RGB")
            # Shorter side to `size`, then the centre square: no aspect-ratio distortion.
            img = ImageOps.fit(img, (size, size), method=getattr(Image, "Resampling", Image).BICUBIC)
            arr = np.array(img, dtype=np.uint8)  # a writable copy for torch.from_numpy
    except OSError as exc:
        raise ValueError(f"cannot decode image {str(path)!r}: {exc}") from None
    return arr[None] if grayscale else arr.transpose(2, 0, 1)


def load_images(root: Path, rel_paths, size: int, grayscale: bool, workers=None) -> torch.Tensor:
    """Decode images into one uint8 (N, C, size, size) tensor; PIL decodes outside the GIL, so a
    thread pool scales."""
    c = 1 if grayscale else 3
    out = torch.empty(len(rel_paths), c, size, size, dtype=torch.uint8)
    if not rel_paths:
        return out
    workers = workers or min(8, os.cpu_count() or 1)

    def work(i):
        out[i] = torch.from_numpy(_decode(root / rel_paths[i], size, grayscale))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(len(rel_paths))))
    return out


def build_imagefolder(root, *, ratio=None, seed=0, split=0, image_size=None, permute_classes=True,
                      pretrain_set=None, split_file=None, train_list=None, test_list=None, grayscale=False,
                      workers=None, fewshot_list=None):
    """Long-tailed data from ``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``val/``).

    The long-tailed training split is, in order of precedence: the images named in
    ``train_list`` ("relative/path label" lines, paths relative to ``root``, as ImageNet-LT ships
    them); the exponential profile with ``ratio`` over the training tree; or, with ``ratio=None``
    (the default here), the whole training tree as it is (already long-tailed data).
    ``probe_train`` is the training tree cut to a balanced set (preferring the few-shot
    candidates D_i & D_b); ``balanced_train`` (D_b) is None when some class of the tree has fewer
    than |D_i| / C images. With ``ratio`` the head / tail ranks go to a seeded permutation of the
    classes; a list file or ``ratio=None`` ranks them by their counts. With both ``val/`` and ``test/``
    present, ``val/`` becomes ``val``. Images are resized (shorter side, centre crop) to
    ``image_size`` (default 64) and held as uint8 in memory. ``fewshot_list`` (same format) names
    an explicit few-shot probe set, e.g. the official ImageNet-100-LT 1 % list
    ``imageNet_100_sub_balance_train_0.01`` (12 images per class drawn from the full training
    set): ``data.fewshot(k)`` with its k per class returns it, as the official few-shot probe
    trains on it.
    """
    if root is None:
        raise FileNotFoundError("imagefolder needs root=: a folder holding train/<class>/ and test/<class>/ "
                                "(or val/<class>/)")
    root = Path(root)
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{str(root)!r} has no train/ folder; expected root/train/<class>/<image> and "
                                f"root/test/<class>/<image> (or root/val/...)")
    train_items, classes = scan_tree(root / "train")
    if not classes or not train_items:
        raise ValueError(f"{str(root / 'train')!r} holds no class folders with images ({', '.join(EXTENSIONS)})")
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"{str(root)!r} has neither test/ nor val/ next to train/")
    test_items, _ = scan_tree(test_dir, classes)
    val_items = None
    if test_dir.name == "test" and (root / "val").is_dir():
        val_items, _ = scan_tree(root / "val", classes)

    lt_positions = read_list_file(train_list, root, train_items, "train_list") if train_list else None
    few_positions = read_list_file(fewshot_list, root, train_items, "fewshot_list") if fewshot_list else None
    if few_positions is not None:
        per = np.bincount([train_items[i][1] for i in few_positions], minlength=len(classes))
        if per.min() != per.max():
            raise ValueError(f"fewshot_list {str(fewshot_list)!r} is not class-balanced: {per.min()} to {per.max()} "
                             f"images per class")
    test_pos = read_list_file(test_list, root, test_items, "test_list") if test_list else np.arange(len(test_items))
    test_items = [test_items[i] for i in test_pos]

    tr_x = load_images(root, [p for p, _ in train_items], size, grayscale, workers)
    te_x = load_images(root, [p for p, _ in test_items], size, grayscale, workers)
    tr_y = torch.tensor([y for _, y in train_items], dtype=torch.int64)
    te_y = torch.tensor([y for _, y in test_items], dtype=torch.int64)
    va_x = va_y = None
    if val_items is not None:
        va_x = load_images(root, [p for p, _ in val_items], size, grayscale, workers)
        va_y = torch.tensor([y for _, y in val_items], dtype=torch.int64)
    config = dict(name="imagefolder", root=str(root), ratio=ratio, seed=seed, split=split,
                  permute_classes=permute_classes, image_size=size, grayscale=grayscale,
                  train_list=None if train_list is None else str(train_list),
                  test_list=None if test_list is None else str(test_list),
                  fewshot_list=None if fewshot_list is None else str(fewshot_list))
    return assemble("imagefolder", num_classes=len(classes), class_names=classes, train_images=tr_x,
                    train_labels=tr_y, test_images=te_x, test_labels=te_y, val_images=va_x, val_labels=va_y,
                    ratio=ratio, seed=seed, split=split, permute_classes=permute_classes, image_size=size,
                    split_file=split_file, lt_positions=lt_positions, config=config,
                    pretrain_set=pretrain_set, fewshot_positions=few_positions)
