"""DnC stage 3: distil a base model and K cluster experts into one student, and the student's
training loop.

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
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from .models import DenseEncoder, build_model_from_args, convert_sync_batchnorm, load_model, load_weights
from .distributed import barrier, init_distributed, shutdown, wrap_ddp
from .run import (Execution, TrainingMethod, data_order, open_checkpoint, restore_training, run_lock,
                  seed_everything, seed_rank, sgd_with_schedule, stop_signals, train_loop, two_view_augment,
                  write_run_files)

__all__ = ["cosine_regression_loss", "dnc_distillation_loss", "PredictionHead", "DnCStudent",
           "teacher_targets", "distill_student", "load_student"]

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
    """The DnC student loss: regress the base teacher's and the owning expert's embeddings.

    Per image, (2 - 2 cos) between the student's base head and the base model's embedding,
    plus the same between the student's head of the image's cluster and the embedding of the
    expert that owns that cluster (Tian et al., ICCV 2021), weighted and reduced.

    Args:
        base_pred: (N, D) base head output.
        base_target: (N, D) base teacher embedding (detached here).
        expert_preds: (K, N, D) outputs of all K expert heads (only the owner's row is used),
            or (N, D) when the caller already picked each image's expert head.
        expert_target: (N, D) embedding from the expert that owns each image (detached here).
        clusters: (N,) int cluster id of each image, in [0, K).
        base_weight: weight of the base term.
        expert_weight: weight of the expert term.
        reduction: "mean" (over images), "sum" or "none" (per-image loss, (N,)).

    Returns:
        A 0-d tensor, or the (N,) per-image losses; float32 at least (promoted from the inputs).

    Raises:
        ValueError: for clusters that are not an (N,) int tensor or lie outside [0, K).

    Examples:
        >>> import torch, sdclr_fast
        >>> n, k, d = 6, 3, 8
        >>> base = torch.randn(n, d)
        >>> experts = torch.randn(k, n, d)
        >>> clusters = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> loss = sdclr_fast.dnc_distillation_loss(base, base, experts, experts[clusters, torch.arange(n)], clusters)
        >>> float(loss) < 1e-6                    # each head matches its teacher exactly
        True
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


@torch.no_grad()
def teacher_targets(x, clusters, base, experts):
    """Teacher embeddings of the batch x: the base model on every image and, for each cluster,
    its expert on that cluster's images only (one expert forward per image, not K).

    base, experts[k]: encoders x -> (n, D) (for example a ``DenseEncoder``: dense-branch
    backbone features); teachers should be in eval mode so that a small cluster subset is
    embedded exactly as it would be in a full batch.
    Returns (base_target (N, D), expert_target (N, D)).
    """
    clusters = clusters.to(x.device)
    if clusters.shape != (x.shape[0],):
        raise ValueError(f"clusters must have shape ({x.shape[0]},), got {tuple(clusters.shape)}")
    if clusters.numel() and (int(clusters.min()) < 0 or int(clusters.max()) >= len(experts)):
        raise ValueError(f"clusters must lie in [0, {len(experts)})")
    base_t = base(x)
    expert_t = torch.empty_like(base_t)
    for k, expert in enumerate(experts):
        rows = (clusters == k).nonzero().flatten()
        if rows.numel():
            expert_t[rows] = expert(x[rows]).to(expert_t.dtype)
    return base_t, expert_t


# ---------------------------------------------------------------- the student's training loop
def _rel(path, root) -> str:
    return os.path.relpath(Path(path).resolve(), Path(root).resolve())


def distill_student(config, options, *, run_dir, data, base_checkpoint, expert_checkpoints, assignments,
                    resume=False, stop_at_epoch=None) -> Path:
    """Train the DnC student in ``run_dir`` and return its checkpoint (the format of a
    pretraining checkpoint, plus ``dnc_heads``). ``config`` is the student's PretrainConfig,
    ``options`` the DnCConfig; ``assignments[i]`` is the cluster of training image i (a position
    in ``data.train``); ``expert_checkpoints[k]`` is cluster k's expert. ``stop_at_epoch`` stops
    with a resumable checkpoint once that many epochs are complete. Holds ``run_dir``'s lock and
    stops on SIGTERM / SIGUSR1 like :func:`sdclr_fast.train.pretrain.pretrain`. Under torchrun the
    student is trained with DDP like :func:`pretrain`: each rank distils its slice of every batch
    (the teachers run on that slice only), every rank's RNG states are saved."""
    from .run import resolve_device

    dist_info = init_distributed(resolve_device(config.device).type)
    try:
        with run_lock(run_dir, dist_info), stop_signals():
            return _distill_student(config, options, Path(run_dir), data, base_checkpoint, expert_checkpoints,
                                    assignments, resume, stop_at_epoch, dist_info)
    finally:
        shutdown(dist_info)


class _StudentMethod(TrainingMethod):
    """The student's step: teachers and student see the same augmented views (both concatenated),
    loss :func:`dnc_distillation_loss`; its checkpoint adds the heads and the teachers' paths."""

    label = "dnc student"
    hint = "Lower --dnc-distill-lr or disable --amp"

    def __init__(self, ex, options, student, shell, step_module, teachers, augment, cluster_of, entries):
        self.ex, self.options, self.student, self.model, self.module = ex, options, student, shell, step_module
        self.teachers, self.augment, self.cluster_of, self.entries = teachers, augment, cluster_of, entries

    def step(self, batch, rows):
        with torch.no_grad():
            v1, v2 = self.augment(batch.images[rows])
        x = self.ex.images(torch.cat([v1, v2]))
        c = self.cluster_of[batch.index[rows]].repeat(2)
        with self.ex.autocast():
            base_t, expert_t = teacher_targets(x, c, *self.teachers)
            base_p, expert_p = self.module(x)
        return dnc_distillation_loss(base_p, base_t, expert_p, expert_t, c, base_weight=self.options.base_weight,
                                     expert_weight=self.options.expert_weight)

    def checkpoint_entries(self):
        return dict(self.entries, model=self.model, dnc_heads=self.student.heads.state_dict())


def _distill_student(config, options, run_dir, data, base_checkpoint, expert_checkpoints, assignments, resume,
                     stop_at_epoch, dist_info):
    ckpt_path = run_dir / CHECKPOINT_NAME
    say = print if dist_info.is_main else (lambda *a, **k: None)
    assignments = torch.as_tensor(assignments, dtype=torch.long).cpu()
    if assignments.shape != (len(data.train),):
        raise ValueError(f"assignments must have one cluster id per training image ({len(data.train)}), "
                         f"got shape {tuple(assignments.shape)}")
    if len(expert_checkpoints) != options.k:
        raise ValueError(f"expected {options.k} expert checkpoints, got {len(expert_checkpoints)}")
    # relative to the student's folder, so that a moved run directory still resumes
    teacher_paths = {"base": _rel(base_checkpoint, run_dir),
                     "experts": [_rel(p, run_dir) for p in expert_checkpoints]}
    resumed = open_checkpoint(ckpt_path, config, resume=resume, announce=False, warn=dist_info.is_main)
    if resumed is not None:
        if resumed.get("dnc_teachers") != teacher_paths:
            raise ValueError(f"cannot resume {str(ckpt_path)!r}: it was distilled from other teachers")
        if resumed.get("finished"):
            say(f"{ckpt_path}: student already finished; nothing to do")
            return ckpt_path

    ex = Execution.of(config, dist_info).setup_process(config)
    device = ex.device
    world, rank = dist_info.world_size, dist_info.rank
    batch_size = min(config.batch_size, len(data.train))
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} (the student's batch) must be divisible by the number of "
                         f"processes ({world})")
    if dist_info.is_main:
        write_run_files(run_dir, data, config)
    barrier(dist_info)

    # ---- teachers: frozen, eval mode (BN running statistics, dense branch)
    cache = {}
    for p in [base_checkpoint, *expert_checkpoints]:
        if str(p) not in cache:
            cache[str(p)] = ex.place(load_model(p, device=device).requires_grad_(False))
    base_teacher = DenseEncoder(cache[str(base_checkpoint)], options.distill_target)
    experts = [DenseEncoder(cache[str(p)], options.distill_target) for p in expert_checkpoints]
    margs = load_checkpoint(base_checkpoint)["model_args"]

    # ---- student: the base architecture + one prediction head per teacher
    seed_everything(config.seed)
    shell = build_model_from_args(margs)
    if options.student_init == "base":
        load_weights(shell, load_checkpoint(base_checkpoint))
    feature_dim = int(shell.backbone.feature_dim)
    target_dim = feature_dim if options.distill_target == "features" else int(margs["proj_dim"])
    student = ex.place(DnCStudent(DenseEncoder(shell), feature_dim, options.k, target_dim,
                                  hidden_dim=options.head_hidden))
    order, batches = data_order(config, data.train, batch_size, device)
    if getattr(batches, "local", False):  # a stream gives each rank its own share
        batches.for_rank(rank, world)
    # the shell's projection head is not trained by distillation: leave it out of the optimiser
    optimizer, scheduler = sgd_with_schedule(list(shell.backbone.parameters()) + list(student.heads.parameters()),
                                             config, len(batches))
    augment = two_view_augment(config, data, device)
    seed_rank(config.seed, rank)
    start = (0, 0, 0, 0.0)
    if resumed is not None:
        start = restore_training(resumed, shell, optimizer, scheduler, order, rank=rank, world=world)
        student.heads.load_state_dict(resumed["dnc_heads"])
        say(f"resuming {ckpt_path} after epoch {start[0]}/{config.epochs}, step {start[2]}")

    step_module = student
    if dist_info.enabled:
        synced_bn = config.sync_bn and device.type == "cuda"
        if synced_bn:  # parameters and buffers are kept; ``shell`` is the converted one
            student = convert_sync_batchnorm(student)
            shell = student.backbone.model
        # DDP reduces what the student's loss reaches: the projection head / predictor of the shell
        # are not trained (not in the optimiser) and an SDCLR shell's pruned-branch BN is never used.
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for p in student.parameters():
            p.requires_grad_(id(p) in trained)
        step_module = wrap_ddp(student, dist_info, device, sync_buffers=not synced_bn,
                               find_unused_parameters=margs["method"] == "sdclr")

    entries = dict(model_args=margs, init_checkpoint=base_checkpoint if options.student_init == "base" else None,
                   dnc_teachers=teacher_paths,
                   dnc_head_dims=[feature_dim, int(options.head_hidden or feature_dim), target_dim])
    method = _StudentMethod(ex, options, student, shell, step_module, (base_teacher, experts), augment,
                            assignments.to(device), entries)
    return train_loop(method, config=config, ex=ex, dist_info=dist_info, ckpt_path=ckpt_path, order=order,
                      batches=batches, batch_size=batch_size, optimizer=optimizer, scheduler=scheduler, start=start,
                      stop_at_epoch=stop_at_epoch)


def load_student(checkpoint_path, *, device="cpu"):
    """The full DnC student (backbone + prediction heads) from its checkpoint, in eval mode.
    For evaluation :func:`sdclr_fast.train.load_model` is enough (it loads the backbone as a
    SelfCompetitor and ignores the heads)."""
    from .config import DnCConfig

    state = load_checkpoint(checkpoint_path)
    if "dnc_heads" not in state:
        raise CheckpointError(f"{state['path']!r} is not a DnC student checkpoint (no 'dnc_heads')")
    shell = load_weights(build_model_from_args(state["model_args"]), state)
    feature_dim, hidden, target_dim = state["dnc_head_dims"]
    k = DnCConfig.from_dict(state["config"]["extra"]["dnc"]).k
    student = DnCStudent(DenseEncoder(shell), feature_dim, k, target_dim, hidden_dim=hidden)
    student.heads.load_state_dict(state["dnc_heads"])
    return student.to(device).eval()
