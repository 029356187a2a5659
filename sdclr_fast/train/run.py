"""What every run shares: execution settings, the run's data and files, the run-directory lock,
the resume check, the data order and schedule, the metrics log, the progress bar, the NaN guard,
stop signals and the restore of a checkpoint, and the one training loop (:func:`train_loop`) that
SimCLR / SDCLR / MoCLR pretraining and the DnC student run their steps in (a
:class:`TrainingMethod` each). Used by pretraining, every DnC stage and evaluation."""
from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import WriteError, lock_directory, remove_debris, write_json
from .checkpoint import (CHECKPOINT_NAME, CheckpointError, check_expected, capture_rng, load_checkpoint,
                         load_newest_checkpoint, restore_rng, save_checkpoint)
from .distributed import DistInfo, all_gather_object, all_reduce_mean, barrier

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
SPLIT_NAME = "split.json"


# Exit statuses of the command line (docs/clusters.md).
EXIT_BAD_INPUT = 2      # bad flags or data, a mismatched or unreadable checkpoint, a NaN loss
EXIT_WRITE_FAILED = 3   # a file could not be written (disk full, read-only, permissions)
EXIT_LOCKED = 4         # another process holds the run directory
EXIT_PREEMPTED = 75     # stopped by SIGTERM / SIGUSR1 with a resumable checkpoint (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # stopped by SIGINT (Ctrl-C): with a resumable checkpoint in training (128 + SIGINT)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


class Preempted(Exception):
    """A stop signal arrived; the run saved a resumable checkpoint and stopped."""

    def __init__(self, message: str, checkpoint=None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.signal = stop_requested()  # e.g. "SIGTERM"; the command line's exit status depends on it


def run_lock(run_dir, dist_info: DistInfo | None = None):
    """The run directory's lock for the life of a run (rank 0 only under torchrun)."""
    return lock_directory(run_dir, enabled=dist_info is None or dist_info.is_main)


# ---------------------------------------------------------------- stop signals
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_stop = {"signal": None, "depth": 0, "previous": {}, "linger": False}


def _on_stop_signal(signum, frame):
    # Only a flag: the loop finishes its step and saves; a second signal changes nothing (the
    # first one's name is kept, so the exit status follows the first).
    if _stop["signal"] is None:
        _stop["signal"] = signal.Signals(signum).name


@contextlib.contextmanager
def stop_signals():
    """While active, SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before a kill) and
    SIGINT (Ctrl-C) set a flag that the training loops poll after each step instead of ending
    the process. Nested uses share one handler; outside the main thread it does nothing.

    The previous handlers are restored on leaving, except after a stop in a process that called
    :func:`linger_after_stop` (the command line): it is on its way out with a saved checkpoint,
    and a second signal (schedulers often send several) must not turn that clean stop into a kill."""
    install = threading.current_thread() is threading.main_thread() and _stop["depth"] == 0
    if install:
        _stop["signal"] = None
        for s in STOP_SIGNALS:
            previous = signal.signal(s, _on_stop_signal)
            if previous is not _on_stop_signal:  # not the handler a stopped run left in place
                _stop["previous"][s] = previous
    if threading.current_thread() is threading.main_thread():
        _stop["depth"] += 1
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            _stop["depth"] -= 1
            if _stop["depth"] == 0:
                if _stop["signal"] is None or not _stop["linger"]:
                    for s, h in _stop["previous"].items():
                        signal.signal(s, h)
                    _stop["previous"] = {}
                else:
                    ignore_stop_signals()


def ignore_stop_signals() -> None:
    """SIG_IGN for the stop signals: unlike a Python handler, the interpreter's exit does not reset
    it to the default action (which would turn a clean exit status into death by the signal)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def linger_after_stop() -> None:
    """Ignore stop signals after a run stopped on one, until the process has exited (the command
    line calls this; library users get their own handlers back when a run ends)."""
    _stop["linger"] = True


def stop_requested() -> str | None:
    """The name of the stop signal received (e.g. "SIGTERM"), or None."""
    return _stop["signal"]


def request_stop(name: str = "SIGTERM") -> None:
    """Ask the running loop to stop as a stop signal would (tests, embedding code)."""
    _stop["signal"] = name


class StopCheck:
    """Whether the loop should stop after this step. Under DDP every rank must stop at the same
    step, so the ranks' flags are combined with an all-reduce every ``every`` steps (and at
    epoch ends); a single process reads its flag after every step."""

    def __init__(self, dist_info: DistInfo, every: int, device):
        self.dist_info, self.every, self.device = dist_info, max(1, int(every)), device

    def __call__(self, steps_done: int, force: bool = False) -> bool:
        if not self.dist_info.enabled:
            return stop_requested() is not None
        if not force and steps_done % self.every:
            return False
        import torch.distributed as dist

        flag = torch.tensor([1.0 if stop_requested() else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dist_info.group)
        if flag.item() and stop_requested() is None:
            request_stop("a stop signal on another rank")
        return bool(flag.item())


class StepCheckpoints:
    """The checkpoints a loop writes inside and at the end of an epoch besides its epoch-end one:
    every ``every`` steps (``--checkpoint-every-steps``), and when a stop signal came, one more
    followed by :class:`Preempted`. ``save(epochs_done, position, epoch_start_state, loss_sum,
    row)`` is the loop's own checkpoint writer."""

    def __init__(self, stop: StopCheck, every: int | None, guard: "LossGuard", save, ckpt_path, steps_per_epoch: int):
        self.stop, self.every, self.guard, self.save = stop, every, guard, save
        self.ckpt_path, self.steps_per_epoch = ckpt_path, steps_per_epoch

    def after_step(self, epoch: int, done: int, global_step: int, epoch_start_state, loss_sum, bar=None) -> None:
        if done >= self.steps_per_epoch:
            return  # the epoch-end checkpoint follows
        stopping = self.stop(done)
        if stopping or (self.every and global_step % self.every == 0):
            self.guard.check()
            self.save(epoch, done, epoch_start_state, loss_sum, None)
        if stopping:
            if bar is not None:
                bar.close()
            raise Preempted(stopped_message(self.ckpt_path, epoch, done, self.steps_per_epoch), self.ckpt_path)

    def after_epoch(self, epochs_done: int, total_epochs: int) -> None:
        """Call after the epoch-end checkpoint: stops there when a signal came during the epoch."""
        if epochs_done < total_epochs and self.stop(self.steps_per_epoch, force=True):
            raise Preempted(stopped_message(self.ckpt_path, epochs_done, 0, self.steps_per_epoch), self.ckpt_path)


