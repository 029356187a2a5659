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


def default_probe_per_class(num_classes: int, pool_per_class: int, val_per_class: int):
    """CIFAR-100's balanced probe pool leaves as many images per class of the 45k pool out as val
    holds (450 - 50 = 400 per class, the official 40k cifar100_trainIdxList); CIFAR-10's is the
    whole 45k pool (None)."""
    if num_classes == 100 and val_per_class > 0:
        return max(1, pool_per_class - val_per_class)
    return None


def cifar_protocol_split(labels: np.ndarray, num_classes: int, *, ratio=100.0, seed=0, split=0,
                         permute_classes=True, val_fraction=0.1, probe_per_class="default"):
    """The SDCLR split of a CIFAR train set, from its labels alone.

    Holds ``val_fraction`` of every class out (500 / 50 per class: the 45k / 5k split, seeded by
    ``seed`` only), then draws the long-tailed subset D_i of the rest with n_max = the per-class
    pool size (4500 / 450) and the head / tail ranks given to a permutation of the classes
    seeded by (seed, split), the balanced set D_b of the same size (nested with D_i), and the
    balanced probe pool: the whole 45k for CIFAR-10, 400 per class (40k) for CIFAR-100, holding
    D_i & D_b. Returns (long_tail, probe_pool, val, class_order, balanced).
    """
    labels = np.asarray(labels)
    per = [len(p) for p in S.indices_by_class(labels, num_classes)]
    hold = int(min(per) * val_fraction)
    if probe_per_class == "default":
        probe_per_class = default_probe_per_class(num_classes, min(per) - hold, hold)
    keep, val = S.stratified_holdout(labels, num_classes, hold, seed)
    lt, order = S.long_tail_subset(labels, keep, num_classes, ratio, seed, split, permute_classes)
    bal, _ = S.same_size_balanced(labels, keep, lt, num_classes, seed, split)
    prefer = lt if bal is None else np.intersect1d(lt, bal)
    probe = S.balanced_subset(labels, keep, num_classes, seed, per_class=probe_per_class, prefer=prefer, split=split)
    return lt, probe, val, order, bal


# ----------------------------------------------------------------------------- official SDCLR split files

_OFFICIAL_NAMES = {
    10: dict(train=["cifar10/trainIdxList.npy", "trainIdxList.npy"],
             val=["cifar10/valIdxList.npy", "valIdxList.npy"],
             subset=["cifar10_imbSub_with_subsets/split{k}_{part}.npy", "split{k}_{part}.npy"]),
    100: dict(train=["cifar100/cifar100_trainIdxList.npy", "cifar100_split/cifar100_trainIdxList.npy",
                     "cifar100_trainIdxList.npy"],
              val=["cifar100/cifar100_valIdxList.npy", "cifar100_split/cifar100_valIdxList.npy",
                   "cifar100_valIdxList.npy"],
              subset=["cifar100_imbSub_with_subsets/cifar100_split{k}_{part}.npy", "cifar100_split{k}_{part}.npy"]),
}
OFFICIAL_KEYS = ("train", "val", "D_i", "D_b", "S_b")


