"""DnC stage 3: distil a base model and K cluster experts into one student.

The student is a backbone of the teachers' architecture with one MLP prediction head per
teacher: head 0 regresses the base model's embedding of every image, head 1 + k regresses the
embedding of expert k, used only on the images of cluster k. The regression loss is the
normalised-L2 / cosine loss of BYOL and DnC,

    l(p, t) = || p/|p| - t/|t| ||^2 = 2 - 2 cos(p, t),

summed over the two targets of each image and averaged over the batch:

    L = mean_i [ w_base * l(h_0(f(x_i)), g_base(x_i)) + w_expert * l(h_{1+c_i}(f(x_i)), g_{c_i}(x_i)) ]

with c_i the cluster of image i. As in DnC, teacher and student see the *same* augmented
view; teachers run in eval mode (BN running statistics, dense branch) under ``no_grad``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["cosine_regression_loss", "dnc_distillation_loss", "PredictionHead", "DnCStudent",
           "teacher_targets"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_pair(pred, target, name):
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError(f"{name}: prediction and target must be tensors")
    if pred.dim() != 2:
        raise ValueError(f"{name}: prediction must be 2-D (batch, dim), got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"{name}: prediction shape {tuple(pred.shape)} and target shape "
                         f"{tuple(target.shape)} must match")


def cosine_regression_loss(pred, target, reduction="mean"):
    """Per-row ``2 - 2 cos(pred, target)`` (normalised L2 distance squared), in float32 or wider.

    The target is detached: teachers are fixed. A zero row counts as orthogonal to everything
    (F.normalize's convention), so its loss is 2 and its gradient is finite.
    """
    _check_pair(pred, target, "cosine_regression_loss")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    dtype = torch.promote_types(pred.dtype, torch.float32)
    p = F.normalize(pred.to(dtype), dim=1)
    t = F.normalize(target.detach().to(dtype), dim=1)
    per_row = 2.0 - 2.0 * (p * t).sum(1)
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()


def dnc_distillation_loss(base_pred, base_target, expert_preds, expert_target, clusters, *,
                          base_weight=1.0, expert_weight=1.0, reduction="mean"):
    """The DnC student loss.

    Args:
        base_pred: (N, D) base head output.
        base_target: (N, D) base teacher embedding.
        expert_preds: (K, N, D) outputs of all K expert heads (only the owner's row is used),
            or (N, D) when the caller already picked each image's expert head.
        expert_target: (N, D) embedding from the expert that owns each image.
        clusters: (N,) int cluster id of each image, in [0, K).
        base_weight, expert_weight: weights of the two terms.
        reduction: "mean" (over images), "sum" or "none" (per-image loss, (N,)).
    """
    if expert_preds.dim() == 3:
        k, n = expert_preds.shape[:2]
        if not isinstance(clusters, torch.Tensor) or clusters.shape != (n,) or \
                clusters.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"clusters must be an int tensor of shape ({n},)")
        if n and (int(clusters.min()) < 0 or int(clusters.max()) >= k):
            raise ValueError(f"clusters must lie in [0, {k}), got values in "
                             f"[{int(clusters.min())}, {int(clusters.max())}]")
        idx = clusters.to(device=expert_preds.device, dtype=torch.long)
        expert_pred = expert_preds[idx, torch.arange(n, device=expert_preds.device)]
    else:
        expert_pred = expert_preds
    per_row = (base_weight * cosine_regression_loss(base_pred, base_target, "none")
               + expert_weight * cosine_regression_loss(expert_pred, expert_target, "none"))
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()


class PredictionHead(nn.Module):
    """Linear - BN - ReLU - Linear, the BYOL / DnC prediction MLP."""

    def __init__(self, in_dim, out_dim, hidden_dim=None):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False),
                                 nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, x):
        return self.net(x)


class DnCStudent(nn.Module):
    """A backbone with one prediction head per teacher (head 0: base, head 1 + k: expert k).

    ``backbone(x)`` must return (N, feature_dim) features. All K expert heads run on the whole
    batch (so each head's BatchNorm sees full-batch statistics even when a cluster has one image
    in the batch) and each image then uses its owner's row.
    """

    def __init__(self, backbone, feature_dim, num_experts, target_dim, hidden_dim=None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.num_experts = num_experts
        self.target_dim = target_dim
        self.heads = nn.ModuleList(PredictionHead(feature_dim, target_dim, hidden_dim)
                                   for _ in range(num_experts + 1))

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        """Returns (base_pred (N, D), expert_preds (K, N, D))."""
        h = self.backbone(x)
        return self.heads[0](h), torch.stack([head(h) for head in self.heads[1:]])

    def loss(self, x, base_target, expert_target, clusters, **kwargs):
        base_pred, expert_preds = self(x)
        return dnc_distillation_loss(base_pred, base_target, expert_preds, expert_target,
                                     clusters, **kwargs)


@torch.no_grad()
def teacher_targets(x, clusters, base, experts, embed):
    """Teacher embeddings of the batch x: the base model on every image and, for each cluster,
    its expert on that cluster's images only (one expert forward per image, not K).

    embed(model, x) -> (n, D) computes a teacher's embedding (for example its dense-branch
    backbone features); teachers should be in eval mode so that a small cluster subset is
    embedded exactly as it would be in a full batch.
    Returns (base_target (N, D), expert_target (N, D)).
    """
    clusters = clusters.to(x.device)
    if clusters.shape != (x.shape[0],):
        raise ValueError(f"clusters must have shape ({x.shape[0]},), got {tuple(clusters.shape)}")
    if clusters.numel() and (int(clusters.min()) < 0 or int(clusters.max()) >= len(experts)):
        raise ValueError(f"clusters must lie in [0, {len(experts)})")
    base_t = embed(base, x)
    expert_t = torch.empty_like(base_t)
    for k, expert in enumerate(experts):
        rows = (clusters == k).nonzero().flatten()
        if rows.numel():
            expert_t[rows] = embed(expert, x[rows]).to(expert_t.dtype)
    return base_t, expert_t
