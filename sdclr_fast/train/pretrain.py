"""The SimCLR / SDCLR pretraining loop.

SDCLR step: view 1 through the dense branch, view 2 through the pruned branch (the masks are
recomputed from the current dense weights at the start of every epoch with the fast top-k
pruning op), loss = NT-Xent(z_dense(v1), z_pruned(v2)), one backward. The official code runs
three forwards and two backwards per step as a DDP workaround; the gradient of the joint loss
is the same, so two forwards and one backward suffice. Both branches run inside one module call
(:class:`ContrastiveForward`), so DDP sees exactly one forward per backward.

SimCLR step: both views through the dense network in one forward of the concatenated batch.

Everything a run needs to continue after a kill is checkpointed atomically at the end of every
epoch (model with masks and dual-BN statistics, optimiser, scheduler, all RNG states including
the data-order generator); a resumed CPU run ends with weights bit-identical to an
uninterrupted one. On CUDA they agree only to rounding: cuDNN's autotuner (enabled, the shapes
are fixed) may pick other convolution algorithms in another process, and several backward
kernels accumulate with atomics (the RNG states, CUDA's included, are restored). Under DDP every
process's RNG states are saved, so a resume needs the same number of processes.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import CHECKPOINT_NAME, CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .config import PretrainConfig
from .distributed import DistInfo, all_gather_object, all_reduce_mean, barrier, init_distributed, shutdown
from .schedule import warmup_cosine

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


# ---------------------------------------------------------------- model
def model_args(config: PretrainConfig, in_channels: int) -> dict:
    """Arguments of ``sdclr_fast.nn.build_model`` for a run (stored in every checkpoint)."""
    return dict(arch=config.arch, method=config.method, in_channels=int(in_channels), width=config.width,
                cifar_stem=config.cifar_stem, proj_dim=config.proj_dim)


def build_model_from_args(args: dict):
    from ..nn import build_model

    return build_model(**args)


class ContrastiveForward(nn.Module):
    """Both views of one step in a single forward call, returning (z1, z2)."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, v1, v2):
        if self.method == "sdclr":
            return self.model(v1, branch="dense"), self.model(v2, branch="pruned")
        # SimCLR: one forward over the 2B batch, so BN normalises both views together.
        z = self.model(torch.cat([v1, v2]), branch="dense")
        return z[: v1.shape[0]], z[v1.shape[0]:]


def load_model(checkpoint_path, *, device="cpu", expect: dict | None = None):
    """The pretrained model (a ``SelfCompetitor`` with its masks and BN statistics) from a
    checkpoint written by :func:`pretrain`, in eval mode on ``device``."""
    state = load_checkpoint(checkpoint_path, expect=expect)
    if "model_args" not in state:
        raise CheckpointError(f"checkpoint {state['path']!r} lacks the entry 'model_args'")
    model = build_model_from_args(state["model_args"])
    _load_weights(model, state)
    return model.to(device).eval()


def _load_weights(model, state):
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {state['path']!r} does not fit this model: {exc}") from None


# ---------------------------------------------------------------- small helpers
def resolve_device(config: PretrainConfig, dist_info: DistInfo | None = None) -> torch.device:
    name = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available")
        if dist_info is not None and dist_info.enabled:
            dev = torch.device("cuda", dist_info.local_rank)
    return dev


def _seed_everything(seed: int):
    import random

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _params_finite(model) -> bool:
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class _MetricsLog:
    """metrics.jsonl (one JSON object per line) and, when tensorboard is installed, scalars."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, keep_before_epoch: int):
        self.path = run_dir / METRICS_NAME
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        # A resumed run drops the rows of the epoch that was interrupted (and anything later).
        rows = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
                if isinstance(row, dict) and row.get("epoch", 0) < keep_before_epoch:
                    rows.append(line)
        self.path.write_text("".join(r + "\n" for r in rows))
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, row: dict, step: int):
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("kind", "epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{row.get('kind', 'train')}/{k}", v, step)

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(run_dir) -> list:
    """The rows of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- the loop
def pretrain(config: PretrainConfig, *, run_dir, indices=None, init_checkpoint=None, data=None,
             resume: bool = False, stop_at_epoch: int | None = None) -> Path:
    """Pretrain with SimCLR or SDCLR and return the path of the final checkpoint.

    config:          a :class:`PretrainConfig`.
    run_dir:         where checkpoint.pt, config.json, split.json and metrics.jsonl go.
    indices:         positions into the training split to train on (e.g. one DnC cluster);
                     None trains on all of it.
    init_checkpoint: initialise the model weights (and masks / BN statistics) from this
                     checkpoint; optimiser, schedule and epoch count start fresh.
    data:            a ready ``ContrastiveData`` instead of building ``config.dataset``.
    resume:          continue from ``run_dir/checkpoint.pt`` (no-op if that run finished; a
                     fresh start if there is none). Without it an existing checkpoint is an error.
    stop_at_epoch:   stop (with a resumable checkpoint) once this many epochs are complete,
                     e.g. to split a run over jobs with a wall-time limit.
    """
    if not isinstance(config, PretrainConfig):
        raise ValueError(f"config must be a PretrainConfig, got {type(config).__name__}")
    config.validate()
    if stop_at_epoch is not None and (isinstance(stop_at_epoch, bool) or not isinstance(stop_at_epoch, int)
                                      or stop_at_epoch < 1):
        raise ValueError(f"stop_at_epoch must be a positive int or None, got {stop_at_epoch!r}")
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT_NAME

    probe_dev = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist_info = init_distributed(probe_dev.type)
    try:
        return _pretrain(config, run_dir, ckpt_path, indices, init_checkpoint, data, resume, stop_at_epoch,
                         dist_info)
    finally:
        shutdown(dist_info)