def official_split_files(official_split, num_classes: int, split: int) -> dict:
    """Paths of the official SDCLR index files for ``split`` (the k of split{k}_D_i.npy).

    ``official_split`` is the official ``split/`` folder (or a folder holding the files
    directly), or a dict with the keys "train", "val", "D_i" and optionally "D_b", "S_b" mapping to
    .npy files. Returns {key: Path or None}; D_b and S_b are None when absent.
    """
    if isinstance(official_split, dict):
        unknown = sorted(set(official_split) - set(OFFICIAL_KEYS))
        if unknown:
            raise ValueError(f"official_split has unknown keys {unknown}; expected {list(OFFICIAL_KEYS)}")
        out = {k: (None if official_split.get(k) is None else Path(official_split[k])) for k in OFFICIAL_KEYS}
        for k in ("train", "val", "D_i"):
            if out[k] is None:
                raise ValueError(f"official_split needs the key {k!r} (a .npy file of indices into the 50k "
                                 f"CIFAR training images)")
        for k, p in out.items():
            if p is not None and not p.is_file():
                raise FileNotFoundError(f"official_split[{k!r}]: file {str(p)!r} not found")
        return out
    folder = Path(official_split)
    if not folder.is_dir():
        raise FileNotFoundError(f"official_split {str(folder)!r} is not a folder (expected SDCLR's split/ folder, "
                                f"or a dict of .npy files)")
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"with official_split, split picks the file split{{k}}_D_i.npy and must be an int >= 1 "
                         f"(the official files are numbered 1-5), got {split!r}")
    names = _OFFICIAL_NAMES[num_classes]

    def find(cands, required, what):
        for c in cands:
            if (folder / c).is_file():
                return folder / c
        if required:
            raise FileNotFoundError(f"official_split: none of {cands} found under {str(folder)!r} ({what})")
        return None

    out = {"train": find(names["train"], True, "the probe pool list"),
           "val": find(names["val"], True, "the validation list")}
    for part in ("D_i", "D_b", "S_b"):
        cands = [c.format(k=split, part=part) for c in names["subset"]]
        out[part] = find(cands, part == "D_i", f"split={split} picks split{split}_*")
    return out


def _load_index_file(path: Path, n: int) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"official split file {str(path)!r} is not a readable .npy array ({exc})") from None
    arr = np.asarray(arr)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"official split file {str(path)!r} must hold a 1-D integer array, got "
                         f"{arr.dtype} of shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.size == 0:
        raise ValueError(f"official split file {str(path)!r} is empty")
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(f"official split file {str(path)!r} holds indices in [{arr.min()}, {arr.max()}]; "
                         f"expected indices into the {n} CIFAR training images, [0, {n})")
    uniq, cnt = np.unique(arr, return_counts=True)
    if (cnt > 1).any():
        raise ValueError(f"official split file {str(path)!r} lists index {int(uniq[cnt > 1][0])} more than once "
                         f"({int((cnt > 1).sum())} duplicates)")
    return np.sort(arr)


def load_official_split(official_split, labels: np.ndarray, num_classes: int, split: int) -> dict:
    """Read and check SDCLR's index files; returns the ``official`` dict of :func:`assemble`.

    Checks every file (1-D ints in [0, 50000), no duplicates), that train and val are disjoint,
    that D_b is balanced and as large as D_i (within C - 1), and that S_b is balanced and inside
    D_i & D_b. Errors name the file.
    """
    labels = np.asarray(labels)
    files = official_split_files(official_split, num_classes, split)
    arr = {k: (None if p is None else _load_index_file(p, len(labels))) for k, p in files.items()}
    both = np.intersect1d(arr["train"], arr["val"])
    if both.size:
        raise ValueError(f"official split files {str(files['train'])!r} and {str(files['val'])!r} share "
                         f"{both.size} indices (e.g. {int(both[0])}); the probe pool and val must be disjoint")

    def counts(a):
        return np.bincount(labels[a], minlength=num_classes)

    lt, bal, few = arr["D_i"], arr["D_b"], arr["S_b"]
    if bal is not None:
        c = counts(bal)
        if c.min() != c.max():
            raise ValueError(f"official D_b file {str(files['D_b'])!r} is not class-balanced: {c.min()} to "
                             f"{c.max()} images per class")
        if abs(len(bal) - len(lt)) >= num_classes:
            raise ValueError(f"official D_b file {str(files['D_b'])!r} holds {len(bal)} images; expected the size "
                             f"of D_i ({len(lt)}, {str(files['D_i'])!r}) within {num_classes - 1}")
    if few is not None:
        inside = lt if bal is None else np.intersect1d(lt, bal)
        outside = np.setdiff1d(few, inside)
        if outside.size:
            raise ValueError(f"official S_b file {str(files['S_b'])!r} holds {outside.size} images outside "
                             f"D_i & D_b (e.g. index {int(outside[0])}); the few-shot set must lie in both")
        c = counts(few)
        if c.min() != c.max():
            raise ValueError(f"official S_b file {str(files['S_b'])!r} is not class-balanced: {c.min()} to "
                             f"{c.max()} images per class")
    return {"long_tail": lt, "balanced": bal, "fewshot": few, "probe": arr["train"], "val": arr["val"],
            "files": {k: (None if p is None else str(p)) for k, p in files.items()}}


