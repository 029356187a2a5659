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
_VAL, _ORDER, _LONG_TAIL, _BALANCED, _FEWSHOT = 0, 1, 2, 3, 4


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


def balanced_subset(labels: np.ndarray, pool: np.ndarray, num_classes: int, seed: int):
    """Every class cut to the size of the smallest one (the full pool when already balanced)."""
    pool = np.asarray(pool, dtype=np.int64)
    per_class = indices_by_class(labels[pool], num_classes)
    n = min(len(p) for p in per_class)
    if n == 0:
        raise ValueError("a class has no images in the pool; a balanced probe set is impossible")
    if all(len(p) == n for p in per_class):
        return np.sort(pool)
    rng = rng_for(seed, _BALANCED)
    chosen = [rng.permutation(pool[p])[:n] for p in per_class]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def shots_per_class(shots, class_sizes) -> int:
    """Resolve ``shots``: an int k (k images per class) or a fraction in (0, 1] of each class.

    A fraction is taken of the smallest class size and floored, with a minimum of one image
    (1% of CIFAR-10's 4500 per class = 45 shots; of CIFAR-100's 450 = 4).
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


def fewshot_subset(labels: np.ndarray, pool: np.ndarray, num_classes: int, shots, seed: int, split: int):
    """k random images per class from ``pool``; the same (seed, split, k) gives the same set."""
    pool = np.asarray(pool, dtype=np.int64)
    per_class = indices_by_class(labels[pool], num_classes)
    k = shots_per_class(shots, [len(p) for p in per_class])
    rng = rng_for(seed, _FEWSHOT, split, k)
    chosen = [rng.permutation(pool[p])[:k] for p in per_class]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
