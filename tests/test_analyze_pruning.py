"""`analyze-pruning`: pruned copies, BN re-estimation, per-sample losses, the table and the CLI."""
import json

import numpy as np
import pytest
import torch

from sdclr_fast.data import ContrastiveData, ImageSet
from sdclr_fast.nn import build_model
from sdclr_fast.ops.reference import nt_xent_reference
from sdclr_fast.train import analyze as A

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_data(n=48, classes=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * 30 + [1] * 12 + [2] * 6)[:n]  # long-tailed: 30 / 12 / 6
    images = torch.randint(0, 256, (labels.numel(), 3, size, size), dtype=torch.uint8, generator=g)
    images[:, 0] = (images[:, 0] // 2 + 60 * labels.view(-1, 1, 1)).to(torch.uint8)  # a class signal
    s = ImageSet(images, labels, torch.arange(labels.numel()))
    return ContrastiveData(name="tiny", num_classes=classes, in_channels=3, image_size=size,
                           class_names=["a", "b", "c"], train=s, probe_train=s, val=None, test=s,
                           class_order=torch.arange(classes), mean=(0.45,) * 3, std=(0.25,) * 3, config={"seed": 0})


def tiny_model(method="sdclr"):
    torch.manual_seed(0)
    return build_model(arch="resnet18", method=method, in_channels=3, width=4, cifar_stem=True, proj_dim=8).eval()


@pytest.mark.parametrize("mode", A.MODES)
@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_pruned_copy_zeroes_the_rule_s_weights_and_leaves_the_model(mode, sparsity):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = A.pruned_copy(model, sparsity, mode, seed=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the original is untouched
    convs = list(model.masked_convs().values())
    w = torch.cat([c.weight.detach().flatten() for c in convs])
    pw = torch.cat([c.weight.detach().flatten() for c in net.masked_convs().values()])
    zeroed = (pw == 0) & (w != 0)
    n = w.numel()
    if mode == "magnitude":  # SDCLR's rule: |w| >= the value at index ceil(s * n) of the sorted |w| stays
        t = w.abs().sort().values[int(np.ceil(sparsity * n))]
        assert torch.equal(pw, torch.where(w.abs() >= t, w, torch.zeros_like(w)))
    else:  # about s of the weights, not the smallest ones
        assert abs(float(zeroed.float().mean()) - sparsity) < 0.05
        assert float(w[zeroed].abs().mean()) > 0.5 * float(w.abs().mean())
    assert all(bool(c.mask.all()) for c in net.masked_convs().values())  # zeros live in the weights
    with pytest.raises(ValueError, match="mode"):
        A.pruned_copy(model, sparsity, "l1")
    with pytest.raises(ValueError, match="sparsities"):
        A.pruned_copy(model, 1.0)


def test_recalibrated_bn_statistics_are_the_exact_batch_averages():
    model = tiny_model("simclr")
    data = tiny_data()
    net = A.recalibrate_bn(A.pruned_copy(model, 0.5), data.train.images, data.mean, data.std, batch_size=16)
    assert not net.training
    bn = net.backbone.bn1
    # The first BN sees conv1's output; its running mean is the mean of the three batch means.
    from sdclr_fast.data.augment import eval_transform

    x = eval_transform(data.train.images, data.mean, data.std)
    with torch.no_grad():
        y = net.backbone.conv1(x)
    means = torch.stack([y[i:i + 16].mean((0, 2, 3)) for i in range(0, 48, 16)]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1  # restored


def test_per_sample_losses_match_the_reference_and_pair_the_same_views():
    model = tiny_model()
    data = tiny_data()
    d1, p1 = A.per_sample_losses(model, model, data, temperature=0.2, batch_size=16, seed=1)
    assert d1.dtype == torch.float64 and d1.shape == (48,)
    torch.testing.assert_close(d1, p1)  # an unpruned "pruned" network: the same pairs, the same loss
    d2, _ = A.per_sample_losses(model, model, data, temperature=0.2, batch_size=16, seed=1)
    assert torch.equal(d1, d2)
    # Against the reference on the first batch, built the documented way.
    from sdclr_fast.data.augment import TwoViewAugment

    order = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    aug = TwoViewAugment(8, 3, data.mean, data.std)
    idx = order[:16]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1 * 1_000_003 + 0)
        v1, v2 = aug(data.train.images[idx])
    with torch.no_grad():
        rows = nt_xent_reference(model(v1), model(v2), 0.2, reduction="none").double()
    torch.testing.assert_close(d1[idx], 0.5 * (rows[:16] + rows[16:]), rtol=1e-5, atol=1e-5)


def test_analyze_model_reports_every_group_and_the_deltas():
    model = tiny_model()
    data = tiny_data()
    res = A.analyze_model(model, data, sparsities=[0.5], modes=["magnitude", "random"], probe_epochs=2, knn_k=5,
                          loss_batch_size=16, batch_size=16, progress=lambda *_: None)
    assert [(r["mode"], r["sparsity"]) for r in res["pruned"]] == [("magnitude", 0.5), ("random", 0.5)]
    assert res["class_counts"] == [30, 12, 6]
    for r in res["pruned"]:
        assert 0.45 < r["density"] < 0.55
        for m in A.MEASURES:
            pc = np.array(r[m]["per_class"], dtype=float) - np.array(res["dense"][m]["per_class"], dtype=float)
            np.testing.assert_allclose(r["delta"][m]["per_class"], pc)
            # groups of 3 classes: one class each (major = 0, moderate = 1, minor = 2)
            assert r["delta"][m]["major"] == pytest.approx(pc[0]) and r["delta"][m]["minor"] == pytest.approx(pc[2])
    table = A.format_summary({"SDCLR": [res, res]})
    assert table.count("\n") == 2 + 2 * 3 - 1 and "± 0.00" in table
    rows = A.summary_rows({"SDCLR": res})
    r0 = rows[0]
    assert r0["minor - major"][0] == pytest.approx(r0["minor"][0] - r0["major"][0])
    with pytest.raises(ValueError, match="bn"):
        A.analyze_model(model, data, bn="none")
    with pytest.raises(ValueError, match="modes"):
        A.analyze_model(model, data, modes=["l1"])
    with pytest.raises(ValueError, match="sparsities"):
        A.analyze_model(model, data, sparsities=[0.0])


def test_write_analysis_files(tmp_path):
    model = tiny_model("simclr")
    res = A.analyze_model(model, tiny_data(), sparsities=[0.9], modes=["magnitude"], probe_epochs=1, knn_k=5,
                          loss_batch_size=16, batch_size=16, progress=lambda *_: None, bn="keep")
    paths = A.write_analysis({"SimCLR": res}, tmp_path)
    assert paths["plot"].stat().st_size > 1000
    assert "| SimCLR | magnitude | 0.9 | loss | 1 |" in paths["report"].read_text()
    assert json.loads(paths["json"].read_text())["SimCLR"]["bn"] == "keep"


def test_analyze_pruning_command_on_a_run(tmp_path, capsys):
    from PIL import Image

    from sdclr_fast.cli import main

    rng = np.random.default_rng(0)
    for split, counts in (("train", (16, 8, 6, 4)), ("test", (4, 4, 4, 4))):
        for c, n in enumerate(counts):
            d = tmp_path / "images" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (8, 8, 3), dtype=np.uint8)
                img[(c // 2) * 4:(c // 2 + 1) * 4, (c % 2) * 4:(c % 2 + 1) * 4] += 150
                Image.fromarray(img).save(d / f"{i}.png")
    run = tmp_path / "run"
    assert main(["pretrain", "--method", "simclr", "--dataset", "imagefolder", "--data-root", str(tmp_path / "images"),
                 "--image-size", "8", "--width", "4", "--epochs", "1", "--batch-size", "8", "--lr", "0.1",
                 "--device", "cpu", "--no-progress", "--no-tensorboard", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["analyze-pruning", "--run-dir", str(run), "--sparsities", "0.5", "0.9", "--modes", "magnitude",
                 "--probe-epochs", "2", "--knn-k", "3", "--test-per-class", "2", "--loss-per-class", "5",
                 "--bn-images", "10", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| SimCLR | magnitude | 0.9 | linear | 1 |" in out and "minor − major" in out
    saved = json.loads((run / "pruning" / "pruning_damage.json").read_text())["SimCLR"][0]
    assert [r["sparsity"] for r in saved["pruned"]] == [0.5, 0.9]
    assert (run / "pruning" / "pruning_damage.png").exists()
    assert "loss_per_class=5" in (run / "pruning" / "pruning_damage.md").read_text()
    with pytest.raises(SystemExit):
        main(["analyze-pruning", "--run-dir", str(run), "--sparsities", "1.5", "--device", "cpu"])


def test_reference_gets_the_same_bn_reestimation_and_draws_are_balanced():
    model = tiny_model("simclr")
    data = tiny_data()
    kw = dict(sparsities=[0.3], modes=["magnitude"], probe_epochs=1, knn_k=5, loss_batch_size=16, batch_size=16,
              progress=lambda *_: None)
    res = A.analyze_model(model, data, **kw)
    ref = A.recalibrate_bn(__import__("copy").deepcopy(model), data.long_tail.images, data.mean, data.std,
                           batch_size=16)
    pairs = A.LossPairs(ref, data, temperature=0.2, batch_size=16)
    per_class = [float(pairs.dense[data.long_tail.labels == c].mean()) for c in range(3)]
    np.testing.assert_allclose(res["dense"]["loss"]["per_class"], per_class, rtol=1e-12)
    kept = A.analyze_model(model, data, bn="keep", **kw)  # the stored statistics: another reference
    assert kept["dense"]["loss"]["per_class"] != res["dense"]["loss"]["per_class"]
    draw = A.balanced_draw(data.long_tail, 3, 7, seed=2)
    assert np.bincount(draw.labels.numpy()).tolist() == [7, 7, 6]
    assert torch.equal(draw.indices, draw.indices.sort().values)
    with pytest.raises(ValueError, match="per_class"):
        A.balanced_draw(data.long_tail, 3, 0)
    with pytest.raises(ValueError, match="bn_images"):
        A.analyze_model(model, data, bn_images=1, **kw)
