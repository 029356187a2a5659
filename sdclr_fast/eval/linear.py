"""Linear probe on precomputed features of a frozen backbone (the SDCLR protocol).

SDCLR's linear evaluation (train_cifar.py, run with --fixto layer4 --fixbn) freezes the backbone
with BN in eval mode, replaces the fc layer (weight ~ N(0, 0.01^2), bias 0) and trains it with
SGD lr 30, momentum 0.9, weight decay 0, batch 128 and step decay x0.1: 30 epochs with
milestones 10, 20 (full shot, the balanced train set) or 100 epochs with milestones 40, 60 (few
shot). Its scheduler is stepped at the start of every epoch, so the decay takes effect from the
milestone-th epoch (1-based): for the full-shot run 9 epochs at lr 30, 10 at 3 and 11 at 0.3;
this module does the same. SDCLR measures the validation accuracy after every epoch (every fifth
for the few-shot probe, its ``--test_freq 5``) and reports the test accuracy of the epoch with the
best one (the first, on ties); pass ``val_features`` / ``val_labels`` to do that, otherwise the
last epoch is used.

Because the backbone is frozen and in eval mode, its output for a given input image never
changes, so only the classifier is trained. SDCLR's probe trains on augmented images (RandomCrop
with padding 4, horizontal flip): ``train_features`` may be a function ``epoch -> (N, D)`` that
returns that epoch's features of freshly augmented images (``evaluate_backbone`` does this by
default), or fixed features computed once (faster; ``extract_features(..., flip=True)``, shape
(2, N, D), then samples the flip per image and step). The official models normalise their [0, 1]
input inside the network with ImageNet's mean / std; here the eval transform does the same with
the run's input statistics (``input_norm``: ImageNet's by default), before the backbone.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = {
    "full": dict(epochs=30, milestones=(10, 20), val_every=1),
    # The official few-shot runs pass --test_freq 5: val is measured after every fifth epoch only.
    "fewshot": dict(epochs=100, milestones=(40, 60), val_every=5),
}


@dataclass
class ProbeResult:
    fc: nn.Linear                 # the classifier used for the predictions (best on val, else last)
    predictions: torch.Tensor     # int64 (M,) predicted classes of the test features
    losses: list = field(default_factory=list)        # mean training loss per epoch
    val_accuracies: list = field(default_factory=list)  # % per measured epoch, when val features are given
    val_epochs: list = field(default_factory=list)      # the 0-based epochs those were measured after
    best_epoch: int = -1          # 0-based epoch whose classifier made the predictions
    feature_mean: torch.Tensor | None = None          # set with normalize="standardize"
    feature_std: torch.Tensor | None = None


def _check_features(feats, labels, name):
    if not isinstance(feats, torch.Tensor) or feats.dim() not in (2, 3) or not feats.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (N, D) or (V, N, D)")
    n = feats.shape[-2]
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (n,)
                               or labels.dtype not in (torch.int64, torch.int32)):
        raise ValueError(f"{name} labels must be an int tensor of shape ({n},)")
    if n == 0:
        raise ValueError(f"{name} is empty")


def _normalise(x, how, mean=None, std=None):
    if how is None:
        return x
    if how == "l2":
        return F.normalize(x, dim=-1)
    return (x - mean) / std


def step_factor(epoch: int, milestones, gamma: float) -> float:
    """lr multiplier of 0-based ``epoch`` under SDCLR's step schedule (decay from epoch m - 1 on)."""
    return gamma ** sum(epoch + 1 >= m for m in milestones)


