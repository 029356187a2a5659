"""Model I/O for every run: the model arguments a checkpoint stores, rebuilding and loading a
model from a checkpoint, and the dense-branch embedding that probes, clustering and
distillation read."""
from __future__ import annotations

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint

EMBEDDINGS = ("features", "projection")


def model_args(config, in_channels: int) -> dict:
    """Arguments of ``sdclr_fast.nn.build_model`` for a run (stored in every checkpoint)."""
    return dict(arch=config.arch, method=config.method, in_channels=int(in_channels), width=config.width,
                cifar_stem=config.cifar_stem, proj_dim=config.proj_dim)


def build_model_from_args(args: dict):
    from ..nn import build_model

    return build_model(**args)


def load_weights(model: nn.Module, state: dict) -> nn.Module:
    """Load a checkpoint's ``model`` entry, with an error naming the file when it does not fit."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {state['path']!r} does not fit this model: {exc}") from None
    return model


def load_model(checkpoint_path, *, device="cpu", expect: dict | None = None):
    """The pretrained model (a ``SelfCompetitor`` with its masks and BN statistics) from a
    checkpoint written by a pretraining run or a DnC stage, in eval mode on ``device``."""
    state = load_checkpoint(checkpoint_path, expect=expect)
    if "model_args" not in state:
        raise CheckpointError(f"checkpoint {state['path']!r} lacks the entry 'model_args'")
    model = load_weights(build_model_from_args(state["model_args"]), state)
    return model.to(device).eval()


class DenseEncoder(nn.Module):
    """The dense branch of a ``SelfCompetitor`` as a plain encoder: its backbone features (what
    the linear probe and kNN see, the default) or its projection-head output."""

    def __init__(self, model: nn.Module, which: str = "features"):
        super().__init__()
        if which not in EMBEDDINGS:
            raise ValueError(f"which must be one of {EMBEDDINGS}, got {which!r}")
        self.model = model
        self.which = which

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.which == "features":
            return self.model.features(x, branch="dense")
        return self.model(x, branch="dense")