def stopped_message(ckpt_path, epoch: int, position: int, steps_per_epoch: int) -> str:
    where = (f"after epoch {epoch}" if position == 0 else
             f"in epoch {epoch + 1} after step {position}/{steps_per_epoch}")
    return (f"stopped by {stop_requested()} {where}; resumable checkpoint {str(ckpt_path)!r} (continue with "
            f"--resume)")


# ---------------------------------------------------------------- execution
def resolve_device(name: str | None = None, dist_info: DistInfo | None = None) -> torch.device:
    """``name`` (None: cuda when available); under DDP on CUDA each process takes cuda:LOCAL_RANK."""
    dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available")
        if dist_info is not None and dist_info.enabled:
            dev = torch.device("cuda", dist_info.local_rank)
    return dev


@dataclass(frozen=True)
class Execution:
    """Where and how a run computes: bf16 autocast and channels-last default to on for CUDA."""

    device: torch.device
    amp: bool
    channels_last: bool

    @classmethod
    def of(cls, config, dist_info: DistInfo | None = None) -> "Execution":
        device = resolve_device(config.device, dist_info)
        on_cuda = device.type == "cuda"
        return cls(device, on_cuda if config.amp is None else bool(config.amp),
                   on_cuda if config.channels_last is None else bool(config.channels_last))

    def setup_process(self, config) -> "Execution":
        """Per-process settings: CPU threads, cuDNN autotuning (shapes are fixed for a run)."""
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        return self

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    @property
    def autocast_dtype(self):
        return torch.bfloat16 if self.amp else None

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------- data and run files
def run_data(config, run_dir, data=None):
    """The run's data set: ``data`` when given, else built from the config, with the exact split
    of ``run_dir/split.json`` when the run directory holds one; its ``mean`` / ``std`` are the
    config's ``input_norm`` statistics (``data.augment.with_input_norm``)."""
    from ..data.augment import with_input_norm

    if data is not None:
        return with_input_norm(data, config.input_norm)
    from ..data import build_dataset

    run_dir = Path(run_dir)
    split_file = run_dir if (run_dir / SPLIT_NAME).exists() else None
    options = dict(config.data_options)
    if config.official_split is not None:
        options["official_split"] = config.official_split
    data = build_dataset(config.dataset, config.data_root, ratio=config.ratio, seed=config.seed,
                         split=config.split, image_size=config.image_size, split_file=split_file,
                         permute_classes=config.permute_classes, pretrain_set=config.pretrain_set, **options)
    if config.ratio is not None and isinstance(getattr(data.train, "images", None), torch.Tensor):
        counts = data.train.class_counts(data.num_classes)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:  # the tail of n_max * ratio**(-i / (C - 1)) rounded down to nothing
            raise ValueError(f"ratio={config.ratio:g} leaves {len(empty)} of {data.num_classes} classes without a "
                             f"training image (e.g. {data.class_names[empty[0]]!r}); the largest ratio that keeps "
                             f"one image in every class here is {int(counts.max())}")
    return with_input_norm(data, config.input_norm)


