"""SDCLR protocol data: per-split class permutation, the balanced set D_b, the few-shot set inside
D_i & D_b, split.json round trips (formats 1 and 2) and SDCLR's official index files (fake ones
in the official layout: no CIFAR files or official .npy files exist on this machine)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import official_layout, write_cifar_batches
from sdclr_fast.data import build_dataset, load_split, long_tail_counts

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_fmnist(folder: Path, per_class: int):
    import gzip
    import struct

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(10), per_class))
    yt = np.repeat(np.arange(10), 1)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (len(y), 28, 28)), "train-labels-idx1-ubyte": y,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (len(yt), 28, 28)), "t10k-labels-idx1-ubyte": yt}
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        raw = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
        with gzip.open(folder / (name + ".gz"), "wb") as f:
            f.write(raw + arr.astype(np.uint8).tobytes())


# ----------------------------------------------------------------------------- class permutation

def test_class_permutation_per_split_and_stored(tmp_path):
    _write_fmnist(tmp_path / "fm", 20)
    orders = []
    for split in range(5):
        data = build_dataset("fashion-mnist-lt", tmp_path / "fm", ratio=10, seed=3, split=split)
        order = data.class_order.tolist()
        assert sorted(order) == list(range(10))
        assert data.class_counts[data.class_order].tolist() == long_tail_counts(20, 10, 10)
        assert data.config["permute_classes"] is True
        orders.append(tuple(order))
        saved = load_split(data.save_split(tmp_path / f"run{split}"))
        assert saved["class_order"].tolist() == order
    assert len(set(orders)) == 5 and tuple(range(10)) not in orders   # split 0 is permuted too
    again = build_dataset("fashion-mnist-lt", tmp_path / "fm", ratio=10, seed=3, split=2)
    assert tuple(again.class_order.tolist()) == orders[2]
    none = build_dataset("fashion-mnist-lt", tmp_path / "fm", ratio=10, seed=3, split=2, permute_classes=None)
    assert tuple(none.class_order.tolist()) == orders[2]                # None means the default
    plain = build_dataset("fashion-mnist-lt", tmp_path / "fm", ratio=10, seed=3, split=2, permute_classes=False)
    assert plain.class_order.tolist() == list(range(10))
    assert plain.class_counts.tolist() == long_tail_counts(20, 10, 10)


# ----------------------------------------------------------------------------- the balanced set D_b

def test_balanced_set_sizes_and_overlap(tmp_path):
    _write_fmnist(tmp_path / "fm", 30)
    data = build_dataset("fashion-mnist-lt", tmp_path / "fm", ratio=10, seed=1, split=4)
    lt, bal = data.train, data.balanced_train
    n, m = len(lt), len(lt) // 10
    assert bal.class_counts(10).tolist() == [m] * 10 and len(bal) == 10 * m <= n < 10 * (m + 1)
    assert len(set(bal.indices.tolist())) == len(bal)
    counts = lt.class_counts(10)
    inter = np.intersect1d(lt.indices.numpy(), bal.indices.numpy())
    per = np.bincount(data.probe_train.labels.numpy()[np.searchsorted(data.probe_train.indices.numpy(), inter)],
                      minlength=10)
    assert per.tolist() == torch.minimum(counts, torch.tensor(m)).tolist()   # nested class by class
    # D_b is drawn from the same pool as D_i, and the draw is reproducible.
    assert set(bal.indices.tolist()) <= set(data.probe_train.indices.tolist())
    again = build_dataset("fashion-mnist-lt", tmp_path / "fm", ratio=10, seed=1, split=4)
    assert torch.equal(again.balanced_train.indices, bal.indices)


def test_pretrain_set_balanced(tmp_path):
    _write_fmnist(tmp_path / "fm", 30)
    lt = build_dataset("fashion-mnist-lt", tmp_path / "fm", ratio=10, seed=1)
    b = build_dataset("fashion-mnist-lt", tmp_path / "fm", ratio=10, seed=1, pretrain_set="balanced")
    assert b.pretrain_set == "balanced" and lt.pretrain_set == "long_tail"
    assert torch.equal(b.train.indices, lt.balanced_train.indices)
    assert b.train is b.balanced_train
    # Evaluation groups still come from the long-tailed ranking.
    assert torch.equal(b.class_counts, lt.class_counts) and torch.equal(b.long_tail_counts, lt.class_counts)
    assert torch.equal(b.long_tail.indices, lt.train.indices)
    assert torch.equal(b.class_order, lt.class_order)
    assert b.mean != lt.mean                         # normalisation of the set that is pretrained on
    assert torch.equal(b.fewshot(3).indices, lt.fewshot(3).indices)
    assert "balanced" in b.summary()
    for bad in ("D_b", "", 1):
        with pytest.raises(ValueError, match="pretrain_set"):
            build_dataset("fashion-mnist-lt", tmp_path / "fm", pretrain_set=bad)
    # The choice is saved; a split file reproduces it and refuses a contradicting argument.
    path = b.save_split(tmp_path / "run")
    assert json.loads(path.read_text())["pretrain_set"] == "balanced"
    again = build_dataset("fashion-mnist-lt", tmp_path / "fm", split_file=path)
    assert again.pretrain_set == "balanced" and torch.equal(again.train.indices, b.train.indices)
    assert again.mean == b.mean
    with pytest.raises(ValueError, match="pretrain_set='long_tail'.*'balanced'"):
        build_dataset("fashion-mnist-lt", tmp_path / "fm", split_file=path, pretrain_set="long_tail")


def test_pretrain_balanced_impossible_names_reason(tmp_path):
    from PIL import Image

    for c, n in enumerate([12, 2, 2]):
        for part, k in (("train", n), ("test", 1)):
            d = tmp_path / part / f"k{c}"
            d.mkdir(parents=True, exist_ok=True)
            for j in range(k):
                Image.fromarray(np.full((8, 8, 3), 10 * c + j, np.uint8)).save(d / f"{j}.png")
    data = build_dataset("imagefolder", tmp_path, image_size=8)    # the tree as is: 16 images
    assert data.balanced_train is None                               # 5 per class impossible
    assert data.fewshot(2).class_counts(3).tolist() == [2, 2, 2]     # from D_i & probe_train
    with pytest.raises(ValueError, match="pretrain_set='balanced'.*class 1 has 2 images"):
        build_dataset("imagefolder", tmp_path, image_size=8, pretrain_set="balanced")


# ----------------------------------------------------------------------------- split.json

def test_split_json_round_trip_all_fields(tmp_path):
    write_cifar_batches(tmp_path / "c", 100, 10)
    data = build_dataset("cifar100-lt", tmp_path / "c", ratio=9, seed=2, split=3)
    path = data.save_split(tmp_path / "run")
    raw = json.loads(path.read_text())
    assert raw["format"] == 2 and raw["pretrain_set"] == "long_tail" and raw["fewshot_train"] is None
    assert raw["balanced_train"] == data.balanced_train.indices.tolist()
    assert raw["config"]["probe_per_class"] == 8
    again = build_dataset("cifar100-lt", tmp_path / "c", seed=0, split=0, split_file=path)
    for part in ("train", "balanced_train", "probe_train", "val", "test"):
        a, b = getattr(data, part), getattr(again, part)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images), part
    assert torch.equal(again.class_order, data.class_order)
    assert torch.equal(again.fewshot(1).indices, data.fewshot(1).indices)
    # A format-1 file (before D_b existed) still loads; D_b is drawn again from its D_i.
    old = {k: v for k, v in raw.items() if k not in ("pretrain_set", "balanced_train", "fewshot_train")}
    old["format"] = 1
    (tmp_path / "old.json").write_text(json.dumps(old))
    legacy = build_dataset("cifar100-lt", tmp_path / "c", split_file=tmp_path / "old.json")
    assert torch.equal(legacy.train.indices, data.train.indices)
    assert torch.equal(legacy.balanced_train.indices, data.balanced_train.indices)
    # A format-2 file missing the new fields, or another format, is refused by name.
    broken = dict(raw)
    del broken["balanced_train"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"lacks the fields \['balanced_train'\]"):
        load_split(tmp_path / "broken.json")
    (tmp_path / "f3.json").write_text(json.dumps(dict(raw, format=3)))
    with pytest.raises(ValueError, match="format 3"):
        load_split(tmp_path / "f3.json")
    (tmp_path / "ps.json").write_text(json.dumps(dict(raw, pretrain_set="half")))
    with pytest.raises(ValueError, match="pretrain_set"):
        load_split(tmp_path / "ps.json")


# ----------------------------------------------------------------------------- official split files

def test_official_split_cifar10(tmp_path):
    y = write_cifar_batches(tmp_path / "c", 10, 50)
    off = official_layout(tmp_path / "split", y, 10)
    data = build_dataset("cifar10-lt", tmp_path / "c", official_split=tmp_path / "split", split=2)
    np.testing.assert_array_equal(data.train.indices.numpy(), off[2]["D_i"])
    np.testing.assert_array_equal(data.balanced_train.indices.numpy(), off[2]["D_b"])
    np.testing.assert_array_equal(data.fewshot_train.indices.numpy(), off[2]["S_b"])
    np.testing.assert_array_equal(data.probe_train.indices.numpy(), off["train"])
    np.testing.assert_array_equal(data.val.indices.numpy(), off["val"])
    counts = data.class_counts
    assert counts[data.class_order].tolist() == sorted(counts.tolist(), reverse=True)
    tail = int(counts.min())
    # The few-shot probe set of S_b's size is S_b itself; other sizes draw inside D_i & D_b.
    assert torch.equal(data.fewshot(tail).indices, data.fewshot_train.indices)
    other = data.fewshot(tail - 1)
    assert set(other.indices.tolist()) <= set(off[2]["D_i"].tolist()) & set(off[2]["D_b"].tolist())
    one = build_dataset("cifar10-lt", tmp_path / "c", official_split=tmp_path / "split", split=1)
    np.testing.assert_array_equal(one.train.indices.numpy(), off[1]["D_i"])
    b = build_dataset("cifar10-lt", tmp_path / "c", official_split=tmp_path / "split", split=2,
                      pretrain_set="balanced")
    assert torch.equal(b.train.indices, data.balanced_train.indices) and torch.equal(b.class_counts, counts)
    # The run reproduces from its split.json alone.
    path = data.save_split(tmp_path / "run")
    again = build_dataset("cifar10-lt", tmp_path / "c", split_file=path)
    for part in ("train", "balanced_train", "fewshot_train", "probe_train", "val"):
        assert torch.equal(getattr(again, part).indices, getattr(data, part).indices), part
    assert torch.equal(again.fewshot(tail).indices, data.fewshot(tail).indices)
    assert again.config["official_split"]["D_i"].endswith("split2_D_i.npy")
    # A resumed run passes both: the split file (written from official files) wins.
    resumed = build_dataset("cifar10-lt", tmp_path / "c", split=2, split_file=path,
                            official_split=tmp_path / "split")
    assert torch.equal(resumed.train.indices, data.train.indices)
    # Explicit files instead of the folder; D_b and S_b may be left out (D_b is then drawn).
    f = off["files"]
    explicit = build_dataset("cifar10-lt", tmp_path / "c", split=2,
                             official_split={"train": f["train"], "val": f["val"], "D_i": f[(2, "D_i")]})
    assert torch.equal(explicit.train.indices, data.train.indices) and explicit.fewshot_train is None
    assert explicit.balanced_train.class_counts(10).unique().numel() == 1


def test_official_split_cifar100_layout(tmp_path):
    y = write_cifar_batches(tmp_path / "c", 100, 20)
    off = official_layout(tmp_path / "split", y, 100, splits=(3,))
    data = build_dataset("cifar100-lt", tmp_path / "c", official_split=tmp_path / "split", split=3)
    np.testing.assert_array_equal(data.train.indices.numpy(), off[3]["D_i"])
    np.testing.assert_array_equal(data.val.indices.numpy(), off["val"])
    np.testing.assert_array_equal(data.fewshot_train.indices.numpy(), off[3]["S_b"])


def _expect(tmp_path, match, **kw):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        build_dataset("cifar10-lt", tmp_path / "c", **{"official_split": tmp_path / "split", "split": 1, **kw})


def test_official_split_errors(tmp_path):
    y = write_cifar_batches(tmp_path / "c", 10, 50)
    off = official_layout(tmp_path / "split", y, 10, splits=(1,))
    f = off["files"]
    _expect(tmp_path, r"split4_D_i.npy.*split=4 picks", split=4)        # no such split file
    _expect(tmp_path, r"split picks the file.*must be an int >= 1.*got 0", split=0)
    drawn = build_dataset("cifar10-lt", tmp_path / "c", ratio=5).save_split(tmp_path / "drawn")
    _expect(tmp_path, r"split_file was not written from official split files", split_file=drawn)
    _expect(tmp_path, r"not a folder", official_split=tmp_path / "nowhere")
    _expect(tmp_path, r"unknown keys \['D_x'\]", official_split={"D_x": f["train"]})
    _expect(tmp_path, r"needs the key 'val'", official_split={"train": f["train"], "D_i": f[(1, "D_i")]})

    def broken(path, arr, match):
        good = np.load(path)
        np.save(path, arr)
        try:
            _expect(tmp_path, match)
        finally:
            np.save(path, good)

    di, db, sb = (np.load(f[(1, p)]) for p in ("D_i", "D_b", "S_b"))
    name = "split1_D_i.npy"
    broken(f[(1, "D_i")], np.append(di, 50000), rf"{name}.*\[0, 500\)")         # out of range
    broken(f[(1, "D_i")], np.append(di, di[0]), rf"{name}.*more than once")
    broken(f[(1, "D_i")], di.reshape(1, -1), rf"{name}.*1-D integer")
    broken(f[(1, "D_i")], di.astype(np.float64), rf"{name}.*1-D integer")
    f[(1, "D_i")].write_bytes(b"not npy")
    try:
        _expect(tmp_path, rf"{name}.*not a readable")
    finally:
        np.save(f[(1, "D_i")], di)
    # D_b must be balanced and as large as D_i.
    cls = y[db]
    drop = np.nonzero(cls == cls[0])[0][0]
    broken(f[(1, "D_b")], np.delete(db, drop), r"split1_D_b.npy.*not class-balanced")
    keep = np.concatenate([db[cls == c][: (cls == c).sum() - 1] for c in range(10)])
    broken(f[(1, "D_b")], keep, r"split1_D_b.npy.*expected the size of D_i")
    # S_b must lie in D_i & D_b and be balanced.
    outside = np.setdiff1d(np.arange(500), np.union1d(di, db))[0]
    broken(f[(1, "S_b")], np.append(sb, outside), r"split1_S_b.npy.*outside D_i & D_b")
    cls = y[sb]
    broken(f[(1, "S_b")], np.delete(sb, np.nonzero(cls == cls[0])[0][0]), r"split1_S_b.npy.*not class-balanced")
    # trainIdxList and valIdxList must be disjoint.
    broken(f["val"], np.append(np.load(f["val"]), np.load(f["train"])[0]), r"trainIdxList.npy.*valIdxList.npy")
    # After every restore the files load again.
    assert len(build_dataset("cifar10-lt", tmp_path / "c", official_split=tmp_path / "split", split=1).train)
