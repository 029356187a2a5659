"""Plain-PyTorch / NumPy references for every op: the ground truth of tests and benchmarks.

They materialise what the fused ops avoid (the 2N x 2N similarity matrix, the masked weight,
a full sort), so they are slow and memory-hungry by design.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- NT-Xent
def _reduce(per_row, weights, reduction):
    """Per-row losses, weighted where weights are given, then reduced as the ops do."""
    if weights is not None:
        per_row = per_row * weights.to(per_row)
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()


def nt_xent_reference(z1, z2=None, temperature=0.2, *, normalize=True, reduction="mean",
                      weights=None, labels=None, multi_positive="out"):
    """NT-Xent as SDCLR / SimCLR define it, with the full (M, M) similarity matrix.

    Two views z1, z2 (N, D): M = 2N rows [z1; z2], row i's positive is its other view.
    With `labels` ((N,) for both views or (2N,); or (M,) with z2=None, one (M, D) matrix of any
    number of views) every other row of the same label is a positive: "out" averages the
    positives' log-probabilities (SupCon L_out), "in" sums their probabilities inside the log
    (solo-learn). Rows without a positive give 0. The log-sum-exp runs over all j != i.
    """
    z = z1 if z2 is None else torch.cat([z1, z2], dim=0)
    m = z.shape[0]
    if normalize:
        z = F.normalize(z, dim=1)
    sim = (z @ z.t()) / temperature
    eye = torch.eye(m, dtype=torch.bool, device=z.device)
    lse = torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1)
    if labels is None:
        idx = torch.arange(m, device=z.device)
        positive = torch.zeros(m, m, dtype=torch.bool, device=z.device)
        positive[idx, (idx + m // 2) % m] = True
    else:
        labels = labels.to(z.device)
        if labels.shape[0] == m // 2 and z2 is not None:
            labels = torch.cat([labels, labels])
        positive = (labels[:, None] == labels[None, :]) & ~eye
    count = positive.sum(1)
    if multi_positive == "in":
        # rows without positives: a finite placeholder, so that where() has no NaN gradient
        pos_sim = sim.masked_fill(~positive, float("-inf")).masked_fill(count[:, None] == 0, 0.0)
        pos_term = torch.logsumexp(pos_sim, dim=1)
    else:
        pos_term = (sim * positive).sum(1) / count.clamp_min(1)
    per_row = torch.where(count > 0, lse - pos_term, torch.zeros_like(lse))
    return _reduce(per_row, weights, reduction)


def nt_xent_cross_entropy_reference(z1, z2, temperature=0.2):
    """The cross-entropy formulation most libraries use (lightly style): logits with the
    diagonal masked out, the other view as the target class."""
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    n2 = z.shape[0]
    logits = (z @ z.t()) / temperature
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    target = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    return F.cross_entropy(logits, target)


# ---------------------------------------------------------------- pruning
def kth_index(sparsity, n):
    """The official code's threshold rank (SDCLR prune/mask.py): the number of weights to prune,
    np.ceil(fraction * n), used as an index into the sorted |w| and capped at the last one."""
    return int(min(np.ceil(np.float64(sparsity) * n), n - 1))


def _magnitude_dtype(tensors):
    # fp16/bf16/fp32 magnitudes are exact in float32; float64 ones need float64.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def magnitude_threshold_reference(tensors, sparsity):
    """The official SDCLR rule: pool |w| of all tensors, sort on the CPU with NumPy, take the
    value at index ceil(sparsity * n)."""
    dtype = _magnitude_dtype(tensors)
    flat = np.concatenate([t.detach().abs().to(dtype).cpu().reshape(-1).numpy() for t in tensors])
    return torch.tensor(np.sort(flat, kind="stable")[kth_index(sparsity, flat.size)])


def magnitude_masks_reference(tensors, sparsity, scope="global"):
    """Masks |w| >= threshold with one pooled threshold ("global") or one per tensor ("layer";
    an empty tensor gets an empty mask)."""
    dtype = _magnitude_dtype(tensors)
    if scope == "global":
        t = magnitude_threshold_reference(tensors, sparsity)
        return [w.detach().abs().to(dtype).cpu() >= t for w in tensors]
    return [w.detach().abs().to(dtype).cpu() >= magnitude_threshold_reference([w], sparsity)
            if w.numel() else torch.zeros(w.shape, dtype=torch.bool) for w in tensors]


def block_scores_reference(weight, block):
    """Mean |w| (float64) of every (bo out-channels x bi in-channels x all taps) block of a conv
    weight (O, I, kh, kw), block by block; edge blocks are smaller and averaged over their
    own size."""
    bo, bi = block
    o, i = weight.shape[:2]
    w = weight.detach().abs().to(torch.float64).cpu()
    scores = torch.zeros(math.ceil(o / bo), math.ceil(i / bi), dtype=torch.float64)
    for r in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            scores[r, c] = w[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi].mean()
    return scores


def _per_weight_scores(w, sc, block):
    """Every weight of ``w`` carrying the score of its block (float64, the shape of ``w``)."""
    out = torch.zeros(w.shape, dtype=torch.float64)
    for r in range(sc.shape[0]):
        for c in range(sc.shape[1]):
            out[r * block[0]:(r + 1) * block[0], c * block[1]:(c + 1) * block[1]] = sc[r, c]
    return out


def magnitude_block_masks_reference(tensors, sparsity, block, scope="global", scores=None):
    """Block masks that count weights: every weight carries its block's block_scores_reference
    score, the threshold is the sort rule of magnitude_threshold_reference over those per-weight
    scores (pooled or per tensor), kept blocks expanded to the weight.
    `scores` (one per tensor) ranks given scores instead: block means computed in another
    order can differ in the last bit, which flips near-ties; passing the op's own scores
    checks the selection exactly."""
    if scores is None:
        scores = [block_scores_reference(w, block) for w in tensors]
    scores = [sc.detach().cpu() for sc in scores]
    spread = [_per_weight_scores(w, sc, block) for w, sc in zip(tensors, scores)]
    if scope == "global":
        thresholds = [magnitude_threshold_reference(spread, sparsity)] * len(scores)
    else:
        thresholds = [magnitude_threshold_reference([sp], sparsity) if sp.numel() else 0.0
                      for sp in spread]
    masks = []
    for w, sc, t in zip(tensors, scores, thresholds):
        m = torch.zeros(w.shape, dtype=torch.bool)
        for r in range(sc.shape[0]):
            for c in range(sc.shape[1]):
                m[r * block[0]:(r + 1) * block[0], c * block[1]:(c + 1) * block[1]] = bool(sc[r, c] >= t)
        masks.append(m)
    return masks


# ---------------------------------------------------------------- masked convolution
def masked_conv2d_reference(x, weight, mask, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Convolution with the mask multiplied into a copy of the weight (what the official code
    does every forward). Dilation is 1 along a kernel side of size 1, which changes nothing but
    keeps torch 2.13's oneDNN from segfaulting (see ops/masked_conv.py, _unit_dilation)."""
    d = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    d = tuple(1 if k == 1 else di for k, di in zip(weight.shape[2:], d))
    return F.conv2d(x, weight * mask.to(weight.dtype), bias, stride, padding, d, groups)


