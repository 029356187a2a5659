"""Shared test helpers: a tiny separable image data set, bit-for-bit state comparison and a
port for a multi-process test's rendezvous."""
import os
import random
import socket
import time

import torch

from sdclr_fast.data import ImageSet


def separable_images(counts, seed, size=8):
    """Class c: a bright square in a class-specific quadrant on noise; counts[c] images of it."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c, n in enumerate(counts):
        x = torch.randint(0, 60, (n, 1, size, size), generator=g)
        r, q = divmod(c, 2)
        h = size // 2
        x[:, :, r * h:(r + 1) * h, q * h:(q + 1) * h] += 150
        xs.append(x.clamp(0, 255).to(torch.uint8))
        ys.append(torch.full((n,), c, dtype=torch.int64))
    x, y = torch.cat(xs), torch.cat(ys)
    return ImageSet(x, y, torch.arange(len(y)))


def assert_same_state(a, b, where=""):
    """Recursive bit-for-bit equality of checkpoint-like nests of tensors, dicts and lists;
    `where` names the first differing entry."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def free_port():
    """A free port for a spawned group's rendezvous store, outside the kernel's ephemeral range.
    A port that bind(("", 0)) hands out is in that range, where it can be taken again before
    rank 0's store binds it: by any new connection, even rank 1's own retries (a socket
    connecting to a local port nobody listens on can be given that port and connect to itself)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        port = rng.randrange(min(10000, low // 2), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port below the ephemeral range (which starts at {low})")
