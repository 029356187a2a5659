"""Pretraining loop: resume equals an uninterrupted run, mask refresh, checkpoint validation, NaN stop,
schedule and config checks, evaluation of a run. Tiny synthetic data (4 classes of 8x8 images) and a
width-4 ResNet-18, so each test takes seconds."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch

from sdclr_fast.ops.reference import magnitude_masks_reference
from sdclr_fast.train import (CheckpointError, NonFiniteLossError, PretrainConfig, load_checkpoint, load_model,
                              read_metrics, save_checkpoint, warmup_cosine_factor)
from sdclr_fast.train.pretrain import pretrain
from sdclr_fast.train.checkpoint import capture_rng, restore_rng


from helpers import PRETRAIN_DATA as DATA, assert_same_state, free_port  # noqa: E402
from helpers import tiny_pretrain_config as tiny_config, tiny_pretrain_data as tiny_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")




def _state(path):
    return load_checkpoint(path)




# ---------------------------------------------------------------- resume
@pytest.mark.parametrize("method", ["sdclr", "simclr"])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, method):
    cfg = tiny_config(method)
    full = pretrain(cfg, run_dir=tmp_path / "full", data=DATA)
    # "Kill" after the first epoch, then resume to the end.
    part = pretrain(cfg, run_dir=tmp_path / "part", data=DATA, stop_at_epoch=1)
    first = _state(part)
    assert first["epoch"] == 1 and not first["finished"]
    resumed = pretrain(cfg, run_dir=tmp_path / "part", data=DATA, resume=True)
    a, b = _state(full), _state(resumed)
    assert a["epoch"] == b["epoch"] == 2 and a["finished"] and b["finished"]
    assert_same_state(a["model"], b["model"], "model")
    assert_same_state(a["optimizer"], b["optimizer"], "optimizer")
    assert a["scheduler"] == b["scheduler"]
    # The resumed run's metrics have one row per epoch, the interrupted ones dropped.
    rows = [r for r in read_metrics(tmp_path / "part") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in rows] == [0, 1]
    full_rows = [r for r in read_metrics(tmp_path / "full") if r["kind"] == "epoch"]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in rows)
    assert (tmp_path / "part" / "split.json").exists() and (tmp_path / "part" / "config.json").exists()


def test_different_seed_gives_different_weights(tmp_path):
    # Guards the equality test above against a loop that ignores its inputs.
    a = _state(pretrain(tiny_config(epochs=1), run_dir=tmp_path / "a", data=DATA))
    b = _state(pretrain(tiny_config(epochs=1, seed=4), run_dir=tmp_path / "b", data=DATA))
    assert not torch.equal(a["model"]["backbone.conv1.weight"], b["model"]["backbone.conv1.weight"])


def test_resume_of_finished_run_is_a_noop(tmp_path, capsys):
    path = pretrain(tiny_config(epochs=1), run_dir=tmp_path, data=DATA)
    before = path.read_bytes()
    capsys.readouterr()
    again = pretrain(tiny_config(epochs=1), run_dir=tmp_path, data=DATA, resume=True)
    assert again == path and path.read_bytes() == before
    assert "already finished" in capsys.readouterr().out


def test_existing_run_needs_resume_and_same_config(tmp_path):
    pretrain(tiny_config(), run_dir=tmp_path, data=DATA, stop_at_epoch=1)
    with pytest.raises(ValueError, match="resume"):
        pretrain(tiny_config(), run_dir=tmp_path, data=DATA)
    with pytest.raises(ValueError, match=r"lr: stored 0\.1, given 0\.2"):
        pretrain(tiny_config(lr=0.2), run_dir=tmp_path, data=DATA, resume=True)
    with pytest.raises(CheckpointError, match="method='sdclr'"):
        pretrain(tiny_config("simclr"), run_dir=tmp_path, data=DATA, resume=True)
    with pytest.raises(ValueError, match="subset"):
        pretrain(tiny_config(), run_dir=tmp_path, data=DATA, resume=True, indices=torch.arange(40))


# ---------------------------------------------------------------- SDCLR masks
def _mask_keys(state):
    return sorted(k for k, v in state.items() if v.dtype == torch.bool)


def test_sdclr_masks_recomputed_every_epoch(tmp_path):
    cfg = tiny_config(epochs=3)
    pretrain(cfg, run_dir=tmp_path, data=DATA, stop_at_epoch=2)
    after2 = _state(tmp_path / "checkpoint.pt")["model"]
    pretrain(cfg, run_dir=tmp_path, data=DATA, resume=True)
    after3 = _state(tmp_path / "checkpoint.pt")["model"]
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "epoch"]
    assert len(rows) == 3
    for r in rows:  # global pruning at 0.9 keeps ~10% (ties could only add a few)
        assert abs(r["kept_fraction"] - 0.1) < 0.005 and r["prune_s"] >= 0
    # The masks used in epoch 3 are the SDCLR rule applied to the weights at the end of epoch 2.
    keys = _mask_keys(after3)
    assert keys, "the model state holds no bool masks"
    weights = [after2[k[: -len("mask")] + "weight"] if k.endswith("mask") else None for k in keys]
    assert all(w is not None for w in weights), keys
    expected = magnitude_masks_reference(weights, 0.9)
    for k, e in zip(keys, expected):
        assert torch.equal(after3[k], e), k
    # ... and they changed since epoch 2 (the weights moved).
    assert any(not torch.equal(after2[k], after3[k]) for k in keys)


def test_simclr_has_no_pruning_metrics(tmp_path):
    pretrain(tiny_config("simclr", epochs=1), run_dir=tmp_path, data=DATA)
    row = [r for r in read_metrics(tmp_path) if r["kind"] == "epoch"][0]
    assert "kept_fraction" not in row and row["prune_s"] == 0


# ---------------------------------------------------------------- library entry points for DnC
def test_indices_and_init_checkpoint(tmp_path):
    base = pretrain(tiny_config(epochs=1), run_dir=tmp_path / "base", data=DATA)
    idx = torch.arange(0, 48, 2)  # 24 images -> one step of 16
    # A vanishing lr leaves the initialised weights (almost) where the base run ended.
    cfg = tiny_config(epochs=1, lr=1e-12)
    out = pretrain(cfg, run_dir=tmp_path / "expert", data=DATA, indices=idx, init_checkpoint=base)
    st = _state(out)
    assert st["train_indices"] == idx.tolist()
    steps = [r for r in read_metrics(tmp_path / "expert") if r["kind"] == "epoch"][0]["step"]
    assert steps == 1
    b = _state(base)["model"]
    for k, v in st["model"].items():
        if v.is_floating_point() and k.endswith("weight") and "bn" not in k:
            torch.testing.assert_close(v, b[k], rtol=0, atol=1e-6)
    # ... and a fresh start from the same seed is different.
    fresh = _state(pretrain(cfg, run_dir=tmp_path / "fresh", data=DATA, indices=idx))["model"]
    assert any(not torch.equal(fresh[k], st["model"][k]) for k in fresh if fresh[k].is_floating_point())


def test_load_model_restores_the_trained_model(tmp_path):
    path = pretrain(tiny_config(epochs=1), run_dir=tmp_path, data=DATA)
    model = load_model(path)
    assert not model.training
    assert_same_state(model.state_dict(), _state(path)["model"], "model")
    with torch.no_grad():
        x = torch.randn(5, 1, 8, 8)
        z = model(x, branch="dense")
        zp = model(x, branch="pruned")
    assert z.shape == (5, 16) and torch.isfinite(z).all() and not torch.equal(z, zp)


def test_batch_larger_than_subset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        pretrain(tiny_config(batch_size=64), run_dir=tmp_path, data=DATA)


# ---------------------------------------------------------------- bad checkpoints
def test_truncated_checkpoint_names_the_file(tmp_path):
    path = pretrain(tiny_config(epochs=1), run_dir=tmp_path, data=DATA)
    raw = path.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 30, 10):
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match=str(path)):
            load_model(path)
        with pytest.raises(CheckpointError, match=str(path)):
            pretrain(tiny_config(epochs=1), run_dir=tmp_path, data=DATA, resume=True)


def test_foreign_files_are_rejected(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="not an sdclr-fast checkpoint") as e:
        load_checkpoint(other)
    assert str(other) in str(e.value)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=str(text)):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    future = tmp_path / "future.pt"
    save_checkpoint({"config": {}, "model": {}, "epoch": 0}, future)
    st = torch.load(future, weights_only=True)
    st["version"] = 99
    torch.save(st, future)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(future)
    path = pretrain(tiny_config("simclr", epochs=1), run_dir=tmp_path / "run", data=DATA)
    with pytest.raises(CheckpointError, match="method='simclr'"):
        load_checkpoint(path, expect={"method": "sdclr"})


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"config": {}, "model": {"w": torch.ones(3)}, "epoch": 1}, path)
    before = path.read_bytes()

    def dying_fsync(fd):  # killed after the new bytes went to the temporary file, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr("sdclr_fast.files.os.fsync", dying_fsync)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"config": {}, "model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    assert path.read_bytes() == before
    # no temporary file left; the previous checkpoint was rotated before the write began
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert (tmp_path / "checkpoint.prev.pt").read_bytes() == before


# ---------------------------------------------------------------- NaN
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import sdclr_fast.ops.nt_xent as ntx

    cfg = tiny_config()
    path = pretrain(cfg, run_dir=tmp_path, data=DATA, stop_at_epoch=1)
    good = path.read_bytes()
    real = ntx.nt_xent
    calls = []

    def nan_on_second_step(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(ntx, "nt_xent", nan_on_second_step)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 2") as e:
        pretrain(cfg, run_dir=tmp_path, data=DATA, resume=True)
    assert str(path) in str(e.value)
    assert path.read_bytes() == good
    assert _state(path)["epoch"] == 1


def test_diverging_weights_stop_the_run(tmp_path):
    # An absurd lr blows the weights up; the run must stop with a clear error, not save NaNs.
    with pytest.raises(NonFiniteLossError, match=r"epoch \d+, step \d+|weights became non-finite"):
        pretrain(tiny_config(lr=1e30, warmup_epochs=0, epochs=3), run_dir=tmp_path, data=DATA)
    if (tmp_path / "checkpoint.pt").exists():
        st = _state(tmp_path / "checkpoint.pt")
        assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())


# ---------------------------------------------------------------- pieces
def test_schedule_warmup_then_cosine():
    f = [warmup_cosine_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[10] == 1.0 and f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    # Warm-up longer than the run is clipped to it.
    g = [warmup_cosine_factor(s, 5, 50) for s in range(5)]
    assert g == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert warmup_cosine_factor(0, 4, 0) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine_factor(0, 0, 0)


def test_config_checks_name_the_field():
    for field, bad in [("method", "byol"), ("lr", 0.0), ("lr", float("nan")), ("epochs", 0), ("batch_size", 1.5),
                       ("sparsity", 1.0), ("sparsity", -0.1), ("temperature", 0), ("prune_scope", "row"),
                       ("momentum", 2.0), ("warmup_epochs", -1), ("width", True), ("amp", "yes"), ("seed", -1),
                       ("ratio", 0.5), ("image_size", 0)]:
        with pytest.raises(ValueError, match=field):
            PretrainConfig(**{field: bad})
    c = PretrainConfig(epochs=3, warmup_epochs=10)
    assert c.warmup_epochs_effective == 3
    assert PretrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown config fields"):
        PretrainConfig.from_dict({"epochs": 3, "bogus": 1})


def test_rng_states_round_trip():
    g = torch.Generator().manual_seed(5)
    state = capture_rng(g)
    a = (torch.rand(3), np.random.rand(3), random.random(), torch.randperm(10, generator=g))
    restore_rng(state, g)
    b = (torch.rand(3), np.random.rand(3), random.random(), torch.randperm(10, generator=g))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and torch.equal(a[3], b[3])


def test_evaluate_checkpoint_reports_groups(tmp_path):
    from sdclr_fast.train.evaluate import evaluate_checkpoint, format_table, write_outputs

    path = pretrain(tiny_config(epochs=1), run_dir=tmp_path, data=DATA)
    label, res = evaluate_checkpoint(path, probes=("linear", "fewshot-2", "knn"), data=DATA, device="cpu",
                                     probe_options={"epochs": 3}, knn_k=5)
    assert label.startswith("SDCLR")
    assert set(res) == {"linear", "fewshot-2", "knn"}
    for r in res.values():
        assert 0 <= r.overall <= 100 and r.std >= 0 and r.per_class.shape == (4,)
    table = format_table({label: res})
    assert "major" in table and "knn" in table
    out = write_outputs({label: res}, tmp_path / "report", title="t")
    assert out["report"].exists() and all(p.exists() for p in out["plots"])
    assert json.loads(out["report"].with_suffix(".json").read_text())


# ---------------------------------------------------------------- demo planning
def test_demo_budget_plan_and_stratified_subset():
    from sdclr_fast.train.demo import BATCH, plan_budget, stratified_subset

    # Enough time for 5 epochs of 1000 images at 1 s per step of BATCH for each of two methods.
    steps = 5 * 1000 / BATCH
    epochs, frac = plan_budget(2 * steps * 1.0, {"simclr": 1.0, "sdclr": 1.0}, 1000, dnc=False)
    assert (epochs, frac) == (5, 1.0)
    # Too slow for one epoch: one epoch over a fraction of the data.
    epochs, frac = plan_budget(0.5 * 2 * (1000 / BATCH), {"simclr": 1.0, "sdclr": 1.0}, 1000, dnc=False)
    assert epochs == 1 and frac == pytest.approx(0.5)
    # DnC counts as three more runs.
    e_dnc, _ = plan_budget(5 * steps, {"simclr": 1.0, "sdclr": 1.0}, 1000, dnc=True)
    assert e_dnc == 5
    labels = torch.tensor([0] * 100 + [1] * 10 + [2] * 1)
    idx = stratified_subset(labels, 0.25, seed=0)
    counts = torch.bincount(labels[idx]).tolist()
    assert counts == [25, 3, 1] and torch.equal(idx, torch.sort(idx).values)
    assert torch.equal(idx, stratified_subset(labels, 0.25, seed=0))


# ---------------------------------------------------------------- DDP on CPU (gloo)
def _ddp_worker(rank, world, port, run_dir, method):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    pretrain(tiny_config(method, epochs=2), run_dir=run_dir, data=tiny_data(), stop_at_epoch=1)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sdclr", "simclr"])
def test_ddp_two_processes_on_cpu(tmp_path, method):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path), method), nprocs=2, join=True)
    st = _state(tmp_path / "checkpoint.pt")
    assert st["epoch"] == 1 and len(st["rng"]) == 2  # one RNG state per process
    # Per-process augmentation differs, so the two processes' saved RNG states do too.
    assert not torch.equal(st["rng"][0]["torch"], st["rng"][1]["torch"])
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "epoch"]
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"])
    # Resuming with a different number of processes is refused rather than silently inexact.
    with pytest.raises(ValueError, match="2 process"):
        pretrain(tiny_config(method), run_dir=tmp_path, data=DATA, resume=True)


# ---------------------------------------------------------------- the step's gradient
@pytest.mark.parametrize("method", ["sdclr", "simclr"])
def test_one_backward_step_matches_the_official_three_forward_two_backward_step(method):
    """SDCLR's official loop: pruned view without grad, dense view + backward, pruned view +
    backward; SimCLR's: one forward of the concatenated views. The step here (ContrastiveForward
    and the fused loss, one backward) must give the gradient of the official structure computed
    with the materialising cross-entropy reference loss (float64)."""
    from sdclr_fast.nn import build_model
    from sdclr_fast.ops.nt_xent import nt_xent
    from sdclr_fast.ops.reference import nt_xent_cross_entropy_reference as official_loss
    from sdclr_fast.train.pretrain import ContrastiveForward

    torch.manual_seed(0)
    model = build_model("resnet18", method, in_channels=1, width=4, proj_dim=8).double().train()
    if method == "sdclr":
        model.update_masks(sparsity=0.9)
    v1, v2 = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randn(6, 1, 8, 8, dtype=torch.float64)
    z1, z2 = ContrastiveForward(model, method)(v1, v2)
    nt_xent(z1, z2, 0.2).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    second = "pruned" if method == "sdclr" else "dense"
    if method == "sdclr":
        with torch.no_grad():
            z2_fixed = model(v2, branch=second)
        z1 = model(v1, branch="dense")
        official_loss(z1, z2_fixed, 0.2).backward()
        z2 = model(v2, branch=second)
        official_loss(z1.detach(), z2, 0.2).backward()
    else:  # SimCLR: both views in one batch (BN statistics over 2B), plain autograd
        z = model(torch.cat([v1, v2]))
        official_loss(z[:6], z[6:], 0.2).backward()
    official = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert fast.keys() == official.keys() and len(fast) == len(list(model.parameters()))
    for n in fast:
        torch.testing.assert_close(fast[n], official[n], rtol=1e-9, atol=1e-12, msg=n)


def test_blur_crop_scale_and_random_prune_reach_the_run(tmp_path, monkeypatch):
    from sdclr_fast.data import TwoViewAugment
    from sdclr_fast.nn import SelfCompetitor

    seen = {}
    real_init, real_update = TwoViewAugment.__init__, SelfCompetitor.update_masks

    def init(self, *a, **k):
        seen["augment"] = k
        real_init(self, *a, **k)

    def update(self, *a, **k):
        seen["masks"] = k
        return real_update(self, *a, **k)

    monkeypatch.setattr(TwoViewAugment, "__init__", init)
    monkeypatch.setattr(SelfCompetitor, "update_masks", update)
    path = pretrain(tiny_config("sdclr", epochs=1, crop_scale=(0.5, 1.0), blur_prob=1.0, random_prune=0.2),
                    run_dir=tmp_path, data=DATA)
    assert seen["augment"]["scale"] == (0.5, 1.0) and seen["augment"]["blur_p"] == 1.0
    assert seen["masks"]["random_fraction"] == 0.2
    assert load_checkpoint(path)["finished"]
