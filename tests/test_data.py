"""Data sets: the long-tailed split rules, readers and their errors, split files, batching, augmentation."""
import gzip
import json
import math
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import idx_bytes, permuted_labels, write_fmnist
from sdclr_fast.data import (DATASETS, BatchIterator, ImageSet, TwoViewAugment, build_dataset,
                             eval_transform, load_split, long_tail_counts, save_split)
from sdclr_fast.data import splits as S
from sdclr_fast.data.cifar import cifar_protocol_split
from sdclr_fast.data.fmnist import DEFAULT_DIR, read_idx

FMNIST_COUNTS = [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- split rules

def test_long_tail_counts_protocol_totals():
    assert sum(long_tail_counts(4500, 10, 100)) == 11165
    assert sum(long_tail_counts(450, 100, 100)) == 9754
    assert long_tail_counts(6000, 10, 100) == FMNIST_COUNTS
    assert long_tail_counts(4500, 10, 100) == [4500, 2697, 1617, 969, 581, 348, 208, 125, 75, 45]
    assert long_tail_counts(7, 1, 100) == [7]
    assert long_tail_counts(300, 4, 1) == [300] * 4


@settings(max_examples=200, deadline=None)
@given(n_max=st.integers(0, 10000), c=st.integers(2, 200), ratio=st.integers(1, 1000))
def test_long_tail_counts_match_exact_formula(n_max, c, ratio):
    counts = long_tail_counts(n_max, c, ratio)
    assert len(counts) == c and counts[0] == n_max
    assert counts == sorted(counts, reverse=True)
    # The last class is exactly floor(n_max / ratio) (a rational, no rounding).
    assert counts[-1] == math.floor(Fraction(n_max, ratio))
    for i, n in enumerate(counts):
        exact = n_max * float(ratio) ** (-i / (c - 1))
        assert exact - 1 - 1e-6 * exact < n <= exact * (1 + 1e-8)


def test_ratio_must_be_at_least_one():
    for bad in (0.5, 0, -3, float("nan"), float("inf"), "100", True):
        with pytest.raises(ValueError, match="ratio"):
            S.check_ratio(bad)
        with pytest.raises(ValueError, match="ratio"):
            build_dataset("cifar10-lt", "/nonexistent", ratio=bad)
    assert S.check_ratio(None) is None and S.check_ratio(1) == 1.0


@pytest.mark.parametrize("num_classes, per_class, total", [(10, 5000, 11165), (100, 500, 9754)])
def test_cifar_protocol_split_counts(num_classes, per_class, total):
    y = permuted_labels(per_class, num_classes)
    lt, probe, val, order, bal = cifar_protocol_split(y, num_classes, ratio=100, seed=3, split=2)
    assert len(lt) == total
    n_max = per_class * 9 // 10
    counts = np.bincount(y[lt], minlength=num_classes)
    assert counts[order].tolist() == long_tail_counts(n_max, num_classes, 100)
    assert sorted(order.tolist()) == list(range(num_classes)) and order.tolist() != list(range(num_classes))
    assert np.bincount(y[val], minlength=num_classes).tolist() == [per_class // 10] * num_classes
    # Probe pool: CIFAR-10 the whole 45k; CIFAR-100 400 per class (40k), as the official lists.
    probe_per = n_max if num_classes == 10 else 400
    assert np.bincount(y[probe], minlength=num_classes).tolist() == [probe_per] * num_classes
    assert len(probe) == (45000 if num_classes == 10 else 40000)
    assert not set(val) & set(probe) and not set(val) & set(lt) and not set(val) & set(bal)
    assert len(set(lt)) == len(lt)
    # D_b: floor(|D_i| / C) per class, same pool, nested with D_i class by class.
    m = total // num_classes
    assert np.bincount(y[bal], minlength=num_classes).tolist() == [m] * num_classes
    both = np.intersect1d(lt, bal)
    assert np.bincount(y[both], minlength=num_classes).tolist() == np.minimum(counts, m).tolist()
    # The few-shot candidates D_i & D_b lie in the probe pool (also in CIFAR-100's 40k).
    assert set(both.tolist()) <= set(probe.tolist())
    if num_classes == 10:
        assert set(lt) <= set(probe)


def test_splits_reproducible_by_seed_and_split():
    y = permuted_labels(200, 10)
    a = cifar_protocol_split(y, 10, seed=1, split=0)
    b = cifar_protocol_split(y, 10, seed=1, split=0)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    c = cifar_protocol_split(y, 10, seed=1, split=1)
    assert not np.array_equal(a[0], c[0])           # another long-tailed draw ...
    np.testing.assert_array_equal(a[2], c[2])       # ... over the same 45k / 5k split
    np.testing.assert_array_equal(a[1], c[1])
    d = cifar_protocol_split(y, 10, seed=2, split=0)
    assert not np.array_equal(a[2], d[2])


def test_permuted_class_order():
    y = permuted_labels(100, 10)
    lt, order = S.long_tail_subset(y, np.arange(len(y)), 10, 10, seed=4, split=1, permute_classes=True)
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
    counts = np.bincount(y[lt], minlength=10)
    assert [counts[c] for c in order] == long_tail_counts(100, 10, 10)
    lt2, order2 = S.long_tail_subset(y, np.arange(len(y)), 10, 10, seed=4, split=1, permute_classes=True)
    np.testing.assert_array_equal(lt, lt2)
    np.testing.assert_array_equal(order, order2)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 60), min_size=2, max_size=12), ratio=st.floats(1, 80),
       seed=st.integers(0, 2**31), split=st.integers(0, 4), permute=st.booleans())
