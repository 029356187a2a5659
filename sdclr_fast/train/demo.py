"""`sdclr-fast demo` / `make demo`: SimCLR vs SDCLR (optionally DnC) on Fashion-MNIST-LT.

The demo must finish in about 15 minutes on a 2-core CPU machine, so it scales the SDCLR recipe
down: a narrow ResNet-18 (width 16, CIFAR stem) on the images resized to 16x16, batch 128 with
the paper's lr rescaled linearly (0.5 * 128 / 512), one warm-up epoch, and a fixed number of
epochs (``EPOCHS``), so the run's length does not depend on the machine's speed. The same seed
repeats the same numbers on one machine with the same torch build and thread count (the
evaluation itself runs on one thread); another CPU or thread count rounds differently during
pretraining and moves them by a point or two (an AMD EPYC machine gave linear 71.27 / 71.18
where the development machine gave 69.37 / 70.64). The linear probe
(SDCLR's: 30 epochs, lr 30, crop + flip augmentation) and kNN run on a balanced 500-per-class
subset of the 60k training images (subsampled so that the probes stay cheap) and the full 10k
test set. Everything else (pruning at 0.9 recomputed every epoch, temperature 0.2, the split
with ratio 100 and its class permutation) is the paper's. ``budget_minutes`` instead chooses the
epochs from a step time measured at start-up (numbers then depend on the machine's load).
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .config import PretrainConfig

DATASET = "fashion-mnist-lt"
WIDTH = 16
IMAGE_SIZE = 16
BATCH = 128
PROBE_PER_CLASS = 500
CALIBRATION_STEPS = 4
EVAL_SHARE = 0.15       # of the budget, kept for feature extraction and the probes
MAX_EPOCHS = 200
EPOCHS = 8              # the fixed schedule (README.md and docs/index.md give its wall time)
LABELS = {"simclr": "SimCLR", "sdclr": "SDCLR", "dnc": "DnC"}


def demo_config(method: str, *, epochs: int, data_root=None, device=None, seed: int = 0) -> PretrainConfig:
    return PretrainConfig(method=method, dataset=DATASET, data_root=data_root, image_size=IMAGE_SIZE,
                          arch="resnet18", width=WIDTH, epochs=epochs, batch_size=BATCH, lr=0.5 * BATCH / 512,
                          warmup_epochs=1.0, seed=seed, device=device, tensorboard=False,
                          extra={"label": LABELS[method]})


def _seconds_per_step(method, data, data_root, device, seed) -> float:
    """Wall time of one training step, measured over a few steps of a short run on a subset
    (the first step, which pays one-off costs such as allocations and kernel selection, is left
    out; pruning is amortised over an epoch's steps)."""
    from .pretrain import pretrain
    from .run import read_metrics

    tmp = Path(tempfile.mkdtemp(prefix="sdclr_fast_calib_"))
    try:
        cfg = demo_config(method, epochs=1, data_root=data_root, device=device, seed=seed).replace(
            progress=False, log_every=1)
        pretrain(cfg, run_dir=tmp, data=data, indices=torch.arange(BATCH * CALIBRATION_STEPS))
        rows = read_metrics(tmp)
        t = [r["epoch_time_s"] for r in rows if r["kind"] == "step"]
        epoch = [r for r in rows if r["kind"] == "epoch"][-1]
        steps_per_epoch = max(1, len(data.train) // BATCH)
        return (t[-1] - t[0]) / (len(t) - 1) + epoch["prune_s"] / steps_per_epoch
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted positions of ceil(fraction * n_c) random images of every class c (the long-tailed
    profile is kept; every class keeps at least one image)."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels).tolist():
        pos = (labels == c).nonzero().flatten()
        n = max(1, math.ceil(fraction * len(pos)))
        keep.append(pos[torch.randperm(len(pos), generator=g)[:n]])
    return torch.sort(torch.cat(keep)).values


def plan_budget(budget_s: float, seconds_per_step: dict, n_train: int, dnc: bool):
    """(epochs, fraction of the training split) that fit ``budget_s`` of pretraining."""
    # DnC trains a base model, experts covering the data once per epoch, and a student that also
    # runs every teacher: about three runs' worth of steps, at the cost of the mean method.
    mean_step = sum(seconds_per_step.values()) / len(seconds_per_step)
    step_cost = sum(seconds_per_step.values()) + (3 * mean_step if dnc else 0.0)
    affordable = max(budget_s, 0.0) / step_cost * BATCH  # images each method can see
    if affordable >= n_train:
        return int(min(MAX_EPOCHS, affordable // n_train)), 1.0
    return 1, max(affordable / n_train, 2 * BATCH / n_train)


def run_demo(*, methods=("simclr", "sdclr"), budget_minutes: float | None = None, run_dir="runs/demo", epochs=None,
             data_root=None, device=None, seed: int = 0) -> dict:
    """Pretrain each method, evaluate, print the comparison and write report.md + plots.
    Returns {label: {probe: EvalResult}}."""
    from ..data import build_dataset
    from .evaluate import evaluate_checkpoint, format_table, write_outputs
    from .pretrain import pretrain

    t_start = time.perf_counter()
    methods = list(dict.fromkeys(methods))
    if not methods or any(m not in LABELS for m in methods):
        raise ValueError(f"methods must be some of {', '.join(LABELS)}, got {methods!r}")
    if budget_minutes is not None and not (budget_minutes > 0):
        raise ValueError(f"budget_minutes must be > 0, got {budget_minutes!r}")
    if budget_minutes is not None and epochs is not None:
        raise ValueError("give epochs or budget_minutes, not both")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs (--epochs) must be an int >= 1, got {epochs!r}")
    run_dir = Path(run_dir)
    data = build_dataset(DATASET, data_root, seed=seed, image_size=IMAGE_SIZE)
    print(data.summary())
    eval_data = dataclasses.replace(data, probe_train=data.fewshot(PROBE_PER_CLASS, pool="probe"))

    contrastive = [m for m in methods if m in ("simclr", "sdclr")]
    stored = {}
    for m in contrastive:
        ck = run_dir / m / CHECKPOINT_NAME
        if ck.exists():
            st = load_checkpoint(ck)
            stored[m] = (PretrainConfig.from_dict(st["config"]), st.get("train_indices"))
    fraction = 1.0
    if budget_minutes is not None and len(stored) < len(contrastive):
        per_step = {m: _seconds_per_step(m, data, data_root, device, seed) for m in contrastive if m not in stored}
        for m, sec in per_step.items():
            print(f"calibration: {m} {sec:.2f} s per step of {BATCH} ({BATCH / sec:.0f} images/s)")
        budget_s = budget_minutes * 60 * (1 - EVAL_SHARE) - (time.perf_counter() - t_start)
        epochs, fraction = plan_budget(budget_s, per_step, len(data.train), "dnc" in methods)
    elif epochs is None and stored:
        # every contrastive run is stored: DnC's stages get the length those runs trained for
        epochs = max(cfg.epochs for cfg, _ in stored.values())
    epochs = EPOCHS if epochs is None else epochs
    indices = None if fraction >= 1 else stratified_subset(data.train.labels, fraction, seed)
    n_images = len(data.train) if indices is None else len(indices)
    plan = f"budget {budget_minutes:g} min -> " if budget_minutes is not None else ""
    print(f"{plan}{epochs} epoch(s) over {n_images} of the {len(data.train)} long-tailed training images per "
          f"method, batch {BATCH}")

    checkpoints = {}
    for m in methods:
        t0 = time.perf_counter()
        if m == "dnc":
            checkpoints[m] = _run_dnc(run_dir / m, epochs, data_root, device, seed)
        elif m in stored:
            cfg, idx = stored[m]
            print(f"{m}: continuing / reusing {run_dir / m} ({cfg.epochs} epochs)")
            checkpoints[m] = pretrain(cfg, run_dir=run_dir / m, data=data, resume=True,
                                      indices=None if idx is None else torch.tensor(idx))
        else:
            cfg = demo_config(m, epochs=epochs, data_root=data_root, device=device, seed=seed)
            checkpoints[m] = pretrain(cfg, run_dir=run_dir / m, data=data, resume=True, indices=indices)
        print(f"{m}: pretrained in {time.perf_counter() - t0:.0f} s")

    results = {}
    for m, ck in checkpoints.items():
        t0 = time.perf_counter()
        _, res = evaluate_checkpoint(ck, probes=("linear", "knn"), data=eval_data, device=device)
        results[LABELS[m]] = res
        print(f"{m}: evaluated in {time.perf_counter() - t0:.0f} s")
    print(format_table(results))
    total = time.perf_counter() - t_start
    trained = {}
    for m, ck in checkpoints.items():
        st = load_checkpoint(ck)
        idx = st.get("train_indices")
        trained[LABELS[m]] = (f"{st['config']['epochs']} epoch(s) over "
                              f"{len(data.train) if idx is None else len(idx)} images")
    notes = (f"Fashion-MNIST-LT (ratio 100, {len(data.train)} long-tailed training images, seed {seed}) at "
             f"{IMAGE_SIZE}x{IMAGE_SIZE}; ResNet-18 width {WIDTH}, batch {BATCH}; "
             + "; ".join(f"{k}: {v}" for k, v in trained.items())
             + f". Linear probe (30 epochs, lr 30) and kNN (k 200) on {len(eval_data.probe_train)} balanced "
             f"training images, tested on {len(data.test)} images. Total demo time {total / 60:.1f} min. "
             f"A demonstration of the pipeline at a tiny budget: the paper trains 2000 epochs.")
    paths = write_outputs(results, run_dir, title="Demo: contrastive pretraining on Fashion-MNIST-LT", notes=notes)
    print(f"report: {paths['report']}")
    print(f"demo finished in {total / 60:.1f} min")
    return results


def _run_dnc(run_dir, epochs, data_root, device, seed):
    """DnC with the demo's base configuration; every stage as long as the contrastive runs."""
    from .config import DnCConfig
    from .dnc import dnc

    cfg = demo_config("sdclr", epochs=epochs, data_root=data_root, device=device, seed=seed).replace(extra={})
    return dnc(cfg, DnCConfig(), run_dir=run_dir, resume=True)
