"""Evaluation of a frozen backbone: linear probe, few-shot probe, kNN, group metrics, plot, report.

Typical use after pretraining (``encoder`` maps normalised images to (B, D) features, e.g.
``model.backbone`` or ``functools.partial(model.features, branch="dense")``)::

    results = evaluate_backbone(encoder, data, probes=("linear", "fewshot-0.01", "knn"))
    plot_per_class_accuracy({"SDCLR": results["linear"]}, run_dir / "per_class.png")
    write_report(run_dir / "report.md", {"SDCLR": results}, plots=[run_dir / "per_class.png"])
"""
from __future__ import annotations

import zlib

import torch

from .features import Features, extract_features, fixed_threads, frozen
from .knn import knn_predict
from .linear import PRESETS, ProbeResult, linear_probe
from .metrics import (GROUP_RULES, GROUPS, METRICS, EvalResult, balancedness, evaluate_predictions, group_classes,
                      mean_std, per_class_accuracy)
from .report import plot_per_class_accuracy, write_report


def parse_probe(probe: str):
    """"linear" -> ("linear", None); "knn" -> ("knn", None); "fewshot-100" -> ("fewshot", 100);
    "fewshot-0.01" -> ("fewshot", 0.01) (a fraction of each class)."""
    if probe in ("linear", "knn"):
        return probe, None
    if isinstance(probe, str) and probe.startswith("fewshot-"):
        arg = probe[len("fewshot-"):]
        try:
            shots = int(arg) if arg.isdigit() else float(arg)
        except ValueError:
            shots = None
        if shots is not None:
            return "fewshot", shots
    raise ValueError(f"unknown probe {probe!r}; expected 'linear', 'knn' or 'fewshot-<k or fraction>' "
                     f"(e.g. 'fewshot-100', 'fewshot-0.01')")


def evaluate_backbone(encoder, data, *, probes=("linear",), device=None, batch_size: int = 512, flip: bool = False,
                      on: str = "test", probe_options: dict | None = None, knn_k: int = 200,
                      knn_temperature: float = 0.1, seed: int = 0, autocast_dtype=None, module=None,
                      select_on_val: bool | None = None, augment: bool = True,
                      probe_per_class: int | None = None, deterministic: bool = True,
                      groups: str = "thirds") -> dict:
    """Evaluate a frozen ``encoder`` on a data set with SDCLR's probes.

    Accuracy overall, per class and per group (major / moderate / minor thirds of the classes by
    their count in the long-tailed training split, ``data.class_counts``) and the balancedness
    std of the three group accuracies. The encoder is frozen in eval mode.

    Args:
        encoder: maps normalised images (B, C, H, W) to (B, D) features, e.g. ``model.backbone``
            or ``functools.partial(model.features, branch="dense")``.
        data: a `sdclr_fast.data.ContrastiveData` (from `build_dataset`).
        probes: any of ``"linear"`` (full-shot probe on ``data.probe_train``, 30 epochs),
            ``"fewshot-<k>"`` (probe on ``data.fewshot(k)``, 100 epochs; k an int per class or a
            fraction) and ``"knn"`` (k-NN with ``knn_k`` / ``knn_temperature`` on
            ``data.probe_train`` features).
        device: where features and probes are computed (default: the encoder's).
        batch_size: images per feature-extraction batch.
        flip: with ``augment=False``, add the flipped view of every probe image.
        on: ``"test"`` or ``"val"`` (CIFAR's held-out 5k): which images are classified.
        probe_options: extra keyword arguments for `linear_probe` (lr, schedule, normalize, ...).
        knn_k: neighbours of the kNN probe.
        knn_temperature: temperature of the kNN vote.
        seed: seeds the probes and their augmentation.
        autocast_dtype: optional autocast dtype for the feature passes.
        module: the nn.Module to freeze when ``encoder`` is a lambda (see
            ``extract_features``); ``functools.partial(model.features, branch="dense")`` is
            recognised on its own.
        select_on_val: report the probe epoch with the best accuracy on ``data.val`` (SDCLR's
            protocol); None = whenever the data set has a val split and ``on="test"``.
        augment: train the linear probes on images augmented afresh every epoch with SDCLR's
            RandomCrop(padding 4) + horizontal flip (the protocol; one feature pass over the
            probe set per epoch). False trains on features computed once (faster).
        probe_per_class: train the full-shot probe and kNN on a balanced subset of that many
            images per class of ``data.probe_train`` (cheaper); None: all of it (the protocol).
        deterministic: on the CPU, compute features, probes and kNN with one thread
            (`fixed_threads`), so that a checkpoint gets identical numbers under any thread
            count on one machine; False uses torch's thread count (faster on many cores, but the
            probe's numbers then move with it).
    groups: the major / moderate / minor rule: "thirds" (the official CIFAR analysis) or
            "imagenet-lt" (> 100 / 20-100 / < 20 training images, the official ImageNet-100-LT one).

    Returns:
        ``{probe name: EvalResult}`` with ``overall``, ``mean_class``, ``major``, ``moderate``,
        ``minor``, ``std`` (percent) and ``per_class``.

    Raises:
        ValueError: for an unknown probe, ``on`` or few-shot size, a data set without the split
            asked for, ``probe_options`` that set what this function sets, ``select_on_val``
            without a val split.

    Examples:
        >>> import torch
        >>> from sdclr_fast import build_dataset, evaluate_backbone
        >>> data = build_dataset("fashion-mnist-lt")             # Debian's dataset-fashion-mnist
        >>> encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 32))
        >>> results = evaluate_backbone(encoder, data, probes=("knn",), probe_per_class=50)
        >>> sorted(results), 0 <= results["knn"].overall <= 100
        (['knn'], True)
    """
    parsed = [(p, *parse_probe(p)) for p in probes]
    if on not in ("test", "val"):
        raise ValueError(f"on must be 'test' or 'val', got {on!r}")
    target = data.test if on == "test" else data.val
    if target is None:
        raise ValueError(f"data set {data.name!r} has no {on} split")
    opts = dict(probe_options or {})
    from .metrics import GROUP_RULES

    if groups not in GROUP_RULES:
        raise ValueError(f"groups must be one of {GROUP_RULES}, got {groups!r}")
    bad = {"preset", "num_classes", "seed", "device", "val_features", "val_labels"} & set(opts)
    if bad:
        raise ValueError(f"probe_options may not set {sorted(bad)} (evaluate_backbone sets them)")
    if select_on_val is None:
        select_on_val = data.val is not None and on == "test"
    if select_on_val and (data.val is None or on != "test"):
        raise ValueError("select_on_val needs a data set with a val split and on='test'")
    # Resolve the few-shot sets first: a bad shots value fails before any feature pass.
    full = data.probe_train if probe_per_class is None else data.fewshot(probe_per_class, pool="probe")
    probe_sets = {name: full if kind != "fewshot" else data.fewshot(shots) for name, kind, shots in parsed}
    common = dict(batch_size=batch_size, device=device, autocast_dtype=autocast_dtype, module=module)
    run_on = device if device is not None else _run_device(encoder, module)
    with fixed_threads(run_on, enabled=deterministic):
        return _evaluate(encoder, data, parsed, target, opts, probe_sets, common, flip, augment, select_on_val,
                         knn_k, knn_temperature, seed, groups)