def test_long_tail_subset_properties(sizes, ratio, seed, split, permute):
    y = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(sizes)), sizes))
    pool = np.random.default_rng(seed + 1).permutation(len(y))[: max(1, len(y) * 3 // 4)]
    per = np.bincount(y[pool], minlength=len(sizes))
    if per.min() == 0:
        return
    lt, order = S.long_tail_subset(y, pool, len(sizes), ratio, seed, split, permute_classes=permute)
    assert set(lt.tolist()) <= set(pool.tolist()) and len(np.unique(lt)) == len(lt)
    counts = np.bincount(y[lt], minlength=len(sizes))
    assert [counts[c] for c in order] == long_tail_counts(int(per.min()), len(sizes), ratio)
    again, _ = S.long_tail_subset(y, pool, len(sizes), ratio, seed, split, permute_classes=permute)
    np.testing.assert_array_equal(lt, again)


def test_long_tail_subset_needs_enough_images():
    y = permuted_labels(5, 3)
    with pytest.raises(ValueError, match="fewer than"):
        S.long_tail_subset(y, np.arange(len(y)), 3, 2, 0, 0, n_max=6)


def test_balanced_subset_cuts_to_smallest_class():
    y = np.array([0] * 5 + [1] * 3 + [2] * 4)
    pos = S.balanced_subset(y, np.arange(len(y)), 3, seed=0)
    assert np.bincount(y[pos]).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="no images"):
        S.balanced_subset(np.array([0, 0, 1]), np.arange(3), 3, seed=0)


def test_shots_per_class_rules():
    assert S.shots_per_class(5, [10, 20]) == 5
    assert S.shots_per_class(0.01, [4500] * 3) == 45
    assert S.shots_per_class(0.01, [450] * 3) == 4
    assert S.shots_per_class(0.001, [450] * 3) == 1
    assert S.shots_per_class(1.0, [7, 9]) == 7
    for bad in (0, -1, 0.0, 1.5, True, "3", 11):
        with pytest.raises(ValueError, match="shots"):
            S.shots_per_class(bad, [10, 20])


# ----------------------------------------------------------------------------- CIFAR files

def _write_cifar(root: Path, num_classes: int, per_class: int, test_per_class: int, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    key = b"labels" if num_classes == 10 else b"fine_labels"
    y = permuted_labels(per_class, num_classes, seed).tolist()
    x = rng.integers(0, 256, (len(y), 3072), dtype=np.uint8)
    yt = permuted_labels(test_per_class, num_classes, seed + 1).tolist()
    xt = rng.integers(0, 256, (len(yt), 3072), dtype=np.uint8)
    if num_classes == 10:
        parts = np.array_split(np.arange(len(y)), 5)
        for i, p in enumerate(parts, 1):
            with open(folder / f"data_batch_{i}", "wb") as f:
                pickle.dump({b"data": x[p], key: [y[j] for j in p]}, f)
        files = {"test_batch": {b"data": xt, key: yt},
                 "batches.meta": {b"label_names": [f"c{i}".encode() for i in range(10)]}}
    else:
        files = {"train": {b"data": x, key: y}, "test": {b"data": xt, key: yt},
                 "meta": {b"fine_label_names": [f"f{i}".encode() for i in range(100)]}}
    for name, obj in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)
    return x.reshape(-1, 3, 32, 32), np.array(y), xt.reshape(-1, 3, 32, 32), np.array(yt)


def test_cifar10_lt_from_pickles(tmp_path):
    x, y, xt, yt = _write_cifar(tmp_path, 10, 40, 3)
    data = build_dataset("cifar10-lt", tmp_path, ratio=10, seed=5, split=1)
    assert data.num_classes == 10 and data.in_channels == 3 and data.image_size == 32
    assert data.class_names == [f"c{i}" for i in range(10)]
    assert data.class_counts[data.class_order].tolist() == long_tail_counts(36, 10, 10)
    assert len(data.val) == 40 and len(data.probe_train) == 360 and len(data.test) == 30
    # Same draws as the labels-only protocol function.
    lt, probe, val, _, bal = cifar_protocol_split(y, 10, ratio=10, seed=5, split=1)
    np.testing.assert_array_equal(data.balanced_train.indices.numpy(), bal)
    np.testing.assert_array_equal(data.train.indices.numpy(), lt)
    np.testing.assert_array_equal(data.probe_train.indices.numpy(), probe)
    np.testing.assert_array_equal(data.val.indices.numpy(), val)
    # Pixels and labels are those of the files (channel-first).
    i = data.train.indices.numpy()
    np.testing.assert_array_equal(data.train.images.numpy(), x[i])
    np.testing.assert_array_equal(data.train.labels.numpy(), y[i])
    np.testing.assert_array_equal(data.test.images.numpy(), xt)
    # The folder itself works as root too, and mean / std are those of the training split.
    again = build_dataset("cifar10-lt", tmp_path / "cifar-10-batches-py", ratio=10, seed=5, split=1)
    assert torch.equal(again.train.images, data.train.images)
    ref = data.train.images.double().div(255)
    np.testing.assert_allclose(data.mean, ref.mean(dim=(0, 2, 3)).numpy(), rtol=1e-9)
    np.testing.assert_allclose(data.std, ref.std(dim=(0, 2, 3), unbiased=False).numpy(), rtol=1e-9)


def test_cifar100_lt_from_pickles_and_resize(tmp_path):
    _write_cifar(tmp_path, 100, 10, 1)
    data = build_dataset("cifar100-lt", tmp_path, ratio=9, image_size=16)
    assert data.class_counts[data.class_order].tolist() == long_tail_counts(9, 100, 9)
    assert data.class_names[:2] == ["f0", "f1"]
    # The CIFAR-100 probe pool leaves val's share of the pool out (450 - 50 = 400 on the real data).
    assert data.probe_train.class_counts(100).tolist() == [8] * 100 and len(data.val) == 100
    assert data.train.images.shape[1:] == (3, 16, 16) and data.test.images.shape[1:] == (3, 16, 16)
    assert data.image_size == 16


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        build_dataset("cifar10-lt", tmp_path)
    with pytest.raises(FileNotFoundError, match="root="):
        build_dataset("cifar100-lt")
    _write_cifar(tmp_path, 10, 10, 1)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="data_batch_3"):
        build_dataset("cifar10-lt", tmp_path, ratio=2)
    with open(bad, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        build_dataset("cifar10-lt", tmp_path, ratio=2)


# ----------------------------------------------------------------------------- split files

def test_split_file_round_trip(tmp_path):
    _write_cifar(tmp_path / "c", 10, 30, 2)
    data = build_dataset("cifar10-lt", tmp_path / "c", ratio=5, seed=7, split=3, permute_classes=True)
    path = save_split(data, tmp_path / "run")
    assert path == tmp_path / "run" / "split.json"
    saved = load_split(tmp_path / "run")
    np.testing.assert_array_equal(saved["train"], data.train.indices.numpy())
    np.testing.assert_array_equal(saved["val"], data.val.indices.numpy())
    assert saved["config"]["seed"] == 7 and saved["class_order"].tolist() == data.class_order.tolist()
    # Other seed/split arguments lose against the file: the run is reproduced exactly.
    again = build_dataset("cifar10-lt", tmp_path / "c", seed=0, split=0, split_file=path)
    for part in ("train", "probe_train", "val", "test"):
        a, b = getattr(data, part), getattr(again, part)
        assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices)
    assert torch.equal(again.class_order, data.class_order)
    assert torch.equal(again.fewshot(2).indices, data.fewshot(2).indices)
    assert again.mean == data.mean


