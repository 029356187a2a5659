"""Fidelity to the official SDCLR code (VITA-Group/SDCLR): input normalisation, the crop's
interpolation, the method-aware ImageNet-100-LT recipe, its class groups and few-shot list, the
official CIFAR-100 S_b, the few-shot probe's val check period and the ImageNet-100 probe transforms."""
import dataclasses

import numpy as np
import pytest
import torch

from sdclr_fast.data import ContrastiveData, ImageSet, TwoViewAugment
from sdclr_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD, input_stats, with_input_norm

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_data(channels=3, n=12, classes=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % classes
    s = ImageSet(images, labels, torch.arange(n))
    return ContrastiveData(name="tiny", num_classes=classes, in_channels=channels, image_size=size,
                           class_names=[str(i) for i in range(classes)], train=s, probe_train=s, val=None, test=s,
                           class_order=torch.arange(classes), mean=(0.3,) * channels, std=(0.2,) * channels,
                           config={"seed": 0})


# ----------------------------------------------------------------------------- input normalisation

def test_input_norm_is_imagenet_by_default_and_keeps_dataset_stats():
    from sdclr_fast.train.config import PretrainConfig
    from sdclr_fast.train.run import run_data

    data = tiny_data()
    # official models/resnet.py: NormalizeByChannelMeanStd(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert input_stats("imagenet", data) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert input_stats("dataset", data) == ((0.3,) * 3, (0.2,) * 3)
    gray = tiny_data(channels=1)
    mean, std = input_stats("imagenet", gray)
    assert mean == pytest.approx((sum(IMAGENET_MEAN) / 3,)) and std == pytest.approx((sum(IMAGENET_STD) / 3,))
    net = with_input_norm(data, "imagenet")
    assert (net.mean, net.std) == (IMAGENET_MEAN, IMAGENET_STD) and net.train is data.train
    assert (data.mean, data.std) == ((0.3,) * 3, (0.2,) * 3)  # the original is left alone
    back = with_input_norm(with_input_norm(net, "imagenet"), "dataset")  # the data set's own stats survive
    assert (back.mean, back.std) == ((0.3,) * 3, (0.2,) * 3)
    # A run normalises with its config's choice, also for data handed in; old configs used the data set's.
    assert run_data(PretrainConfig(dataset="tiny"), "unused", data).mean == IMAGENET_MEAN
    old = {k: v for k, v in PretrainConfig(dataset="tiny").to_dict().items() if k != "input_norm"}
    assert run_data(PretrainConfig.from_dict(old), "unused", data).mean == (0.3,) * 3
    with pytest.raises(ValueError, match="input_norm"):
        input_stats("zca", data)
    with pytest.raises(ValueError, match="input_norm"):
        PretrainConfig(input_norm="zca")
    with pytest.raises(ValueError, match="1- or 3-channel"):
        input_stats("imagenet", tiny_data(channels=2))


def test_normalising_after_augmentation_equals_the_official_in_network_layer():
    """The official pipeline: augmentation on [0, 1] images, then the network's first layer
    (x - mean) / std. Here the augmentation ends with that normalisation: the same tensor."""
    aug = TwoViewAugment(8, 3, IMAGENET_MEAN, IMAGENET_STD)
    raw = TwoViewAugment(8, 3, (0.0,) * 3, (1.0,) * 3)
    x = tiny_data().train.images
    torch.manual_seed(3)
    v1, v2 = aug(x)
    torch.manual_seed(3)
    r1, r2 = raw(x)
    m, s = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(v1, (r1 - m) / s, rtol=0, atol=1e-6)
    torch.testing.assert_close(v2, (r2 - m) / s, rtol=0, atol=1e-6)


def test_crop_is_bicubic_and_saturates_like_a_pil_image():
    import kornia.augmentation as K
    from kornia.constants import Resample

    aug = TwoViewAugment(16, 3, (0.0,) * 3, (1.0,) * 3, jitter_p=0.0, grayscale_p=0.0, flip_p=0.0)
    crop = aug.ops[0]
    assert isinstance(crop, K.RandomResizedCrop) and crop.flags["resample"] == Resample.BICUBIC
    # A step edge: bicubic upsampling overshoots [0, 1] beside it (bilinear cannot); the output is clamped.
    x = torch.zeros(64, 3, 8, 8, dtype=torch.uint8)
    x[..., 4:] = 255
    unclamped = K.RandomResizedCrop((16, 16), scale=(0.1, 1.0), resample="bicubic")(x.float() / 255)
    assert float(unclamped.max()) > 1.0 or float(unclamped.min()) < 0.0
    torch.manual_seed(0)
    v1, _ = aug(x)
    assert float(v1.min()) >= 0.0 and float(v1.max()) <= 1.0


# ----------------------------------------------------------------------------- one number per checkpoint

def _image_folder(root, counts=(40, 20, 10, 6), size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per in (("train", counts), ("test", (8,) * len(counts))):
        for c, n in enumerate(per):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
                r, q = divmod(c, 2)
                h = size // 2
                img[r * h:(r + 1) * h, q * h:(q + 1) * h] += rng.integers(60, 160, dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from sdclr_fast.cli import main

    root = tmp_path_factory.mktemp("fidelity")
    _image_folder(root / "images")
    run = root / "run"
    assert main(["pretrain", "--method", "sdclr", "--dataset", "imagefolder", "--data-root", str(root / "images"),
                 "--image-size", "12", "--arch", "resnet50", "--width", "32", "--epochs", "1", "--batch-size", "16",
                 "--lr", "0.1",
                 "--device", "cpu", "--no-progress", "--no-tensorboard", "--run-dir", str(run)]) == 0
    return run


def _eval_in_child(run, out, threads, *extra):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-m", "sdclr_fast", "eval", "--run-dir", str(run), "--probe", "all",
                           "--shots", "3", "--probe-epochs", "4", "--knn-k", "5", "--device", "cpu", "--out", str(out),
                           *extra], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.replace(str(out), "OUT"), (out / "report.json").read_text()


@pytest.mark.slow
def test_eval_prints_identical_tables_under_one_and_two_threads(tiny_run, tmp_path):
    """`sdclr-fast eval` of one checkpoint, in child processes with OMP_NUM_THREADS 1 and 2: the
    same table and the same per-class numbers, bit for bit (the evaluation runs on one thread).

    The run is a ResNet-50 (1024 features at width 32): on this project's machine its evaluation
    with ``--all-threads`` (the old behaviour) gave kNN 53.12 % under one thread and 65.62 % under
    two, from the same checkpoint (MKL splits the reduction of K >= 1024 GEMMs by thread)."""
    one = _eval_in_child(tiny_run, tmp_path / "t1", 1)
    two = _eval_in_child(tiny_run, tmp_path / "t2", 2)
    assert one[0] == two[0]
    assert one[1] == two[1]
    assert "knn" in one[0] and "fewshot-3" in one[0]


def test_fixed_threads_restores_the_thread_count():
    from sdclr_fast.eval import fixed_threads

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with fixed_threads("cpu"):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with fixed_threads("cpu", enabled=False):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), fixed_threads(None):
            raise RuntimeError("restored on the way out")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------- few-shot probe val period

def test_fewshot_probe_checks_val_every_fifth_epoch_like_test_freq_5():
    from sdclr_fast.eval import PRESETS, linear_probe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g)
    y = torch.arange(30) % 3
    xv, yv = torch.randn(9, 6, generator=g), torch.arange(9) % 3
    assert PRESETS["fewshot"]["val_every"] == 5 and PRESETS["full"]["val_every"] == 1
    r = linear_probe(x, y, x, 3, preset="fewshot", epochs=12, val_features=xv, val_labels=yv)
    assert r.val_epochs == [4, 9] and len(r.val_accuracies) == 2  # after 1-based epochs 5 and 10
    assert r.best_epoch in (4, 9) and r.val_accuracies[r.val_epochs.index(r.best_epoch)] == max(r.val_accuracies)
    full = linear_probe(x, y, x, 3, preset="full", epochs=3, val_features=xv, val_labels=yv)
    assert full.val_epochs == [0, 1, 2]
    # the best measured epoch's classifier made the predictions: rerunning that many epochs gives it
    again = linear_probe(x, y, x, 3, preset="fewshot", epochs=r.best_epoch + 1, milestones=(5, 7))  # 40, 60 of 100
    assert torch.equal(again.predictions, r.predictions)
    short = linear_probe(x, y, x, 3, preset="fewshot", epochs=3, val_features=xv, val_labels=yv)
    assert short.val_epochs == [] and short.best_epoch == 2  # nothing measured: the last epoch
    with pytest.raises(ValueError, match="val_every"):
        linear_probe(x, y, x, 3, val_every=0)


