"""Plain-PyTorch / NumPy references for every op: the ground truth of tests and benchmarks.

They materialise what the fused ops avoid (the 2N x 2N similarity matrix, the masked weight,
a full sort), so they are slow and memory-hungry by design.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- NT-Xent
def nt_xent_reference(z1, z2, temperature=0.2, *, normalize=True, reduction="mean", weights=None,
                      labels=None):
    """NT-Xent as SDCLR / SimCLR define it, with the full (2N, 2N) similarity matrix.

    Row i's positive is its other view (or, with `labels`, every other row of the same label,
    averaged); the log-sum-exp runs over all j != i.
    """
    z = torch.cat([z1, z2], dim=0)
    n2 = z.shape[0]
    n = n2 // 2
    if normalize:
        z = F.normalize(z, dim=1)
    sim = (z @ z.t()) / temperature
    eye = torch.eye(n2, dtype=torch.bool, device=z.device)
    lse = torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1)
    if labels is None:
        idx = torch.arange(n2, device=z.device)
        pos = sim[idx, (idx + n) % n2]
        per_row = lse - pos
    else:
        labels = labels.to(z.device)
        if labels.shape[0] == n:
            labels = torch.cat([labels, labels])
        positive = (labels[:, None] == labels[None, :]) & ~eye
        count = positive.sum(1)
        pos_mean = (sim * positive).sum(1) / count.clamp_min(1)
        per_row = torch.where(count > 0, lse - pos_mean, torch.zeros_like(lse))
    if weights is not None:
        per_row = per_row * weights.to(per_row)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.mean()


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
    """Index into the ascending sorted |w| of the pruning threshold: ceil(sparsity * n), kept
    inside the array so that at least the largest magnitudes survive when sparsity is near 1."""
    return min(math.ceil(sparsity * n), n - 1)


def magnitude_threshold_reference(tensors, sparsity):
    """The official SDCLR rule: pool |w| of all tensors, sort on the CPU with NumPy, take the
    value at index ceil(sparsity * n)."""
    flat = np.concatenate([t.detach().abs().float().cpu().reshape(-1).numpy() for t in tensors])
    return torch.tensor(np.sort(flat, kind="stable")[kth_index(sparsity, flat.size)])


def magnitude_masks_reference(tensors, sparsity, scope="global"):
    """Masks |w| >= threshold with one pooled threshold ("global") or one per tensor ("layer")."""
    if scope == "global":
        t = magnitude_threshold_reference(tensors, sparsity)
        return [w.detach().abs().float().cpu() >= t for w in tensors]
    return [w.detach().abs().float().cpu() >= magnitude_threshold_reference([w], sparsity)
            for w in tensors]


# ---------------------------------------------------------------- masked convolution
def masked_conv2d_reference(x, weight, mask, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Convolution with the mask multiplied into a copy of the weight (what the official code
    does every forward)."""
    return F.conv2d(x, weight * mask.to(weight.dtype), bias, stride, padding, dilation, groups)
