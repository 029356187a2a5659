"""What every run shares: execution settings, the run's data and files, the resume check, the
data order and schedule, the metrics log, the progress bar, the NaN guard and the restore of a
checkpoint. Used by SimCLR / SDCLR pretraining, every DnC stage and evaluation; the training
steps themselves stay inline in their loops."""
from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import write_json
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, restore_rng
from .distributed import DistInfo

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
SPLIT_NAME = "split.json"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


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
    of ``run_dir/split.json`` when the run directory holds one."""
    if data is not None:
        return data
    from ..data import build_dataset

    run_dir = Path(run_dir)
    split_file = run_dir if (run_dir / SPLIT_NAME).exists() else None
    return build_dataset(config.dataset, config.data_root, ratio=config.ratio, seed=config.seed,
                         split=config.split, image_size=config.image_size, split_file=split_file)


def write_run_files(run_dir, data, config=None) -> None:
    """split.json (once: a run keeps its first split) and config.json in ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / SPLIT_NAME).exists():
        data.save_split(run_dir)
    if config is not None:
        write_json(run_dir / CONFIG_NAME, config.to_dict(), what="the run configuration", indent=2)


# ---------------------------------------------------------------- resume
def config_differences_error(diff: dict, what: str) -> ValueError:
    """The one message for a resume whose configuration differs from the stored one."""
    listing = ", ".join(f"{k}: stored {a!r}, given {b!r}" for k, (a, b) in diff.items())
    return ValueError(f"cannot resume {what} with a different configuration ({listing})")


def open_checkpoint(ckpt_path: Path, config, *, resume: bool, expect: dict | None = None,
                    announce: bool = True) -> dict | None:
    """The checkpoint a run continues from, or None for a fresh start.

    An existing checkpoint without ``resume`` is an error (a run is never overwritten); with
    ``resume`` its stored configuration must equal ``config`` except for runtime fields.
    """
    from .config import PretrainConfig

    if not ckpt_path.exists():
        if resume and announce:
            print(f"{ckpt_path} does not exist; starting the run from scratch")
        return None
    if not resume:
        raise ValueError(f"run_dir {str(ckpt_path.parent)!r} already holds {CHECKPOINT_NAME}; pass "
                         f"resume=True (--resume) to continue it, or choose another run directory")
    state = load_checkpoint(ckpt_path, expect=expect)
    diff = PretrainConfig.from_dict(state["config"]).differences(config)
    if diff:
        raise config_differences_error(diff, repr(str(ckpt_path)))
    return state


def restore_training(state: dict, model, optimizer, scheduler, order: torch.Generator, *, rank: int = 0,
                     world: int = 1) -> tuple:
    """Load weights, optimiser, schedule and this rank's RNG states from a checkpoint; returns
    (epochs done, global step)."""
    from .models import load_weights

    load_weights(model, state)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    if len(rng) != world:
        raise ValueError(f"cannot resume {state['path']!r} exactly: it was written by {len(rng)} process(es), "
                         f"this run has {world}")
    restore_rng(rng[rank], order)
    return int(state["epoch"]), int(state["step"])


# ---------------------------------------------------------------- order and schedule
def data_order(config, train_set, batch_size: int, device):
    """(generator, BatchIterator): the seeded shuffle of a run, the last partial batch dropped."""
    from ..data import BatchIterator

    order = torch.Generator()
    order.manual_seed(config.seed)
    return order, BatchIterator(train_set, batch_size, shuffle=True, drop_last=True, generator=order, device=device)


def sgd_with_schedule(params, config, steps_per_epoch: int, lr: float | None = None):
    """SGD with the config's momentum and weight decay, and the per-step warm-up + cosine schedule."""
    from .schedule import warmup_cosine

    optimizer = torch.optim.SGD(params, lr=config.lr if lr is None else lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    total = steps_per_epoch * config.epochs
    scheduler = warmup_cosine(optimizer, total, round(config.warmup_epochs_effective * steps_per_epoch))
    return optimizer, scheduler


# ---------------------------------------------------------------- monitoring
class MetricsLog:
    """metrics.jsonl (one JSON object per line) and, when tensorboard is installed, scalars."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, keep_before_epoch: int):
        self.path = Path(run_dir) / METRICS_NAME
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
