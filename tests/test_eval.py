"""Evaluation: group metrics, balancedness, linear probe, kNN, feature extraction, plot and report."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sdclr_fast.data import ContrastiveData
from sdclr_fast.data.assemble import assemble
from sdclr_fast.eval.linear import step_factor
from sdclr_fast.eval import (EvalResult, balancedness, evaluate_backbone, evaluate_predictions, extract_features,
                             group_classes, knn_predict, linear_probe, mean_std, parse_probe, per_class_accuracy,
                             plot_per_class_accuracy, write_report)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- groups and metrics

def test_group_classes_cifar_sizes():
    g = group_classes(np.array([4500, 2697, 1617, 969, 581, 348, 208, 125, 75, 45]))
    assert g["major"].tolist() == [0, 1, 2, 3]
    assert g["moderate"].tolist() == [4, 5, 6] and g["minor"].tolist() == [7, 8, 9]
    sizes = {k: len(v) for k, v in group_classes(np.arange(100, 0, -1)).items()}
    assert sizes == {"major": 34, "moderate": 33, "minor": 33}
    sizes = {k: len(v) for k, v in group_classes(np.arange(11)).items()}
    assert sizes == {"major": 5, "moderate": 3, "minor": 3}      # the extra classes go to major
    g = group_classes(torch.tensor([1, 50, 7, 3, 30, 9]))          # ranked by count, not by index
    assert g["major"].tolist() == [1, 4] and g["moderate"].tolist() == [2, 5] and g["minor"].tolist() == [0, 3]
    g = group_classes([5, 5, 5])                                   # ties: lower index = more frequent
    assert (g["major"].tolist(), g["moderate"].tolist(), g["minor"].tolist()) == ([0], [1], [2])
    with pytest.raises(ValueError, match="at least 3"):
        group_classes([3, 1])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=3, max_size=40))
def test_groups_partition_and_order(counts):
    g = group_classes(counts)
    allc = np.concatenate([g["major"], g["moderate"], g["minor"]])
    assert sorted(allc.tolist()) == list(range(len(counts)))
    c = np.asarray(counts)
    # Every major class has at least as many images as every moderate one, and so on.
    assert c[g["major"]].min() >= c[g["moderate"]].max() >= 0
    assert c[g["moderate"]].min() >= c[g["minor"]].max()


def test_balancedness_hand_example():
    assert balancedness([90.0, 60.0, 30.0]) == pytest.approx(math.sqrt(600.0))
    assert balancedness([50.0, 50.0, 50.0]) == 0.0


def test_evaluate_predictions_hand_example():
    # 6 classes; training counts make classes 0, 1 major, 2, 3 moderate, 4, 5 minor.
    counts = np.array([100, 80, 40, 30, 5, 1])
    labels = np.repeat(np.arange(6), 4)
    preds = labels.copy()
    preds[[4, 5, 6, 7]] = 0      # class 1: 0 / 4
    preds[[8]] = 1               # class 2: 3 / 4
    preds[[20, 21]] = 3          # class 5: 2 / 4
    r = evaluate_predictions(torch.from_numpy(preds), torch.from_numpy(labels), torch.from_numpy(counts))
    np.testing.assert_allclose(r.per_class, [100, 0, 75, 100, 100, 50])
    assert r.major == pytest.approx(50.0) and r.moderate == pytest.approx(87.5) and r.minor == pytest.approx(75.0)
    assert r.overall == pytest.approx(100 * 17 / 24) and r.mean_class == pytest.approx(425 / 6)
    expected_std = np.sqrt(np.mean((np.array([50, 87.5, 75]) - 212.5 / 3) ** 2))
    assert r.std == pytest.approx(expected_std)
    back = EvalResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.std == r.std and np.array_equal(back.per_class, r.per_class)


def test_per_class_accuracy_absent_class_and_errors():
    acc = per_class_accuracy([0, 1, 1], [0, 1, 0], 3)
    assert acc[0] == 50 and acc[1] == 100 and np.isnan(acc[2])
    with pytest.raises(ValueError, match="shape"):
        per_class_accuracy([0, 1], [0, 1, 0], 3)
    with pytest.raises(ValueError, match="labels"):
        per_class_accuracy([0], [5], 3)
    with pytest.raises(ValueError, match="integers"):
        per_class_accuracy([0.5], [0], 3)


def test_mean_std_population():
    def res(overall):
        return EvalResult(overall, overall, 1, 2, 3, 4, np.zeros(3), np.array([3, 2, 1]))

    s = mean_std([res(10.0), res(20.0), res(30.0)])
    assert s["overall"] == pytest.approx((20.0, np.std([10, 20, 30])))
    assert s["std"] == (4.0, 0.0)
    with pytest.raises(ValueError, match="empty"):
        mean_std([])


# ----------------------------------------------------------------------------- linear probe

def _separable(n_per_class, num_classes, dim, seed, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(num_classes, dim) * 3.0
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + noise * torch.randn(len(y), dim, generator=g)
    return x.relu(), y  # non-negative, like post-ReLU pooled features


def test_linear_probe_separable_features():
    x, y = _separable(40, 5, 12, seed=0)
    xt, yt = _separable(20, 5, 12, seed=1)
    r = linear_probe(x, y, xt, 5)
    assert len(r.losses) == 30 and r.losses[-1] < r.losses[0]
    assert (r.predictions == yt).float().mean() >= 0.97
    few = linear_probe(x[::8], y[::8], xt, 5, preset="fewshot", batch_size=8)
    assert len(few.losses) == 100 and (few.predictions == yt).float().mean() >= 0.9
    again = linear_probe(x, y, xt, 5)
    assert torch.equal(again.fc.weight, r.fc.weight)              # seeded init and batch order
    other = linear_probe(x, y, xt, 5, seed=1)
    assert not torch.equal(other.fc.weight, r.fc.weight)


@pytest.mark.parametrize("options", [dict(schedule="cosine"), dict(normalize="l2", lr=1.0),
                                     dict(normalize="standardize", lr=1.0), dict(epochs=6, batch_size=1000)])
def test_linear_probe_options(options):
    x, y = _separable(30, 4, 10, seed=2)
    xt, yt = _separable(15, 4, 10, seed=3)
    r = linear_probe(x, y, xt, 4, **options)
    assert (r.predictions == yt).float().mean() >= 0.95
    assert len(r.losses) == options.get("epochs", 30)
    if options.get("normalize") == "standardize":
        torch.testing.assert_close(r.feature_mean, x.mean(0))


def test_linear_probe_with_flip_views():
    x, y = _separable(30, 4, 10, seed=4)
    views = torch.stack([x, x + 0.05])
    xt, yt = _separable(15, 4, 10, seed=5)
    r = linear_probe(views, y, xt, 4)
    assert (r.predictions == yt).float().mean() >= 0.95
    # Test features with views: the identity view (index 0) is classified.
    r2 = linear_probe(views, y, torch.stack([xt, xt * 0 + 100]), 4)
    assert torch.equal(r2.predictions, r.predictions)


def test_step_schedule_matches_sdclr():
    # SDCLR steps MultiStepLR at the start of each epoch: 9 epochs at 30, 10 at 3, 11 at 0.3.
    lrs = [30 * step_factor(e, (10, 20), 0.1) for e in range(30)]
    assert lrs[:9] == [30] * 9 and lrs[9:19] == pytest.approx([3] * 10) and lrs[19:] == pytest.approx([0.3] * 11)
    # With gamma=0 the lr is 0 from epoch milestone - 1 on: the weights freeze there.
    x, y = _separable(10, 3, 6, seed=6)
    a = linear_probe(x, y, x, 3, epochs=4, milestones=(3,), gamma=0.0)
    b = linear_probe(x, y, x, 3, epochs=2, milestones=(5,))
    torch.testing.assert_close(a.fc.weight, b.fc.weight, rtol=0, atol=0)


def test_linear_probe_selects_best_val_epoch():
    x, y = _separable(20, 3, 6, seed=10)
    xt, _ = _separable(5, 3, 6, seed=11)
    # Validation labels that only an untrained-like classifier matches: the early epoch must win.
    xv, yv = _separable(5, 3, 6, seed=12)
    r = linear_probe(x, y, xt, 3, epochs=6, val_features=xv, val_labels=yv)
    assert len(r.val_accuracies) == 6 and r.val_accuracies[r.best_epoch] == max(r.val_accuracies)
    assert r.best_epoch == r.val_accuracies.index(max(r.val_accuracies))   # first best
    wrong = (yv + 1) % 3
    r2 = linear_probe(x, y, xt, 3, epochs=6, val_features=xv, val_labels=wrong)
    best = r2.best_epoch
    ref = linear_probe(x, y, xt, 3, epochs=best + 1, milestones=(2, 4))
    torch.testing.assert_close(r2.fc.weight, ref.fc.weight, rtol=0, atol=0)
    torch.testing.assert_close(r2.predictions, ref.predictions, rtol=0, atol=0)
    with pytest.raises(ValueError, match="together"):
        linear_probe(x, y, xt, 3, val_features=xv)


def test_linear_probe_errors_and_divergence():
    x, y = _separable(5, 3, 4, seed=7)
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe(x, y, x, 1)
    with pytest.raises(ValueError, match="train_labels"):
        linear_probe(x, y + 3, x, 3)
    with pytest.raises(ValueError, match="dimensions"):
        linear_probe(x, y, x[:, :3], 3)
    with pytest.raises(ValueError, match="preset"):
        linear_probe(x, y, x, 3, preset="half")
    with pytest.raises(ValueError, match="normalize"):
        linear_probe(x, y, x, 3, normalize="bn")
    with pytest.raises(ValueError, match="train_features"):
        linear_probe(x.long(), y, x, 3)
    with pytest.raises(FloatingPointError, match="normalize='l2'"):
        linear_probe(x * 1e30, y, x, 3, epochs=2)


# ----------------------------------------------------------------------------- kNN

def _knn_reference(bank, labels, queries, num_classes, k, temperature, weighting):
    """Float64 loops: (predictions, per-query class votes)."""
    bank = bank.double() / bank.double().norm(dim=1, keepdim=True)
    preds, all_votes = [], []
    for q in queries.double():
        q = q / q.norm()
        sims = bank @ q
        order = sorted(range(len(sims)), key=lambda i: -float(sims[i]))[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(labels[i])] += math.exp(float(sims[i]) / temperature) if weighting == "exp" else 1.0
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
        all_votes.append(votes)
    return torch.tensor(preds), all_votes


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(1, 10), d=st.integers(2, 7), c=st.integers(1, 5),
       k=st.integers(1, 50), weighting=st.sampled_from(["exp", "majority"]), seed=st.integers(0, 10_000))
def test_knn_matches_reference(n, m, d, c, k, weighting, seed):
    # d >= 2 with Gaussian rows: exactly tied similarities (where topk may pick either neighbour)
    # have probability zero; in d = 1 every similarity is +-1 and the k-th neighbour is ambiguous.
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(n, d, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    queries = torch.randn(m, d, generator=g)
    got = knn_predict(bank, labels, queries, c, k=k, weighting=weighting, temperature=0.5, chunk=3)
    want, votes = _knn_reference(bank, labels, queries, c, min(k, n), 0.5, weighting)
    for i in range(m):
        if got[i] != want[i]:  # only a float32-vs-float64 near-tie of the weighted votes may differ
            a, b = votes[i][int(got[i])], votes[i][int(want[i])]
            assert weighting == "exp" and abs(a - b) <= 1e-5 * max(a, b), (i, votes[i])


def test_knn_separable_and_ties():
    x, y = _separable(30, 4, 8, seed=8)
    xt, yt = _separable(10, 4, 8, seed=9)
    assert torch.equal(knn_predict(x, y, xt, 4, k=20), yt)
    # Two equally similar neighbours of different classes: the lower class index wins.
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert knn_predict(bank, torch.tensor([1, 0]), torch.tensor([[2.0, 0.0]]), 2, k=2,
                       weighting="majority").tolist() == [0]
    with pytest.raises(ValueError, match="k must"):
        knn_predict(x, y, xt, 4, k=0)
    with pytest.raises(ValueError, match="dimensions"):
        knn_predict(x, y, xt[:, :3], 4)
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(x, y.float(), xt, 4)


# ----------------------------------------------------------------------------- features and end to end

class _TinyNet(nn.Module):
    def __init__(self, c=1):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(c, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.feature_dim = 8

    def forward(self, x):
        return self.bn(self.conv(x)).relu().mean(dim=(2, 3))


def _tiny_data(per_class=(12, 8, 6, 4), test_per_class=6, size=6, with_val=False):
    # Class c is an image of brightness 60 * c plus noise, so simple features separate the classes.
    g = torch.Generator().manual_seed(0)

    def make(counts):
        y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
        x = (60.0 * y.view(-1, 1, 1, 1) + 8 * torch.randn(len(y), 1, size, size, generator=g)).clamp(0, 255)
        return x.to(torch.uint8), y

    tx, ty = make(per_class)
    sx, sy = make([test_per_class] * len(per_class))
    vx, vy = make([2] * len(per_class)) if with_val else (None, None)
    return assemble("tiny", num_classes=len(per_class), class_names=[str(i) for i in range(len(per_class))],
                    train_images=tx, train_labels=ty, test_images=sx, test_labels=sy, val_images=vx,
                    val_labels=vy, ratio=None, seed=0)


def test_extract_features_eval_mode_and_restore():
    data = _tiny_data()
    net = _TinyNet()
    net.bn.running_mean.fill_(0.3)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    f = extract_features(net, data.test, data.mean, data.std, batch_size=5)
    assert net.training and net.bn.training                       # modes restored
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k                        # running stats untouched
    net.eval()
    with torch.no_grad():
        from sdclr_fast.data import eval_transform

        ref = net(eval_transform(data.test.images, data.mean, data.std))
        ref_flip = net(eval_transform(data.test.images, data.mean, data.std).flip(-1))
    torch.testing.assert_close(f.features, ref)
    assert torch.equal(f.labels, data.test.labels) and not f.features.requires_grad
    ff = extract_features(lambda x: net(x), data.test, data.mean, data.std, flip=True)
    assert ff.features.shape == (2, len(data.test), 8)
    torch.testing.assert_close(ff.features[1], ref_flip)
    # The module behind a bound method or a partial is frozen too; a lambda needs module=.
    net.train()
    from functools import partial

    for enc, kw in ((net.forward, {}), (partial(net.forward), {}), (lambda x: net(x), {"module": net})):
        got = extract_features(enc, data.test, data.mean, data.std, **kw)
        torch.testing.assert_close(got.features, ref)
        assert net.training and torch.equal(net.bn.running_mean, before["bn.running_mean"])
    with pytest.raises(ValueError, match="module"):
        extract_features(lambda x: net(x), data.test, data.mean, data.std, module=3)
    raw = extract_features(net, data.test.images, data.mean, data.std)
    assert raw.labels.numel() == 0
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        extract_features(lambda x: x, data.test, data.mean, data.std)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(net, data.test.images.float(), data.mean, data.std)
    with pytest.raises(ValueError, match="callable"):
        extract_features(3, data.test, data.mean, data.std)


def test_evaluate_backbone_end_to_end(tmp_path):
    data = _tiny_data()
    assert isinstance(data, ContrastiveData) and data.class_counts.tolist() == [12, 8, 6, 4]
    def flatten(x):
        # Radial-basis codes of the mean brightness: separable by class, for probes and cosine kNN.
        b = x.mean(dim=(1, 2, 3)).unsqueeze(1)
        return torch.exp(-(b - torch.linspace(-3, 3, 12)) ** 2 / 0.5)

    # features computed once (brightness codes would not survive the probe's zero-padded crops)
    out = evaluate_backbone(flatten, data, probes=("linear", "fewshot-3", "knn"), batch_size=7,
                            probe_options=dict(epochs=10, lr=1.0), knn_k=5, augment=False)
    assert set(out) == {"linear", "fewshot-3", "knn"}
    for r in out.values():
        assert r.overall >= 90 and r.per_class.shape == (4,)
        assert r.class_counts.tolist() == [12, 8, 6, 4]
    flipped = evaluate_backbone(flatten, data, probes=("linear",), flip=True, augment=False,
                                probe_options=dict(epochs=10, lr=1.0))
    assert flipped["linear"].overall >= 90
    with pytest.raises(ValueError, match="unknown probe"):
        evaluate_backbone(flatten, data, probes=("svm",))
    with pytest.raises(ValueError, match="no val split"):
        evaluate_backbone(flatten, data, on="val")
    with pytest.raises(ValueError, match="probe_options may not set"):
        evaluate_backbone(flatten, data, probe_options=dict(seed=3))
    with pytest.raises(ValueError, match="select_on_val"):
        evaluate_backbone(flatten, data, select_on_val=True)
    with_val = _tiny_data(with_val=True)
    assert len(with_val.val) == 8
    sel = evaluate_backbone(flatten, with_val, probes=("linear", "knn"), probe_options=dict(epochs=5, lr=1.0),
                            augment=False)
    assert sel["linear"].overall >= 90 and sel["knn"].overall >= 90
    on_val = evaluate_backbone(flatten, with_val, probes=("knn",), on="val")
    assert on_val["knn"].overall >= 90
    assert parse_probe("fewshot-0.01") == ("fewshot", 0.01) and parse_probe("fewshot-100") == ("fewshot", 100)


# ----------------------------------------------------------------------------- plot and report

def _fake_result(seed, counts=(50, 30, 20, 10, 5, 2)):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), 10)
    preds = np.where(rng.random(labels.size) < 0.7, labels, 0)
    return evaluate_predictions(preds, labels, np.array(counts))


def test_plot_and_report_files(tmp_path):
    results = {"SimCLR": [_fake_result(0), _fake_result(1)], "SDCLR": [_fake_result(2), _fake_result(3)],
               "DnC": _fake_result(4)}
    png = plot_per_class_accuracy(results, tmp_path / "plots" / "per_class.png", title="linear probe")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    report = write_report(tmp_path / "report.md",
                          {m: {"linear": r, "knn": _fake_result(9)} for m, r in results.items()},
                          plots=[png], notes="Fashion-MNIST-LT, ratio 100.")
    text = report.read_text()
    assert "| method | probe | splits | overall | major | moderate | minor | std |" in text
    sim = mean_std(results["SimCLR"])
    assert f"| SimCLR | linear | 2 | {sim['overall'][0]:.2f} ± {sim['overall'][1]:.2f} |" in text
    dnc = results["DnC"]
    assert f"| DnC | linear | 1 | {dnc.overall:.2f} | {dnc.major:.2f} | {dnc.moderate:.2f} | {dnc.minor:.2f} | " \
           f"{dnc.std:.2f} |" in text
    assert "](plots/per_class.png)" in text and "Fashion-MNIST-LT, ratio 100." in text
    raw = json.loads((tmp_path / "report.json").read_text())
    assert raw["SDCLR"]["linear"]["mean_std"]["overall"][0] == pytest.approx(mean_std(results["SDCLR"])["overall"][0])
    with pytest.raises(ValueError, match="non-empty"):
        write_report(tmp_path / "r.md", {})
    with pytest.raises(ValueError, match="EvalResult"):
        plot_per_class_accuracy({"x": [1, 2]}, tmp_path / "x.png")


# ---------------------------------------------------------------- the probe's augmentation
def _pad_crop_flip_reference(x, padding, offsets, flips):
    out = []
    for i in range(x.shape[0]):
        p = torch.nn.functional.pad(x[i], (padding,) * 4)
        oy, ox = int(offsets[0, i]), int(offsets[1, i])
        crop = p[:, oy:oy + x.shape[2], ox:ox + x.shape[3]]
        out.append(crop.flip(-1) if flips[i] else crop)
    return torch.stack(out)


@settings(deadline=None, max_examples=25)
@given(b=st.integers(1, 5), c=st.sampled_from([1, 3]), h=st.integers(1, 9), w=st.integers(1, 9),
       padding=st.integers(0, 4), seed=st.integers(0, 2 ** 16))
def test_pad_crop_flip_matches_a_per_image_reference(b, c, h, w, padding, seed):
    from sdclr_fast.data.augment import pad_crop_flip

    x = torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8)
    got = pad_crop_flip(x, padding, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)  # the same draws, in the op's order
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=g)
    flips = torch.randint(0, 2, (b,), generator=g).bool()
    assert got.dtype == torch.uint8 and torch.equal(got, _pad_crop_flip_reference(x, padding, offsets, flips))


def test_pad_crop_flip_covers_every_offset_and_both_flips():
    from sdclr_fast.data.augment import pad_crop_flip

    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(4000, 1, 1, 1)
    out = pad_crop_flip(x, 2, torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) == 5 * 5 * 2  # 25 windows, each flipped or not
    with pytest.raises(ValueError, match="padding"):
        pad_crop_flip(x, -1)


def test_linear_probe_accepts_per_epoch_features():
    from sdclr_fast.eval import linear_probe

    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(10)
    x = torch.randn(40, 6, generator=g) + 3 * torch.nn.functional.one_hot(y, 6).float()
    test = torch.randn(8, 6, generator=g)
    fixed = linear_probe(x, y, test, 4, epochs=5, lr=0.5)
    seen = []

    def per_epoch(epoch):
        seen.append(epoch)
        return x

    same = linear_probe(per_epoch, y, test, 4, epochs=5, lr=0.5)
    assert seen == [0, 1, 2, 3, 4]  # fresh features every epoch
    assert torch.equal(same.fc.weight, fixed.fc.weight) and torch.equal(same.predictions, fixed.predictions)
    with pytest.raises(ValueError, match="expected"):
        linear_probe(lambda e: x if e == 0 else x[:5], y, test, 4, epochs=2)


def test_evaluate_backbone_augments_the_probe_images_every_epoch():
    data = _tiny_data()
    seen = []

    def spy(x):
        seen.append(x.clone())
        return x.flatten(1)[:, :6]

    evaluate_backbone(spy, data, probes=("linear",), batch_size=1000, probe_options=dict(epochs=3, lr=0.1))
    train_passes = [v for v in seen if v.shape[0] == len(data.probe_train)]
    assert len(train_passes) == 3  # one augmented pass over the probe set per epoch
    assert not torch.equal(train_passes[0], train_passes[1])
    seen.clear()
    evaluate_backbone(spy, data, probes=("linear",), batch_size=1000, probe_options=dict(epochs=3, lr=0.1))
    again = [v for v in seen if v.shape[0] == len(data.probe_train)]
    assert all(torch.equal(a, b) for a, b in zip(train_passes, again))  # seeded: repeatable
