"""Accuracy overall, per class and per many/medium/few-shot group, and SDCLR's balancedness.

All accuracies are in percent. Groups follow SDCLR's exp_analyse.py: classes are ranked by their
number of images in the long-tailed *training* split; the C // 3 classes with the fewest images
are "minor", the next C // 3 "moderate" and the rest (C - 2 * (C // 3)) "major", so for C not
divisible by 3 the extra classes go to the major group (C = 10: 4 / 3 / 3; C = 100: 34 / 33 / 33).
Ties in count are ranked by class index, the lower index counting as more frequent. That is the
"thirds" rule, the official one for CIFAR; the official ImageNet-100-LT analysis instead cuts by
fixed counts ("imagenet-lt": > 100 training images major, 20-100 moderate, < 20 minor; 39 / 48 / 13
classes on its list), so a group may be empty there (its accuracy is then NaN). A group's
accuracy is the mean of its classes' accuracies, and "std" is the population standard deviation
of the three group accuracies (SDCLR's "balancedness"; lower is more balanced).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUPS = ("major", "moderate", "minor")
GROUP_RULES = ("thirds", "imagenet-lt")
METRICS = ("overall", "mean_class", "major", "moderate", "minor", "std")


def _np(x, name, integer=True):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if integer and x.size and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {x.dtype}")
    return x


def per_class_accuracy(predictions, labels, num_classes: int) -> np.ndarray:
    """Accuracy (%) of each class over its test samples; NaN for a class without samples."""
    p, y = _np(predictions, "predictions"), _np(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in shape")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    total = np.bincount(y, minlength=num_classes).astype(np.float64)
    right = np.bincount(y[p == y], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 100.0 * right / total, np.nan)


def group_classes(class_counts, rule: str = "thirds") -> dict:
    """{"major", "moderate", "minor"} -> int64 arrays of class indices, by ``rule`` "thirds" or
    "imagenet-lt" (see the module docstring).

    Examples:
        >>> {g: v.tolist() for g, v in group_classes([150, 101, 100, 20, 19, 3], "imagenet-lt").items()}
        {'major': [0, 1], 'moderate': [2, 3], 'minor': [4, 5]}
    """
    counts = _np(class_counts, "class_counts")
    if rule not in GROUP_RULES:
        raise ValueError(f"rule must be one of {GROUP_RULES}, got {rule!r}")
    if rule == "imagenet-lt":
        every = np.arange(counts.size)
        return {"major": every[counts > 100], "moderate": every[(counts >= 20) & (counts <= 100)],
                "minor": every[counts < 20]}
    c = counts.size
    if c < 3:
        raise ValueError(f"group metrics need at least 3 classes, got {c}")
    # Ascending by count; among equal counts the higher class index first (= less frequent).
    ranked = np.lexsort((-np.arange(c), counts))
    third = c // 3
    return {"minor": np.sort(ranked[:third]), "moderate": np.sort(ranked[third:2 * third]),
            "major": np.sort(ranked[2 * third:])}


def balancedness(group_accuracies) -> float:
    """Population std of the group accuracies (SDCLR's "std")."""
    return float(np.std(np.asarray(list(group_accuracies), dtype=np.float64)))


@dataclass
class EvalResult:
    """One evaluation (one probe of one model on one split); accuracies in percent."""

    overall: float          # accuracy over all test samples
    mean_class: float       # mean of the per-class accuracies (= overall on a balanced test set)
    major: float
    moderate: float
    minor: float
    std: float              # balancedness: population std of (major, moderate, minor)
    per_class: np.ndarray   # (C,) accuracy per class, NaN for classes absent from the test set
    class_counts: np.ndarray  # (C,) training-split images per class that define the groups
    groups: str = "thirds"    # the group rule (GROUP_RULES)

    def to_dict(self) -> dict:
        out = {m: float(getattr(self, m)) for m in METRICS}
        out["per_class"] = [None if np.isnan(v) else float(v) for v in self.per_class]
        out["class_counts"] = [int(v) for v in self.class_counts]
        out["groups"] = self.groups
        return out

    @staticmethod
    def from_dict(d: dict) -> "EvalResult":
        return EvalResult(**{m: float(d[m]) for m in METRICS},
                          per_class=np.array([np.nan if v is None else v for v in d["per_class"]], dtype=np.float64),
                          class_counts=np.asarray(d["class_counts"], dtype=np.int64), groups=d.get("groups", "thirds"))


def evaluate_predictions(predictions, labels, class_counts, groups: str = "thirds") -> EvalResult:
    """All metrics from test predictions and the long-tailed training split's class counts;
    ``groups`` is the group rule ("thirds" or "imagenet-lt", see :func:`group_classes`)."""
    counts = _np(class_counts, "class_counts")
    num_classes = counts.size
    per_class = per_class_accuracy(predictions, labels, num_classes)
    p, y = _np(predictions, "predictions"), _np(labels, "labels")
    if y.size == 0:
        raise ValueError("labels is empty")
    rule = groups
    with np.errstate(invalid="ignore"):
        acc = {g: float(np.nanmean(per_class[idx])) if np.isfinite(per_class[idx]).any() else float("nan")
               for g, idx in group_classes(counts, rule).items()}
    return EvalResult(overall=float(100.0 * (p == y).mean()), mean_class=float(np.nanmean(per_class)),
                      major=acc["major"], moderate=acc["moderate"], minor=acc["minor"],
                      std=balancedness(acc[g] for g in GROUPS), per_class=per_class,
                      class_counts=counts.astype(np.int64), groups=rule)


def mean_std(results) -> dict:
    """{metric: (mean, std)} over several EvalResults (e.g. the five splits).

    The std is the population std (np.std, as SDCLR reports mean +- std over splits); a single
    result gives std 0.
    """
    results = list(results)
    if not results:
        raise ValueError("results is empty")
    out = {}
    for m in METRICS:
        v = np.array([getattr(r, m) for r in results], dtype=np.float64)
        out[m] = (float(v.mean()), float(v.std()))
    return out