# ----------------------------------------------------------------------------- ImageNet-100-LT groups

def test_imagenet_lt_groups_follow_the_official_thresholds():
    from sdclr_fast.eval import evaluate_predictions, group_classes

    # exp_analyse.py: many-shot > 100 training images, medium 20-100, few-shot < 20.
    counts = np.array([1280, 101, 100, 57, 20, 19, 5, 300])
    g = group_classes(counts, "imagenet-lt")
    assert g["major"].tolist() == [0, 1, 7] and g["moderate"].tolist() == [2, 3, 4] and g["minor"].tolist() == [5, 6]
    assert {k: v.tolist() for k, v in group_classes(counts).items()} == {  # thirds: 2 / 2 / 4 by rank
        "minor": [5, 6], "moderate": [3, 4], "major": [0, 1, 2, 7]}
    # The official ImageNet-100-LT list has 39 / 48 / 13 classes in the three groups: a profile with those counts.
    lt = np.array([400] * 39 + [60] * 48 + [10] * 13)
    assert [len(v) for v in group_classes(lt, "imagenet-lt").values()] == [39, 48, 13]
    labels = np.repeat(np.arange(8), 2)
    preds = labels.copy()
    preds[10:] = 0  # classes 5, 6, 7 wrong
    r = evaluate_predictions(preds, labels, counts, "imagenet-lt")
    assert (r.major, r.moderate, r.minor) == (pytest.approx(200 / 3), 100.0, 0.0) and r.groups == "imagenet-lt"
    assert type(r).from_dict(r.to_dict()).groups == "imagenet-lt"
    empty = evaluate_predictions(labels, labels, np.full(8, 500), "imagenet-lt")  # no class below 100
    assert np.isnan(empty.minor) and empty.major == 100.0
    with pytest.raises(ValueError, match="rule"):
        group_classes(counts, "quartiles")


