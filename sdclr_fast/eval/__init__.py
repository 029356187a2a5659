"""Evaluation of a frozen backbone: linear probe, few-shot probe, kNN, group metrics, plot, report.

Typical use after pretraining (``encoder`` maps normalised images to (B, D) features, e.g.
``model.backbone`` or ``functools.partial(model.features, branch="dense")``)::

    results = evaluate_backbone(encoder, data, probes=("linear", "fewshot-0.01", "knn"))
    plot_per_class_accuracy({"SDCLR": results["linear"]}, run_dir / "per_class.png")
    write_report(run_dir / "report.md", {"SDCLR": results}, plots=[run_dir / "per_class.png"])
"""
from __future__ import annotations

from .features import Features, extract_features, frozen
from .knn import knn_predict
from .linear import PRESETS, ProbeResult, linear_probe
from .metrics import (GROUPS, METRICS, EvalResult, balancedness, evaluate_predictions, group_classes, mean_std,
                      per_class_accuracy)
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
                      select_on_val: bool | None = None) -> dict:
    """Evaluate ``encoder`` on a :class:`~sdclr_fast.data.ContrastiveData`; returns {probe: EvalResult}.

    probes: any of "linear" (full-shot probe on ``data.probe_train``, 30 epochs), "fewshot-<k>"
            (probe on ``data.fewshot(k)``, 100 epochs; k an int per class or a fraction) and
            "knn" (k-NN with ``knn_k`` / ``knn_temperature`` on ``data.probe_train`` features).
    on:     "test" or "val" (CIFAR's held-out 5k) - which images are classified.
    flip:   train the probes with the horizontal-flip augmentation (see ``linear_probe``).
    probe_options: extra keyword arguments for ``linear_probe`` (lr, schedule, normalize, ...).
    select_on_val: report the probe epoch with the best accuracy on ``data.val`` (SDCLR's
            protocol); None = whenever the data set has a val split and ``on="test"``.
    module: the nn.Module to freeze when ``encoder`` is a lambda (see ``extract_features``);
            ``functools.partial(model.features, branch="dense")`` is recognised on its own.

    Features are extracted once with the encoder frozen in eval mode; the group metrics use
    ``data.class_counts`` (the long-tailed training split).
    """
    parsed = [(p, *parse_probe(p)) for p in probes]
    if on not in ("test", "val"):
        raise ValueError(f"on must be 'test' or 'val', got {on!r}")
    target = data.test if on == "test" else data.val
    if target is None:
        raise ValueError(f"data set {data.name!r} has no {on} split")
    opts = dict(probe_options or {})
    bad = {"preset", "num_classes", "seed", "device", "val_features", "val_labels"} & set(opts)
    if bad:
        raise ValueError(f"probe_options may not set {sorted(bad)} (evaluate_backbone sets them)")
    if select_on_val is None:
        select_on_val = data.val is not None and on == "test"
    if select_on_val and (data.val is None or on != "test"):
        raise ValueError("select_on_val needs a data set with a val split and on='test'")
    # Resolve the few-shot subsets first: a bad shots value fails before any feature pass.
    fewshot_pos = {name: data.fewshot_positions(shots) for name, kind, shots in parsed if kind == "fewshot"}
    train = extract_features(encoder, data.probe_train, data.mean, data.std, batch_size=batch_size,
                             device=device, flip=flip, autocast_dtype=autocast_dtype, module=module)
    test = extract_features(encoder, target, data.mean, data.std, batch_size=batch_size, device=device,
                            autocast_dtype=autocast_dtype, module=module)
    val = None
    if select_on_val and any(kind != "knn" for _, kind, _ in parsed):
        val = extract_features(encoder, data.val, data.mean, data.std, batch_size=batch_size, device=device,
                               autocast_dtype=autocast_dtype, module=module)
        opts.update(val_features=val.features, val_labels=val.labels)
    counts = data.class_counts
    out = {}
    for name, kind, shots in parsed:
        if kind == "knn":
            bank = train.features[0] if train.features.dim() == 3 else train.features
            preds = knn_predict(bank, train.labels, test.features, data.num_classes, k=knn_k,
                                temperature=knn_temperature)
        else:
            feats, labels = train.features, train.labels
            if kind == "fewshot":
                pos = fewshot_pos[name].to(labels.device)
                feats, labels = feats[..., pos, :], labels[pos]
            preds = linear_probe(feats, labels, test.features, data.num_classes,
                                 preset="full" if kind == "linear" else "fewshot", seed=seed, **opts).predictions
        out[name] = evaluate_predictions(preds, test.labels, counts)
    return out


__all__ = [
    "GROUPS", "METRICS", "PRESETS", "EvalResult", "Features", "ProbeResult", "balancedness", "evaluate_backbone",
    "evaluate_predictions", "extract_features", "frozen", "group_classes", "knn_predict", "linear_probe",
    "mean_std", "parse_probe", "per_class_accuracy", "plot_per_class_accuracy", "write_report",
]
