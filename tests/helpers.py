"""Shared test helpers: a tiny separable image data set, bit-for-bit state comparison, a
port for a multi-process test's rendezvous, DnC clusters fixed by the test, the tiny data and
configs the training tests share, fake data-set files on disk, signals sent at chosen training
steps, and the Triton-interpreter / Hypothesis settings of the kernel tests.

Test modules import these from here, never from one another."""
import gzip
import os
import pickle
import random
import signal
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck

from sdclr_fast.data import ContrastiveData, ImageSet
from sdclr_fast.data import splits as S
from sdclr_fast.data.assemble import assemble
from sdclr_fast.train import PretrainConfig
from sdclr_fast.train.config import DnCConfig


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
    connecting to a local port nobody listens on can be given that port and connect to itself).

    A spawned group's workers pass a barrier before destroy_process_group: rank 0 hosts the
    store, and when it tore the group down while another rank still used it, its process now
    and then aborted at exit ("terminate called without an active exception", SIGABRT after
    its results were saved: 2 runs in 30 of test_info_nce's group, 0 in 30 with the barrier)."""
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


# ------------------------------------------------------------------ Triton kernels, Hypothesis
# Triton on CPU tensors runs only in the interpreter (conftest.py decides TRITON_INTERPRET before
# any test module is imported); on a GPU machine run the CUDA tests with TRITON_INTERPRET=0.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether Triton kernels run in the interpreter on CPU tensors in this session."""
interp = pytest.mark.skipif(not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
"""Marks a test that runs Triton kernels on CPU tensors (skipped unless TRITON_INTERPRET=1)."""
HYPOTHESIS_SETTINGS = dict(deadline=None, derandomize=True,
                           suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
"""Keyword arguments of hypothesis.settings for the loss kernels' property tests."""


# ------------------------------------------------------------------ tiny data and configs
def tiny_pretrain_data():
    """Pretraining data for the loop tests: 4 long-tailed classes (24/12/8/4) of 8x8 images,
    a balanced probe set (8 each) and test set (6 each)."""
    train = separable_images([24, 12, 8, 4], seed=1)
    probe = separable_images([8, 8, 8, 8], seed=2)
    test = separable_images([6, 6, 6, 6], seed=3)
    return ContrastiveData(name="synthetic", num_classes=4, in_channels=1, image_size=8, class_names=list("abcd"),
                           train=train, probe_train=probe, val=None, test=test,
                           class_order=torch.arange(4), mean=(0.3,), std=(0.25,), config={"seed": 0, "split": 0})


PRETRAIN_DATA = tiny_pretrain_data()
"""One shared tiny_pretrain_data() (48 training images: 3 steps of 16 per epoch)."""


def tiny_pretrain_config(method="sdclr", **kw):
    """A 2-epoch width-4 ResNet-18 run on the CPU, batch 16, for PRETRAIN_DATA; ``kw`` overrides."""
    base = dict(method=method, dataset="synthetic", arch="resnet18", width=4, proj_dim=16, epochs=2,
                batch_size=16, lr=0.1, warmup_epochs=1, seed=3, device="cpu", progress=False,
                tensorboard=False, log_every=1)
    base.update(kw)
    return PretrainConfig(**base)


def tiny_dnc_data():
    """DnC's tiny data: 4 long-tailed classes (24/16/12/8, 60 training images) of 8x8 images,
    a balanced probe set (8 each) and test set (6 each)."""
    return ContrastiveData(name="synthetic", num_classes=4, in_channels=1, image_size=8, class_names=list("abcd"),
                           train=separable_images([24, 16, 12, 8], seed=1),
                           probe_train=separable_images([8, 8, 8, 8], seed=2), val=None,
                           test=separable_images([6, 6, 6, 6], seed=3), class_order=torch.arange(4),
                           mean=(0.3,), std=(0.25,), config={"seed": 0, "split": 0})


DNC_DATA = tiny_dnc_data()
"""One shared tiny_dnc_data()."""


def tiny_dnc_config(**kw):
    """tiny_pretrain_config's run as SimCLR with batch 8 (DnC's clusters are small); ``kw`` overrides."""
    base = dict(method="simclr", dataset="synthetic", arch="resnet18", width=4, proj_dim=16, epochs=2,
                batch_size=8, lr=0.1, warmup_epochs=1, seed=3, device="cpu", progress=False,
                tensorboard=False, log_every=1)
    base.update(kw)
    return PretrainConfig(**base)


def tiny_dnc_options(**kw):
    """DnC with 2 clusters, 2 epochs per stage, torch k-means; ``kw`` overrides."""
    base = dict(k=2, base_epochs=2, expert_epochs=2, student_epochs=2, kmeans_backend="torch")
    base.update(kw)
    return DnCConfig(**base)


def tiny_study_data(config):
    """A study's data loader: a balanced pool of 4x40 8x8 images made long-tailed (ratio 10) by
    ``config``'s seed, split and pretrain_set."""
    pool = separable_images([40, 40, 40, 40], seed=1)
    test = separable_images([6, 6, 6, 6], seed=3)
    return assemble("synthetic", num_classes=4, class_names=list("abcd"), train_images=pool.images,
                    train_labels=pool.labels, test_images=test.images, test_labels=test.labels, ratio=10,
                    seed=config.seed, split=config.split, pretrain_set=config.pretrain_set)


STUDY_BASE = PretrainConfig(dataset="synthetic", arch="resnet18", width=4, proj_dim=8, epochs=1, batch_size=8,
                            lr=0.05, warmup_epochs=0, device="cpu", progress=False, tensorboard=False)
"""The base config of the study tests' cells (1 epoch, batch 8, width 4)."""


# ------------------------------------------------------------------ stop signals
def signal_at_steps(monkeypatch, steps, signum=signal.SIGTERM, during_save=False):
    """Send ``signum`` to this process inside the given (1-based) loss calls; optionally a second
    one while the resulting checkpoint is being written. Returns [loss calls, second signals]."""
    import sdclr_fast.ops.nt_xent as ntx

    real, calls = ntx.nt_xent, [0, 0]

    def loss(*a, **k):
        calls[0] += 1
        if calls[0] in steps:
            os.kill(os.getpid(), signum)
        return real(*a, **k)

    monkeypatch.setattr(ntx, "nt_xent", loss)
    if during_save:
        import sdclr_fast.train.run as run

        real_save = run.save_checkpoint

        def save(*a, **k):
            if run.stop_requested():  # a second signal while the stop's checkpoint is written
                calls[1] += 1
                os.kill(os.getpid(), signum)
            return real_save(*a, **k)

        monkeypatch.setattr(run, "save_checkpoint", save)
    return calls


# ------------------------------------------------------------------ data-set files on disk
def write_image_folder(root: Path):
    """An ImageFolder tree of 8x8 RGB PNGs under ``root``: train/class0..3 with 12/8/6/4 images,
    test/class0..3 with 3 each; class c has a bright square in its own quadrant."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, counts in (("train", [12, 8, 6, 4]), ("test", [3, 3, 3, 3])):
        for c, n in enumerate(counts):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (8, 8, 3), dtype=np.uint8)
                r, q = divmod(c, 2)
                img[r * 4:(r + 1) * 4, q * 4:(q + 1) * 4] += 150
                Image.fromarray(img).save(d / f"{i}.png")


def permuted_labels(per_class, num_classes, seed=0):
    """``per_class`` labels of each of ``num_classes`` classes in a seeded random order."""
    y = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(y)


def idx_bytes(arr: np.ndarray, magic_type=0x08) -> bytes:
    """``arr`` as an IDX file (MNIST's format): magic, dimensions, then the bytes."""
    header = bytes([0, 0, magic_type, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fmnist(folder: Path, per_class=12, test_per_class=2, gz=True):
    """Fake Fashion-MNIST IDX files (gzipped unless ``gz`` is false) of random 28x28 images,
    ``per_class`` / ``test_per_class`` per class; returns the arrays by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y = permuted_labels(per_class, 10)
    yt = permuted_labels(test_per_class, 10, 1)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (len(y), 28, 28)),
              "train-labels-idx1-ubyte": y, "t10k-images-idx3-ubyte": rng.integers(0, 256, (len(yt), 28, 28)),
              "t10k-labels-idx1-ubyte": yt}
    for name, arr in arrays.items():
        raw = idx_bytes(np.asarray(arr))
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(raw)
        else:
            (folder / name).write_bytes(raw)
    return arrays


def write_cifar_batches(root: Path, num_classes: int, per_class: int, test_per_class: int = 1, seed=0):
    """Fake CIFAR-10 / CIFAR-100 python batches (no meta file) of random images under ``root``;
    returns the training labels in file order (for official_layout)."""
    rng = np.random.default_rng(seed)
    folder = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    key = b"labels" if num_classes == 10 else b"fine_labels"
    y = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    x = rng.integers(0, 256, (len(y), 3072), dtype=np.uint8)
    yt = np.repeat(np.arange(num_classes), test_per_class)
    xt = rng.integers(0, 256, (len(yt), 3072), dtype=np.uint8)
    if num_classes == 10:
        parts = np.array_split(np.arange(len(y)), 5)
        files = {f"data_batch_{i + 1}": {b"data": x[p], key: y[p].tolist()} for i, p in enumerate(parts)}
        files["test_batch"] = {b"data": xt, key: yt.tolist()}
    else:
        files = {"train": {b"data": x, key: y.tolist()}, "test": {b"data": xt, key: yt.tolist()}}
    for name, obj in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)
    return y


def official_layout(folder: Path, y: np.ndarray, num_classes: int, splits=(1, 2), seed=0):
    """Fake index files in SDCLR's layout: trainIdxList / valIdxList (90% / 10%), and per split a
    permuted long-tailed D_i (ratio 10) of trainIdxList, D_b of its size nested with it, and S_b
    with the tail count per class inside D_i & D_b."""
    rng = np.random.default_rng(seed)
    keep, val = S.stratified_holdout(y, num_classes, int(np.bincount(y).min() * 0.1), seed)
    if num_classes == 10:
        tr, va = folder / "cifar10" / "trainIdxList.npy", folder / "cifar10" / "valIdxList.npy"
        sub = folder / "cifar10_imbSub_with_subsets"
        fmt = "split{k}_{p}.npy"
    else:
        tr = folder / "cifar100" / "cifar100_trainIdxList.npy"
        va = folder / "cifar100_split" / "cifar100_valIdxList.npy"
        sub = folder / "cifar100_imbSub_with_subsets"
        fmt = "cifar100_split{k}_{p}.npy"
    for p in (tr.parent, va.parent, sub):
        p.mkdir(parents=True, exist_ok=True)
    np.save(tr, rng.permutation(keep))
    np.save(va, rng.permutation(val))
    out = {"train": keep, "val": val, "files": {}}
    for k in splits:
        lt, _ = S.long_tail_subset(y, keep, num_classes, 10, seed, 100 + k, permute_classes=True)
        bal, _ = S.same_size_balanced(y, keep, lt, num_classes, seed, 100 + k)
        tail = int(np.bincount(y[lt], minlength=num_classes).min())
        few = S.fewshot_subset(y, np.intersect1d(lt, bal), num_classes, tail, seed, k)
        out[k] = {"D_i": lt, "D_b": bal, "S_b": few}
        for p, arr in out[k].items():
            path = sub / fmt.format(k=k, p=p)
            np.save(path, rng.permutation(arr))
            out["files"][(k, p)] = path
    out["files"]["train"], out["files"]["val"] = tr, va
    return out


def package_tree_mismatch(package_dir, kernels_dir):
    """Why ``sdclr_fast`` (imported from ``package_dir``) and ``sdclr_fast.kernels`` (from
    ``kernels_dir``) come from two source trees, or None when they are one: the kernels sit in
    the package (an installed wheel) or beside it (the repository's ``kernels/``). A clone put on
    PYTHONPATH in front of another tree's editable install gets its own ``sdclr_fast`` but the
    install's ``kernels/`` (the editable finder maps that name to a fixed path), so its tests would
    run its ops against the other tree's kernels."""
    package_dir, kernels_dir = Path(package_dir).resolve(), Path(kernels_dir).resolve()
    if kernels_dir in (package_dir / "kernels", package_dir.parent / "kernels"):
        return None
    return (f"sdclr_fast is imported from {str(package_dir)!r} but sdclr_fast.kernels from "
            f"{str(kernels_dir)!r}: two source trees (a clone on PYTHONPATH in front of another tree's "
            f"editable install?). Link the clone's kernels into its package "
            f"(ln -s ../kernels {package_dir}/kernels) or install the clone.")