# ---------------------------------------------------------------- the data's identity
def data_identity(data) -> dict:
    """What a resumed run compares instead of the data's path (data is often staged to another
    node-local folder after a requeue): the number of training images and classes, and a SHA-256
    over the training labels and 1024 evenly spaced images (a stream: over its keys and its
    shards' checksums)."""
    train, digest = data.train, hashlib.sha256()
    images = getattr(train, "images", None)
    if isinstance(images, torch.Tensor):
        digest.update(train.labels.cpu().numpy().tobytes())
        n = len(train)
        picks = torch.linspace(0, n - 1, min(n, 1024)).round().long().unique() if n else torch.zeros(0, dtype=torch.long)
        digest.update(images.index_select(0, picks).contiguous().cpu().numpy().tobytes())
    else:
        digest.update("\n".join(train.kept_keys()).encode())
        for check in train.reader.get("checks", {}).values():
            digest.update(f"{check['count']}:{check.get('sha256')}".encode())
    return {"images": len(train), "classes": int(getattr(data, "num_classes", 0) or 0), "sha256": digest.hexdigest()}


def check_data_identity(state: dict, identity: dict) -> None:
    """A resumed run must see the data its checkpoint was trained on, wherever it now lies."""
    stored = state.get("data_identity")
    if stored is not None and stored != identity:
        diff = ", ".join(f"{k}: {stored.get(k)!r} then, {identity.get(k)!r} now" for k in identity
                         if stored.get(k) != identity.get(k))
        raise ValueError(f"cannot resume {state['path']!r}: the training data differs from the data it was trained "
                         f"on ({diff}); give the same data (its folder may change)")


def two_view_augment(config, data, device):
    """The run's two-view augmentation (SDCLR's, with the config's crop scale and blur) on ``device``,
    normalising with the config's ``input_norm`` statistics also when ``data`` did not come
    through :func:`run_data` (e.g. the DnC student's)."""
    from ..data import TwoViewAugment
    from ..data.augment import input_stats

    mean, std = input_stats(config.input_norm, data)
    return TwoViewAugment(config.image_size or data.image_size, data.in_channels, mean, std,
                          scale=config.crop_scale, blur_p=config.blur_prob).to(device)


