"""MoCLR (DnC's base method): the step's loss and gradients against a materialised float64
reference, the EMA update and BYOL's momentum schedule against hand-computed values, kill and
resume bit-identical to an uninterrupted run (the target network included), evaluation on
the online backbone, DDP on two CPU processes."""
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import sdclr_fast.ops.info_nce as info_nce_module
from helpers import assert_same_state, free_port
from sdclr_fast.nn import build_model
from sdclr_fast.train import PretrainConfig, load_checkpoint, load_model, read_metrics
from sdclr_fast.train.moclr import make_target, moclr_loss, momentum_at, update_target
from sdclr_fast.train.pretrain import ContrastiveForward, pretrain
from sdclr_fast.train.run import Preempted
from helpers import PRETRAIN_DATA as DATA, tiny_pretrain_config as tiny_config, tiny_pretrain_data as tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_model():
    return build_model("resnet18", "moclr", in_channels=1, width=4, proj_dim=8).double().train()


# ---------------------------------------------------------------- the step
def test_model_is_simclr_plus_predictor():
    m = _tiny_model()
    s = build_model("resnet18", "simclr", in_channels=1, width=4, proj_dim=8)
    assert [n for n in m.state_dict() if not n.startswith("predictor.")] == list(s.state_dict())
    lin = [x for x in m.predictor.modules() if isinstance(x, torch.nn.Linear)]
    assert [(x.in_features, x.out_features) for x in lin] == [(8, 32), (32, 8)]  # proj -> feature_dim -> proj
    t = make_target(m)
    assert t.predictor is None and not any(p.requires_grad for p in t.parameters())
    assert list(t.state_dict()) == list(s.state_dict())


