"""`sdclr-fast analyze-pruning`: how much pruning damages each class of a pretrained backbone.

SDCLR's premise (Jiang et al., ICML 2021, after Hooker et al. 2019) is that pruning a network
trained on long-tailed data damages the representation of its rare classes more than that of
its frequent ones, which is why a pruned self-competitor highlights the tail. This module
measures it on a checkpoint (SimCLR or SDCLR): the dense branch's backbone is pruned at each
sparsity (global magnitude, as SDCLR's self-competitor, or uniformly at random), its BatchNorm
running statistics are re-estimated on the long-tailed training split (a pruned network's
activations no longer match the stored ones; the unpruned reference gets the same re-estimation,
so that the changes are those of pruning alone; ``bn="keep"`` skips both), and

* the kNN and linear-probe accuracy of every class (the probes are trained afresh on the pruned
  features, on the fixed un-augmented features plus their mirror images, which is cheaper than
  the protocol's augmented probe and the same for every network compared), and
* the per-sample NT-Xent loss of SDCLR's pair, z_dense(view 1) against z_pruned(view 2), next to
  the dense pair z_dense(view 1), z_dense(view 2), on the same views and batches,

are compared with the unpruned network's. Everything is reported per class and per
major / moderate / minor group (``sdclr_fast.eval.group_classes`` of the training counts):
accuracy changes in points (negative = damage), loss changes in nats (positive = damage).
"""
from __future__ import annotations

import copy
import dataclasses
import numbers
from pathlib import Path

import numpy as np
import torch
from torch import nn

SPARSITIES = (0.3, 0.5, 0.7, 0.9)
MODES = ("magnitude", "random")
BN_CHOICES = ("recalibrate", "keep")
MEASURES = ("knn", "linear", "loss")


def check_sparsities(sparsities) -> tuple:
    """Sorted unique sparsities, each in (0, 1); ValueError naming ``sparsities`` otherwise."""
    try:
        values = sorted({float(s) for s in sparsities})
    except (TypeError, ValueError):
        raise ValueError(f"sparsities must be numbers in (0, 1), got {sparsities!r}") from None
    if not values or any(not (0 < s < 1) or isinstance(s, bool) for s in values):
        raise ValueError(f"sparsities must be numbers in (0, 1), got {sparsities!r}")
    return tuple(values)


