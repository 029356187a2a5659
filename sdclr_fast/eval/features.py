"""Features of a frozen backbone, extracted once for the probes."""
from __future__ import annotations

import contextlib
import numbers
from typing import NamedTuple

import torch
from torch import nn

from ..data.augment import eval_transform
from ..data.base import ImageSet


@contextlib.contextmanager
def fixed_threads(device=None, enabled: bool = True):
    """Run the block with one intra-op thread when it computes on the CPU, restoring torch's
    thread count afterwards.

    Why: CPU kernels (MKL / oneDNN GEMMs, parallel reductions) may split a sum differently for
    another thread count, and the linear probe's SGD at lr 30 amplifies a last-bit difference
    into points of accuracy; one thread fixes the order of every sum, so one checkpoint gets the
    same numbers whatever OMP_NUM_THREADS or ``torch.set_num_threads`` says. Another CPU (ISA,
    MKL / oneDNN kernels) or torch build may still round differently. ``enabled=False`` or a
    CUDA ``device`` leaves the thread count alone.
    """
    cpu = device is None or torch.device(device).type == "cpu"
    n = torch.get_num_threads()
    if enabled and cpu and n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


class Features(NamedTuple):
    features: torch.Tensor  # float32 (N, D), or (V, N, D) with V views (flip=True: identity, h-flip)
    labels: torch.Tensor    # int64 (N,)


def owning_module(encoder):
    """The nn.Module behind ``encoder``: itself, the owner of a bound method (``model.features``)
    or of a functools.partial of one; None for other callables."""
    seen = 0
    while encoder is not None and seen < 4:
        if isinstance(encoder, nn.Module):
            return encoder
        owner = getattr(encoder, "__self__", None)  # not `or`: an empty nn.Sequential is falsy
        encoder = owner if owner is not None else getattr(encoder, "func", None)
        seen += 1
    return None


@contextlib.contextmanager
def frozen(module):
    """Eval mode (BatchNorm uses its running statistics, dropout is off) and no autograd for the
    duration, restoring every submodule's training flag afterwards."""
    modules = list(module.modules()) if isinstance(module, nn.Module) else []
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.train(False)
        with torch.no_grad():
            yield
    finally:
        for m, flag in zip(modules, flags):
            m.train(flag)


def device_of(encoder):
    """The device of a module's first parameter or buffer (CPU for one that holds none)."""
    if isinstance(encoder, nn.Module):
        for t in list(encoder.parameters()) + list(encoder.buffers()):
            return t.device
    return torch.device("cpu")


def extract_features(encoder, data, mean, std, *, batch_size: int = 512, device=None, flip: bool = False,
                     out_device=None, autocast_dtype: torch.dtype | None = None, module=None,
                     transform=None) -> Features:
    """Run ``encoder`` (an nn.Module or any callable images -> (B, D) features) over ``data``.

    data:   an ImageSet, or a uint8 (N, C, H, W) tensor (labels are then empty).
    mean, std: normalisation of the deterministic eval transform (``ContrastiveData.mean/std``).
    device: where to run (default: the encoder's parameters' device).
    flip:   also embed the horizontally flipped images; features become (2, N, D), which lets the
            linear probe sample the flip augmentation of the SDCLR protocol per step.
    out_device: where the features are returned (default: ``device``).
    transform: an augmentation of each uint8 batch on ``device`` before the eval transform (e.g.
            the probe's ``pad_crop_flip``).
    autocast_dtype: e.g. torch.bfloat16 to run the encoder under autocast; features stay float32.

    module: the nn.Module to put in eval mode when ``encoder`` is a plain callable such as a
            lambda; found automatically for a module, a bound method (``model.features``) or a
            functools.partial of one. A lambda without ``module`` runs in whatever mode the model
            is in (BatchNorm in train mode would use batch statistics and update its running ones).

    The module is put in eval mode (dense BN running statistics) and restored afterwards.
    """
    if isinstance(data, ImageSet):
        images, labels = data.images, data.labels
    elif isinstance(data, torch.Tensor):
        images, labels = data, torch.empty(0, dtype=torch.int64)
    else:
        raise ValueError(f"data must be an ImageSet or a uint8 image tensor, got {type(data).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("data holds no images")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not callable(encoder):
        raise ValueError(f"encoder must be callable (images -> features), got {type(encoder).__name__}")
    if module is not None and not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    module = module if module is not None else owning_module(encoder)
    device = torch.device(device) if device is not None else device_of(module)
    out_device = torch.device(out_device) if out_device is not None else device
    views = 2 if flip else 1
    chunks = [[] for _ in range(views)]
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with frozen(module), amp:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device, non_blocking=True)
            x = eval_transform(x if transform is None else transform(x), mean, std)
            for v in range(views):
                f = encoder(x if v == 0 else x.flip(-1))
                if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != x.shape[0]:
                    raise ValueError(f"encoder must return (B, D) features, got "
                                     f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
                chunks[v].append(f.float().to(out_device))
    feats = [torch.cat(c) for c in chunks]
    out = feats[0] if views == 1 else torch.stack(feats)
    return Features(out, labels.to(out_device))
