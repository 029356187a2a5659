"""Weighted k-nearest-neighbour classifier on cosine similarity (InstDisc / SimCLR monitor)."""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                num_classes: int, *, k: int = 200, temperature: float = 0.1, weighting: str = "exp",
                chunk: int = 1024) -> torch.Tensor:
    """Predict the class of each query row from its ``k`` most cosine-similar training rows.

    ``weighting="exp"``: each neighbour votes exp(sim / temperature) for its class (Wu et al.
    2018, InstDisc: k = 200, temperature 0.1); ``"majority"``: one vote each. The class with the
    largest total wins; ties go to the lower class index. ``k`` larger than the training set
    uses all of it (which of several exactly tied neighbours at the k-th place counts is up to
    torch.topk). Rows are L2-normalised here, so raw features are fine.

    Args:
        train_features: (N, D) float features of the labelled bank.
        train_labels: (N,) int labels in [0, num_classes).
        query_features: (M, D) float features to classify.
        num_classes: number of classes, a positive int.
        k: number of neighbours, a positive int.
        temperature: > 0, the vote's temperature for ``"exp"``.
        weighting: ``"exp"`` or ``"majority"``.
        chunk: queries processed at a time, bounding the (chunk, N) similarity block.

    Returns:
        (M,) int64 predicted classes on the queries' device.

    Raises:
        ValueError: naming the argument: features that are not (N, D) float tensors or differ
            in D, an empty bank, labels of the wrong shape or outside [0, num_classes), a bad
            k, weighting or temperature.

    Examples:
        >>> import torch, sdclr_fast
        >>> bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> sdclr_fast.knn_predict(bank, labels, torch.tensor([[1.0, 0.2], [0.2, 1.0]]), 2, k=2)
        tensor([0, 1])
    """
    for name, f in (("train_features", train_features), ("query_features", query_features)):
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or not f.is_floating_point():
            raise ValueError(f"{name} must be a float tensor of shape (N, D)")
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"query_features have {query_features.shape[1]} dimensions, "
                         f"train_features {train_features.shape[1]}")
    n = train_features.shape[0]
    if n == 0:
        raise ValueError("train_features is empty")
    if not isinstance(train_labels, torch.Tensor) or train_labels.shape != (n,) or train_labels.is_floating_point():
        raise ValueError(f"train_labels must be an int tensor of shape ({n},)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise ValueError(f"train_labels must lie in [0, {num_classes})")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if weighting not in ("exp", "majority"):
        raise ValueError(f"weighting must be 'exp' or 'majority', got {weighting!r}")
    if weighting == "exp" and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    device = query_features.device
    bank = F.normalize(train_features.to(device, torch.float32), dim=1)
    labels = train_labels.to(device, torch.int64)
    k = min(int(k), n)
    preds = []
    for start in range(0, query_features.shape[0], chunk):
        q = F.normalize(query_features[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        # exp((s - 1) / T) keeps the weights <= 1; the constant factor exp(-1/T) changes no vote.
        w = torch.exp((sim - 1) / temperature) if weighting == "exp" else torch.ones_like(sim)
        votes = torch.zeros(q.shape[0], num_classes, device=device, dtype=torch.float32)
        votes.scatter_add_(1, labels[idx], w)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64, device=device)