@torch.no_grad()
def pruned_copy(model, sparsity: float, mode: str = "magnitude", *, seed: int = 0, scope: str = "global"):
    """A deep copy of a ``SelfCompetitor`` whose backbone conv weights are multiplied by a mask
    at ``sparsity``: "magnitude" (SDCLR's rule, one global threshold, ``scope`` "layer" for one
    per conv) or "random" (every weight dropped with probability ceil(sparsity * n) / n, drawn
    from a CPU generator seeded with ``seed``). The copy's dense branch is the pruned network
    (its masks stay off; the zeros are in the weights); ``model`` is not changed."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_sparsities([sparsity])
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(int(seed))
    out.update_masks(sparsity, scope=scope, random_fraction=sparsity if mode == "random" else 0.0,
                     generator=gen)
    for conv in out.masked_convs().values():
        conv.weight.mul_(conv.mask.to(conv.weight.dtype))
        conv.mask.fill_(True)
    return out


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, mean, std, *, batch_size: int = 512, device=None):
    """Re-estimate the running mean / variance of every BatchNorm of ``model``'s dense branch
    (backbone and head) as the average of the batch statistics over ``images`` (uint8, batches of
    ``batch_size`` in order, eval transform; BatchNorm's ``momentum=None`` mode); affine
    parameters are kept. The model is left in eval mode."""
    from ..data.augment import eval_transform

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
    model.train()
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            if x.shape[0] > 1:  # BatchNorm needs two samples in train mode
                model(eval_transform(x, mean, std), branch="dense")
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.eval()
    return model


class LossPairs:
    """SDCLR's per-sample loss on fixed views, for one dense network and any pruned copy of it.

    Every image of ``data.long_tail`` gets two views from SDCLR's augmentation, drawn per batch
    from ``seed`` (batches of ``batch_size`` in one seeded permutation, so every pair sees the
    same views and negatives). The dense projections z_dense(v1) and the dense pair's losses
    are computed once; :meth:`pruned` then costs one forward of view 2 per image. Losses are
    NT-Xent rows (``temperature``), the mean of an image's two rows, float64 (N,).
    """

    @torch.no_grad()
    def __init__(self, dense, data, *, temperature: float, batch_size: int = 512, seed: int = 0,
                 crop_scale=(0.1, 1.0), image_size=None, device=None):
        from ..data.augment import TwoViewAugment

        images = data.long_tail.images
        self.images, self.n, self.device, self.temperature = images, images.shape[0], device, float(temperature)
        self.seed = int(seed)
        self.aug = TwoViewAugment(image_size or images.shape[-1], images.shape[1], data.mean, data.std,
                                  scale=tuple(crop_scale)).to(device)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))
        self.batches = [order[i:i + batch_size] for i in range(0, self.n, batch_size)]
        dense.eval()
        self.z1, dense_losses = [], []
        for b, idx in enumerate(self.batches):
            v1, v2 = self._views(b, idx)
            self.z1.append(dense(v1, branch="dense").float())
            dense_losses.append(self._rows(self.z1[-1], dense(v2, branch="dense").float()))
        self.dense = self._scatter(dense_losses)

    def _views(self, b, idx):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + b)
            return self.aug(self.images.index_select(0, idx).to(self.device))

    def _rows(self, z1, z2):
        from ..ops.nt_xent import nt_xent

        if z1.shape[0] < 2:  # a lone image has no negative
            return torch.full((z1.shape[0],), float("nan"), dtype=torch.float64)
        rows = nt_xent(z1, z2, self.temperature, reduction="none").double().cpu()
        return 0.5 * (rows[:z1.shape[0]] + rows[z1.shape[0]:])

    def _scatter(self, per_batch):
        out = torch.empty(self.n, dtype=torch.float64)
        for idx, vals in zip(self.batches, per_batch):
            out[idx] = vals
        return out

    @torch.no_grad()
    def pruned(self, net) -> torch.Tensor:
        """Per-image loss of the pair z_dense(v1), z_net(v2) (``net``'s dense branch)."""
        net.eval()
        return self._scatter([self._rows(z1, net(self._views(b, idx)[1], branch="dense").float())
                              for b, (idx, z1) in enumerate(zip(self.batches, self.z1))])


def per_sample_losses(dense, pruned, data, *, temperature: float, batch_size: int = 512, seed: int = 0,
                      crop_scale=(0.1, 1.0), image_size=None, device=None):
    """(dense-pair, SDCLR-pair) NT-Xent loss of every image of ``data.long_tail`` (float64 (N,)
    each): dense pair z_dense(v1), z_dense(v2); SDCLR pair z_dense(v1), z_pruned(v2) with the
    projection head of ``pruned`` (its dense branch); views and batches as :class:`LossPairs`."""
    pairs = LossPairs(dense, data, temperature=temperature, batch_size=batch_size, seed=seed, crop_scale=crop_scale,
                      image_size=image_size, device=device)
    return pairs.dense, pairs.pruned(pruned)


def balanced_draw(images, num_classes: int, per_class: int, seed: int = 0):
    """An ImageSet of at most ``per_class`` images of every class of ``images`` (a seeded draw,
    kept in the original order)."""
    from ..data.base import ImageSet

    if isinstance(per_class, bool) or not isinstance(per_class, numbers.Integral) or per_class < 1:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}")
    perm = torch.randperm(len(images.labels), generator=torch.Generator().manual_seed(int(seed)))
    keep = torch.cat([perm[images.labels[perm] == c][:per_class] for c in range(num_classes)]).sort().values
    return ImageSet(images.images.index_select(0, keep), images.labels.index_select(0, keep),
                    images.indices.index_select(0, keep))


def _class_means(values: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    ok = np.isfinite(values)
    total = np.bincount(labels[ok], weights=values[ok], minlength=num_classes)
    count = np.bincount(labels[ok], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def _groups(per_class: np.ndarray, class_counts, rule: str = "thirds") -> dict:
    from ..eval import GROUPS, group_classes

    idx = group_classes(class_counts, rule)
    with np.errstate(invalid="ignore"):
        out = {g: float(np.nanmean(per_class[idx[g]])) if np.isfinite(per_class[idx[g]]).any() else float("nan")
               for g in GROUPS}
    out["overall"] = float(np.nanmean(per_class))
    return out


def _entry(per_class: np.ndarray, class_counts, rule: str = "thirds") -> dict:
    return {**_groups(per_class, class_counts, rule),
            "per_class": [None if np.isnan(v) else float(v) for v in per_class]}


def analyze_model(model, data, *, config=None, sparsities=SPARSITIES, modes=MODES, bn: str = "recalibrate",
                  probe_epochs: int | None = None, probe_per_class: int | None = None,
                  test_per_class: int | None = None, loss_per_class: int | None = None,
                  bn_images: int | None = None, knn_k: int = 200,
                  temperature: float | None = None, loss_batch_size: int | None = None, batch_size: int = 512,
                  seed: int = 0, device=None, progress=print) -> dict:
    """The pruning-damage analysis of one model (see the module docstring).

    model:   a ``SelfCompetitor`` (its dense branch is analysed), on ``device``.
    data:    its ``ContrastiveData`` with the run's input statistics (``run_data``).
    config:  the run's ``PretrainConfig`` (temperature, batch size, crop scale of the loss
             measurement); None: SDCLR's CIFAR values.
    sparsities, modes: the pruned networks ("magnitude" and / or "random").
    bn:      "recalibrate" (default) or "keep" (the stored running statistics).
    probe_epochs, probe_per_class, knn_k: the probes (see ``sdclr_fast.eval.evaluate_backbone``).
    test_per_class: classify only this many test images per class (a seeded draw; cheaper); None:
             the whole test set.
    loss_per_class: measure the loss on at most this many images of every class of D_i (a
             seeded draw: the tail keeps all of its images, the batches are less head-heavy than
             training's); None: all of D_i.
    bn_images: re-estimate BN on this many images of D_i drawn at random (its class profile
             kept on average); None: all of D_i.

    Returns {"dense": {measure: entry}, "pruned": [{"mode", "sparsity", "density", measure: entry,
    "delta": {measure: entry}}, ...], "class_counts": [...]} where an entry is {"overall",
    "major", "moderate", "minor", "per_class"}: accuracies in %, losses in nats, "delta" the
    pruned minus the dense value (class by class, then averaged like the values).
    """
    from ..eval import evaluate_backbone, fixed_threads
    from .models import DenseEncoder

    sparsities = check_sparsities(sparsities)
    modes = tuple(dict.fromkeys(modes))
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes must be some of {MODES}, got {modes!r}")
    if bn not in BN_CHOICES:
        raise ValueError(f"bn must be one of {BN_CHOICES}, got {bn!r}")
    if probe_epochs is not None and (isinstance(probe_epochs, bool) or not isinstance(probe_epochs, numbers.Integral)
                                     or probe_epochs < 1):
        raise ValueError(f"probe_epochs must be a positive int, got {probe_epochs!r}")
    temperature = temperature if temperature is not None else (config.temperature if config is not None else 0.2)
    loss_bs = loss_batch_size or (config.batch_size if config is not None else 512)
    crop_scale = config.crop_scale if config is not None else (0.1, 1.0)
    image_size = config.image_size if config is not None else None
    rule = config.eval_groups if config is not None else "thirds"
    counts = data.class_counts
    counts_np = np.asarray(counts.tolist() if isinstance(counts, torch.Tensor) else counts, dtype=np.int64)
    loss_set = data.long_tail if loss_per_class is None else balanced_draw(data.long_tail, data.num_classes,
                                                                           loss_per_class, seed)
    loss_data = dataclasses.replace(data, train=loss_set, long_tail_train=loss_set)
    labels = loss_set.labels.numpy()
    bn_set = data.long_tail.images
    if bn_images is not None:
        if isinstance(bn_images, bool) or not isinstance(bn_images, numbers.Integral) or bn_images < 2:
            raise ValueError(f"bn_images must be an int >= 2, got {bn_images!r}")
        pick = torch.randperm(bn_set.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:bn_images]
        bn_set = bn_set.index_select(0, pick.sort().values)
    opts = {"epochs": probe_epochs} if probe_epochs is not None else None
    if test_per_class is not None:
        data = dataclasses.replace(data, test=balanced_draw(data.test, data.num_classes, test_per_class, seed))

    def accuracies(net):
        res = evaluate_backbone(DenseEncoder(net), data, probes=("linear", "knn"), device=device, flip=True,
                                augment=False, probe_options=opts, knn_k=knn_k, seed=seed,
                                probe_per_class=probe_per_class, batch_size=batch_size, module=net, groups=rule)
        return {"knn": res["knn"].per_class, "linear": res["linear"].per_class}

    # One thread on the CPU: the same numbers under any thread count (see eval.fixed_threads).
    with fixed_threads(device):
        model.eval()
        progress("dense network")
        reference = model
        if bn == "recalibrate":
            reference = recalibrate_bn(copy.deepcopy(model), bn_set, data.mean, data.std, batch_size=batch_size,
                                       device=device)
        acc = accuracies(reference)
        pairs = LossPairs(reference, loss_data, temperature=temperature, batch_size=loss_bs, seed=seed,
                          crop_scale=crop_scale, image_size=image_size, device=device)
        loss_dense = _class_means(pairs.dense.numpy(), labels, data.num_classes)
        dense = {"knn": _entry(acc["knn"], counts_np, rule), "linear": _entry(acc["linear"], counts_np, rule),
                 "loss": _entry(loss_dense, counts_np, rule)}
        rows = []
        for mode in modes:
            for s in sparsities:
                net = pruned_copy(model, s, mode, seed=seed)
                density = float(sum(int((c.weight != 0).sum()) for c in net.masked_convs().values())) / sum(
                    c.weight.numel() for c in net.masked_convs().values())
                if bn == "recalibrate":
                    recalibrate_bn(net, bn_set, data.mean, data.std, batch_size=batch_size,
                                   device=device)
                progress(f"{mode} pruning at {s:g} (density {density:.3f})")
                acc_p = accuracies(net)
                loss_p = _class_means(pairs.pruned(net).numpy(), labels, data.num_classes)
                per = {"knn": acc_p["knn"], "linear": acc_p["linear"], "loss": loss_p}
                base = {"knn": acc["knn"], "linear": acc["linear"], "loss": loss_dense}
                rows.append({"mode": mode, "sparsity": s, "density": density,
                             **{m: _entry(per[m], counts_np, rule) for m in MEASURES},
                             "delta": {m: _entry(per[m] - base[m], counts_np, rule) for m in MEASURES}})
    return {"dense": dense, "pruned": rows, "class_counts": counts_np.tolist(), "groups": rule, "bn": bn,
            "temperature": float(temperature), "loss_batch_size": int(loss_bs)}


def analyze_checkpoint(path, **options) -> tuple:
    """(label, analysis) of the checkpoint at ``path`` (a run directory or checkpoint file): its
    model and data split rebuilt as ``sdclr-fast eval`` does; options as :func:`analyze_model`
    (``device`` included)."""
    from .checkpoint import load_checkpoint
    from .config import PretrainConfig
    from .evaluate import data_for_run, resolve_checkpoint, run_label
    from .models import build_model_from_args, load_weights
    from .run import resolve_device

    ckpt = resolve_checkpoint(path)
    state = load_checkpoint(ckpt)
    config = PretrainConfig.from_dict(state["config"])
    data = data_for_run(state, ckpt.parent)
    device = resolve_device(options.pop("device", None))
    model = load_weights(build_model_from_args(state["model_args"]), state).to(device).eval()
    return run_label(state, ckpt), analyze_model(model, data, config=config, device=device, **options)


def _mean_std(values):
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), 0.0)


def summary_rows(analyses: dict) -> list:
    """One row per (label, mode, sparsity, measure): the group deltas as (mean, std) over the
    analyses of that label (a list: splits / permutations), plus "minor - major"."""
    rows = []
    for label, runs in analyses.items():
        runs = runs if isinstance(runs, list) else [runs]
        keys = [(r["mode"], r["sparsity"]) for r in runs[0]["pruned"]]
        for i, (mode, s) in enumerate(keys):
            for m in MEASURES:
                cells = {g: _mean_std(r["pruned"][i]["delta"][m][g] for r in runs)
                         for g in ("overall", "major", "moderate", "minor")}
                cells["minor - major"] = _mean_std(r["pruned"][i]["delta"][m]["minor"]
                                                   - r["pruned"][i]["delta"][m]["major"] for r in runs)
                rows.append({"label": label, "mode": mode, "sparsity": s, "measure": m, "runs": len(runs), **cells})
    return rows


def format_summary(analyses: dict) -> str:
    """Markdown table of :func:`summary_rows` (mean ± std where there are several runs)."""
    head = ["run", "pruning", "sparsity", "measure", "runs", "Δ overall", "Δ major", "Δ moderate", "Δ minor",
            "minor − major"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 4 + ["---:"] * 6) + " |"]
    for r in summary_rows(analyses):
        def cell(key):
            mean, std = r[key]
            return f"{mean:+.2f}" + (f" ± {std:.2f}" if r["runs"] > 1 else "")
        lines.append(f"| {r['label']} | {r['mode']} | {r['sparsity']:g} | {r['measure']} | {r['runs']} | "
                     + " | ".join(cell(k) for k in ("overall", "major", "moderate", "minor", "minor - major")) + " |")
    return "\n".join(lines)