def _predict(fc, x):
    with torch.no_grad():
        return torch.cat([fc(x[i:i + 8192]).argmax(1) for i in range(0, x.shape[0], 8192)])


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 num_classes: int, *, preset: str = "full", epochs: int | None = None, lr: float = 30.0,
                 momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 128,
                 schedule: str = "step", milestones=None, gamma: float = 0.1, normalize: str | None = None,
                 val_features: torch.Tensor | None = None, val_labels: torch.Tensor | None = None,
                 init_std: float = 0.01, seed: int = 0, device=None, val_every: int | None = None) -> ProbeResult:
    """Train a fresh linear classifier on ``train_features`` and predict ``test_features`` (SDCLR's probe).

    SGD with momentum on a re-initialised fc layer, SDCLR's schedule (``preset="full"``: 30
    epochs, steps at 10 and 20; ``"fewshot"``: 100 epochs, steps at 40 and 60); with validation
    features, the epoch with the best validation accuracy makes the predictions.

    Args:
        train_features: float (N, D), or (V, N, D) views of which one is drawn per image and
            step (flip augmentation, see the module docstring), or a function ``epoch -> (N, D)``
            giving each epoch's features of augmented images (rows in the order of
            ``train_labels``).
        train_labels: (N,) int labels in [0, num_classes).
        test_features: (M, D) float features to predict.
        num_classes: an int >= 2.
        preset: ``"full"`` or ``"fewshot"``; ``epochs`` / ``milestones`` override it. A custom
            ``epochs`` without milestones scales the preset's milestones (same fractions of the
            run).
        epochs: number of epochs (default: the preset's).
        lr: learning rate (SDCLR's 30, for raw features).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        batch_size: training batch size.
        schedule: ``"step"`` (x ``gamma`` from each milestone epoch on, as SDCLR) or
            ``"cosine"`` (per step, from lr to 0).
        milestones: epochs of the step decays (default: the preset's).
        gamma: the step decay's factor.
        normalize: None (raw features, SDCLR), ``"l2"`` (unit-norm rows) or ``"standardize"``
            (per dimension, with the training features' mean and std).
        val_features: (V, D) features for picking the best epoch (SDCLR) instead of the last.
        val_labels: (V,) labels of ``val_features``; given together with them.
        init_std: fc weight ~ N(0, init_std^2), bias 0 (SDCLR's re-initialisation).
        seed: the fc initialisation, batch order and view draws.
        device: where to train (default: the features' device).
        val_every: measure val after every ``val_every``-th epoch only (1-based epochs 5, 10, ...
            for 5); None: the preset's (1 full shot, 5 few shot: the official ``--test_freq 5``
            of the few-shot runs).

    Returns:
        A `ProbeResult`: ``predictions`` (M,) int64, the ``fc`` layer that made them, the
        per-epoch ``losses``, ``val_accuracies`` / ``val_epochs`` and ``best_epoch``.

    Raises:
        ValueError: naming the argument: features or labels of the wrong shape or dimension,
            labels outside [0, num_classes), val features without labels, an unknown preset,
            schedule or normalize, a non-positive lr, batch size, epochs or val_every.
        FloatingPointError: when the training loss diverges (the message suggests
            ``normalize`` or a lower lr).

    Examples:
        >>> import torch, sdclr_fast
        >>> centres = torch.randn(3, 8) * 4
        >>> labels = torch.arange(3).repeat(20)
        >>> feats = centres[labels] + torch.randn(60, 8)
        >>> result = sdclr_fast.linear_probe(feats, labels, centres, 3, epochs=10, lr=0.1)
        >>> result.predictions
        tensor([0, 1, 2])
    """
    epoch_features = train_features if callable(train_features) else None
    if epoch_features is not None:
        train_features = epoch_features(0)
        if isinstance(train_features, torch.Tensor) and train_features.dim() != 2:
            raise ValueError("train_features(epoch) must return (N, D) features")
    _check_features(train_features, train_labels, "train_features")
    _check_features(test_features, None, "test_features")
    if test_features.dim() == 3:
        test_features = test_features[0]  # identity view: the eval transform is deterministic
    d = train_features.shape[-1]
    if test_features.shape[-1] != d:
        raise ValueError(f"test_features have {test_features.shape[-1]} dimensions, train_features {d}")
    if (val_features is None) != (val_labels is None):
        raise ValueError("give val_features and val_labels together")
    if val_features is not None:
        _check_features(val_features, val_labels, "val_features")
        if val_features.dim() == 3:
            val_features = val_features[0]
        if val_features.shape[-1] != d:
            raise ValueError(f"val_features have {val_features.shape[-1]} dimensions, train_features {d}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise ValueError(f"train_labels must lie in [0, {num_classes})")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if schedule not in ("step", "cosine"):
        raise ValueError(f"schedule must be 'step' or 'cosine', got {schedule!r}")
    if normalize not in (None, "l2", "standardize"):
        raise ValueError(f"normalize must be None, 'l2' or 'standardize', got {normalize!r}")
    if not isinstance(lr, numbers.Real) or not (lr > 0) or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (init_std >= 0):
        raise ValueError(f"init_std must be >= 0, got {init_std!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    base = PRESETS[preset]
    if epochs is None:
        epochs = base["epochs"]
        milestones = base["milestones"] if milestones is None else milestones
    elif milestones is None:
        milestones = tuple(round(m * epochs / base["epochs"]) for m in base["milestones"])
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    val_every = base["val_every"] if val_every is None else val_every
    if isinstance(val_every, bool) or not isinstance(val_every, numbers.Integral) or val_every < 1:
        raise ValueError(f"val_every must be a positive int, got {val_every!r}")

    device = torch.device(device) if device is not None else train_features.device
    x = train_features.to(device, torch.float32)
    y = train_labels.to(device, torch.int64)
    xt = test_features.to(device, torch.float32)
    xv = yv = None
    mean = std = None
    if normalize == "standardize":
        flat = x.reshape(-1, d)
        mean, std = flat.mean(0), flat.std(0, unbiased=False).clamp_min(1e-6)
    x, xt = _normalise(x, normalize, mean, std), _normalise(xt, normalize, mean, std)
    if val_features is not None:
        xv = _normalise(val_features.to(device, torch.float32), normalize, mean, std)
        yv = val_labels.to(device, torch.int64)

    gen = torch.Generator().manual_seed(int(seed))
    fc = nn.Linear(d, num_classes).to(device)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(num_classes, d, generator=gen) * init_std)
        fc.bias.zero_()
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = y.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    views = x.shape[0] if x.dim() == 3 else 1
    losses, val_acc, val_epochs = [], [], []
    best_epoch, best_acc, best_state = epochs - 1, -1.0, None
    step = 0
    for epoch in range(epochs):
        if epoch_features is not None and epoch > 0:
            x = _normalise(epoch_features(epoch).to(device, torch.float32), normalize, mean, std)
            if x.shape != (n, d):
                raise ValueError(f"train_features(epoch) returned shape {tuple(x.shape)}, expected ({n}, {d})")
        factor = step_factor(epoch, milestones, gamma)
        order = torch.randperm(n, generator=gen).to(device)
        view = torch.randint(views, (n,), generator=gen).to(device) if views > 1 else None
        running = torch.zeros((), device=device)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            xb = x[view[idx], idx] if view is not None else x.index_select(0, idx)
            if schedule == "cosine":
                factor = 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = lr * factor
            loss = F.cross_entropy(fc(xb), y.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.detach() * idx.numel()
            step += 1
        losses.append(float(running) / n)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(
                f"linear probe diverged in epoch {epoch} (loss {losses[-1]}) at lr={lr}; the mean feature "
                f"norm is {float(x.reshape(-1, d).norm(dim=1).mean()):.3g}. Try normalize='l2' or "
                f"'standardize', or a lower lr")
        if xv is not None and (epoch + 1) % val_every == 0:
            acc = 100.0 * float((_predict(fc, xv) == yv).float().mean())
            val_acc.append(acc)
            val_epochs.append(epoch)
            if acc > best_acc:  # strictly better: the first best epoch wins, as in SDCLR
                best_acc, best_epoch = acc, epoch
                best_state = {k: v.clone() for k, v in fc.state_dict().items()}
    if best_state is not None:
        fc.load_state_dict(best_state)
    return ProbeResult(fc=fc, predictions=_predict(fc, xt), losses=losses, val_accuracies=val_acc,
                       val_epochs=val_epochs, best_epoch=best_epoch, feature_mean=mean, feature_std=std)