def test_split_file_errors(tmp_path):
    _write_cifar(tmp_path / "c", 10, 30, 2)
    data = build_dataset("cifar10-lt", tmp_path / "c", ratio=5)
    path = data.save_split(tmp_path / "run")
    with pytest.raises(ValueError, match="cifar10-lt"):
        build_dataset("cifar100-lt", tmp_path / "c", split_file=path)
    payload = json.loads(path.read_text())
    payload["train"] = payload["train"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="class counts"):
        build_dataset("cifar10-lt", tmp_path / "c", split_file=tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_split(tmp_path / "broken.json")
    (tmp_path / "short.json").write_text(json.dumps({"format": 1}))
    with pytest.raises(ValueError, match="lacks"):
        load_split(tmp_path / "short.json")
    with pytest.raises(FileNotFoundError):
        load_split(tmp_path / "nowhere.json")


# ----------------------------------------------------------------------------- Fashion-MNIST

def test_fmnist_lt_synthetic_idx(tmp_path, monkeypatch):
    arrays = write_fmnist(tmp_path / "fm")
    data = build_dataset("fashion-mnist-lt", tmp_path / "fm", ratio=4)
    assert data.class_counts[data.class_order].tolist() == long_tail_counts(12, 10, 4)
    plain = build_dataset("fashion-mnist-lt", tmp_path / "fm", ratio=4, permute_classes=False)
    assert plain.class_counts.tolist() == long_tail_counts(12, 10, 4)
    assert plain.class_order.tolist() == list(range(10))
    assert data.train.images.shape[1:] == (1, 28, 28) and data.train.images.dtype == torch.uint8
    assert len(data.probe_train) == 120 and data.val is None and len(data.test) == 20
    i = data.train.indices.numpy()
    np.testing.assert_array_equal(data.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"][i])
    assert data.class_names[0] == "T-shirt/top"
    # The environment variable points at the folder when no root is given.
    monkeypatch.setenv("SDCLR_FAST_FMNIST_DIR", str(tmp_path / "fm"))
    env = build_dataset("fashion-mnist-lt", ratio=4, image_size=32)
    assert torch.equal(env.train.indices, data.train.indices)
    assert env.train.images.shape[1:] == (1, 32, 32) and env.image_size == 32
    # Uncompressed IDX files are read too.
    write_fmnist(tmp_path / "raw", gz=False)
    assert len(build_dataset("fashion-mnist-lt", tmp_path / "raw", ratio=4).train) == len(data.train)


def test_fmnist_missing_file_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SDCLR_FAST_FMNIST_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("fashion-mnist-lt")
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "SDCLR_FAST_FMNIST_DIR" in msg
    assert "train-images-idx3-ubyte.gz" in msg


def test_fmnist_corrupt_idx_named(tmp_path):
    folder = tmp_path / "fm"
    write_fmnist(folder)
    target = folder / "train-images-idx3-ubyte.gz"
    good = gzip.decompress(target.read_bytes())
    cases = {
        "magic": b"\x01\x02" + good[2:],
        "element type": good[:2] + b"\x0d" + good[3:],
        "dimensions": good[:3] + b"\x02" + good[4:],
        "truncated": good[:-5],
        "header": good[:10],
    }
    for what, raw in cases.items():
        target.write_bytes(gzip.compress(raw))
        with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz") as err:
            build_dataset("fashion-mnist-lt", folder)
        assert what in str(err.value)
    target.write_bytes(gzip.compress(good)[:-20])  # a cut-off gzip stream
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_idx(target, 3)
    target.write_bytes(gzip.compress(good))
    labels = folder / "train-labels-idx1-ubyte.gz"
    with gzip.open(labels, "wb") as f:
        f.write(idx_bytes(np.zeros(7, np.uint8)))
    with pytest.raises(ValueError, match="labels"):
        build_dataset("fashion-mnist-lt", folder)


@pytest.mark.skipif(not Path(DEFAULT_DIR, "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_lt(monkeypatch):
    monkeypatch.delenv("SDCLR_FAST_FMNIST_DIR", raising=False)
    data = build_dataset("fashion-mnist-lt")
    assert data.class_counts[data.class_order].tolist() == FMNIST_COUNTS and len(data.train) == 14886
    assert data.class_order.tolist() != list(range(10))
    assert data.balanced_train.class_counts(10).tolist() == [1488] * 10
    assert data.probe_train.class_counts(10).tolist() == [6000] * 10
    assert len(data.test) == 10000 and data.test.class_counts(10).tolist() == [1000] * 10
    assert data.train.images.shape[1:] == (1, 28, 28)
    assert 0.25 < data.mean[0] < 0.35 and 0.3 < data.std[0] < 0.4
    few = data.fewshot(0.01)
    assert few.class_counts(10).tolist() == [60] * 10
    assert set(few.indices.tolist()) <= set(data.probe_train.indices.tolist())
    assert set(few.indices.tolist()) <= set(data.train.indices.tolist()) & set(data.balanced_train.indices.tolist())
    plain = build_dataset("fashion-mnist-lt", permute_classes=False)
    assert plain.class_counts.tolist() == FMNIST_COUNTS


# ----------------------------------------------------------------------------- imagefolder

def _write_tree(root: Path, counts, test_count=2, size=(10, 8)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, per in (("train", counts), ("test", [test_count] * len(counts))):
        for c, n in enumerate(per):
            d = root / part / f"class_{c}"
            d.mkdir(parents=True)
            for j in range(n):
                arr = np.full((size[1], size[0], 3), 40 * c + j, np.uint8)
                arr[0, 0] = rng.integers(0, 256, 3)
                Image.fromarray(arr).save(d / f"img_{j}.png")


def test_imagefolder_tree_and_list(tmp_path):
    _write_tree(tmp_path, [6, 4, 3])
    data = build_dataset("imagefolder", tmp_path, image_size=8, workers=2)
    assert data.class_names == ["class_0", "class_1", "class_2"]
    assert data.class_counts.tolist() == [6, 4, 3]         # default: the tree as it is
    assert data.train.images.shape == (13, 3, 8, 8) and data.probe_train.class_counts(3).tolist() == [3, 3, 3]
    assert len(data.test) == 6 and data.val is None
    # A flat colour stays flat through the resize (the centre crop drops the noisy corner).
    j = int((data.train.labels == 1).nonzero()[0])
    assert int(data.train.images[j, 0, 4, 4]) in range(40, 44)
    prof = build_dataset("imagefolder", tmp_path, image_size=8, ratio=3)
    assert prof.class_counts[prof.class_order].tolist() == long_tail_counts(3, 3, 3)
    gray = build_dataset("imagefolder", tmp_path, image_size=8, grayscale=True)
    assert gray.in_channels == 1 and len(gray.mean) == 1
    lst = tmp_path / "lt.txt"
    lst.write_text("train/class_0/img_0.png 0\ntrain/class_0/img_3.png 0\n\ntrain/class_2/img_1.png 2\n")
    sub = build_dataset("imagefolder", tmp_path, image_size=8, train_list=lst)
    assert sub.class_counts.tolist() == [2, 0, 1]
    assert sub.class_order.tolist() == [0, 2, 1]
    lst.write_text("train/class_0/img_0.png 1\n")
    with pytest.raises(ValueError, match="line 1: label 1"):
        build_dataset("imagefolder", tmp_path, image_size=8, train_list=lst)
    lst.write_text("train/class_9/x.png 0\n")
    with pytest.raises(ValueError, match="not an image"):
        build_dataset("imagefolder", tmp_path, image_size=8, train_list=lst)


def test_imagefolder_val_and_test_list(tmp_path):
    _write_tree(tmp_path, [3, 3, 3])
    from PIL import Image

    for c in range(3):
        d = tmp_path / "val" / f"class_{c}"
        d.mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 10 * c, np.uint8)).save(d / "v.png")
    data = build_dataset("imagefolder", tmp_path, image_size=8)
    assert len(data.val) == 3 and data.val.labels.tolist() == [0, 1, 2] and len(data.test) == 6
    lst = tmp_path / "test.txt"
    lst.write_text("test/class_2/img_1.png 2\ntest/class_0/img_0.png 0\n")
    sub = build_dataset("imagefolder", tmp_path, image_size=8, test_list=lst)
    assert sub.test.labels.tolist() == [2, 0]
    assert "3 classes" in repr(sub) and repr(sub.train).startswith("ImageSet(9 images")


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/"):
        build_dataset("imagefolder", tmp_path)
    _write_tree(tmp_path / "t", [2, 2, 2])
    (tmp_path / "t" / "train" / "class_1" / "img_0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="img_0.png"):
        build_dataset("imagefolder", tmp_path / "t", image_size=8)


# ----------------------------------------------------------------------------- interface errors

def test_unknown_dataset_and_options():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*fashion-mnist-lt"):
        build_dataset("mnist")
    with pytest.raises(ValueError, match="unknown options"):
        build_dataset("fashion-mnist-lt", val_fraction=0.2)
    with pytest.raises(ValueError, match="seed"):
        build_dataset("fashion-mnist-lt", seed=-1)
    with pytest.raises(ValueError, match="split"):
        build_dataset("fashion-mnist-lt", split=1.5)
    with pytest.raises(ValueError, match="image_size"):
        build_dataset("fashion-mnist-lt", image_size=0)
    assert set(DATASETS) == {"fashion-mnist-lt", "cifar10-lt", "cifar100-lt", "imagefolder", "webdataset"}


# ----------------------------------------------------------------------------- ImageSet, fewshot

def _imageset(n=20, c=4):
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g),
                    torch.arange(n) % c, torch.arange(100, 100 + n))


def test_imageset_subset_and_checks():
    s = _imageset()
    sub = s.subset(torch.tensor([3, 0, 3]))
    assert sub.indices.tolist() == [103, 100, 103] and torch.equal(sub.images[1], s.images[0])
    assert len(s.subset([])) == 0
    assert s.class_counts(4).tolist() == [5, 5, 5, 5]
    for bad in ([20], [-1], torch.ones(20, dtype=torch.bool), [[1]], [0.5]):
        with pytest.raises(ValueError, match="positions"):
            s.subset(bad)
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64),
                 torch.zeros(2, dtype=torch.int64))