def write_run_files(run_dir, data, config=None) -> None:
    """split.json (once: a run keeps its first split) and config.json in ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / SPLIT_NAME).exists():
        data.save_split(run_dir)
    if config is not None:
        write_json(run_dir / CONFIG_NAME, config.to_dict(), what="the run configuration", indent=2)


# ---------------------------------------------------------------- resume
_read_before_run: dict = {}  # resolved path -> (file stamp, value) kept by read_for_run


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def read_for_run(path, reader):
    """``reader(path)``, kept for the run that follows, whose :func:`read_again` of the same
    unchanged file takes this value instead of reading the file a second time (the command line
    reads a resumed run's stored configuration from the checkpoint or ``dnc.json`` first)."""
    path = Path(path)
    stamp = _stamp(path)
    value = reader(path)
    _read_before_run[path.resolve()] = (stamp, value)
    return value


def read_again(path, reader):
    """The value :func:`read_for_run` kept for ``path`` (handed over once, and only while the file
    is unchanged), else ``reader(path)``."""
    path = Path(path)
    kept = _read_before_run.pop(path.resolve(), None)
    if kept is not None and path.exists() and _stamp(path) == kept[0]:
        return kept[1]
    return reader(path)


def config_differences_error(diff: dict, what: str) -> ValueError:
    """The one message for a resume whose configuration differs from the stored one."""
    listing = ", ".join(f"{k}: stored {a!r}, given {b!r}" for k, (a, b) in diff.items())
    return ValueError(f"cannot resume {what} with a different configuration ({listing})")


def open_checkpoint(ckpt_path: Path, config, *, resume: bool, expect: dict | None = None,
                    announce: bool = True, warn: bool = True) -> dict | None:
    """The checkpoint a run continues from, or None for a fresh start.

    An existing checkpoint without ``resume`` is an error (a run is never overwritten); with
    ``resume`` its stored configuration must equal ``config`` except for runtime fields.
    ``announce``: say so when there is none to resume; ``warn``: say so when the newest is
    unreadable and the previous one is used (one process of a distributed run says these).
    """
    from .config import PretrainConfig

    if warn and ckpt_path.parent.is_dir():  # one process, holding the run's lock
        remove_debris(ckpt_path.parent)
    if not ckpt_path.exists():
        if resume and announce:
            print(f"{ckpt_path} does not exist; starting the run from scratch")
        return None
    if not resume:
        raise ValueError(f"run_dir {str(ckpt_path.parent)!r} already holds {CHECKPOINT_NAME}; pass "
                         f"resume=True (--resume) to continue it, or choose another run directory")
    state, note = read_again(ckpt_path, load_newest_checkpoint)
    check_expected(state, expect)
    if note and warn:
        print(f"{note}; the work after it is repeated", flush=True)
    diff = PretrainConfig.from_dict(state["config"]).differences(config)
    if "data_identity" in state:  # the data is compared by identity once it is built, not by its folder
        diff.pop("data_root", None)
    if diff:
        raise config_differences_error(diff, repr(str(ckpt_path)))
    return state


def check_batch_size(batch_size: int, dist_info: DistInfo) -> None:
    """Each process needs 2 images a step: an image's negatives are the other images, and BatchNorm
    needs 2 values per channel."""
    if batch_size // dist_info.world_size < 2:
        raise ValueError(f"batch_size={batch_size} gives {batch_size // dist_info.world_size} image(s) per process "
                         f"({dist_info.world_size} process(es)); contrastive training needs at least 2 (the other "
                         f"images are the negatives, and BatchNorm needs 2 values per channel)")


def init_weights(model, margs: dict, path, *, expect: dict | None = None):
    """Load the weights of checkpoint ``path`` into ``model`` (built from ``margs``); a checkpoint of
    a model built otherwise is one line naming the arguments that differ."""
    from .models import load_weights

    state = load_checkpoint(path, expect=expect)
    try:
        return load_weights(model, state)
    except CheckpointError:
        stored = state.get("model_args") or {}
        diff = {k: (stored.get(k), margs.get(k)) for k in sorted(set(stored) | set(margs))
                if stored.get(k) != margs.get(k)}
        if not diff:
            raise
        listing = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in diff.items())
        raise CheckpointError(f"init_checkpoint {str(path)!r} holds a model built with other arguments ({listing}); "
                              f"give the flags it was trained with, or another checkpoint") from None


