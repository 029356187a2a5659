"""MoCLR, the contrastive method of DnC's base model and experts: SimCLR's loss with a
momentum (EMA) target network.

Online network = backbone + projection head + predictor (``build_model(method="moclr")``);
target network = backbone + projection head, a copy of the online ones that is never trained
by gradient: after every optimiser step its weights move towards the online weights,

    xi <- m_k xi + (1 - m_k) theta,   m_k = 1 - (1 - m_base) (cos(pi k / K) + 1) / 2,

(BYOL's schedule: m_base at step k = 0, rising to 1 at the last of the K steps of the run) and
its buffers (BN running statistics) are copied from the online network. The loss contrasts
online predictions of one view against target projections of the other view, negatives from
the target projections of the batch, symmetric over the two views:

    L = (InfoNCE(q(v1), z_t(v2)) + InfoNCE(q(v2), z_t(v1))) / 2

with ``sdclr_fast.info_nce`` (in-batch negatives; gathered over the ranks under DDP). The
target runs in train mode (batch statistics, as BYOL's target) under ``no_grad``. Evaluation,
clustering and distillation use the online network's backbone.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

import sdclr_fast.ops.info_nce as _info_nce

__all__ = ["momentum_at", "make_target", "update_target", "moclr_loss"]


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """BYOL's target momentum after optimiser step ``step`` (0-based) of ``total_steps``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


def make_target(online: nn.Module) -> nn.Module:
    """The target network: a copy of the online model without its predictor, frozen."""
    target = copy.deepcopy(online)
    target.predictor = None
    return target.requires_grad_(False)


@torch.no_grad()
def update_target(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """EMA of the online backbone and head into the target (``sdclr_fast.ops.info_nce.momentum_update_``)
    and a copy of the online buffers (BN running statistics, masks)."""
    for name in ("backbone", "head"):
        _info_nce.momentum_update_(getattr(target, name), getattr(online, name), momentum)
    online_buffers = dict(online.named_buffers())
    for name, buf in target.named_buffers():
        buf.copy_(online_buffers[name])


def moclr_loss(p1, p2, t1, t2, temperature, *, gather_distributed=False):
    """(InfoNCE(p1, t2) + InfoNCE(p2, t1)) / 2: online predictions p of each view against the
    target projections t of the other view, in float32 (float64 stays float64)."""
    dt = torch.promote_types(p1.dtype, torch.float32)
    p1, p2, t1, t2 = p1.to(dt), p2.to(dt), t1.detach().to(dt), t2.detach().to(dt)
    return 0.5 * (_info_nce.info_nce(p1, t2, temperature, gather_distributed=gather_distributed)
                  + _info_nce.info_nce(p2, t1, temperature, gather_distributed=gather_distributed))