def test_fewshot_inside_pretraining_images(tmp_path):
    write_fmnist(tmp_path / "fm", per_class=40)
    data = build_dataset("fashion-mnist-lt", tmp_path / "fm", ratio=8, seed=1)
    lt, bal = set(data.train.indices.tolist()), set(data.balanced_train.indices.tolist())
    # The tail class of D_i has floor(40 / 8) = 5 images, all of them in D_b (nested sets).
    assert int(data.class_counts.min()) == 5
    few = data.fewshot(5)
    assert few.class_counts(10).tolist() == [5] * 10
    assert set(few.indices.tolist()) <= lt & bal
    assert set(few.indices.tolist()) <= set(data.probe_train.indices.tolist())
    assert torch.equal(few.images, data.probe_train.images[data.fewshot_positions(5)])
    assert torch.equal(few.indices, data.fewshot(5).indices)           # deterministic
    # A fraction is of probe_train's class size (40): 1/8 -> 5 per class, the same set.
    assert torch.equal(data.fewshot(0.125).indices, few.indices)
    assert not torch.equal(data.fewshot(4).indices, few.indices[:40])
    other = build_dataset("fashion-mnist-lt", tmp_path / "fm", ratio=8, seed=2)
    assert not torch.equal(other.fewshot(3).indices, data.fewshot(3).indices)
    split1 = build_dataset("fashion-mnist-lt", tmp_path / "fm", ratio=8, seed=1, split=1)
    assert not torch.equal(split1.fewshot(3).indices, data.fewshot(3).indices)
    with pytest.raises(ValueError, match=r"shots=6 asks for 6 .* D_i & D_b.*shots <= 5"):
        data.fewshot(6)
    with pytest.raises(ValueError, match="shots"):
        data.fewshot(0.5)
    # pool="probe": the old draw from all of probe_train (e.g. a larger balanced demo probe set).
    wide = data.fewshot(20, pool="probe")
    assert wide.class_counts(10).tolist() == [20] * 10
    with pytest.raises(ValueError, match="pool"):
        data.fewshot(2, pool="test")
    sub = data.subset([0, 1])
    assert torch.equal(sub.images, data.train.images[:2])