def build_cifar_lt(root, num_classes: int, *, ratio=100.0, seed=0, split=0, image_size=None,
                   permute_classes=True, split_file=None, val_fraction=0.1, pretrain_set=None,
                   probe_per_class="default", official_split=None):
    """CIFAR-{10,100}-LT per the SDCLR protocol (see :func:`cifar_protocol_split`).

    ``split`` (0-4 in the protocol, any int >= 0 works) picks one of the seeded long-tailed
    draws; the 45k/5k split and therefore ``val`` are shared by all splits of a seed, and so is
    ``probe_train`` on CIFAR-10 (the balanced 45k). On CIFAR-100 ``probe_train`` is 400 per
    class (40k; ``probe_per_class``, None for all 450) drawn per split so that it holds D_i & D_b.
    ``test`` is the 10k test set. ``pretrain_set="balanced"`` pretrains on D_b.
    (With ``probe_per_class="default"``, CIFAR-100 leaves val's share out: 450 - 50 = 400.)

    ``official_split``: SDCLR's ``split/`` folder (or a dict of .npy files, see
    :func:`official_split_files`); ``split=k`` then loads split{k}_D_i / D_b / S_b (k = 1-5) and
    trainIdxList / valIdxList: train = D_i, balanced_train = D_b, fewshot_train = S_b,
    probe_train = trainIdxList, val = valIdxList; class ranks follow D_i's counts.
    """
    if not (0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction!r}")
    if split_file is not None and official_split is not None:
        raise ValueError("pass split_file (a saved run) or official_split (SDCLR's index files), not both")
    S.check_ratio(ratio)
    if probe_per_class not in ("default", None) and (
            isinstance(probe_per_class, bool) or not isinstance(probe_per_class, int) or probe_per_class < 1):
        raise ValueError(f"probe_per_class must be an int >= 1, None (the whole pool) or 'default', "
                         f"got {probe_per_class!r}")
    if official_split is not None and not isinstance(official_split, dict):
        official_split_files(official_split, num_classes, split)  # fail before reading the images
    tr_x, tr_y, te_x, te_y, names = load_cifar(root, num_classes)
    name = f"cifar{num_classes}-lt"
    per = [len(p) for p in S.indices_by_class(tr_y.numpy(), num_classes)]
    val_per_class = int(min(per) * val_fraction)
    if probe_per_class == "default":
        probe_per_class = default_probe_per_class(num_classes, min(per) - val_per_class, val_per_class)
    official = None
    if official_split is not None:
        official = load_official_split(official_split, tr_y.numpy(), num_classes, split)
        val_per_class = 0
    config = dict(name=name, root=str(root), ratio=ratio, seed=seed, split=split,
                  permute_classes=permute_classes, image_size=image_size, val_per_class=val_per_class,
                  probe_per_class=probe_per_class)
    if official is not None:
        config.update(ratio=None, permute_classes=None, official_split=official["files"])
    return assemble(name, num_classes=num_classes, class_names=names, train_images=tr_x, train_labels=tr_y,
                    test_images=te_x, test_labels=te_y, val_per_class=val_per_class, ratio=ratio, seed=seed,
                    split=split, permute_classes=permute_classes, image_size=image_size,
                    split_file=split_file, config=config, pretrain_set=pretrain_set,
                    probe_per_class=probe_per_class, official=official)
