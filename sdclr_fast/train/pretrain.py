"""SimCLR / SDCLR / MoCLR pretraining: each method's step (a ``run.TrainingMethod``), run by
``run.train_loop``.

SDCLR step: view 1 through the dense branch, view 2 through the pruned branch (the masks are
recomputed from the current dense weights at the start of every epoch with the fast top-k
pruning op), loss = NT-Xent(z_dense(v1), z_pruned(v2)), one backward. The official code runs
three forwards and two backwards per step as a DDP workaround; the gradient of the joint loss
is the same, so two forwards and one backward suffice. Both branches run inside one module call
(:class:`ContrastiveForward`), so DDP sees exactly one forward per backward.

SimCLR step: both views through the dense network in one forward of the concatenated batch.

MoCLR step (:mod:`sdclr_fast.train.moclr`): both views through the online network and its
predictor in one forward, and through the EMA target network under ``no_grad``; loss =
(InfoNCE(q(v1), z_t(v2)) + InfoNCE(q(v2), z_t(v1))) / 2; after each optimiser step the target
moves towards the online weights. The target is checkpointed with the model.

Everything a run needs to continue after a kill is checkpointed atomically at the end of every
epoch (model with masks and dual-BN statistics, optimiser, scheduler, all RNG states including
the data-order generator); a resumed CPU run ends with weights bit-identical to an
uninterrupted one. On CUDA they agree only to rounding: cuDNN's autotuner (enabled, the shapes
are fixed) may pick other convolution algorithms in another process, and several backward
kernels accumulate with atomics (the RNG states, CUDA's included, are restored). Under DDP every
process's RNG states are saved, so a resume needs the same number of processes.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import CHECKPOINT_NAME
from .config import PretrainConfig
from .distributed import barrier, init_distributed, shutdown, wrap_ddp
from .models import build_model_from_args, convert_sync_batchnorm, model_args
from .moclr import make_target, moclr_loss, momentum_at, update_target
from .run import (Execution, StepOutputsNotFinite, TrainingMethod, check_batch_size, check_data_identity,
                  data_identity, data_order, init_weights, open_checkpoint, resolve_device, restore_training, run_data,
                  run_lock, seed_everything, seed_rank, sgd_with_schedule, stop_signals, train_loop, two_view_augment,
                  write_run_files)


class ContrastiveForward(nn.Module):
    """Both views of one step in a single forward call, returning (z1, z2); for MoCLR (``target``
    given) (online predictions p1, p2, target projections t1, t2)."""

    def __init__(self, model: nn.Module, method: str, target: nn.Module | None = None):
        super().__init__()
        if (method == "moclr") != (target is not None):
            raise ValueError(f"target must be given for method 'moclr' and only for it (method={method!r})")
        self.model = model
        self.method = method
        self.target = target

    def forward(self, v1, v2):
        if self.method == "sdclr":
            return self.model(v1, branch="dense"), self.model(v2, branch="pruned")
        if self.method == "moclr":
            b = v1.shape[0]
            p = self.model.predictor(self.model(torch.cat([v1, v2]), branch="dense"))
            with torch.no_grad():
                t = self.target(torch.cat([v1, v2]), branch="dense")
            return p[:b], p[b:], t[:b], t[b:]
        # SimCLR: one forward over the 2B batch, so BN normalises both views together.
        z = self.model(torch.cat([v1, v2]), branch="dense")
        return z[: v1.shape[0]], z[v1.shape[0]:]


def compile_step(step_module, config, ex, distributed):
    """torch.compile of the step in mode ``config.compile``. Single process, SimCLR / SDCLR:
    both forwards and the NT-Xent loss in one fullgraph function (AOTAutograd compiles its
    backward with it), the temperature a device tensor; masks (buffers updated in place at
    epoch starts) and the tensor learning rate change no guard, so nothing recompiles. Under
    "reduce-overhead" the step replays as a CUDA graph and the returned loss is cloned (the
    next replay overwrites the graph's output). Otherwise (DDP, MoCLR) the forward module
    alone is compiled. Returns (step_module, loss_fn or None)."""
    mode = config.compile
    if distributed or config.method == "moclr":
        return torch.compile(step_module, mode=mode), None
    from ..ops.nt_xent import nt_xent

    tau = torch.tensor(float(config.temperature), device=ex.device)

    def step_loss(v1, v2):
        with ex.autocast():
            z1, z2 = step_module(v1, v2)
        # no value checks in the graph; LossGuard catches a non-finite loss one step late
        return nt_xent(z1.float(), z2.float(), tau, check_finite=False)

    compiled = torch.compile(step_loss, mode=mode, fullgraph=True)
    if mode != "reduce-overhead":
        return step_module, compiled

    def graphed(v1, v2):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(v1, v2).clone()

    return step_module, graphed


def pretrain(config: PretrainConfig, *, run_dir, indices=None, init_checkpoint=None, data=None,
             resume: bool = False, stop_at_epoch: int | None = None) -> Path:
    """Pretrain with SimCLR, SDCLR or MoCLR and return the path of the final checkpoint.

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

    The run holds ``run_dir``'s lock while it runs. On SIGTERM / SIGUSR1 it finishes the current
    step, writes a resumable mid-epoch checkpoint and raises :class:`Preempted`.
    """
    if not isinstance(config, PretrainConfig):
        raise ValueError(f"config must be a PretrainConfig, got {type(config).__name__}")
    config.validate()
    if stop_at_epoch is not None and (isinstance(stop_at_epoch, bool) or not isinstance(stop_at_epoch, int)
                                      or stop_at_epoch < 1):
        raise ValueError(f"stop_at_epoch must be a positive int or None, got {stop_at_epoch!r}")
    dist_info = init_distributed(resolve_device(config.device).type)
    try:
        check_batch_size(config.batch_size, dist_info)  # before the run directory is made
        with run_lock(run_dir, dist_info), stop_signals():
            return _pretrain(config, Path(run_dir), indices, init_checkpoint, data, resume, stop_at_epoch,
                             dist_info)
    finally:
        shutdown(dist_info)


class SimCLR(TrainingMethod):
    """Both views through the dense network; NT-Xent (the compiled step's loss under --compile)."""

    hint = "Lower --lr or disable --amp"

    def __init__(self, config, ex, dist_info, base, step_module, compiled_loss, augment, entries):
        self.config, self.ex, self.gather = config, ex, dist_info.gather
        self.label, self.model, self.module = config.method, base, step_module
        self.compiled_loss, self.augment, self.entries = compiled_loss, augment, entries

    def loss(self, out):
        from ..ops.nt_xent import nt_xent

        return nt_xent(out[0].float(), out[1].float(), self.config.temperature, gather_distributed=self.gather)

    def step(self, batch, rows):
        ex = self.ex
        with torch.no_grad():
            v1, v2 = self.augment(batch.images[rows])
        if self.compiled_loss is not None:
            return self.compiled_loss(ex.images(v1), ex.images(v2))
        with ex.autocast():
            out = self.module(ex.images(v1), ex.images(v2))
        try:
            return self.loss(out)
        except ValueError:
            # the losses reject non-finite embeddings; report it like a non-finite loss.
            if all(bool(torch.isfinite(o).all()) for o in out):
                raise
            raise StepOutputsNotFinite() from None

    def checkpoint_entries(self):
        return dict(self.entries, model=self.model)

    def epoch_columns(self, global_step):
        return {"prune_s": 0.0}


class SDCLR(SimCLR):
    """SimCLR's step with view 2 through the pruned branch, whose masks are recomputed from the
    dense weights at every epoch start (mid-epoch after a resume, the checkpoint's masks hold)."""

    def epoch_start(self, epoch, first):
        self.kept, self.prune_s = None, 0.0
        if first == 0:
            c = self.config
            self.ex.sync()
            t0 = time.perf_counter()
            self.kept = float(self.model.update_masks(sparsity=c.sparsity, scope=c.prune_scope, block=c.prune_block,
                                                      random_fraction=c.random_prune))
            self.ex.sync()
            self.prune_s = time.perf_counter() - t0
        return self.prune_s

    def epoch_columns(self, global_step):
        return {"prune_s": self.prune_s, **({} if self.kept is None else {"kept_fraction": self.kept})}


class MoCLR(SimCLR):
    """Online predictions against the EMA target's projections; the target moves after every step."""

    def __init__(self, *args, target, total_steps):
        super().__init__(*args)
        self.target, self.total_steps = target, total_steps

    def loss(self, out):
        return moclr_loss(*out, self.config.temperature, gather_distributed=self.gather)

    def momentum(self, step):
        return momentum_at(step, self.total_steps, self.config.moclr_momentum)

    def after_step(self, global_step):
        update_target(self.target, self.model, self.momentum(global_step))

    def checkpoint_entries(self):
        return dict(super().checkpoint_entries(), moclr_target=self.target.state_dict())

    def epoch_columns(self, global_step):
        return {"prune_s": 0.0, "target_momentum": self.momentum(global_step - 1)}


def _pretrain(config, run_dir, indices, init_checkpoint, data, resume, stop_at_epoch, dist_info):
    ex = Execution.of(config, dist_info).setup_process(config)
    device = ex.device
    ckpt_path = run_dir / CHECKPOINT_NAME
    resumed = open_checkpoint(ckpt_path, config, resume=resume, announce=dist_info.is_main, warn=dist_info.is_main,
                              expect={"method": config.method, "arch": config.arch})
    if resumed is not None and resumed.get("finished"):
        if dist_info.is_main:
            print(f"{ckpt_path}: run already finished ({resumed['epoch']}/{config.epochs} epochs); nothing to do")
        return ckpt_path

    # ---- data
    data = run_data(config, run_dir, data)
    train_set = data.train if indices is None else data.subset(indices)
    index_list = None if indices is None else train_set.indices.tolist()
    identity = data_identity(data)
    if resumed is not None:
        check_data_identity(resumed, identity)
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
        write_run_files(run_dir, data, config)
    barrier(dist_info)

    # ---- model (same initial weights on every rank), then per-rank augmentation randomness
    seed_everything(config.seed)
    margs = model_args(config, data.in_channels, config.image_size or data.image_size)
    model = build_model_from_args(margs)
    if init_checkpoint is not None and resumed is None:
        init_weights(model, margs, init_checkpoint, expect={"arch": config.arch})
    ex.place(model)
    order, batches = data_order(config, train_set, config.batch_size, device)
    if getattr(batches, "local", False):  # a stream gives each rank its own share
        batches.for_rank(rank, world)
    steps_per_epoch = len(batches)
    optimizer, scheduler = sgd_with_schedule(model.parameters(), config, steps_per_epoch)

    augment = two_view_augment(config, data, device)
    seed_rank(config.seed, rank)
    start = (0, 0, 0, 0.0)
    if resumed is not None:
        start = restore_training(resumed, model, optimizer, scheduler, order, rank=rank, world=world)
        if dist_info.is_main:
            where = f"step {start[2]}/{steps_per_epoch} of epoch {start[0] + 1}" if start[2] else \
                f"epoch {start[0]}/{config.epochs}"
            print(f"resuming {ckpt_path} after {where}")

    base = model
    synced_bn = dist_info.enabled and config.sync_bn and device.type == "cuda"
    if dist_info.enabled and config.sync_bn:
        if synced_bn:
            # Both BN children of every dual BN are converted; parameters and buffers are kept.
            base = model = convert_sync_batchnorm(model)
        elif dist_info.is_main:
            print("note: SyncBatchNorm needs CUDA; BN statistics stay per process on this CPU run")
    target = None
    if config.method == "moclr":
        target = make_target(base)  # after the SyncBN conversion, so the target uses it too
        if resumed is not None:
            target.load_state_dict(resumed["moclr_target"])
    step_module: nn.Module = ContrastiveForward(base, config.method, target)
    if dist_info.enabled:
        # Every rank derives the same masks from the same weights, and SyncBN keeps the running
        # statistics equal, so re-broadcasting the buffers (~11 MB of masks for ResNet-18) each
        # step is only needed when BN statistics are per process.
        step_module = wrap_ddp(step_module, dist_info, device, sync_buffers=not synced_bn)
    compiled_loss = None
    if config.compile:
        step_module, compiled_loss = compile_step(step_module, config, ex, dist_info.enabled)

    entries = dict(model_args=margs, init_checkpoint=init_checkpoint, train_indices=index_list,
                   data_identity=identity)
    args = (config, ex, dist_info, base, step_module, compiled_loss, augment, entries)
    if config.method == "moclr":
        method = MoCLR(*args, target=target, total_steps=steps_per_epoch * config.epochs)
    else:
        method = (SDCLR if config.method == "sdclr" else SimCLR)(*args)
    return train_loop(method, config=config, ex=ex, dist_info=dist_info, ckpt_path=ckpt_path, order=order,
                      batches=batches, batch_size=config.batch_size, optimizer=optimizer, scheduler=scheduler,
                      start=start, stop_at_epoch=stop_at_epoch)
