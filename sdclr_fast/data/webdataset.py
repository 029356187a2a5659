"""Streamed, sharded training data in the WebDataset format (POSIX tar files of samples), for
uncurated sets too large to hold in memory.

A shard holds samples ``<key>.png`` (or ``.jpg``) and, when labelled, ``<key>.cls``; ``sdclr-fast
shards`` writes them from an image folder or the CIFAR / Fashion-MNIST loaders, with a manifest
``shards.json`` (shard names, sample counts and SHA-256 checksums, all keys in order, image size,
channel statistics, class names). Shards from elsewhere work without a manifest: their tar
headers are read once to count and list the samples. Every shard is checked against that index
as it streams (its sample count, and its checksum where the manifest has one): a cut, short or
altered shard stops the run with a :class:`ShardError` naming it instead of silently training
on fewer images.

Reading (:class:`ShardStream`): each epoch, the shard order is shuffled with a seed drawn from the
run's data-order generator (so a checkpoint's data state at the epoch start redraws the same
epoch); rank r reads the shards r, r + W, ... of that order, its DataLoader worker w the w-th,
(w + n)-th ... of those; decoding (PIL) runs in the workers; samples pass a seeded shuffle buffer
and are batched per rank (``batch_size / W`` images each, uint8 on the device: augmentation stays
on the device). A rank's shards are read again (reshuffled) when they run out, so every rank
gives exactly ``len(stream)`` batches an epoch. A resumed epoch is drawn again and its first
``position`` batches are read and dropped: deterministic for a fixed ``num_workers`` and
shuffle buffer (both part of the data's definition here).

Only the keys of :class:`StreamSet` are kept: a ``train_list`` (one key per line) gives a subset
such as a long-tailed draw, and a DnC expert keeps the keys of its cluster.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import read_json, write_json
from .loader import Batch, ignore_stop_signals, iter_workers

MANIFEST = "shards.json"  # format 1; a shard entry may carry "sha256" (written since the shard checks)
MANIFEST_FORMAT = 1
STREAM_FILE = "stream.json"
IMAGE_EXTS = ("png", "jpg", "jpeg")


# ---------------------------------------------------------------- writing
def _png(img: torch.Tensor) -> bytes:
    from PIL import Image

    arr = img.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, mode="L" if arr.shape[2] == 1 else "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def sample_key(index: int) -> str:
    """The key of the image at source index ``index`` (zero-padded, so keys sort like indices)."""
    return f"{int(index):09d}"


def write_shards(images, out_dir, *, prefix: str = "train", shard_size: int = 1000, mean=None, std=None,
                 class_names=None) -> Path:
    """Write an :class:`ImageSet` as ``out_dir/<prefix>-000000.tar ...`` (lossless PNG, key = the
    image's source index, ``.cls`` = its label) and the manifest ``out_dir/shards.json``;
    returns the manifest path."""
    import webdataset as wds

    from .base import channel_stats

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mean is None or std is None:
        mean, std = channel_stats(images.images)
    counts, keys = [], []
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i in range(len(images)):
            key = sample_key(images.indices[i])
            sink.write({"__key__": key, "png": _png(images.images[i]), "cls": int(images.labels[i])})
            keys.append(key)
            if i % shard_size == 0:
                counts.append(0)
            counts[-1] += 1
    n = len(counts)
    manifest = {
        "format": MANIFEST_FORMAT, "pattern": f"{prefix}-{{000000..{n - 1:06d}}}.tar",
        "shards": [{"url": f"{prefix}-{j:06d}.tar", "count": c, "sha256": _sha256(out / f"{prefix}-{j:06d}.tar")}
                   for j, c in enumerate(counts)],
        "count": len(keys), "keys": keys, "in_channels": int(images.images.shape[1]),
        "image_size": int(images.images.shape[-1]), "mean": list(mean), "std": list(std),
        "class_names": None if class_names is None else [str(c) for c in class_names],
    }
    return write_json(out / MANIFEST, manifest, what="the shards manifest", indent=None)


# ---------------------------------------------------------------- the set
def expand_urls(pattern: str) -> list:
    """Shard paths of a brace pattern such as ``shards/train-{000000..000127}.tar`` (or a folder
    holding ``shards.json``, or one tar file)."""
    from braceexpand import braceexpand

    p = Path(pattern)
    if p.is_dir():
        man = _read_manifest(p / MANIFEST)
        return [str(p / s["url"]) for s in man["shards"]]
    urls = list(braceexpand(str(pattern)))
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ValueError(f"--data-root {pattern!r}: {len(missing)} shard(s) not found, e.g. {missing[0]!r}")
    return urls


def _read_manifest(path: Path) -> dict:
    return read_json(path, what="shards manifest", formats=(MANIFEST_FORMAT,))


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ShardError(ValueError):
    """A shard is unreadable, or holds other samples than the index (shards.json or the scan at
    start-up) says: one line naming the shard."""


def _members(url):
    """(name, TarInfo, TarFile) of the files of a shard, as a random-access read; a damaged tar is a ShardError."""
    try:
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    yield m.name, m, tar
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardError(f"shard {str(url)!r} is damaged or truncated ({exc})") from None


def _scan(urls) -> tuple:
    """(keys of the samples in ``urls``, {url: number of samples}) from their tar headers (no
    image is decoded)."""
    keys, counts = [], {}
    for u in urls:
        seen = []
        for name, _, _ in _members(u):
            base, ext = _split_name(name)
            if ext.lower() in IMAGE_EXTS and (not seen or seen[-1] != base):
                seen.append(base)
        keys += seen
        counts[u] = len(seen)
    return keys, counts


_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key = the path up to the first dot of the file name


def _split_name(name: str) -> tuple:
    m = _NAME.match(name)
    return (m.group(1), m.group(2)) if m else (name, "")


class _Hashing:
    """A read-only file that hashes every byte read through it."""

    def __init__(self, raw, digest):
        self.raw, self.digest = raw, digest

    def read(self, n=-1):
        data = self.raw.read(n)
        self.digest.update(data)
        return data

    def finish(self) -> str:
        for chunk in iter(lambda: self.read(1 << 20), b""):
            pass
        return self.digest.hexdigest()


def _shard_samples(url, check: dict | None):
    """The samples of one shard in file order (``{"__key__": key, ext: bytes}``, as webdataset
    groups them), checked while they stream against ``check`` ({"count", "sha256"} from the
    index): a cut or damaged tar, fewer or more samples, or other bytes stop with a
    :class:`ShardError` naming the shard. The count is checked when the shard ends, so the
    samples before the damage have been used."""
    count, sample = 0, None
    try:
        with open(url, "rb") as raw:
            f = _Hashing(raw, hashlib.sha256())
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for m in tar:
                    if not m.isfile() or m.name.split("/")[-1].startswith("__"):
                        continue
                    key, ext = _split_name(m.name)
                    data = tar.extractfile(m).read()
                    if sample is not None and sample["__key__"] != key:
                        count += 1
                        yield sample
                        sample = None
                    if sample is None:
                        sample = {"__key__": key, "__url__": str(url)}
                    sample[ext.lower()] = data
            if sample is not None:
                count += 1
                yield sample
            digest = f.finish()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardError(f"shard {str(url)!r} is damaged or truncated after {count} sample(s) ({exc}); "
                         f"write it again (sdclr-fast shards) or restore it") from None
    if check is None:
        return
    if count != check["count"]:
        raise ShardError(f"shard {str(url)!r} holds {count} samples, the index says {check['count']}: it was "
                         f"truncated or replaced; write it again (sdclr-fast shards) or restore it")
    if check.get("sha256") and digest != check["sha256"]:
        raise ShardError(f"shard {str(url)!r} does not match its checksum in {MANIFEST} (sha256 {digest[:12]}..., "
                         f"expected {check['sha256'][:12]}...): it was damaged or replaced")


def _samples(urls, checks: dict):
    for u in urls:
        yield from _shard_samples(u, checks.get(u))


@dataclass(eq=False)
class StreamSet:
    """The training samples of a stream: its shards and the keys kept (positions into ``keys``,
    the order of the manifest). ``subset(positions)`` keeps fewer (a DnC cluster)."""

    urls: list
    keys: list                   # every sample key of the shards, manifest order
    kept: torch.Tensor           # int64 positions into ``keys`` that are trained on
    labels_by_key: dict = field(default_factory=dict)
    reader: dict = field(default_factory=dict)  # image_size, channels, num_workers, shuffle_buffer

    def __len__(self) -> int:
        return int(self.kept.numel())

    def __repr__(self) -> str:
        return f"StreamSet({len(self)} of {len(self.keys)} samples in {len(self.urls)} shards)"

    @property
    def indices(self) -> torch.Tensor:
        return self.kept

    def subset(self, positions) -> "StreamSet":
        from .base import as_index_tensor

        pos = as_index_tensor(positions, len(self), "positions")
        return StreamSet(self.urls, self.keys, self.kept.index_select(0, pos), self.labels_by_key, self.reader)

    def batches(self, batch_size: int, generator: torch.Generator, device=None) -> "ShardStream":
        return ShardStream(self, batch_size, generator=generator, device=device, **self.reader)

    @property
    def labels(self) -> torch.Tensor:
        """Labels of the kept samples (-1 where a sample has none: uncurated data); reports only."""
        return torch.tensor([self.labels_by_key.get(self.keys[int(p)], -1) for p in self.kept.tolist()],
                            dtype=torch.int64)

    def kept_keys(self) -> list:
        return [self.keys[int(p)] for p in self.kept.tolist()]

    def ordered_batches(self, batch_size: int, rank: int = 0, world: int = 1):
        """One pass, unshuffled, over this rank's shards (``urls[rank::world]``) for embedding:
        (uint8 images, int64 positions into the set) batches; the ranks together cover every
        kept sample once."""
        keep = {self.keys[int(p)]: i for i, p in enumerate(self.kept.tolist())}
        samples = _OrderedSamples(self.urls[rank::world], keep, self.reader["image_size"], self.reader["channels"],
                                  self.reader.get("checks", {}))
        workers = min(self.reader.get("num_workers", 0), len(self.urls[rank::world]))
        with _shard_errors():
            yield from iter_workers(torch.utils.data.DataLoader(samples, batch_size=batch_size, num_workers=workers,
                                                                worker_init_fn=ignore_stop_signals))


# ---------------------------------------------------------------- reading
def _decode(sample, image_size: int, channels: int) -> torch.Tensor:
    """uint8 (C, H, W) of a sample's image, resized (shorter side, centre crop) when needed."""
    from PIL import Image, ImageOps

    data = next(sample[e] for e in IMAGE_EXTS if e in sample)
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (image_size, image_size):
            img = ImageOps.fit(img, (image_size,) * 2, method=getattr(Image, "Resampling", Image).BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


class _OrderedSamples(torch.utils.data.IterableDataset):
    """The kept samples of ``urls`` once, in file order; DataLoader worker w reads urls w, w + n, ..."""

    def __init__(self, urls, keep: dict, image_size: int, channels: int, checks: dict):
        super().__init__()
        self.urls, self.keep, self.image_size, self.channels, self.checks = urls, keep, image_size, channels, checks

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for s in _samples(self.urls[wid::workers], self.checks):
            if s["__key__"] in self.keep:
                yield _decode(s, self.image_size, self.channels), self.keep[s["__key__"]]


class _EpochSamples(torch.utils.data.IterableDataset):
    """One rank's samples of one epoch, endless (its shards again, reshuffled, when they run out);
    each DataLoader worker reads its own share of the rank's shards."""

    def __init__(self, urls, keep: dict, seed: int, rank: int, world: int, buffer: int, image_size: int,
                 channels: int, checks: dict):
        super().__init__()
        self.urls, self.keep, self.seed, self.rank, self.world = urls, keep, seed, rank, world
        self.buffer, self.image_size, self.channels, self.checks = buffer, image_size, channels, checks

    def __iter__(self):
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = list(self.urls)
        random.Random(self.seed).shuffle(order)  # the same on every rank
        # reader (rank r, worker w) reads the shards r + W w, r + W w + W n, ...: ranks get disjoint
        # shards when there are at least W shards, workers when there are W n
        reader, readers = self.rank + self.world * wid, self.world * workers
        mine = order[reader::readers] or [order[reader % len(order)]]
        rng = random.Random(f"{self.seed}/{self.rank}/{wid}")
        keep = self.keep
        for _ in iter(int, 1):  # endless
            rng.shuffle(mine)
            pipe = wds.DataPipeline(lambda: _samples(list(mine), self.checks),
                                    wds.select(lambda s: s["__key__"] in keep),
                                    wds.shuffle(self.buffer, initial=self.buffer, rng=rng))
            got = False
            for s in pipe:
                got = True
                yield _decode(s, self.image_size, self.channels), keep[s["__key__"]]
            if not got:
                if len(mine) == len(order):
                    return  # no shard holds a kept sample
                # none of this reader's shards holds a kept sample (a small DnC cluster): read them all
                mine = list(order)


class ShardStream:
    """Batches of a :class:`StreamSet`, the stream's counterpart of ``BatchIterator``: ``len()``
    batches an epoch (the kept samples over the global batch), ``epoch(start)`` skips the first
    ``start`` of them. Batches are *local*: this rank's ``batch_size / world`` images (set by
    :meth:`for_rank`); ``Batch.index`` holds positions into the set (DnC's cluster lookup)."""

    local = True

    def __init__(self, data: StreamSet, batch_size: int, *, generator: torch.Generator, device=None,
                 image_size: int, channels: int, num_workers: int = 2, shuffle_buffer: int = 1000,
                 checks: dict | None = None):
        if len(data) < batch_size:
            raise ValueError(f"batch_size={batch_size} exceeds the {len(data)} samples of the stream; "
                             f"lower --batch-size")
        self.data, self.batch_size, self.generator = data, int(batch_size), generator
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.image_size, self.channels = int(image_size), int(channels)
        self.num_workers, self.shuffle_buffer = int(num_workers), int(shuffle_buffer)
        self.checks = checks or {}  # url -> {"count", "sha256"}: what each shard must hold
        self.rank, self.world = 0, 1
        # key -> position in the set (what Batch.index reports)
        self._keep = {data.keys[int(p)]: i for i, p in enumerate(data.kept.tolist())}

    def for_rank(self, rank: int, world: int) -> "ShardStream":
        if self.batch_size % world:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by the number of processes ({world})")
        self.rank, self.world = int(rank), int(world)
        return self

    def __len__(self) -> int:
        return len(self.data) // self.batch_size

    def __iter__(self):
        return self.epoch()

    def epoch(self, start: int = 0):
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(self):
            raise ValueError(f"start must be an int in [0, {len(self)}], got {start!r}")
        seed = int(torch.randint(2 ** 62, (1,), generator=self.generator))  # the epoch's draw
        per_rank = self.batch_size // self.world
        samples = _EpochSamples(self.data.urls, self._keep, seed, self.rank, self.world, self.shuffle_buffer,
                                self.image_size, self.channels, self.checks)
        # its own generator: creating the loader must not consume the global RNG (augmentation)
        loader = torch.utils.data.DataLoader(samples, batch_size=per_rank, num_workers=self.num_workers,
                                             generator=torch.Generator().manual_seed(seed),
                                             pin_memory=self.device.type == "cuda",
                                             persistent_workers=False, worker_init_fn=ignore_stop_signals)
        it = iter_workers(loader)
        try:
            for b in range(len(self)):
                try:
                    with _shard_errors():
                        x, idx = next(it)
                except StopIteration:
                    raise ValueError(f"the shards {self.data.urls[0]!r}... hold none of the {len(self.data)} "
                                     f"samples to train on") from None
                if b < start:
                    continue  # a resumed epoch: drawn again, the batches done are dropped
                labels = torch.tensor([self.data.labels_by_key.get(self.data.keys[int(self.data.kept[i])], -1)
                                       for i in idx.tolist()], dtype=torch.int64)
                yield Batch(x.to(self.device, non_blocking=True), labels.to(self.device),
                            idx.to(self.device))
        finally:
            del it


@contextlib.contextmanager
def _shard_errors():
    """A ShardError raised in a DataLoader worker arrives wrapped in the worker's traceback;
    re-raise it as its own one-line message."""
    try:
        yield
    except ShardError as exc:
        text = str(exc)
        if "Traceback" not in text:
            raise
        raise ShardError(text.strip().splitlines()[-1].partition("ShardError: ")[2] or text) from None


# ---------------------------------------------------------------- the data set
@dataclass(eq=False)
class StreamData:
    """What ``build_dataset("webdataset", pattern)`` returns: the training stream, its image
    format and statistics, and (for evaluation only) the labelled data set of ``eval_dataset``."""

    name: str
    in_channels: int
    image_size: int
    mean: tuple
    std: tuple
    train: StreamSet
    class_names: list | None
    config: dict

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0

    def subset(self, positions) -> StreamSet:
        return self.train.subset(positions)

    def save_split(self, run_dir) -> Path:
        """``run_dir/stream.json``: the shards and the options that define the stream (no split
        is drawn; the keys kept are those of ``train_list``)."""
        return write_json(Path(run_dir) / STREAM_FILE, {k: (str(v) if isinstance(v, Path) else v)
                                                        for k, v in self.config.items()},
                          what="the stream description", indent=2)

    def summary(self) -> str:
        return (f"{self.name}: {len(self.train)} samples in {len(self.train.urls)} shards, "
                f"{self.in_channels}x{self.image_size}x{self.image_size}")


def build_webdataset(root, *, image_size=None, seed=0, train_list=None, num_workers=2, shuffle_buffer=1000,
                     **unused) -> StreamData:
    """The stream of the shards ``root`` (a brace pattern, a folder with ``shards.json`` or one
    tar). ``train_list``: a file of sample keys (one per line) to train on, e.g. a long-tailed
    subset; None: every sample. ``image_size``: decode to this size (default: the manifest's)."""
    if root is None:
        raise ValueError("--dataset webdataset needs --data-root: the shards, e.g. 'shards/train-{000000..000127}.tar'")
    for name, v, lo in (("num_workers", num_workers, 0), ("shuffle_buffer", shuffle_buffer, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    urls = expand_urls(root)
    man_path = (Path(root) if Path(root).is_dir() else Path(urls[0]).parent) / MANIFEST
    man = _read_manifest(man_path) if man_path.exists() else None
    if man is not None and sorted(Path(u).name for u in urls) != sorted(s["url"] for s in man["shards"]):
        man = None  # a manifest of other shards in the same folder: scan these ones
    if man is not None:
        keys = man["keys"]
        by_name = {s["url"]: s for s in man["shards"]}
        checks = {u: {"count": int(by_name[Path(u).name]["count"]), "sha256": by_name[Path(u).name].get("sha256")}
                  for u in urls}
    else:
        keys, counts = _scan(urls)
        checks = {u: {"count": c, "sha256": None} for u, c in counts.items()}
    labels_by_key = {}
    if man is not None and man.get("class_names"):
        labels_by_key = _labels(urls)
    if train_list is not None:
        try:
            wanted = [ln.split()[0] for ln in Path(train_list).read_text().splitlines() if ln.strip()]
        except OSError as exc:
            raise ValueError(f"train_list {str(train_list)!r} cannot be read: {exc}") from None
        where = {k: i for i, k in enumerate(keys)}
        missing = [k for k in wanted if k not in where]
        if missing:
            raise ValueError(f"train_list {str(train_list)!r} names {len(missing)} key(s) not in the shards, "
                             f"e.g. {missing[0]!r}")
        kept = torch.tensor(sorted(where[k] for k in set(wanted)), dtype=torch.int64)
    else:
        kept = torch.arange(len(keys), dtype=torch.int64)
    channels = int(man["in_channels"]) if man else 3
    size = int(image_size or (man["image_size"] if man else 64))
    mean = tuple(man["mean"]) if man else (0.5,) * channels
    std = tuple(man["std"]) if man else (0.25,) * channels
    config = {"name": "webdataset", "root": str(root), "train_list": None if train_list is None else str(train_list),
              "seed": seed, "image_size": size, "num_workers": num_workers, "shuffle_buffer": shuffle_buffer,
              "samples": len(kept)}
    reader = {"image_size": size, "channels": channels, "num_workers": num_workers, "shuffle_buffer": shuffle_buffer,
              "checks": checks}
    return StreamData("webdataset", channels, size, mean, std, StreamSet(urls, keys, kept, labels_by_key, reader),
                      man.get("class_names") if man else None, config)


def _labels(urls) -> dict:
    """key -> label from the ``.cls`` members (small files; read once, for reports only)."""
    out = {}
    for u in urls:
        for name, m, tar in _members(u):
            base, ext = _split_name(name)
            if ext == "cls":
                out[base] = int(tar.extractfile(m).read().decode().strip())
    return out
