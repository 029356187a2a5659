"""In-memory image sets and the container that every data set builder returns."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..files import write_json
from . import splits as _splits

SPLIT_FILE = "split.json"
SPLIT_FORMAT = 1


def as_index_tensor(indices, n: int, name: str = "indices") -> torch.Tensor:
    """int64 CPU tensor of positions in [0, n); accepts tensors, arrays, lists, ranges."""
    if isinstance(indices, torch.Tensor):
        t = indices.detach().to("cpu")
    else:
        t = torch.as_tensor(np.asarray(indices))
    if t.dtype == torch.bool:
        raise ValueError(f"{name} must be integer positions, not a boolean mask (use mask.nonzero())")
    if t.numel() == 0:
        t = t.reshape(0).to(torch.int64)
    if t.dim() != 1 or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must be a 1-D integer sequence, got shape {tuple(t.shape)} dtype {t.dtype}")
    t = t.to(torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"{name} must lie in [0, {n}), got values in [{int(t.min())}, {int(t.max())}]")
    return t


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images and labels held in memory.

    images:  uint8 tensor (N, C, H, W) on the CPU.
    labels:  int64 tensor (N,).
    indices: int64 tensor (N,), each image's position in the data set's source pool (the order of
             the original files); this is what split files store.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        n = self.images.shape[0]
        for name in ("labels", "indices"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (n,):
                raise ValueError(f"{name} must be an int64 tensor of shape ({n},)")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return f"ImageSet({len(self)} images of {tuple(self.images.shape[1:])})"

    def subset(self, positions) -> "ImageSet":
        """The images at ``positions`` (indices into this set, e.g. one DnC cluster)."""
        idx = as_index_tensor(positions, len(self), "positions")
        return ImageSet(self.images.index_select(0, idx), self.labels.index_select(0, idx),
                        self.indices.index_select(0, idx))

    def class_counts(self, num_classes: int) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=num_classes)[:num_classes]

    @staticmethod
    def from_pool(images: torch.Tensor, labels: torch.Tensor, positions) -> "ImageSet":
        idx = as_index_tensor(positions, images.shape[0], "positions")
        return ImageSet(images.index_select(0, idx), labels.index_select(0, idx), idx.clone())


def channel_stats(images: torch.Tensor, chunk: int = 4096):
    """Per-channel mean and population std of uint8 images scaled to [0, 1] (float64 sums)."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float64).div_(255.0)
        s += x.sum(dim=(0, 2, 3))
        s2 += x.square().sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / n
    std = (s2 / n - mean.square()).clamp_min(0).sqrt()
    # A constant channel would divide by zero in normalisation.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize (N, C, H, W) uint8 images to size x size (bilinear, antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start:start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def check_image_size(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (or None for the native size), got {image_size!r}")
    return int(image_size)


@dataclass(eq=False)
class ContrastiveData:
    """What a data set builder returns; every image tensor is uint8 (N, C, H, W) on the CPU.

    train:        the long-tailed training split that pretraining uses (its labels must never be
                  shown to the method; they are kept for the group metrics and for DnC analysis).
    probe_train:  the balanced set the full-shot linear probe is trained on.
    val:          held-out validation images (CIFAR: the 5k of the 45k/5k split), or None.
    test:         the test set.
    class_order:  class_order[i] is the class given rank i of the long-tailed profile.
    mean, std:    per-channel statistics of ``train`` in [0, 1] units, for normalisation.
    config:       how the splits were drawn (name, root, ratio, seed, split, ...), see save_split.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    class_names: list
    train: ImageSet
    probe_train: ImageSet
    val: ImageSet | None
    test: ImageSet
    class_order: torch.Tensor
    mean: tuple
    std: tuple
    config: dict = field(default_factory=dict)

    @property
    def class_counts(self) -> torch.Tensor:
        """Images per class in the long-tailed training split (int64, length num_classes)."""
        return self.train.class_counts(self.num_classes)

    def fewshot_positions(self, shots) -> torch.Tensor:
        """Positions into ``probe_train`` of the few-shot subset (see :meth:`fewshot`)."""
        pos = _splits.fewshot_subset(self.probe_train.labels.numpy(), np.arange(len(self.probe_train)),
                                     self.num_classes, shots, self.config.get("seed", 0),
                                     self.config.get("split", 0))
        return torch.from_numpy(pos)

    def fewshot(self, shots) -> ImageSet:
        """A balanced few-shot subset of ``probe_train``: ``shots`` images per class (int), or a
        fraction in (0, 1] of the smallest class (floored, at least 1). Deterministic in
        (seed, split, shots)."""
        return self.probe_train.subset(self.fewshot_positions(shots))

    def subset(self, positions) -> ImageSet:
        """Positions into ``train`` -> that part of the training split (for DnC clusters)."""
        return self.train.subset(positions)

    def save_split(self, run_dir) -> Path:
        """Write ``run_dir/split.json`` with the drawn indices, so a run can be reproduced with
        ``build_dataset(..., split_file=path)``. Returns the path."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / SPLIT_FILE
        payload = {
            "format": SPLIT_FORMAT,
            "dataset": self.name,
            "config": {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in self.config.items()},
            "num_classes": self.num_classes,
            "class_order": self.class_order.tolist(),
            "train_class_counts": self.class_counts.tolist(),
            "train": self.train.indices.tolist(),
            "probe_train": self.probe_train.indices.tolist(),
            "val": None if self.val is None else self.val.indices.tolist(),
            "test": self.test.indices.tolist(),
        }
        return write_json(path, payload, what="the data split", indent=None)

    def __repr__(self) -> str:
        return f"ContrastiveData({self.summary()})"

    def summary(self) -> str:
        counts = self.class_counts.tolist()
        return (f"{self.name}: {self.num_classes} classes, {self.in_channels}x{self.image_size}x{self.image_size}, "
                f"train {len(self.train)} (max {max(counts)} / min {min(counts)} per class), "
                f"probe {len(self.probe_train)}, val {0 if self.val is None else len(self.val)}, "
                f"test {len(self.test)}")


def save_split(data: ContrastiveData, run_dir) -> Path:
    """Module-level form of :meth:`ContrastiveData.save_split`."""
    return data.save_split(run_dir)


def load_split(path) -> dict:
    """Read a split file written by :func:`save_split` (a file or the run directory holding it).

    Returns a dict with "dataset", "config", "class_order", "train_class_counts" and the index
    lists "train", "probe_train", "val" (or None) and "test", each as an int64 numpy array.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SPLIT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"split file {str(path)!r} not found")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"split file {str(path)!r} is not valid JSON: {exc}") from None
    need = ("format", "dataset", "config", "class_order", "train_class_counts", "train", "probe_train", "val", "test")
    missing = [k for k in need if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(f"split file {str(path)!r} lacks the fields {missing}")
    if payload["format"] != SPLIT_FORMAT:
        raise ValueError(f"split file {str(path)!r} has format {payload['format']!r}, expected {SPLIT_FORMAT}")
    out = dict(payload)
    for key in ("class_order", "train_class_counts", "train", "probe_train", "val", "test"):
        if out[key] is not None:
            arr = np.asarray(out[key])
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"split file {str(path)!r}: field {key!r} must be a list of ints")
            out[key] = arr.astype(np.int64)
    return out