def plot_damage(analyses: dict, path) -> Path:
    """PNG: per measure (kNN, linear probe, loss) one panel per run label, the change of each
    group against sparsity (solid magnitude, dashed random; bars = std over runs)."""
    from matplotlib.figure import Figure

    from ..files import atomic_write

    colours = {"major": "tab:blue", "moderate": "tab:orange", "minor": "tab:red"}
    titles = {"knn": "kNN accuracy change (points)", "linear": "linear-probe accuracy change (points)",
              "loss": "per-sample NT-Xent loss change (nats)"}
    labels = list(analyses)
    fig = Figure(figsize=(5.0 * len(labels), 3.4 * len(MEASURES)))
    axes = fig.subplots(len(MEASURES), len(labels), squeeze=False, sharex=True)
    for j, label in enumerate(labels):
        runs = analyses[label] if isinstance(analyses[label], list) else [analyses[label]]
        modes = list(dict.fromkeys(r["mode"] for r in runs[0]["pruned"]))
        for i, m in enumerate(MEASURES):
            ax = axes[i][j]
            for mode in modes:
                pos = [k for k, r in enumerate(runs[0]["pruned"]) if r["mode"] == mode]
                xs = [runs[0]["pruned"][k]["sparsity"] for k in pos]
                for g, colour in colours.items():
                    stats = [_mean_std(r["pruned"][k]["delta"][m][g] for r in runs) for k in pos]
                    ax.errorbar(xs, [a for a, _ in stats], yerr=[b for _, b in stats], color=colour, capsize=2,
                                ls="-" if mode == "magnitude" else "--", marker="o", ms=3,
                                label=f"{g} ({mode})")
            ax.axhline(0, color="k", lw=0.6)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{label}\n{titles[m]}", fontsize=9)
            if i == len(MEASURES) - 1:
                ax.set_xlabel("sparsity")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), what="the pruning-damage plot")
    return path