# ----------------------------------------------------------------------------- batching

def test_batch_iterator_epochs():
    s = _imageset(n=22)
    it = BatchIterator(s, 5, seed=3)
    assert len(it) == 4
    e1 = [b for b in it]
    assert all(b.images.shape == (5, 1, 4, 4) and b.images.dtype == torch.uint8 for b in e1)
    idx1 = torch.cat([b.index for b in e1])
    assert len(set(idx1.tolist())) == 20
    for b in e1:
        assert torch.equal(b.images, s.images[b.index]) and torch.equal(b.labels, s.labels[b.index])
    e2 = torch.cat([b.index for b in it])
    assert not torch.equal(idx1, e2)                                   # a new permutation per epoch
    assert torch.equal(idx1, torch.cat([b.index for b in BatchIterator(s, 5, seed=3)]))  # seeded
    full = BatchIterator(s, 5, shuffle=False, drop_last=False)
    assert len(full) == 5 and torch.equal(torch.cat([b.index for b in full]), torch.arange(22))
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(s, 23)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(s, 0)
    with pytest.raises(ValueError, match="either generator or seed"):
        BatchIterator(s, 4, seed=1, generator=torch.Generator())


# ----------------------------------------------------------------------------- augmentation

def test_two_view_augment_shapes_and_seed():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8, generator=g)
    aug = TwoViewAugment(16, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    torch.manual_seed(11)
    v1, v2 = aug(x)
    assert v1.shape == v2.shape == (6, 3, 16, 16) and v1.dtype == v2.dtype == torch.float32
    assert not torch.equal(v1, v2)
    torch.manual_seed(11)
    w1, w2 = aug(x)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    # Values are normalised [0, 1] images.
    lo = (0 - aug.mean) / aug.std
    hi = (1 - aug.mean) / aug.std
    assert bool(((v1 >= lo - 1e-5) & (v1 <= hi + 1e-5)).all())
    e1, e2 = aug(x[:0])
    assert e1.shape == (0, 3, 16, 16)


def test_two_view_augment_gray_and_errors():
    import kornia.augmentation as K

    aug = TwoViewAugment(28, 1, (0.3,), (0.35,))
    kinds = [type(m) for m in aug.ops]
    assert K.RandomGrayscale not in kinds
    assert any(isinstance(m, K.ColorJitter) for m in aug.ops)
    assert aug.jitter == (0.4, 0.4, 0.0, 0.0) and aug.grayscale_p == 0.0  # no colour ops on grey images
    rgb = TwoViewAugment(28, 3, (0.3,) * 3, (0.35,) * 3)
    assert rgb.jitter == (0.4, 0.4, 0.4, 0.1) and rgb.grayscale_p == 0.2 and rgb.jitter_p == 0.8
    assert K.RandomGrayscale in [type(m) for m in rgb.ops]
    v1, v2 = aug(torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8))
    assert v1.shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(3, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        aug(torch.zeros(3, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="in_channels"):
        TwoViewAugment(28, 1, (0.3, 0.3), (0.3, 0.3))
    with pytest.raises(ValueError, match="std"):
        TwoViewAugment(28, 1, (0.3,), (0.0,))
    with pytest.raises(ValueError, match="image_size"):
        TwoViewAugment(0, 1, (0.3,), (0.3,))
    with pytest.raises(ValueError, match="scale"):
        TwoViewAugment(8, 1, (0.3,), (0.3,), scale=(0.5, 0.1))


def test_eval_transform_exact():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    out = eval_transform(x, mean, std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        eval_transform(x.float(), mean, std)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_and_views_on_cuda():
    s = _imageset(n=40)
    it = BatchIterator(s, 8, seed=1, device="cuda")
    cpu = BatchIterator(s, 8, seed=1)
    for gb, cb in zip(it, cpu):
        assert gb.images.is_cuda and gb.labels.is_cuda
        assert torch.equal(gb.images.cpu(), cb.images) and torch.equal(gb.index.cpu(), cb.index)
    # Fresh iterators: a second pass over `cpu` would be its next epoch (a new permutation).
    streamed = BatchIterator(s, 8, seed=1, device="cuda", preload=False)
    for sb, cb in zip(streamed, BatchIterator(s, 8, seed=1)):
        assert sb.images.is_cuda and torch.equal(sb.images.cpu(), cb.images)
        assert torch.equal(sb.index.cpu(), cb.index) and torch.equal(sb.labels.cpu(), cb.labels)
    aug = TwoViewAugment(4, 1, (0.5,), (0.25,)).cuda()
    torch.manual_seed(0)
    v1, v2 = aug(s.images[:8].cuda())
    assert v1.is_cuda and v1.shape == (8, 1, 4, 4) and v1.dtype == torch.float32
    torch.manual_seed(0)
    w1, _ = aug(s.images[:8].cuda())
    assert torch.equal(v1, w1)