def test_the_imagenet100_recipe_evaluates_with_the_official_groups(tmp_path):
    from sdclr_fast.cli import build_parser, config_from_args
    from sdclr_fast.eval import evaluate_backbone, write_report
    from sdclr_fast.train.config import PretrainConfig

    cfg = config_from_args(build_parser().parse_args(["pretrain", "--run-dir", "x", "--recipe", "imagenet100-lt"]))
    assert cfg.eval_groups == "imagenet-lt"
    assert PretrainConfig().eval_groups == "thirds"
    assert config_from_args(build_parser().parse_args(["pretrain", "--run-dir", "x", "--eval-groups",
                                                       "imagenet-lt"])).eval_groups == "imagenet-lt"
    with pytest.raises(ValueError, match="eval_groups"):
        PretrainConfig(eval_groups="quartiles")
    data = tiny_data(n=12, classes=3)
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 4))
    res = evaluate_backbone(enc, data, probes=("knn",), knn_k=3, groups="imagenet-lt")
    assert res["knn"].groups == "imagenet-lt"
    text = write_report(tmp_path / "r.md", {"m": res}).read_text()
    assert "> 100 / 20-100 / < 20" in text
    with pytest.raises(ValueError, match="groups"):
        evaluate_backbone(enc, data, probes=("knn",), groups="quartiles")


# ----------------------------------------------------------------------------- official CIFAR-100 S_b