def _pretrain(config, run_dir, ckpt_path, indices, init_checkpoint, data, resume, stop_at_epoch, dist_info):
    device = resolve_device(config, dist_info)
    if device.type == "cuda":
        # Shapes are fixed for a whole run, so cuDNN's autotuner pays off after the first steps.
        torch.backends.cudnn.benchmark = True
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)

    # ---- what is already on disk
    resumed = None
    if ckpt_path.exists():
        if not resume:
            raise ValueError(f"run_dir {str(run_dir)!r} already holds {CHECKPOINT_NAME}; pass resume=True "
                             f"(--resume) to continue it, or choose another run directory")
        resumed = load_checkpoint(ckpt_path, expect={"method": config.method, "arch": config.arch})
        stored = PretrainConfig.from_dict(resumed["config"])
        diff = stored.differences(config)
        if diff:
            listing = ", ".join(f"{k}: stored {a!r}, given {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume {str(ckpt_path)!r} with a different configuration ({listing})")
        if resumed.get("finished"):
            if dist_info.is_main:
                print(f"{ckpt_path}: run already finished ({resumed['epoch']}/{config.epochs} epochs); "
                      f"nothing to do")
            return ckpt_path
    elif resume and dist_info.is_main:
        print(f"{ckpt_path} does not exist; starting the run from scratch")

    # ---- data
    if data is None:
        from ..data import build_dataset

        split_file = run_dir if (run_dir / "split.json").exists() else None
        data = build_dataset(config.dataset, config.data_root, ratio=config.ratio, seed=config.seed,
                             split=config.split, image_size=config.image_size, split_file=split_file)
    train_set = data.train
    if indices is not None:
        train_set = data.subset(indices)
    index_list = None if indices is None else train_set.indices.tolist()
    if resumed is not None and resumed.get("train_indices") != index_list:
        raise ValueError(f"cannot resume {str(ckpt_path)!r}: it was trained on a different subset of the "
                         f"training split (indices differ)")
    world, rank = dist_info.world_size, dist_info.rank
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of processes ({world})")
    if len(train_set) < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {len(train_set)} training images; "
                         f"lower --batch-size")
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "split.json").exists():
            data.save_split(run_dir)
        (run_dir / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2))
    barrier(dist_info)

    # ---- model (same initial weights on every rank), then per-rank augmentation randomness
    _seed_everything(config.seed)
    margs = model_args(config, data.in_channels)
    model = build_model_from_args(margs)
    if init_checkpoint is not None and resumed is None:
        init = load_checkpoint(init_checkpoint, expect={"arch": config.arch})
        _load_weights(model, init)
    amp = config.amp if config.amp is not None else device.type == "cuda"
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)

    from ..data import BatchIterator, TwoViewAugment

    order = torch.Generator()
    order.manual_seed(config.seed)
    batches = BatchIterator(train_set, config.batch_size, shuffle=True, drop_last=True, generator=order,
                            device=device)
    steps_per_epoch = len(batches)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs_effective * steps_per_epoch)
    scheduler = warmup_cosine(optimizer, total_steps, warmup_steps)
    image_size = config.image_size or data.image_size
    augment = TwoViewAugment(image_size, data.in_channels, data.mean, data.std).to(device)
    _seed_everything(config.seed + 7919 * (rank + 1))

    start_epoch, global_step = 0, 0
    if resumed is not None:
        _load_weights(model, resumed)
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        rng = resumed["rng"]
        if len(rng) != world:
            raise ValueError(f"cannot resume {str(ckpt_path)!r} exactly: it was written by {len(rng)} "
                             f"process(es), this run has {world}")
        restore_rng(rng[rank], order)
        start_epoch, global_step = int(resumed["epoch"]), int(resumed["step"])
        if dist_info.is_main:
            print(f"resuming {ckpt_path} after epoch {start_epoch}/{config.epochs}")

    base = model
    synced_bn = dist_info.enabled and config.sync_bn and device.type == "cuda"
    if dist_info.enabled and config.sync_bn:
        if synced_bn:
            # Both BN children of every dual BN are converted; parameters and buffers are kept.
            base = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif dist_info.is_main:
            print("note: SyncBatchNorm needs CUDA; BN statistics stay per process on this CPU run")
    step_module: nn.Module = ContrastiveForward(base, config.method)
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Every rank derives the same masks from the same weights, and SyncBN keeps the running
        # statistics equal, so re-broadcasting the buffers (~11 MB of masks for ResNet-18) each
        # step is only needed when BN statistics are per process.
        step_module = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=False, broadcast_buffers=not synced_bn)
    if config.compile:
        step_module = torch.compile(step_module)

    from ..ops.nt_xent import nt_xent

    log = _MetricsLog(run_dir, dist_info.is_main, config.tensorboard, start_epoch)
    per_rank = config.batch_size // world
    last_epoch = config.epochs if stop_at_epoch is None else min(config.epochs, stop_at_epoch)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext())
    try:
        for epoch in range(start_epoch, last_epoch):
            kept, prune_s = None, 0.0
            if config.method == "sdclr":
                _sync(device)
                t0 = time.perf_counter()
                kept = float(base.update_masks(sparsity=config.sparsity, scope=config.prune_scope))
                _sync(device)
                prune_s = time.perf_counter() - t0
            step_module.train()
            t_epoch = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            pending = None  # the previous step's loss, checked one step late so the GPU stays busy

            def check(item, done=epoch):
                value, ep, st, gs = item
                v = float(value)
                if not math.isfinite(v):
                    if ckpt_path.exists():
                        kept_ckpt = (f"the last good checkpoint {str(ckpt_path)!r} (after epoch {done}) was "
                                     f"kept. Lower --lr or disable --amp, then --resume")
                    else:
                        kept_ckpt = "no checkpoint had been written yet. Lower --lr or disable --amp"
                    raise NonFiniteLossError(f"loss became {v} at epoch {ep + 1}, step {st + 1} (global step "
                                             f"{gs + 1}); the run stopped and {kept_ckpt}.")
                return v

            bar = _progress(config, dist_info, steps_per_epoch, epoch)
            for step, batch in enumerate(batches):
                images = batch.images[rank * per_rank:(rank + 1) * per_rank]
                with torch.no_grad():
                    v1, v2 = augment(images)
                if channels_last:
                    v1 = v1.contiguous(memory_format=torch.channels_last)
                    v2 = v2.contiguous(memory_format=torch.channels_last)
                with autocast:
                    z1, z2 = step_module(v1, v2)
                try:
                    loss = nt_xent(z1.float(), z2.float(), config.temperature,
                                   gather_distributed=dist_info.enabled)
                except ValueError:
                    # nt_xent rejects non-finite embeddings; report it like a non-finite loss.
                    if bool(torch.isfinite(z1).all() & torch.isfinite(z2).all()):
                        raise
                    check((torch.tensor(float("nan")), epoch, step, global_step))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if pending is not None:
                    check(pending)
                pending = (loss.detach(), epoch, step, global_step)
                loss_sum += loss.detach()
                global_step += 1
                if (step + 1) % config.log_every == 0 or step + 1 == steps_per_epoch:
                    lval = check(pending)
                    rate = (step + 1) * config.batch_size / (time.perf_counter() - t_epoch)
                    lr = optimizer.param_groups[0]["lr"]
                    if bar is not None:
                        bar.set_postfix(loss=f"{lval:.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.3g}")
                    log.write({"kind": "step", "epoch": epoch, "step": global_step, "loss": lval, "lr": lr,
                               "epoch_time_s": time.perf_counter() - t_epoch}, global_step)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            check(pending)
            _sync(device)
            epoch_s = time.perf_counter() - t_epoch
            mean_loss = float(all_reduce_mean(loss_sum / steps_per_epoch, dist_info))
            if not _params_finite(base):
                raise NonFiniteLossError(f"weights became non-finite during epoch {epoch + 1}; the run stopped "
                                         f"and the last good checkpoint {str(ckpt_path)!r} was kept")
            row = {"kind": "epoch", "epoch": epoch, "step": global_step, "loss": mean_loss,
                   "lr": optimizer.param_groups[0]["lr"],
                   "images_per_s": steps_per_epoch * config.batch_size / (epoch_s + prune_s),
                   "epoch_s": epoch_s, "prune_s": prune_s}
            if kept is not None:
                row["kept_fraction"] = kept
            log.write(row, global_step)
            rng_states = all_gather_object(capture_rng(order), dist_info)
            if dist_info.is_main:
                save_checkpoint({
                    "config": config.to_dict(), "model_args": margs, "model": base.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_states, "epoch": epoch + 1, "step": global_step,
                    "finished": epoch + 1 == config.epochs, "train_indices": index_list,
                    "init_checkpoint": None if init_checkpoint is None else str(init_checkpoint),
                    "last_epoch_metrics": row,
                }, ckpt_path)
            barrier(dist_info)
    finally:
        log.close()
    return ckpt_path


def _progress(config, dist_info, total, epoch):
    if not (config.progress and dist_info.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{config.method} epoch {epoch + 1}/{config.epochs}", leave=False,
                dynamic_ncols=True)
