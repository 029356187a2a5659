"""Shared test helpers: a tiny separable image data set, bit-for-bit state comparison, a
port for a multi-process test's rendezvous, and DnC clusters fixed by the test."""
import os
import random
import socket
import time
from pathlib import Path

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


def fix_clusters(dnc_module, assignments, save_real_to=None):
    """Make DnC's clustering give ``assignments`` (a list of cluster ids, one per training image)
    whatever k-means finds on this CPU: cluster sizes decide how many steps an expert takes and
    whether it trains at all, and k-means' outcome moves with the floating-point path (ISA,
    thread count). The real stage still runs (embedding, k-means, the record's other fields);
    with ``save_real_to`` its record is also written there as JSON (rank 0), so a test can check
    the clustering itself. Patches ``dnc_module.cluster_stage`` for the rest of the process."""
    import json

    from sdclr_fast.train.clustering import cluster_purity

    real = dnc_module.cluster_stage

    def stage(model, data, opt, **kw):
        rec = real(model, data, opt, **kw)
        if rec is None:  # not rank 0
            return None
        if save_real_to is not None:
            Path(save_real_to).write_text(json.dumps(rec))
        a = torch.as_tensor(assignments, dtype=torch.long)
        assert a.shape == (len(data.train),) and int(a.max()) < opt.k
        counts = torch.zeros(opt.k, int(data.num_classes), dtype=torch.long)
        counts.index_put_((a, data.train.labels), torch.ones_like(a), accumulate=True)
        rec = dict(rec, assignments=a.tolist(), sizes=torch.bincount(a, minlength=opt.k).tolist(),
                   class_counts=counts.tolist())
        rec["purity"], rec["overall_purity"] = cluster_purity(counts.tolist())
        return rec

    dnc_module.cluster_stage = stage
    return stage