def restore_training(state: dict, model, optimizer, scheduler, order: torch.Generator, *, rank: int = 0,
                     world: int = 1) -> tuple:
    """Load weights, optimiser, schedule and this rank's RNG states from a checkpoint; returns
    (epochs done, global step, steps done in the interrupted epoch, that epoch's loss sum so far).
    A mid-epoch checkpoint stores the data order's state at the start of its epoch, so the epoch
    is drawn again in the same order and continues after ``position`` batches."""
    from .models import load_weights

    load_weights(model, state)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    if len(rng) != world:
        raise ValueError(f"cannot resume {state['path']!r} exactly: it was written by {len(rng)} process(es), "
                         f"this run has {world}")
    restore_rng(rng[rank], order)
    return int(state["epoch"]), int(state["step"]), int(state.get("position", 0)), float(state.get("loss_sum", 0.0))


def save_training(path, dist_info: DistInfo, order: torch.Generator, *, config, model_args: dict, model, optimizer,
                  scheduler, epoch_done: int, step: int, position: int, epoch_start_state, loss_sum,
                  last_epoch_metrics, init_checkpoint=None, train_indices=None, **extra) -> None:
    """The checkpoint restore_training reads: after ``epoch_done`` epochs and ``position`` steps
    of the next (0: an epoch boundary). Every rank's RNG states are gathered and rank 0 writes;
    all ranks return together. A mid-epoch checkpoint keeps the data order's state at the start
    of its epoch (``epoch_start_state``), so that the epoch is drawn again on resume. ``extra``:
    the method's own entries."""
    rng = capture_rng(order)
    if position:
        rng["data"] = epoch_start_state
    rng_states = all_gather_object(rng, dist_info)
    if dist_info.is_main:
        save_checkpoint({
            "config": config.to_dict(), "model_args": model_args, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rng_states, "epoch": epoch_done, "step": step, "position": position,
            "loss_sum": float(loss_sum), "finished": epoch_done == config.epochs and not position,
            "train_indices": train_indices,
            "init_checkpoint": None if init_checkpoint is None else str(init_checkpoint),
            "last_epoch_metrics": last_epoch_metrics, **extra,
        }, path)
    barrier(dist_info)


# ---------------------------------------------------------------- order and schedule
def data_order(config, train_set, batch_size: int, device):
    """(generator, BatchIterator): the seeded shuffle of a run, the last partial batch dropped."""
    from ..data import BatchIterator

    order = torch.Generator()
    order.manual_seed(config.seed)
    if hasattr(train_set, "batches"):  # a streamed set (data/webdataset.py): the order seeds each epoch's draw
        return order, train_set.batches(batch_size, order, device)
    return order, BatchIterator(train_set, batch_size, shuffle=True, drop_last=True, generator=order, device=device)


def sgd_with_schedule(params, config, steps_per_epoch: int, lr: float | None = None):
    """SGD with the config's momentum and weight decay, and the per-step warm-up + cosine schedule."""
    from .schedule import warmup_cosine

    lr = config.lr if lr is None else lr
    if config.compile:  # a tensor lr: the schedule updates it in place, nothing recompiles
        lr = torch.tensor(float(lr))
    # foreach: one multi-tensor kernel per update instead of one per parameter
    optimizer = torch.optim.SGD(params, lr=lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, foreach=True)
    total = steps_per_epoch * config.epochs
    scheduler = warmup_cosine(optimizer, total, round(config.warmup_epochs_effective * steps_per_epoch))
    return optimizer, scheduler