def test_step_loss_and_gradients_match_materialised_float64_reference():
    torch.manual_seed(0)
    model = _tiny_model()
    target = make_target(model)
    with torch.no_grad():  # a target that differs from the online network, as after training
        for p in target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    v1, v2 = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randn(6, 1, 8, 8, dtype=torch.float64)
    tau = 0.2
    out = ContrastiveForward(model, "moclr", target)(v1, v2)
    loss = moclr_loss(*out, tau)
    loss.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(p.grad is None for p in target.parameters())

    model.zero_grad(set_to_none=True)
    p = model.predictor(model(torch.cat([v1, v2])))
    with torch.no_grad():
        t = target(torch.cat([v1, v2]))
    p1, p2, t1, t2 = p[:6], p[6:], t[:6], t[6:]

    def ce(q, k):  # SimCLR's contrastive loss between q and k, the batch's k as negatives
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / tau
        return F.cross_entropy(logits, torch.arange(q.shape[0]))

    ref = 0.5 * (ce(p1, t2) + ce(p2, t1))
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    # the other pairing (same view) gives another value, so the check above can fail
    assert abs((0.5 * (ce(p1, t1) + ce(p2, t2))).item() - ref.item()) > 1e-3
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(fast[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_momentum_schedule_is_byol_cosine():
    # 1 - (1 - 0.99) (cos(pi k / 4) + 1) / 2
    for k, want in [(0, 0.99), (1, 0.9914644660940672), (2, 0.995), (3, 0.9985355339059327), (4, 1.0)]:
        assert momentum_at(k, 4, 0.99) == pytest.approx(want, abs=1e-15)
    assert momentum_at(0, 100, 0.996) == pytest.approx(0.996, abs=1e-15)
    with pytest.raises(ValueError, match="total_steps"):
        momentum_at(0, 0, 0.99)


def test_ema_update_against_hand_computation():
    torch.manual_seed(1)
    online = _tiny_model()
    target = make_target(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        online(torch.randn(4, 1, 8, 8, dtype=torch.float64))  # new BN running statistics
    before = {n: p.clone() for n, p in target.named_parameters()}
    m = momentum_at(1, 4, 0.99)
    update_target(target, online, m)
    on = dict(online.named_parameters())
    for n, p in target.named_parameters():
        want = m * before[n] + (1 - m) * on[n]
        torch.testing.assert_close(p, want, rtol=1e-12, atol=1e-15, msg=n)
        assert not torch.equal(p, on[n]), n
    ob = dict(online.named_buffers())
    for n, b in target.named_buffers():
        assert torch.equal(b, ob[n]), n


def test_momentum_flag_is_checked():
    with pytest.raises(ValueError, match="moclr_momentum"):
        PretrainConfig(method="moclr", moclr_momentum=1.5)


# ---------------------------------------------------------------- runs
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    cfg = tiny_config("moclr")
    full = load_checkpoint(pretrain(cfg, run_dir=tmp_path / "full", data=DATA))
    part = load_checkpoint(pretrain(cfg, run_dir=tmp_path / "part", data=DATA, stop_at_epoch=1))
    assert part["epoch"] == 1 and part["moclr_target"] is not None
    resumed = load_checkpoint(pretrain(cfg, run_dir=tmp_path / "part", data=DATA, resume=True))
    for key in ("model", "moclr_target", "optimizer", "scheduler"):
        assert_same_state(full[key], resumed[key], key)
    # the target moved away from its start and is not the online network
    assert not torch.equal(full["moclr_target"]["backbone.conv1.weight"], full["model"]["backbone.conv1.weight"])
    rows = [r for r in read_metrics(tmp_path / "full") if r["kind"] == "epoch"]
    steps = rows[-1]["step"]
    assert rows[-1]["target_momentum"] == pytest.approx(momentum_at(steps - 1, steps, cfg.moclr_momentum))


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = tiny_config("moclr", epochs=2)
    full = load_checkpoint(pretrain(cfg, run_dir=tmp_path / "full", data=DATA))
    real, calls = info_nce_module.info_nce, [0]

    def loss(*a, **k):  # two calls per step: the signal arrives during step 2 of 3 in epoch 1
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(info_nce_module, "info_nce", loss)
    with pytest.raises(Preempted, match="SIGTERM"):
        pretrain(cfg, run_dir=tmp_path / "part", data=DATA)
    st = load_checkpoint(tmp_path / "part")
    assert st["step"] == 2 and st["position"] == 2 and not st["finished"]
    monkeypatch.undo()
    final = load_checkpoint(pretrain(cfg, run_dir=tmp_path / "part", data=DATA, resume=True))
    for key in ("model", "moclr_target", "optimizer", "scheduler"):
        assert_same_state(final[key], full[key], key)


def test_evaluation_uses_the_online_backbone(tmp_path):
    from sdclr_fast.train.evaluate import evaluate_checkpoint
    from sdclr_fast.train.models import DenseEncoder

    ckpt = pretrain(tiny_config("moclr", epochs=1), run_dir=tmp_path, data=DATA)
    st = load_checkpoint(ckpt)
    x = torch.randn(5, 1, 8, 8)
    loaded = DenseEncoder(load_model(ckpt))(x)
    online = build_model("resnet18", "moclr", in_channels=1, width=4, proj_dim=16)
    online.load_state_dict(st["model"])
    tgt = make_target(online)
    tgt.load_state_dict(st["moclr_target"])
    with torch.no_grad():
        assert torch.equal(loaded, online.eval().features(x))
        assert not torch.allclose(loaded, tgt.eval().features(x))
    label, res = evaluate_checkpoint(tmp_path, probes=("knn",), data=DATA, device="cpu", knn_k=5)
    assert label == f"MoCLR ({tmp_path.name})" and math.isfinite(res["knn"].overall)


# ---------------------------------------------------------------- DDP on CPU (gloo)
def _ddp_worker(rank, world, port, run_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    pretrain(tiny_config("moclr", epochs=2), run_dir=run_dir, data=tiny_data(), stop_at_epoch=1)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    st = load_checkpoint(tmp_path / "checkpoint.pt")
    assert st["epoch"] == 1 and len(st["rng"]) == 2 and st["moclr_target"] is not None
    assert not torch.equal(st["moclr_target"]["backbone.conv1.weight"], st["model"]["backbone.conv1.weight"])
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "epoch"]
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"])
