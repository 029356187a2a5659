"""`sdclr-fast demo` / `make demo`: SimCLR vs SDCLR (optionally DnC) on Fashion-MNIST-LT in a budget.

The demo must finish in about 15 minutes on a 2-core CPU machine, so it scales the SDCLR recipe
down (the values below were measured to fit): a narrow ResNet-18 (width 16, CIFAR stem) on the
28x28 images, batch 256 with the paper's lr rescaled linearly (0.5 * 256 / 512), one warm-up
epoch, and as many epochs as the budget allows, chosen from a short measured run of each
method. The linear probe and kNN run on a balanced 500-per-class subset of the 60k training
images (the evaluation protocol's probe set, subsampled so that feature extraction stays cheap)
and the full 10k test set. Everything else (pruning at 0.9 recomputed every epoch, temperature
0.2, the long-tailed split with ratio 100) is the paper's.
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
BATCH = 256
PROBE_PER_CLASS = 500
CALIBRATION_STEPS = 4
EVAL_SHARE = 0.12       # of the budget, kept for feature extraction and the probes
MAX_EPOCHS = 200
LABELS = {"simclr": "SimCLR", "sdclr": "SDCLR", "dnc": "DnC"}


def demo_config(method: str, *, epochs: int, data_root=None, device=None, seed: int = 0) -> PretrainConfig:
    return PretrainConfig(method=method, dataset=DATASET, data_root=data_root, arch="resnet18", width=WIDTH,
                          epochs=epochs, batch_size=BATCH, lr=0.5 * BATCH / 512, warmup_epochs=1.0, seed=seed,
                          device=device, tensorboard=False, extra={"label": LABELS[method]})


def _seconds_per_step(method, data, data_root, device, seed) -> float:
    """Wall time of one training step, from a short run on a subset (model build excluded)."""
    from .pretrain import pretrain, read_metrics

    tmp = Path(tempfile.mkdtemp(prefix="sdclr_fast_calib_"))
    try:
        cfg = demo_config(method, epochs=1, data_root=data_root, device=device, seed=seed).replace(
            progress=False, log_every=10 ** 6)
        pretrain(cfg, run_dir=tmp, data=data, indices=torch.arange(BATCH * CALIBRATION_STEPS))
        row = [r for r in read_metrics(tmp) if r["kind"] == "epoch"][-1]
        # The first step pays one-off costs (allocations, kernel selection); steps are uniform after it.
        return (row["epoch_s"] + row["prune_s"]) / CALIBRATION_STEPS
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_demo(*, methods=("simclr", "sdclr"), budget_minutes: float = 15.0, run_dir="runs/demo", epochs=None,
             data_root=None, device=None, seed: int = 0) -> dict:
    """Pretrain each method, evaluate, print the comparison and write report.md + plots.
    Returns {label: {probe: EvalResult}}."""
    from ..data import build_dataset
    from .evaluate import evaluate_checkpoint, format_table, write_outputs
    from .pretrain import pretrain

    t_start = time.perf_counter()
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError("methods must name at least one of simclr, sdclr, dnc")
    if not (budget_minutes > 0):
        raise ValueError(f"budget_minutes must be > 0, got {budget_minutes!r}")
    run_dir = Path(run_dir)
    data = build_dataset(DATASET, data_root, seed=seed)
    print(data.summary())
    eval_data = dataclasses.replace(data, probe_train=data.fewshot(PROBE_PER_CLASS))

    contrastive = [m for m in methods if m in ("simclr", "sdclr")]
    stored = {}
    for m in contrastive:
        ck = run_dir / m / CHECKPOINT_NAME
        if ck.exists():
            stored[m] = PretrainConfig.from_dict(load_checkpoint(ck)["config"])
    steps_per_epoch = len(data.train) // BATCH
    if epochs is None and len(stored) < len(contrastive):
        budget_s = budget_minutes * 60 * (1 - EVAL_SHARE) - (time.perf_counter() - t_start)
        per_step = {m: _seconds_per_step(m, data, data_root, device, seed) for m in contrastive if m not in stored}
        for m, s in per_step.items():
            print(f"calibration: {m} {s:.3f} s/step ({BATCH / s:.0f} images/s)")
        # DnC trains a base model, experts covering the data once per epoch, and a student that
        # also runs every teacher: about three runs' worth of steps.
        shares = len(contrastive) + (3 if "dnc" in methods else 0)
        epoch_s = sum(per_step.values()) * steps_per_epoch / max(len(per_step), 1)
        budget_s -= time.perf_counter() - t_start
        epochs = int(max(1, min(MAX_EPOCHS, math.floor(budget_s / shares / epoch_s))))
        print(f"budget {budget_minutes:g} min -> {epochs} epochs per method ({steps_per_epoch} steps of {BATCH})")

    checkpoints = {}
    for m in methods:
        t0 = time.perf_counter()
        if m == "dnc":
            checkpoints[m] = _run_dnc(run_dir / m, epochs or 1, data_root, device, seed)
        else:
            cfg = stored.get(m) or demo_config(m, epochs=epochs, data_root=data_root, device=device, seed=seed)
            if m in stored:
                print(f"{m}: reusing {run_dir / m} ({cfg.epochs} epochs)")
            checkpoints[m] = pretrain(cfg, run_dir=run_dir / m, data=data, resume=True)
        print(f"{m}: pretrained in {time.perf_counter() - t0:.0f} s")

    results = {}
    for m, ck in checkpoints.items():
        label, res = evaluate_checkpoint(ck, probes=("linear", "knn"), data=eval_data, device=device)
        results[LABELS[m]] = res
    print(format_table(results))
    total = time.perf_counter() - t_start
    used = {m: PretrainConfig.from_dict(load_checkpoint(ck)["config"]).epochs
            for m, ck in checkpoints.items() if m != "dnc"}
    notes = (f"Fashion-MNIST-LT (ratio 100, {len(data.train)} training images, seed {seed}); ResNet-18 width "
             f"{WIDTH}, batch {BATCH}, epochs {used}; linear probe (30 epochs, lr 30) and kNN (k 200) on "
             f"{len(eval_data.probe_train)} balanced training images, tested on {len(data.test)} images. "
             f"Total demo time {total / 60:.1f} min.")
    paths = write_outputs(results, run_dir, title="Demo: contrastive pretraining on Fashion-MNIST-LT", notes=notes)
    print(f"report: {paths['report']}")
    print(f"demo finished in {total / 60:.1f} min")
    return results


def _run_dnc(run_dir, epochs, data_root, device, seed):
    """DnC through its own command-line entry (its flags decide the stage lengths)."""
    from ..cli import build_parser
    from .dnc import run_dnc

    argv = ["pretrain", "--method", "dnc", "--dataset", DATASET, "--run-dir", str(run_dir), "--width", str(WIDTH),
            "--batch-size", str(BATCH), "--lr", str(0.5 * BATCH / 512), "--warmup-epochs", "1",
            "--epochs", str(epochs), "--seed", str(seed), "--resume", "--no-tensorboard"]
    if data_root:
        argv += ["--data-root", str(data_root)]
    if device:
        argv += ["--device", device]
    args = build_parser().parse_args(argv)
    out = run_dnc(args)
    if isinstance(out, (str, Path)):
        return Path(out)
    return Path(run_dir)