def test_official_sb_outside_the_probe_list_is_the_fewshot_probe_set(tmp_path):
    """The official CIFAR-100 S_b files hold 31-56 images outside the 40k probe list; the official
    code trains the few-shot probe on S_b directly, so must we (it used to stop with "S_b holds
    ... outside probe_train")."""
    from helpers import official_layout, write_cifar_batches

    from sdclr_fast.data import build_dataset
    from sdclr_fast.eval import evaluate_backbone

    y = write_cifar_batches(tmp_path / "c", 100, 12)
    off = official_layout(tmp_path / "split", y, 100, splits=(1,))
    sb = off[1]["S_b"]
    train_list = off["files"]["train"]
    kept = np.setdiff1d(np.load(train_list), sb[::3])  # a third of S_b leaves the probe list
    np.save(train_list, kept)
    data = build_dataset("cifar100-lt", tmp_path / "c", official_split=tmp_path / "split", split=1)
    outside = np.setdiff1d(sb, data.probe_train.indices.numpy())
    assert outside.size == len(sb[::3])
    k = int(np.bincount(y[sb], minlength=100).max())
    few = data.fewshot(k)
    np.testing.assert_array_equal(few.indices.numpy(), data.fewshot_train.indices.numpy())
    assert torch.equal(few.labels, torch.as_tensor(y[few.indices.numpy()]))
    with pytest.raises(ValueError, match="outside probe_train"):
        data.fewshot_positions(k)  # positions into probe_train cannot name them
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8))
    res = evaluate_backbone(enc, data, probes=(f"fewshot-{k}",), probe_options={"epochs": 1}, batch_size=256,
                            select_on_val=False)
    assert 0 <= res[f"fewshot-{k}"].overall <= 100


# ----------------------------------------------------------------------------- ImageNet-100-LT few-shot list

def test_official_imagenet_fewshot_list_is_accepted(tmp_path):
    """The official ImageNet-100-LT 1 % list (12 per class) is drawn from the full training set,
    not from D_i & D_b: a fake list in its format, partly outside the long-tailed train_list."""
    from sdclr_fast.data import build_dataset

    root = tmp_path / "imgs"
    _image_folder(root, counts=(10, 8, 6, 5), size=8)
    items = sorted((p.relative_to(root).as_posix(), int(p.parent.name[-1])) for p in (root / "train").rglob("*.png"))
    by_class = {c: [p for p, y in items if y == c] for c in range(4)}
    lt = [f"{p} {c}" for c in range(4) for p in by_class[c][:[8, 4, 2, 1][c]]]
    few = [f"{p} {c}" for c in range(4) for p in by_class[c][-2:]]  # the last two: outside the LT list
    (tmp_path / "lt.txt").write_text("\n".join(lt) + "\n")
    (tmp_path / "few.txt").write_text("\n".join(few) + "\n")
    data = build_dataset("imagefolder", root, image_size=8, train_list=tmp_path / "lt.txt",
                         fewshot_list=tmp_path / "few.txt")
    assert data.class_counts.tolist() == [8, 4, 2, 1]
    got = data.fewshot(2)
    assert sorted(got.labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    names = [items[i][0] for i in got.indices.tolist()]
    assert sorted(names) == sorted(line.rsplit(" ", 1)[0] for line in few)
    assert not set(got.indices.tolist()) <= set(data.long_tail.indices.tolist())
    # The run keeps it through split.json.
    again = build_dataset("imagefolder", root, image_size=8, split_file=data.save_split(tmp_path / "run"))
    assert torch.equal(again.fewshot(2).indices, got.indices)
    (tmp_path / "bad.txt").write_text("\n".join(few[:-1]) + "\n")
    with pytest.raises(ValueError, match="fewshot_list.*not class-balanced"):
        build_dataset("imagefolder", root, image_size=8, fewshot_list=tmp_path / "bad.txt")
    from sdclr_fast.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["pretrain", "--run-dir", "x", "--dataset", "imagefolder",
                                                      "--fewshot-list", str(tmp_path / "few.txt")]))
    assert cfg.data_options == {"fewshot_list": str(tmp_path / "few.txt")}
