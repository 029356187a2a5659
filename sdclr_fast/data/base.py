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
SPLIT_FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1 (no balanced set / few-shot fields) still loads
PRETRAIN_SETS = ("long_tail", "balanced")
FEWSHOT_POOLS = ("pretrain", "probe")


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

    train:        the set the method pretrains on (its labels must never be shown to the method;
                  they are kept for the group metrics and for DnC analysis). This is the
                  long-tailed split D_i, or the balanced set D_b when the data set was built with
                  ``pretrain_set="balanced"`` (SDCLR's balanced baseline).
    probe_train:  the balanced set the full-shot linear probe is trained on (CIFAR-10: the 45k
                  pool; CIFAR-100: 40k, 400 per class; Fashion-MNIST: the 60k).
    val:          held-out validation images (CIFAR: the 5k of the 45k/5k split), or None.
    test:         the test set.
    class_order:  class_order[i] is the class given rank i of the long-tailed profile (a seeded
                  permutation per split by default).
    mean, std:    per-channel statistics of ``train`` in [0, 1] units, for normalisation.
    config:       how the splits were drawn (name, root, ratio, seed, split, pretrain_set, ...).
    long_tail_train: D_i, the long-tailed split, whichever set ``train`` is (None in hand-made
                  instances: then ``train`` is D_i). Read it as ``data.long_tail``.
    balanced_train: D_b, floor(|D_i| / C) images of every class from the same pool, nested with
                  D_i class by class (None where the pool cannot give that many of some class).
    fewshot_train: an explicit few-shot set (SDCLR's official S_b when loaded with
                  ``official_split``), returned by :meth:`fewshot` for its own size; else None.

    ``class_counts`` (and so the major / moderate / minor groups of evaluation) always counts
    D_i, also for the balanced-baseline run.
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
    long_tail_train: ImageSet | None = None
    balanced_train: ImageSet | None = None
    fewshot_train: ImageSet | None = None

    @property
    def long_tail(self) -> ImageSet:
        """D_i (``train`` unless pretraining on the balanced set)."""
        return self.train if self.long_tail_train is None else self.long_tail_train

    @property
    def pretrain_set(self) -> str:
        """"long_tail" or "balanced": which set ``train`` is."""
        return self.config.get("pretrain_set", "long_tail")

    @property
    def long_tail_counts(self) -> torch.Tensor:
        """Images per class in the long-tailed split D_i (int64, length num_classes)."""
        return self.long_tail.class_counts(self.num_classes)

    @property
    def class_counts(self) -> torch.Tensor:
        """The counts that rank the classes for evaluation: those of D_i (= ``long_tail_counts``),
        also when ``train`` is the balanced set."""
        return self.long_tail_counts

    def fewshot_pool(self) -> torch.Tensor:
        """Source indices the few-shot set is drawn from: the pretraining images D_i & D_b (D_i
        when there is no D_b) that lie in ``probe_train``; sorted int64."""
        pool = self.long_tail.indices.numpy()
        if self.balanced_train is not None:
            pool = np.intersect1d(pool, self.balanced_train.indices.numpy())
        pool = np.intersect1d(pool, self.probe_train.indices.numpy())
        return torch.from_numpy(pool.astype(np.int64))

    def fewshot_positions(self, shots, pool: str = "pretrain") -> torch.Tensor:
        """Positions into ``probe_train`` of the few-shot subset (see :meth:`fewshot`)."""
        if pool not in FEWSHOT_POOLS:
            raise ValueError(f"pool must be one of {list(FEWSHOT_POOLS)}, got {pool!r}")
        probe_idx = self.probe_train.indices.numpy()
        if pool == "probe":
            pos = _splits.fewshot_subset(self.probe_train.labels.numpy(), np.arange(len(probe_idx)),
                                         self.num_classes, shots, self.config.get("seed", 0),
                                         self.config.get("split", 0), what="probe_train")
            return torch.from_numpy(pos)
        where = {int(v): i for i, v in enumerate(probe_idx.tolist())}
        if self._is_explicit_fewshot(shots):
            missing = [v for v in self.fewshot_train.indices.tolist() if v not in where]
            if missing:
                raise ValueError(f"the few-shot set S_b holds {len(missing)} images outside probe_train "
                                 f"(e.g. source index {missing[0]}); it cannot be given as probe positions "
                                 f"(fewshot() returns its images)")
            return torch.tensor(sorted(where[v] for v in self.fewshot_train.indices.tolist()), dtype=torch.int64)
        pool = self.fewshot_pool().numpy()
        labels = np.full(int(probe_idx.max()) + 1 if len(probe_idx) else 0, -1, dtype=np.int64)
        labels[probe_idx] = self.probe_train.labels.numpy()
        chosen = _splits.fewshot_subset(labels, pool, self.num_classes, shots, self.config.get("seed", 0),
                                        self.config.get("split", 0), size_pool=probe_idx,
                                        what="the pretraining images D_i & D_b")
        return torch.tensor(sorted(where[v] for v in chosen.tolist()), dtype=torch.int64)

    def _is_explicit_fewshot(self, shots) -> bool:
        """Whether ``shots`` asks for the explicit few-shot set (an official S_b) by its size."""
        if self.fewshot_train is None:
            return False
        k = _splits.shots_per_class(shots, self.probe_train.class_counts(self.num_classes).tolist())
        sb_counts = self.fewshot_train.class_counts(self.num_classes)
        return int(sb_counts.min()) == int(sb_counts.max()) == k

    def fewshot(self, shots, pool: str = "pretrain") -> ImageSet:
        """A balanced few-shot set inside the pretraining images (SDCLR's S_b): ``shots`` images
        per class (int), or a fraction in (0, 1] of the smallest class of ``probe_train`` (floored,
        at least 1: 1% gives 45 on CIFAR-10, 4 on CIFAR-100, 60 on Fashion-MNIST), drawn from
        D_i & D_b (:meth:`fewshot_pool`). Deterministic in (seed, split, k); a k larger than some
        class of D_i & D_b holds raises ValueError naming ``shots``. With an official split loaded,
        the k of its S_b returns S_b itself, as the official code trains the few-shot probe on it,
        also where S_b holds images outside ``probe_train`` (31-56 of each official CIFAR-100 S_b
        lie outside its 40k probe list); any other result is a subset of ``probe_train``.

        ``pool="probe"`` draws from all of ``probe_train`` instead (the pre-protocol behaviour,
        e.g. a small balanced probe set for a quick demo)."""
        if pool == "pretrain" and self._is_explicit_fewshot(shots):
            return self.fewshot_train
        return self.probe_train.subset(self.fewshot_positions(shots, pool))

    def subset(self, positions) -> ImageSet:
        """Positions into ``train`` -> that part of the training split (for DnC clusters)."""
        return self.train.subset(positions)

    def save_split(self, run_dir) -> Path:
        """Write ``run_dir/split.json`` with the drawn indices, so a run can be reproduced with
        ``build_dataset(..., split_file=path)``. Returns the path.

        "train" holds D_i (the long-tailed split) and "train_class_counts" its counts, whichever
        set was pretrained on; "pretrain_set" says which one that was, "balanced_train" holds
        D_b (or null), "fewshot_train" an explicit few-shot set (official S_b) or null."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / SPLIT_FILE
        payload = {
            "format": SPLIT_FORMAT,
            "dataset": self.name,
            "config": {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in self.config.items()},
            "num_classes": self.num_classes,
            "class_order": self.class_order.tolist(),
            "train_class_counts": self.long_tail_counts.tolist(),
            "train": self.long_tail.indices.tolist(),
            "pretrain_set": self.pretrain_set,
            "balanced_train": None if self.balanced_train is None else self.balanced_train.indices.tolist(),
            "fewshot_train": None if self.fewshot_train is None else self.fewshot_train.indices.tolist(),
            "probe_train": self.probe_train.indices.tolist(),
            "val": None if self.val is None else self.val.indices.tolist(),
            "test": self.test.indices.tolist(),
        }
        return write_json(path, payload, what="the data split", indent=None)

    def __repr__(self) -> str:
        return f"ContrastiveData({self.summary()})"

    def summary(self) -> str:
        counts = self.long_tail_counts.tolist()
        which = "" if self.pretrain_set == "long_tail" else f" [pretraining on the balanced set, {len(self.train)}]"
        return (f"{self.name}: {self.num_classes} classes, {self.in_channels}x{self.image_size}x{self.image_size}, "
                f"train {len(self.long_tail)} (max {max(counts)} / min {min(counts)} per class){which}, "
                f"probe {len(self.probe_train)}, val {0 if self.val is None else len(self.val)}, "
                f"test {len(self.test)}")


def save_split(data: ContrastiveData, run_dir) -> Path:
    """Module-level form of :meth:`ContrastiveData.save_split`."""
    return data.save_split(run_dir)


def load_split(path) -> dict:
    """Read a split file written by :func:`save_split` (a file or the run directory holding it).

    Returns a dict with "dataset", "config", "class_order", "train_class_counts", "pretrain_set"
    and the index lists "train" (D_i), "balanced_train" (D_b or None), "fewshot_train" (or None),
    "probe_train", "val" (or None) and "test", each as an int64 numpy array. A format-1 file
    (written before the balanced set existed) loads with pretrain_set "long_tail" and
    balanced_train / fewshot_train None; the balanced set is then drawn again from its D_i.
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
    if payload["format"] not in READABLE_FORMATS:
        raise ValueError(f"split file {str(path)!r} has format {payload['format']!r}, expected one of "
                         f"{list(READABLE_FORMATS)}")
    out = dict(payload)
    if payload["format"] >= 2:
        missing = [k for k in ("pretrain_set", "balanced_train", "fewshot_train") if k not in payload]
        if missing:
            raise ValueError(f"split file {str(path)!r} (format {payload['format']}) lacks the fields {missing}")
    out.setdefault("pretrain_set", "long_tail")
    out.setdefault("balanced_train", None)
    out.setdefault("fewshot_train", None)
    if out["pretrain_set"] not in PRETRAIN_SETS:
        raise ValueError(f"split file {str(path)!r}: pretrain_set must be one of {list(PRETRAIN_SETS)}, "
                         f"got {out['pretrain_set']!r}")
    for key in ("class_order", "train_class_counts", "train", "balanced_train", "fewshot_train",
                "probe_train", "val", "test"):
        if out[key] is not None:
            arr = np.asarray(out[key])
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"split file {str(path)!r}: field {key!r} must be a list of ints")
            out[key] = arr.astype(np.int64)
    return out
