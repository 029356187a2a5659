"""Batches of in-memory uint8 images by index, without a per-image DataLoader."""
from __future__ import annotations

import numbers
import os
import signal
import threading
from typing import NamedTuple

import torch

from .base import ImageSet


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every DataLoader the package starts: the worker survives the stop
    signals that reach a whole job. Schedulers signal every process of a job (and Ctrl-C the
    whole foreground group); a worker that died of it would end the run with a traceback and no
    checkpoint, while the main process, which got the same signal, stops cleanly after its step
    and then ends its workers itself.

    SIGINT and SIGUSR1 are ignored. SIGTERM is also how the main process (DataLoader shutdown,
    multiprocessing at exit) ends a worker, so it is taken by a thread that reads the sender:
    from the parent it ends the worker, from anyone else it is ignored."""
    for s in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    parent = os.getppid()
    # blocked here, before any other thread of the worker starts, so that only the waiter takes it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_sigterm():
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait_for_sigterm, name="sigterm-from-parent", daemon=True).start()
    # iter_workers forked this worker with every stop signal blocked; SIG_IGN is in place now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1, signal.SIGINT})


def iter_workers(loader: torch.utils.data.DataLoader):
    """``iter(loader)`` with the stop signals blocked in this thread while the workers are
    forked. A worker inherits the mask, so a job-wide signal that lands before its
    ``worker_init_fn`` (:func:`ignore_stop_signals`) has run waits, pending, for the handling set
    up there, instead of killing the worker (torch's own SIGTERM handler re-raises it with the
    default action). The parent takes its pending signals once the workers exist."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class Batch(NamedTuple):
    images: torch.Tensor   # uint8 (B, C, H, W) on the target device
    labels: torch.Tensor   # int64 (B,) on the target device (never to be used by the method)
    index: torch.Tensor    # int64 (B,) positions in the iterated set (per-sample bookkeeping, DnC)


class BatchIterator:
    """Iterate over an :class:`ImageSet` in index batches.

    Each ``iter()`` is one epoch: a fresh permutation from ``generator`` when ``shuffle`` (so a
    seeded generator gives the same epoch sequence on every run), the last partial batch dropped
    when ``drop_last``. On a CUDA ``device`` the whole uint8 set is copied there once (CIFAR-LT
    is ~34 MB) and batches are gathered on the device; otherwise batches are gathered on the CPU
    and, for a CUDA target with ``preload=False``, copied through pinned memory.
    """

    def __init__(self, data: ImageSet, batch_size: int, *, shuffle: bool = True, drop_last: bool = True,
                 generator: torch.Generator | None = None, seed: int | None = None, device=None,
                 preload: bool = True):
        if not isinstance(data, ImageSet):
            raise ValueError(f"data must be an ImageSet, got {type(data).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if generator is not None and seed is not None:
            raise ValueError("give either generator or seed, not both")
        n = len(data)
        if drop_last and n < batch_size:
            raise ValueError(f"batch_size={batch_size} exceeds the {n} images with drop_last=True: "
                             f"no batch would be produced; lower batch_size")
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(0 if seed is None else int(seed))
        if generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (the permutation is drawn on the CPU)")
        self.data, self.batch_size, self.shuffle, self.drop_last = data, int(batch_size), shuffle, drop_last
        self.generator = generator
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        on_cuda = self.device.type == "cuda"
        self._images = data.images.to(self.device) if (on_cuda and preload) else data.images
        self._labels = data.labels.to(self.device) if (on_cuda and preload) else data.labels
        self._pin = on_cuda and not preload

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        return self.epoch()

    def epoch(self, start: int = 0):
        """One epoch's batches from batch ``start`` on: the permutation is drawn as for a whole
        epoch (so a resumed epoch sees the same order), the first ``start`` batches are skipped
        without being gathered."""
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or not 0 <= start <= len(self):
            raise ValueError(f"start must be an int in [0, {len(self)}], got {start!r}")
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for b in range(int(start), len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self._images.device.type == "cpu":
                # index_select is a straight row gather, much cheaper than advanced indexing on the CPU.
                x, y = self._images.index_select(0, idx), self._labels.index_select(0, idx)
                if self._pin:
                    x, y = x.pin_memory(), y.pin_memory()
                if self.device.type != "cpu":
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                yield Batch(x, y, idx.to(self.device))
            else:
                didx = idx.to(self.device, non_blocking=True)
                yield Batch(self._images.index_select(0, didx), self._labels.index_select(0, didx), didx)
