"""Split rules of the SDCLR long-tailed protocol, shared by every data set.

All randomness comes from NumPy generators derived from ``(seed, purpose, split)`` so that each
draw (validation hold-out, class order, long-tailed subset, balanced probe set, few-shot subset)
is reproducible on its own and does not shift when another draw changes.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

# Purpose tags mixed into the seed sequence; never reorder (it would change every split).
_VAL, _ORDER, _LONG_TAIL, _BALANCED, _FEWSHOT, _SAME_SIZE, _PROBE = 0, 1, 2, 3, 4, 5, 6


def rng_for(seed: int, purpose: int, *extra: int) -> np.random.Generator:
    """A generator for one purpose; ``seed`` and ``extra`` must be non-negative ints."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), purpose, *map(int, extra)]))


def check_ratio(ratio) -> float | None:
    """``ratio`` is the imbalance factor n_max / n_min (>= 1), or None for "no sub-sampling"."""
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio):
        raise ValueError(f"ratio must be a finite number >= 1 (or None), got {ratio!r}")
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1 (n_max / n_min of the long-tailed profile), got {ratio!r}")
    return float(ratio)


def check_nonneg_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def long_tail_counts(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """Per-rank image counts n_i = floor(n_max * ratio^(-i / (C - 1))), i = 0 .. C-1.

    This is the exponential profile of LDAM / SDCLR: CIFAR-10-LT (n_max 4500, ratio 100) gives
    11,165 images and CIFAR-100-LT (n_max 450) 9,754. A relative 1e-9 nudge before the floor keeps
    exact integers such as n_max / ratio from flooring to one less through rounding of the power.
    """
    n_max = check_nonneg_int(n_max, "n_max")
    ratio = check_ratio(ratio)
    if ratio is None:
        raise ValueError("ratio must be a number >= 1 here, got None")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if num_classes == 1:
        return [n_max]
    counts = []
    for i in range(num_classes):
        x = n_max * ratio ** (-i / (num_classes - 1))
        counts.append(int(math.floor(x * (1 + 1e-9))))
    return counts


def indices_by_class(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Sorted positions of each class in ``labels``."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(num_classes)]


def class_order(num_classes: int, seed: int, split: int, permute: bool) -> np.ndarray:
    """Which class gets rank i of the profile: index order, or a seeded permutation."""
    if not permute:
        return np.arange(num_classes)
    return rng_for(seed, _ORDER, split).permutation(num_classes)


def stratified_holdout(labels: np.ndarray, num_classes: int, per_class: int, seed: int):
    """Hold ``per_class`` random images of every class out (the 45k / 5k CIFAR split).

    Depends on ``seed`` only, not on the split index, so the five long-tailed splits share one
    validation set and one balanced 45k pool, as in the SDCLR protocol. Returns (keep, holdout)
    as sorted int64 position arrays.
    """
    rng = rng_for(seed, _VAL)
    keep, hold = [], []
    for c, idx in enumerate(indices_by_class(labels, num_classes)):
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than the {per_class} to hold out")
        perm = rng.permutation(idx)
        hold.append(perm[:per_class])
        keep.append(perm[per_class:])
    return np.sort(np.concatenate(keep)).astype(np.int64), np.sort(np.concatenate(hold)).astype(np.int64)


def long_tail_subset(labels: np.ndarray, pool: np.ndarray, num_classes: int, ratio: float | None,
                     seed: int, split: int, permute_classes: bool = False, n_max: int | None = None):
    """Draw the long-tailed training subset of ``pool`` (positions into ``labels``).

    The class at rank i of ``class_order`` keeps n_i random images, n_i from
    :func:`long_tail_counts` with ``n_max`` defaulting to the smallest class size in the pool
    (4500 for the 45k CIFAR-10 pool). ``ratio=None`` keeps the whole pool (already long-tailed
    data). Returns (sorted int64 positions, class order as int64 array).
    """
    pool = np.asarray(pool, dtype=np.int64)
    order = class_order(num_classes, seed, split, permute_classes)
    if ratio is None:
        return np.sort(pool), order.astype(np.int64)
    per_class = indices_by_class(labels[pool], num_classes)
    sizes = [len(p) for p in per_class]
    if n_max is None:
        n_max = min(sizes)
    counts = long_tail_counts(n_max, num_classes, ratio)
    rng = rng_for(seed, _LONG_TAIL, split)
    chosen = []
    for rank, c in enumerate(order):
        if counts[rank] > sizes[c]:
            raise ValueError(f"class {c} has {sizes[c]} images in the pool, fewer than the "
                             f"{counts[rank]} the long-tailed profile asks for (n_max={n_max})")
        chosen.append(rng.permutation(pool[per_class[c]])[:counts[rank]])
    return np.sort(np.concatenate(chosen)).astype(np.int64), order.astype(np.int64)


def take_preferring(rng: np.random.Generator, candidates: np.ndarray, k: int, prefer=None) -> np.ndarray:
    """``k`` random items of ``candidates``, those in ``prefer`` (a sorted array) first.

    Items in ``prefer`` are taken before any other (random order within each tier), so the result
    contains min(k, |candidates & prefer|) preferred items: how the balanced set D_b nests with
    the long-tailed set D_i, and how a probe pool is made to hold the few-shot candidates.
    """
    perm = rng.permutation(np.asarray(candidates, dtype=np.int64))
    if prefer is not None and len(prefer):
        tier = ~np.isin(perm, prefer)
        perm = perm[np.argsort(tier, kind="stable")]
    return perm[:k]


def balanced_subset(labels: np.ndarray, pool: np.ndarray, num_classes: int, seed: int,
                    per_class: int | None = None, prefer=None, split: int | None = None):
    """``per_class`` images of every class of ``pool`` (default: the size of the smallest class;
    the whole pool when that already is balanced), preferring the positions in ``prefer``.

    Seeded by ``seed`` alone (shared by the splits) unless ``split`` is given.
    """
    pool = np.asarray(pool, dtype=np.int64)
    per = indices_by_class(labels[pool], num_classes)
    n = min(len(p) for p in per) if per_class is None else int(per_class)
    if n == 0:
        raise ValueError("a class has no images in the pool; a balanced probe set is impossible")
    short = [c for c, p in enumerate(per) if len(p) < n]
    if short:
        raise ValueError(f"class {short[0]} has {len(per[short[0]])} images in the pool, fewer than the "
                         f"{n} per class the balanced probe set needs")
    if all(len(p) == n for p in per):
        return np.sort(pool)
    rng = rng_for(seed, _BALANCED) if split is None else rng_for(seed, _PROBE, split)
    prefer = None if prefer is None else np.sort(np.asarray(prefer, dtype=np.int64))
    chosen = [take_preferring(rng, pool[p], n, prefer) for p in per]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def same_size_balanced(labels: np.ndarray, pool: np.ndarray, long_tail: np.ndarray, num_classes: int,
                       seed: int, split: int):
    """The balanced set D_b of a long-tailed set D_i: floor(|D_i| / C) images of every class.

    Drawn from the same ``pool`` as D_i and nested with it class by class: a class with at least
    that many images in D_i takes them all from D_i, a smaller class keeps all of its D_i images
    and is filled up from the rest of the pool. So |D_i & D_b| per class = min(n_c, |D_b| / C),
    and the few-shot set (a balanced subset of D_i & D_b) can reach the size of D_i's tail
    class. Returns (sorted int64 positions, None), or (None, reason) when a class of the pool
    has fewer than |D_b| / C images.
    """
    pool = np.asarray(pool, dtype=np.int64)
    long_tail = np.sort(np.asarray(long_tail, dtype=np.int64))
    m = len(long_tail) // num_classes
    if m == 0:
        return None, f"the long-tailed set has {len(long_tail)} images, fewer than one per class"
    per = indices_by_class(labels[pool], num_classes)
    for c, p in enumerate(per):
        if len(p) < m:
            return None, (f"class {c} has {len(p)} images in the pool, fewer than the {m} per class "
                          f"of a balanced set as large as the long-tailed one")
    rng = rng_for(seed, _SAME_SIZE, split)
    chosen = [take_preferring(rng, pool[p], m, long_tail) for p in per]
    return np.sort(np.concatenate(chosen)).astype(np.int64), None


def shots_per_class(shots, class_sizes) -> int:
    """Resolve ``shots``: an int k (k images per class) or a fraction in (0, 1] of each class.

    A fraction is taken of the smallest class size (of the balanced probe pool) and floored, with
    a minimum of one image (1% of CIFAR-10's 4500 per class = 45 shots, as SDCLR's S_b; of
    CIFAR-100's 400 = 4; of Fashion-MNIST's 6000 = 60).
    """
    smallest = min(class_sizes)
    if isinstance(shots, bool) or not isinstance(shots, numbers.Real):
        raise ValueError(f"shots must be an int >= 1 or a fraction in (0, 1], got {shots!r}")
    if isinstance(shots, numbers.Integral):
        k = int(shots)
        if k < 1:
            raise ValueError(f"shots must be >= 1 images per class, got {shots!r}")
    else:
        if not (0 < shots <= 1):
            raise ValueError(f"a fractional shots must lie in (0, 1], got {shots!r}")
        k = max(1, int(math.floor(shots * smallest + 1e-9)))
    if k > smallest:
        raise ValueError(f"shots={shots!r} asks for {k} images per class but the smallest class "
                         f"of the probe pool has {smallest}")
    return k


def fewshot_subset(labels: np.ndarray, pool: np.ndarray, num_classes: int, shots, seed: int, split: int,
                   size_pool=None, what: str = "the pool"):
    """k random images per class from ``pool``; the same (seed, split, k) gives the same set.

    ``shots`` is resolved by :func:`shots_per_class` against the class sizes of ``size_pool``
    (default ``pool``): the protocol takes 1% of the balanced probe pool's class size and draws
    it from the pretraining images D_i & D_b (``pool``). A class of ``pool`` with fewer than k
    images raises ValueError naming ``shots`` and ``what``.
    """
    pool = np.asarray(pool, dtype=np.int64)
    per_class = indices_by_class(labels[pool], num_classes)
    base = per_class if size_pool is None else indices_by_class(labels[np.asarray(size_pool, dtype=np.int64)],
                                                                 num_classes)
    k = shots_per_class(shots, [len(p) for p in base])
    sizes = [len(p) for p in per_class]
    short = [c for c, n in enumerate(sizes) if n < k]
    if short:
        c = min(short, key=lambda i: sizes[i])
        raise ValueError(f"shots={shots!r} asks for {k} images per class, but class {c} has only {sizes[c]} "
                         f"in {what}; use shots <= {min(sizes)}")
    rng = rng_for(seed, _FEWSHOT, split, k)
    chosen = [rng.permutation(pool[p])[:k] for p in per_class]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