# ---------------------------------------------------------------- monitoring
class MetricsLog:
    """metrics.jsonl (one JSON object per line) and, when tensorboard is installed, scalars."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, keep_through_step: int):
        self.path = Path(run_dir) / METRICS_NAME
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        # A resumed run drops the rows written after its checkpoint (they are written again).
        rows = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
                if isinstance(row, dict) and row.get("step", 0) <= keep_through_step:
                    rows.append(line)
        from ..files import write_text

        write_text(self.path, "".join(r + "\n" for r in rows), what="the metrics log")
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, row: dict, step: int):
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as exc:
            raise WriteError(self.path, "the metrics log", exc) from exc
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


def progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


class LossGuard:
    """Stops a run whose loss is NaN or infinite, naming the step and the checkpoint that was
    kept. ``push`` checks the previous step's loss, one step late, so that reading it never
    waits for the GPU to finish the current one; ``check`` reads the newest now."""

    def __init__(self, ckpt_path: Path, hint: str):
        self.ckpt_path, self.hint = Path(ckpt_path), hint
        self.pending = None

    def fail(self, value: float, epoch: int, step: int, global_step: int, what: str = "loss"):
        if self.ckpt_path.exists():
            kept = f"the last good checkpoint {str(self.ckpt_path)!r} was kept. {self.hint}, then --resume"
        else:
            kept = f"no checkpoint had been written yet. {self.hint}"
        raise NonFiniteLossError(f"{what} became {value} at epoch {epoch + 1}, step {step + 1} (global step "
                                 f"{global_step + 1}); the run stopped and {kept}.")

    def _read(self, item) -> float:
        value, epoch, step, global_step = item
        v = float(value)
        if not math.isfinite(v):
            self.fail(v, epoch, step, global_step)
        return v

    def push(self, loss: torch.Tensor, epoch: int, step: int, global_step: int) -> None:
        if self.pending is not None:
            self._read(self.pending)
        self.pending = (loss.detach(), epoch, step, global_step)

    def check(self) -> float:
        return self._read(self.pending) if self.pending is not None else float("nan")


def params_finite(model) -> bool:
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------- the training loop
class StepOutputsNotFinite(Exception):
    """Raised by a method's ``step`` when its loss rejected non-finite outputs; :func:`train_loop`
    reports it like a non-finite loss."""


class TrainingMethod(abc.ABC):
    """What :func:`train_loop` asks of a method (SimCLR, SDCLR, MoCLR, the DnC student).

    Attributes: ``label`` (progress bar), ``hint`` (what a NaN message suggests), ``module`` (put
    in train mode at every epoch start), ``model`` (the checkpoint's "model"; its weights must stay
    finite). The loop does the backward, optimiser and schedule steps around :meth:`step`.
    """

    label: str
    hint: str
    module: torch.nn.Module
    model: torch.nn.Module

    def epoch_start(self, epoch: int, first: int) -> float:
        """Called before epoch ``epoch`` runs from step ``first`` (> 0 on a mid-epoch resume);
        returns the seconds it worked, counted in the epoch's images_per_s."""
        return 0.0

    @abc.abstractmethod
    def step(self, batch, rows: slice) -> torch.Tensor:
        """The 0-d loss of this process's rows ``batch.images[rows]`` (forward only)."""

    def after_step(self, global_step: int) -> None:
        """Called after optimiser step ``global_step`` (0-based)."""

    @abc.abstractmethod
    def checkpoint_entries(self) -> dict:
        """save_training's ``model_args``, ``model``, ``init_checkpoint``, ``train_indices`` and
        the method's own entries."""

    def epoch_columns(self, global_step: int) -> dict:
        """The method's columns of an epoch row (after ``global_step`` steps)."""
        return {}


def seed_rank(seed: int, rank: int) -> None:
    """Per-process augmentation randomness after the model (the same on every rank) is built."""
    seed_everything(seed + 7919 * (rank + 1))  # a prime apart, so no two ranks share a stream


