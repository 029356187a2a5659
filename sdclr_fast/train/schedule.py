"""Learning-rate schedule: linear warm-up, then cosine decay to zero, evaluated per step."""
from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based).

    Warm-up rises linearly from 1/warmup_steps to 1 over the first ``warmup_steps`` steps (the
    first step already moves the weights), then a half cosine falls from 1 towards 0 at
    ``total_steps``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(0, min(int(warmup_steps), total_steps))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = total_steps - warmup_steps
    if decay <= 0:
        return 1.0
    progress = min(max(step - warmup_steps, 0), decay) / decay
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """A LambdaLR stepping once per optimiser step (its state_dict goes into checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup_steps))
