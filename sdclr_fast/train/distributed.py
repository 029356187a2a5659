"""torchrun / DDP plumbing: process-group set-up from the environment and small collectives."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False  # this code created the process group (and must destroy it)
    group: object = None            # the process group (None: the default one); rank / world_size are in it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def gather(self):
        """The losses' ``gather_distributed``: the group when it is a sub-group, else whether DDP runs."""
        return self.group if self.group is not None else self.enabled


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT) when WORLD_SIZE > 1; NCCL on CUDA, Gloo on CPU. A group that already
    exists (e.g. created by the caller) is reused."""
    if _active["group"] is not None:
        return _active["group"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        created = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    initialized_here=created)


_active = {"group": None}


@contextlib.contextmanager
def within_group(info: DistInfo):
    """While active, :func:`init_distributed` returns ``info`` (a sub-group of the ranks, or a
    single process: ``DistInfo()``), so that a run started inside trains on that group only
    (DnC's ``parallel_experts``: one expert per group of ranks)."""
    previous, _active["group"] = _active["group"], info
    try:
        yield info
    finally:
        _active["group"] = previous


def new_groups(info: DistInfo, n: int) -> list:
    """Split the ranks into ``n`` consecutive groups of ``world_size // n`` (every rank must call
    this, in the same order: torch.distributed.new_group is collective). Returns this rank's
    (group index, DistInfo in that group)."""
    size = info.world_size // n
    mine = None
    for g in range(n):
        ranks = list(range(g * size, (g + 1) * size))
        pg = dist.new_group(ranks) if size > 1 else None
        if info.rank in ranks:
            sub = DistInfo(rank=ranks.index(info.rank), world_size=size, local_rank=info.local_rank, group=pg) \
                if size > 1 else DistInfo(local_rank=info.local_rank)
            mine = (g, sub)
    return mine


def wrap_ddp(module, info: DistInfo, device, *, sync_buffers: bool, find_unused_parameters: bool = False):
    """DistributedDataParallel on ``info``'s group; ``sync_buffers``: rank 0's buffers are sent to
    the other ranks before every forward (``forward_sync_buffers`` from torch 2.13 on, where
    ``broadcast_buffers`` is deprecated; ``broadcast_buffers`` before)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
            else "broadcast_buffers")
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, process_group=info.group,
               find_unused_parameters=find_unused_parameters, **{name: sync_buffers})


def shutdown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier(group=info.group)


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.group)
    return out


def gather_object(obj, info: DistInfo):
    """Every rank's ``obj`` as a list on rank 0 (None on the other ranks)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dst = 0 if info.group is None else dist.get_global_rank(info.group, 0)
    dist.gather_object(obj, out, dst=dst, group=info.group)
    return out


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    src = 0 if info.group is None else dist.get_global_rank(info.group, 0)
    dist.broadcast_object_list(box, src=src, group=info.group)
    return box[0]


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t, group=info.group)
    return t / info.world_size