def train_loop(method: TrainingMethod, *, config, ex: Execution, dist_info: DistInfo, ckpt_path: Path, order,
               batches, batch_size: int, optimizer, scheduler, start: tuple, stop_at_epoch=None) -> Path:
    """Train ``method`` from ``start`` = (epochs done, global step, steps done in the next epoch,
    their loss sum) (``restore_training``'s result) to ``config.epochs`` or ``stop_at_epoch``:
    loss sum, progress bar, NaN guard, step rows every ``config.log_every`` steps, step checkpoints
    and stop signals (:class:`StepCheckpoints`), an epoch row and checkpoint per epoch. Each
    process trains on its rows of every batch (``batch_size`` / world; a stream's batches are
    already its own). Returns ``ckpt_path``."""
    start_epoch, global_step, position, partial_loss = start
    world, rank = dist_info.world_size, dist_info.rank
    per_rank = batch_size // world
    rows = slice(None) if getattr(batches, "local", False) else slice(rank * per_rank, (rank + 1) * per_rank)
    steps_per_epoch = len(batches)
    log = MetricsLog(ckpt_path.parent, dist_info.is_main, config.tensorboard, global_step)
    guard = LossGuard(ckpt_path, method.hint)
    last_epoch = config.epochs if stop_at_epoch is None else min(config.epochs, int(stop_at_epoch))
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def save(epoch_done, at, epoch_start_state, loss_sum, row):
        """Checkpoint after ``epoch_done`` epochs and ``at`` steps of the next one (0: a boundary)."""
        save_training(ckpt_path, dist_info, order, config=config, optimizer=optimizer, scheduler=scheduler,
                      epoch_done=epoch_done, step=global_step, position=at, epoch_start_state=epoch_start_state,
                      loss_sum=loss_sum, last_epoch_metrics=row, **method.checkpoint_entries())

    checkpoints = StepCheckpoints(StopCheck(dist_info, config.log_every, ex.device), config.checkpoint_every_steps,
                                  guard, save, ckpt_path, steps_per_epoch)
    try:
        for epoch in range(start_epoch, last_epoch):
            first = position if epoch == start_epoch else 0
            epoch_start_state = order.get_state()
            start_s = method.epoch_start(epoch, first)
            method.module.train()
            t_epoch = time.perf_counter()
            loss_sum = torch.full((), partial_loss if first else 0.0, device=ex.device)
            bar = progress_bar(config.progress and dist_info.is_main, steps_per_epoch,
                               f"{method.label} epoch {epoch + 1}/{config.epochs}")
            if bar is not None:
                bar.update(first)
            for step, batch in enumerate(batches.epoch(first), start=first):
                try:
                    loss = method.step(batch, rows)
                except StepOutputsNotFinite:
                    guard.fail(float("nan"), epoch, step, global_step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                scheduler.step()
                method.after_step(global_step)
                guard.push(loss, epoch, step, global_step)
                loss_sum += loss.detach()
                global_step += 1
                if (step + 1) % config.log_every == 0 or step + 1 == steps_per_epoch:
                    lval = guard.check()
                    rate = (step + 1) * batch_size / (time.perf_counter() - t_epoch)
                    lr = float(optimizer.param_groups[0]["lr"])  # a CPU tensor under --compile
                    if bar is not None:
                        bar.set_postfix(loss=f"{lval:.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.3g}")
                    log.write({"kind": "step", "epoch": epoch, "step": global_step, "loss": lval, "lr": lr,
                               "epoch_time_s": time.perf_counter() - t_epoch}, global_step)
                if bar is not None:
                    bar.update(1)
                checkpoints.after_step(epoch, step + 1, global_step, epoch_start_state, loss_sum, bar)
            if bar is not None:
                bar.close()
            guard.check()
            ex.sync()
            epoch_s = time.perf_counter() - t_epoch
            mean_loss = float(all_reduce_mean(loss_sum / steps_per_epoch, dist_info))
            if not params_finite(method.model):
                raise NonFiniteLossError(f"weights became non-finite during epoch {epoch + 1}; the run stopped "
                                         f"and the last good checkpoint {str(ckpt_path)!r} was kept")
            row = {"kind": "epoch", "epoch": epoch, "step": global_step, "loss": mean_loss,
                   "lr": float(optimizer.param_groups[0]["lr"]),
                   "images_per_s": steps_per_epoch * batch_size / (epoch_s + start_s), "epoch_s": epoch_s,
                   **method.epoch_columns(global_step)}
            log.write(row, global_step)
            save(epoch + 1, 0, None, 0.0, row)
            checkpoints.after_epoch(epoch + 1, config.epochs)
    finally:
        log.close()
    return ckpt_path