def masked_linear_reference(x, weight, mask, bias=None):
    """Linear layer with the mask multiplied into a copy of the weight."""
    return F.linear(x, weight * mask.to(weight.dtype), bias)


# ---------------------------------------------------------------- InfoNCE (query / key / bank)
def info_nce_reference(query, key, temperature=0.2, *, negatives=None, symmetric=False,
                       normalize=True, reduction="mean", weights=None, labels=None,
                       in_batch_negatives=True):
    """InfoNCE with the full (M, M + Q) logit matrix: row i of `query` against all keys (or,
    with in_batch_negatives=False, only its own key k_i) and the Q `negatives`; the positive
    is k_i (with `labels`, every key of the same label, averaged). symmetric=True appends the
    M key -> query rows (no bank in that direction); weights (M,) apply to both directions."""
    q, k, n = query, key, negatives
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        n = F.normalize(n, dim=1) if n is not None else None
    m = q.shape[0]
    eye = torch.eye(m, dtype=torch.bool, device=q.device)
    pos = eye if labels is None else labels[:, None].to(q.device) == labels[None, :].to(q.device)
    sim = (q @ k.t()) / temperature
    in_batch = sim if in_batch_negatives else sim.masked_fill(~eye, float("-inf"))
    logits = torch.cat([in_batch, (q @ n.t()) / temperature], 1) if n is not None else in_batch
    count = pos.sum(1)
    per_row = torch.logsumexp(logits, 1) - (sim * pos).sum(1) / count
    if symmetric:
        per_row = torch.cat([per_row, torch.logsumexp(sim.t(), 1) - (sim.t() * pos).sum(1) / count])
        weights = torch.cat([weights, weights]) if weights is not None else None
    return _reduce(per_row, weights, reduction)