def write_analysis(analyses: dict, out_dir, *, notes: str | None = None) -> dict:
    """pruning_damage.md (the summary table), .json (everything, per class included) and .png in
    ``out_dir``; returns their paths."""
    from ..files import write_json, write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_damage(analyses, out_dir / "pruning_damage.png")
    text = ["# Pruning damage per class group", ""]
    if notes:
        text += [notes.strip(), ""]
    text += ["Change from the unpruned network (pruned − dense): accuracies in points (negative = damage), "
             "per-sample NT-Xent loss in nats (positive = damage); groups are the thirds of the classes ranked by "
             "their long-tailed training counts. \"minor − major\" below zero for an accuracy (above zero for the "
             "loss) means the rare classes lose more, as SDCLR's premise says.", "",
             format_summary(analyses), "", "![pruning damage](pruning_damage.png)", ""]
    report = write_text(out_dir / "pruning_damage.md", "\n".join(text), what="the pruning-damage report")
    data = write_json(out_dir / "pruning_damage.json", analyses, what="the pruning-damage data")
    return {"report": report, "json": data, "plot": plot}


__all__ = ["BN_CHOICES", "MEASURES", "MODES", "SPARSITIES", "LossPairs", "analyze_checkpoint", "analyze_model",
           "balanced_draw", "format_summary", "per_sample_losses", "plot_damage", "pruned_copy", "recalibrate_bn",
           "summary_rows", "write_analysis"]