def _run_device(encoder, module):
    """Where ``extract_features`` runs ``encoder`` by default (its module's parameters)."""
    from .features import device_of, owning_module

    return device_of(module if module is not None else owning_module(encoder))


def _evaluate(encoder, data, parsed, target, opts, probe_sets, common, flip, augment, select_on_val, knn_k,
              knn_temperature, seed, groups):
    from ..data.augment import pad_crop_flip

    def features(images, **kw):
        return extract_features(encoder, images, data.mean, data.std, **common, **kw)

    def augmented(images, name):
        """epoch -> features of that epoch's crop+flip of ``images`` (seeded per probe and epoch)."""
        def at_epoch(epoch):
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{epoch}".encode()))
            return features(images, transform=lambda x: pad_crop_flip(x, 4, gen)).features
        return at_epoch

    test = features(target)
    if select_on_val and any(kind != "knn" for _, kind, _ in parsed):
        val = features(data.val)
        opts.update(val_features=val.features, val_labels=val.labels)
    plain = {}  # un-augmented features per probe set, computed once
    counts = data.class_counts
    out = {}
    for name, kind, shots in parsed:
        images = probe_sets[name]
        if kind == "knn" or not augment:
            key = (id(images), flip and kind != "knn")
            if key not in plain:
                plain[key] = features(images, flip=key[1])
            train = plain[key]
        if kind == "knn":
            bank = train.features[0] if train.features.dim() == 3 else train.features
            preds = knn_predict(bank, train.labels, test.features, data.num_classes, k=knn_k,
                                temperature=knn_temperature)
        else:
            feats = augmented(images, name) if augment else train.features
            preds = linear_probe(feats, images.labels.to(test.labels.device), test.features, data.num_classes,
                                 preset="full" if kind == "linear" else "fewshot", seed=seed, **opts).predictions
        out[name] = evaluate_predictions(preds, test.labels, counts, groups)
    return out


__all__ = [
    "GROUP_RULES", "GROUPS", "METRICS", "PRESETS", "EvalResult", "Features", "ProbeResult", "balancedness",
    "evaluate_backbone", "evaluate_predictions", "extract_features", "fixed_threads", "frozen", "group_classes", "knn_predict",
    "linear_probe", "mean_std", "parse_probe", "per_class_accuracy", "plot_per_class_accuracy", "write_report",
]
