"""Divide and Contrast end to end on tiny synthetic data (4 classes of 8x8 images, width-4
ResNet-18): stage markers, experts trained on their cluster only, kill and resume in stage 2
and stage 3 equal to an uninterrupted run, the student loadable by the evaluation path, the
command-line flags."""
import argparse
import json

import pytest
import torch

from sdclr_fast.train import PretrainConfig, load_checkpoint, load_model
import sdclr_fast.train.pretrain as loop
from sdclr_fast.cli import add_dnc_arguments
from sdclr_fast.train.clustering import CLUSTERS_NAME, canonical_order, cluster_stage, embed_images, read_clusters
from sdclr_fast.train.config import DnCConfig
from sdclr_fast.train.distill import distill_student, load_student
from sdclr_fast.train.dnc import dnc, dnc_state
from sdclr_fast.train.kmeans import kmeans


from helpers import DNC_DATA as DATA, assert_same_state, fix_clusters  # noqa: E402
from helpers import tiny_dnc_config as tiny_config, tiny_dnc_options as tiny_options  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")






class Killed(RuntimeError):
    pass


class PretrainSpy:
    """Wraps the real pretrain(): records every call and can "kill" the run inside one expert
    (after its first epoch, leaving a resumable checkpoint)."""

    def __init__(self, real, kill_in=None, kill_under=None):
        self.real, self.kill_in, self.kill_under, self.calls = real, kill_in, kill_under, []

    def __call__(self, config, *, run_dir, indices=None, **kw):
        self.calls.append({"run_dir": run_dir.name, "indices": None if indices is None else
                           torch.as_tensor(indices).clone(), "resume": kw.get("resume"),
                           "init": kw.get("init_checkpoint"), "epochs": config.epochs,
                           "batch_size": config.batch_size})
        if run_dir.name == self.kill_in and self.kill_under in (None, run_dir.parent.name):
            self.real(config, run_dir=run_dir, indices=indices, stop_at_epoch=1, **kw)
            raise Killed(f"killed inside {run_dir.name}")
        return self.real(config, run_dir=run_dir, indices=indices, **kw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One full DnC run (the default MoCLR base, k=2) that several tests inspect."""
    run_dir = tmp_path_factory.mktemp("dnc_full")
    spy = PretrainSpy(loop.pretrain)
    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "pretrain", spy)
    try:
        student = dnc(tiny_config(), tiny_options(), run_dir=run_dir, data=DATA)
    finally:
        mp.undo()
    return run_dir, student, spy.calls


# ---------------------------------------------------------------- the full pipeline
def test_run_directory_layout_and_markers(uninterrupted):
    run_dir, student, calls = uninterrupted
    assert student == run_dir / "student" / "checkpoint.pt"
    for sub in ("base", "expert_0", "expert_1", "student"):
        assert (run_dir / sub / "checkpoint.pt").exists(), sub
    assert (run_dir / "split.json").exists() and (run_dir / CLUSTERS_NAME).exists()
    state = dnc_state(run_dir)
    st = state["stages"]
    assert st["base"]["done"] and st["clusters"]["done"] and st["student"]["done"]
    assert set(st["experts"]) == {"0", "1"} and all(e["done"] and e["trained"] for e in st["experts"].values())
    assert state["dnc"]["k"] == 2 and state["base_config"]["method"] == "moclr"
    # run_dir/checkpoint.pt is the student's final checkpoint, for `sdclr-fast eval --run-dir`
    assert (run_dir / "checkpoint.pt").read_bytes() == student.read_bytes()
    assert [c["run_dir"] for c in calls] == ["base", "expert_0", "expert_1"]


def test_each_expert_trains_on_its_cluster_only(uninterrupted):
    run_dir, _, calls = uninterrupted
    clusters = read_clusters(run_dir)
    a = clusters["assignments"]
    assert a.shape == (len(DATA.train),) and set(a.tolist()) == {0, 1}
    assert clusters["sizes"] == torch.bincount(a, minlength=2).tolist()
    assert clusters["sizes"][0] >= clusters["sizes"][1]  # canonical numbering: largest first
    base_ckpt = run_dir / "base" / "checkpoint.pt"
    assert calls[0]["indices"] is None  # the base model sees everything
    for k in range(2):
        call = calls[1 + k]
        members = (a == k).nonzero().flatten()
        assert torch.equal(call["indices"], members)
        assert str(call["init"]) == str(base_ckpt)  # initialised from the base model
        stored = load_checkpoint(run_dir / f"expert_{k}")
        assert stored["train_indices"] == DATA.train.indices[members].tolist()
        assert stored["init_checkpoint"] == str(base_ckpt)
        assert stored["finished"] and stored["config"]["method"] == "moclr"
        assert call["batch_size"] == min(8, len(members))


def test_expert_starts_from_base_weights(uninterrupted, tmp_path):
    # a 1-epoch expert with lr ~ 0 stays at the base weights: the init really is the base model
    run_dir, _, _ = uninterrupted
    cfg = tiny_config(method="moclr", lr=1e-12, epochs=1, weight_decay=0.0, momentum=0.0)
    members = (read_clusters(run_dir)["assignments"] == 0).nonzero().flatten()
    path = loop.pretrain(cfg, run_dir=tmp_path, indices=members, data=DATA,
                         init_checkpoint=run_dir / "base" / "checkpoint.pt")
    base = load_checkpoint(run_dir / "base")["model"]
    got = load_checkpoint(path)["model"]
    w = [k for k in base if k.endswith("weight") and base[k].dim() == 4][0]
    torch.testing.assert_close(got[w], base[w], rtol=0, atol=1e-9)


def test_clusters_are_kmeans_of_normalised_base_features(uninterrupted):
    run_dir, _, _ = uninterrupted
    model = load_model(run_dir / "base" / "checkpoint.pt")
    from sdclr_fast.data.augment import with_input_norm

    run_data = with_input_norm(DATA, tiny_config().input_norm)  # the statistics the run normalised with
    emb = embed_images(model, DATA.train, run_data, "features")
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(DATA.train)))
    res = kmeans(emb, 2, iters=50, seed=3, backend="torch")
    want, _ = canonical_order(res.assignments, 2)
    assert torch.equal(read_clusters(run_dir)["assignments"], want)


def test_student_checkpoint_loads_like_a_pretraining_one(uninterrupted):
    run_dir, student, _ = uninterrupted
    state = load_checkpoint(student)
    assert state["finished"] and state["epoch"] == 2
    assert state["config"]["extra"]["label"] == "DnC"
    model = load_model(student)  # the evaluation path's loader
    x = torch.randn(3, 1, 8, 8)
    f = model.features(x, branch="dense")
    assert f.shape == (3, model.backbone.feature_dim)
    # the backbone is the distilled one, not a fresh network or the base model
    base = load_checkpoint(run_dir / "base")["model"]
    w = [k for k in base if k.endswith("weight") and base[k].dim() == 4][0]
    assert not torch.equal(state["model"][w], base[w])
    # the full student with its K + 1 heads
    full = load_student(student)
    bp, ep = full(x)
    assert bp.shape == (3, model.backbone.feature_dim) and ep.shape == (2, 3, model.backbone.feature_dim)
    torch.testing.assert_close(full.features(x), f)


def test_evaluate_checkpoint_on_the_run_directory(uninterrupted):
    from sdclr_fast.train import evaluate_checkpoint

    run_dir, _, _ = uninterrupted
    label, res = evaluate_checkpoint(run_dir, probes=("knn",), data=DATA, device="cpu", knn_k=5)
    assert label == "DnC"
    assert 0.0 <= res["knn"].overall <= 100.0


def test_student_loss_decreases(uninterrupted):
    run_dir, _, _ = uninterrupted
    rows = [json.loads(r) for r in (run_dir / "student" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "epoch"]
    first_step = next(r["loss"] for r in rows if r["kind"] == "step")
    # the student learns to regress its teachers: the second epoch's mean loss is clearly below
    # the first's and below the untrained student's first step (~4.3 here, 3.6 after 2 epochs)
    assert len(losses) == 2 and losses[1] < 0.95 * losses[0] and losses[1] < 0.9 * first_step


# ---------------------------------------------------------------- kill and resume
def test_kill_in_stage_2_then_resume_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch):
    full_dir, full_student, _ = uninterrupted
    real = loop.pretrain
    # 1) the run is killed inside expert 1, after its first epoch
    spy = PretrainSpy(real, kill_in="expert_1")
    monkeypatch.setattr(loop, "pretrain", spy)
    with pytest.raises(Killed):
        dnc(tiny_config(), tiny_options(), run_dir=tmp_path, data=DATA)
    st = dnc_state(tmp_path)["stages"]
    assert st["base"]["done"] and st["clusters"]["done"] and st["experts"]["0"]["done"]
    assert "1" not in st["experts"] and "student" not in st
    partial = load_checkpoint(tmp_path / "expert_1")
    assert partial["epoch"] == 1 and not partial["finished"]
    # 2) without --resume the run directory is refused
    with pytest.raises(ValueError, match="resume"):
        dnc(tiny_config(), tiny_options(), run_dir=tmp_path, data=DATA)
    # 3) resume: base and expert 0 are not retrained, expert 1 continues from its epoch 1
    expert0 = (tmp_path / "expert_0" / "checkpoint.pt").read_bytes()
    spy = PretrainSpy(real)
    monkeypatch.setattr(loop, "pretrain", spy)
    student = dnc(tiny_config(), tiny_options(), run_dir=tmp_path, data=DATA, resume=True)
    assert [c["run_dir"] for c in spy.calls] == ["expert_1"]
    assert spy.calls[0]["resume"] is True
    assert (tmp_path / "expert_0" / "checkpoint.pt").read_bytes() == expert0
    # 4) every stage ends bit-identical to the uninterrupted run (CPU)
    for sub in ("base", "expert_0", "expert_1"):
        assert_same_state(load_checkpoint(tmp_path / sub)["model"], load_checkpoint(full_dir / sub)["model"], sub)
    assert read_clusters(tmp_path)["assignments"].tolist() == read_clusters(full_dir)["assignments"].tolist()
    a, b = load_checkpoint(student), load_checkpoint(full_student)
    assert_same_state(a["model"], b["model"], "student")
    assert_same_state(a["dnc_heads"], b["dnc_heads"], "heads")
    # 5) a second resume is a no-op
    spy = PretrainSpy(real)
    monkeypatch.setattr(loop, "pretrain", spy)
    before = student.read_bytes()
    assert dnc(tiny_config(), tiny_options(), run_dir=tmp_path, data=DATA, resume=True) == student
    assert spy.calls == [] and student.read_bytes() == before


def test_student_kill_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
    full_dir, full_student, _ = uninterrupted
    opt = tiny_options()
    cfg = load_checkpoint(full_student)["config"]
    cfg = PretrainConfig.from_dict(cfg)
    kw = dict(data=DATA, base_checkpoint=full_dir / "base" / "checkpoint.pt",
              expert_checkpoints=[full_dir / "expert_0" / "checkpoint.pt", full_dir / "expert_1" / "checkpoint.pt"],
              assignments=read_clusters(full_dir)["assignments"])
    part = distill_student(cfg, opt, run_dir=tmp_path, stop_at_epoch=1, **kw)
    after_one = load_checkpoint(part)
    assert after_one["epoch"] == 1 and not after_one["finished"]
    # guards the equality below against a loop that does not train: epoch 2 moves the weights
    w = [k for k in after_one["model"] if k.endswith("weight") and after_one["model"][k].dim() == 4][0]
    assert not torch.equal(after_one["model"][w], load_checkpoint(full_student)["model"][w])
    with pytest.raises(ValueError, match="resume"):
        distill_student(cfg, opt, run_dir=tmp_path, **kw)
    done = distill_student(cfg, opt, run_dir=tmp_path, resume=True, **kw)
    a, b = load_checkpoint(done), load_checkpoint(full_student)
    assert_same_state(a["model"], b["model"], "model")
    assert_same_state(a["dnc_heads"], b["dnc_heads"], "heads")
    assert_same_state(a["optimizer"], b["optimizer"], "optimizer")
    # other teachers: refused
    kw["expert_checkpoints"] = kw["expert_checkpoints"][::-1]
    with pytest.raises(ValueError, match="other teachers"):
        distill_student(cfg, opt, run_dir=tmp_path, resume=True, **kw)


def test_resume_with_other_options_is_refused(uninterrupted):
    run_dir, _, _ = uninterrupted
    with pytest.raises(ValueError, match="k: stored 2, given 3"):
        dnc(tiny_config(), tiny_options(k=3), run_dir=run_dir, data=DATA, resume=True)
    with pytest.raises(ValueError, match="lr"):
        dnc(tiny_config(lr=0.2), tiny_options(), run_dir=run_dir, data=DATA, resume=True)


def test_tail_cluster_smaller_than_the_batch_in_one_process(tmp_path, monkeypatch):
    """A 3-image tail cluster (fewer than the batch of 8; clusters fixed, not left to k-means):
    its expert trains on one process with batch 3, the loss stays finite, the student trains."""
    import sdclr_fast.train.dnc as dnc_mod

    labels = DATA.train.labels
    tail = (labels == 3).nonzero().flatten()[:3]
    a = (labels != 0).long()  # cluster 1: class "a" (24 images); cluster 0: the rest
    a[tail] = 2
    monkeypatch.setattr(dnc_mod, "cluster_stage", dnc_mod.cluster_stage)  # undone after the test
    fix_clusters(dnc_mod, a.tolist())
    spy = PretrainSpy(loop.pretrain)
    monkeypatch.setattr(loop, "pretrain", spy)
    dnc(tiny_config(), tiny_options(k=3, base_epochs=1, expert_epochs=2, student_epochs=1), run_dir=tmp_path,
        data=DATA)
    experts = dnc_state(tmp_path)["stages"]["experts"]
    assert all(experts[k]["trained"] for k in "012")
    assert [c["batch_size"] for c in spy.calls[1:]] == [8, 8, 3]
    assert torch.equal(spy.calls[3]["indices"], tail)
    st = load_checkpoint(tmp_path / "expert_2")
    assert st["finished"] and torch.isfinite(torch.tensor(st["last_epoch_metrics"]["loss"]))


# ---------------------------------------------------------------- variants
def test_sdclr_base_and_singleton_cluster(tmp_path, monkeypatch):
    """An SDCLR base (masks, dual BN) and a cluster of one image, which cannot be contrasted:
    the base model stands in as its expert; the student still trains and loads."""
    import sdclr_fast.train.dnc as dnc_mod

    def fake_cluster_stage(model, data, opt, **kw):
        rec = real_stage(model, data, opt, **kw)
        a = torch.zeros(len(data.train), dtype=torch.long)
        a[5] = 1  # cluster 1 = one image
        rec["assignments"], rec["sizes"] = a.tolist(), torch.bincount(a, minlength=2).tolist()
        return rec

    real_stage = cluster_stage
    monkeypatch.setattr(dnc_mod, "cluster_stage", fake_cluster_stage)
    spy = PretrainSpy(loop.pretrain)
    monkeypatch.setattr(loop, "pretrain", spy)
    opt = tiny_options(base_method="sdclr", base_epochs=1, expert_epochs=1, student_epochs=1,
                       distill_target="projection", student_init="base")
    student = dnc(tiny_config(), opt, run_dir=tmp_path, data=DATA)
    assert [c["run_dir"] for c in spy.calls] == ["base", "expert_0"]
    st = dnc_state(tmp_path)["stages"]["experts"]
    assert st["1"]["trained"] is False and st["1"]["checkpoint"] == "base/checkpoint.pt"
    state = load_checkpoint(student)
    assert state["config"]["method"] == "sdclr" and state["config"]["extra"]["label"] == "DnC (SDCLR base)"
    assert state["dnc_head_dims"][2] == 16  # regresses the projection (proj_dim 16)
    model = load_model(student)
    assert model.features(torch.randn(2, 1, 8, 8), branch="dense").shape[0] == 2


def test_cluster_stage_record(uninterrupted):
    run_dir, _, _ = uninterrupted
    model = load_model(run_dir / "base" / "checkpoint.pt")
    rec = cluster_stage(model, DATA, tiny_options(k=3, cluster_on="projection", kmeans_metric="euclidean"), seed=1)
    assert rec["k"] == 3 and rec["embedding"] == "projection" and rec["metric"] == "euclidean"
    assert len(rec["assignments"]) == len(DATA.train) and sum(rec["sizes"]) == len(DATA.train)
    assert rec["sizes"] == sorted(rec["sizes"], reverse=True) and min(rec["sizes"]) > 0
    assert torch.tensor(rec["centroids"]).shape == (3, 16)
    # per-cluster class histogram (for inspection only): rows sum to the sizes, columns to the classes
    counts = torch.tensor(rec["class_counts"])
    assert counts.shape == (3, 4) and counts.sum(1).tolist() == rec["sizes"]
    assert counts.sum(0).tolist() == DATA.class_counts.tolist()
    # purity: the share of each cluster's largest class; overall: images in their cluster's largest class
    assert rec["purity"] == pytest.approx([max(r) / sum(r) for r in rec["class_counts"]])
    assert rec["overall_purity"] == pytest.approx(sum(max(r) for r in rec["class_counts"]) / len(DATA.train))
    with pytest.raises(ValueError, match="exceeds"):
        cluster_stage(model, DATA, tiny_options(k=len(DATA.train) + 1))


def test_canonical_numbering():
    a = torch.tensor([2, 2, 0, 1, 1, 1, 0, 2, 3])
    new, order = canonical_order(a, 4)
    # sizes: 0 -> 2, 1 -> 3, 2 -> 3, 3 -> 1; ties broken by first member (2 before 1)
    assert order == [2, 1, 0, 3]
    assert new.tolist() == [0, 0, 2, 1, 1, 1, 2, 0, 3]


# ---------------------------------------------------------------- options and flags
@pytest.mark.parametrize("kw, match", [
    (dict(k=0), "k must be a positive int"),
    (dict(base_method="byol"), "base_method must be one of"),
    (dict(expert_epochs=0), "expert_epochs must be a positive int"),
    (dict(kmeans_backend="sklearn"), "kmeans_backend"),
    (dict(cluster_on="logits"), "cluster_on"),
    (dict(distill_target="logits"), "distill_target"),
    (dict(distill_lr=0.0), "distill_lr"),
    (dict(base_weight=-1.0), "base_weight"),
    (dict(base_weight=0.0, expert_weight=0.0), "both be 0"),
    (dict(student_init="imagenet"), "student_init"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        DnCConfig(**kw)


def test_dnc_flags_parse_and_default_to_none():
    p = argparse.ArgumentParser()
    add_dnc_arguments(p)
    args = p.parse_args([])
    # a flag not given sets nothing, so the stored or default option stands
    assert [k for k in vars(args) if k.startswith("dnc_")] == []
    args = p.parse_args(["--dnc-k", "10", "--dnc-base-method", "sdclr", "--dnc-expert-epochs", "3",
                         "--dnc-distill-lr", "0.05", "--dnc-kmeans-backend", "torch"])
    assert (args.dnc_k, args.dnc_base_method, args.dnc_expert_epochs, args.dnc_distill_lr) == (10, "sdclr", 3, 0.05)
    for action in p._actions:
        if action.dest.startswith("dnc_"):
            assert action.help, action.dest
    with pytest.raises(SystemExit):
        p.parse_args(["--dnc-base-method", "byol"])


def test_cli_pretrain_dnc_flags_reach_the_pipeline(monkeypatch, tmp_path):
    from sdclr_fast.cli import build_parser, run_dnc
    import sdclr_fast.train.dnc as dnc_mod

    seen = {}

    def fake_dnc(config, options, *, run_dir, resume, init_checkpoint):
        seen.update(config=config, options=options, run_dir=run_dir, resume=resume)
        return run_dir / "student" / "checkpoint.pt"

    monkeypatch.setattr(dnc_mod, "dnc", fake_dnc)
    args = build_parser().parse_args(["pretrain", "--method", "dnc", "--run-dir", str(tmp_path), "--epochs", "7",
                                      "--dnc-k", "3", "--dnc-base-method", "sdclr", "--dnc-student-epochs", "2"])
    out = run_dnc(args)
    assert out == tmp_path / "student" / "checkpoint.pt"
    assert seen["options"].k == 3 and seen["options"].base_method == "sdclr" and seen["options"].student_epochs == 2
    assert seen["config"].method == "sdclr" and seen["config"].epochs == 7 and seen["resume"] is False


def test_cli_resume_of_a_dnc_run_reads_dnc_json_once(uninterrupted, tmp_path, monkeypatch):
    """The command line's stored configuration and the pipeline's resume check share one read."""
    import shutil

    import sdclr_fast.train.dnc as dnc_mod
    from sdclr_fast.cli import build_parser, dnc_configs_from_args

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    reads = []
    real = dnc_mod._read_state
    monkeypatch.setattr(dnc_mod, "_read_state", lambda path: reads.append(path) or real(path))
    args = build_parser().parse_args(["pretrain", "--method", "dnc", "--run-dir", str(run_dir), "--resume",
                                      "--dnc-kmeans-backend", "torch"])
    base, options = dnc_configs_from_args(args)
    assert options.k == 2 and options.kmeans_backend == "torch" and base.method == "moclr"
    assert dnc(base, options, run_dir=run_dir, resume=True, data=DATA) == run_dir / "student" / "checkpoint.pt"
    assert len(reads) == 1, reads


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_student_stage_on_cuda_with_amp(uninterrupted, tmp_path):
    """The distillation step on the GPU path (bf16 autocast, channels_last, data on the device)."""
    full_dir, full_student, _ = uninterrupted
    cfg = PretrainConfig.from_dict(load_checkpoint(full_student)["config"]).replace(
        device="cuda", amp=True, channels_last=True, epochs=1)
    path = distill_student(cfg, tiny_options(), run_dir=tmp_path, data=DATA,
                           base_checkpoint=full_dir / "base" / "checkpoint.pt",
                           expert_checkpoints=[full_dir / "expert_0" / "checkpoint.pt",
                                               full_dir / "expert_1" / "checkpoint.pt"],
                           assignments=read_clusters(full_dir)["assignments"])
    state = load_checkpoint(path)
    assert state["finished"] and 0.0 <= state["last_epoch_metrics"]["loss"] <= 8.0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_student_stopped_by_a_signal_mid_epoch_resumes_exactly(uninterrupted, tmp_path, monkeypatch):
    """SIGTERM inside the student's first epoch: a mid-epoch checkpoint, then an exact resume."""
    import signal as _signal

    import sdclr_fast.train.distill as distill_mod
    from sdclr_fast.train.run import Preempted

    full_dir, full_student, _ = uninterrupted
    cfg = PretrainConfig.from_dict(load_checkpoint(full_student)["config"])
    kw = dict(data=DATA, base_checkpoint=full_dir / "base" / "checkpoint.pt",
              expert_checkpoints=[full_dir / "expert_0" / "checkpoint.pt", full_dir / "expert_1" / "checkpoint.pt"],
              assignments=read_clusters(full_dir)["assignments"])
    real, calls = distill_mod.dnc_distillation_loss, [0]

    def loss(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            import os

            os.kill(os.getpid(), _signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(distill_mod, "dnc_distillation_loss", loss)
    with pytest.raises(Preempted, match="after step 3/"):
        distill_student(cfg, tiny_options(), run_dir=tmp_path, **kw)
    st = load_checkpoint(tmp_path)
    assert (st["epoch"], st["position"], st["step"]) == (0, 3, 3)
    monkeypatch.undo()
    done = distill_student(cfg, tiny_options(), run_dir=tmp_path, resume=True, **kw)
    a, b = load_checkpoint(done), load_checkpoint(full_student)
    assert_same_state(a["model"], b["model"], "model")
    assert_same_state(a["dnc_heads"], b["dnc_heads"], "heads")


# ---------------------------------------------------------------- cluster report
def test_clusters_markdown_and_purity(uninterrupted):
    from sdclr_fast.train.clustering import cluster_purity, clusters_markdown

    run_dir, _, _ = uninterrupted
    rec = json.loads((run_dir / CLUSTERS_NAME).read_text())
    per, overall = cluster_purity(rec["class_counts"])
    assert rec["purity"] == per and rec["overall_purity"] == overall
    assert cluster_purity([[3, 1, 0], [0, 0, 0], [2, 2, 4]]) == ([0.75, None, 0.5], 7 / 12)
    md = (run_dir / "clusters.md").read_text()
    assert "## Round 1" in md and "## Round 2" not in md and f"overall purity {overall:.3f}" in md
    for k, (size, row) in enumerate(zip(rec["sizes"], rec["class_counts"])):
        assert f"| {k} | {size} | {per[k]:.3f} | " + " | ".join(map(str, row)) + " |" in md
    assert "| cluster | size | purity | a | b | c | d |" in md  # the data set's class names
    assert clusters_markdown([(1, rec)], list("abcd")) == md


# ---------------------------------------------------------------- several rounds
def two_round_options(**kw):
    base = dict(rounds=2, base_epochs=1, expert_epochs=1, student_epochs=2)
    base.update(kw)
    return tiny_options(**base)


class DistillSpy:
    """Wraps distill_student: records the run directories and can "kill" the student of one
    round after its first epoch."""

    def __init__(self, real, kill_under=None):
        self.real, self.kill_under, self.calls = real, kill_under, []

    def __call__(self, config, options, *, run_dir, **kw):
        self.calls.append(f"{run_dir.parent.name}/{run_dir.name}")
        if self.kill_under is not None and run_dir.parent.name == self.kill_under:
            self.real(config, options, run_dir=run_dir, stop_at_epoch=1, **kw)
            raise Killed(f"killed inside {run_dir}")
        return self.real(config, options, run_dir=run_dir, **kw)


def _run_two_rounds(run_dir, monkeypatch, *, resume=False, kill_in=None, kill_under=None, kill_student=None):
    import sdclr_fast.train.dnc as dnc_mod

    spy = PretrainSpy(REAL_PRETRAIN, kill_in=kill_in, kill_under=kill_under)
    dspy = DistillSpy(REAL_DISTILL, kill_under=kill_student)
    monkeypatch.setattr(loop, "pretrain", spy)
    monkeypatch.setattr(dnc_mod, "distill_student", dspy)
    try:
        out = dnc(tiny_config(epochs=1), two_round_options(), run_dir=run_dir, data=DATA, resume=resume)
    finally:
        monkeypatch.undo()
    return out, spy.calls, dspy.calls


REAL_PRETRAIN = loop.pretrain
REAL_DISTILL = distill_student


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dnc_two_rounds")
    mp = pytest.MonkeyPatch()
    out, calls, students = _run_two_rounds(run_dir, mp)
    return run_dir, out, calls, students


def test_two_rounds_layout_markers_and_final_checkpoint(two_rounds):
    from sdclr_fast.train.evaluate import evaluate_checkpoint

    run_dir, student, calls, students = two_rounds
    r2 = run_dir / "round_2"
    assert student == r2 / "student" / "checkpoint.pt"
    assert [f"{c['run_dir']}" for c in calls] == ["base", "expert_0", "expert_1", "expert_0", "expert_1"]
    assert students == [f"{run_dir.name}/student", "round_2/student"]
    for sub in ("base", "expert_0", "expert_1", "student", "round_2/expert_0", "round_2/expert_1",
                "round_2/student"):
        assert (run_dir / sub / "checkpoint.pt").exists(), sub
    assert (run_dir / CLUSTERS_NAME).exists() and (r2 / CLUSTERS_NAME).exists()
    st = dnc_state(run_dir)["stages"]
    assert st["student"]["done"] and "final" not in st["student"]
    r2m = st["round_2"]
    assert r2m["clusters"]["done"] and r2m["clusters"]["file"] == "round_2/clusters.json"
    assert r2m["student"] == {"done": True, "checkpoint": "round_2/student/checkpoint.pt", "final": "checkpoint.pt"}
    assert {k: e["checkpoint"] for k, e in r2m["experts"].items()} == {
        "0": "round_2/expert_0/checkpoint.pt", "1": "round_2/expert_1/checkpoint.pt"}
    # the final checkpoint is the last round's student; each student is labelled with its round
    assert (run_dir / "checkpoint.pt").read_bytes() == student.read_bytes()
    assert load_checkpoint(run_dir / "student")["config"]["extra"]["label"] == "DnC round 1 student"
    label, _ = evaluate_checkpoint(run_dir, probes=("knn",), data=DATA, device="cpu", knn_k=5)
    assert label == "DnC round 2 student"
    md = (run_dir / "clusters.md").read_text()
    assert "## Round 1" in md and "## Round 2" in md


def test_round_two_starts_from_the_round_one_student(two_rounds):
    run_dir, _, calls, _ = two_rounds
    s1 = run_dir / "student" / "checkpoint.pt"
    # round 2's experts start from round 1's student, on round 2's clusters
    a2 = read_clusters(run_dir / "round_2")["assignments"]
    for k, call in enumerate(calls[3:]):
        assert str(call["init"]) == str(s1)
        assert torch.equal(call["indices"], (a2 == k).nonzero().flatten())
    # round 2's clusters are k-means of the round 1 student's features
    from sdclr_fast.data.augment import with_input_norm

    run_data = with_input_norm(DATA, tiny_config().input_norm)  # the statistics the run normalised with
    rec = cluster_stage(load_model(s1), run_data, two_round_options(), seed=3, batch_size=8)
    assert rec["assignments"] == a2.tolist()
    # round 2's student was distilled from round 1's student and round 2's experts
    teachers = load_checkpoint(run_dir / "round_2" / "student")["dnc_teachers"]
    assert teachers == {"base": "../../student/checkpoint.pt",
                        "experts": ["../expert_0/checkpoint.pt", "../expert_1/checkpoint.pt"]}


def _assert_same_run(a_dir, b_dir):
    for sub in ("base", "expert_0", "expert_1", "student", "round_2/expert_0", "round_2/expert_1",
                "round_2/student"):
        a, b = load_checkpoint(a_dir / sub), load_checkpoint(b_dir / sub)
        assert_same_state(a["model"], b["model"], sub)
    for sub in (".", "round_2"):
        assert read_clusters(a_dir / sub)["assignments"].tolist() == read_clusters(b_dir / sub)["assignments"].tolist()
    assert_same_state(load_checkpoint(a_dir)["dnc_heads"], load_checkpoint(b_dir)["dnc_heads"], "final heads")


def test_kill_in_round_two_expert_then_resume_equals_uninterrupted(two_rounds, tmp_path, monkeypatch):
    full_dir = two_rounds[0]
    with pytest.raises(Killed):
        _run_two_rounds(tmp_path, monkeypatch, kill_in="expert_1", kill_under="round_2")
    st = dnc_state(tmp_path)["stages"]
    assert st["student"]["done"] and st["round_2"]["clusters"]["done"] and st["round_2"]["experts"]["0"]["done"]
    assert "1" not in st["round_2"]["experts"] and "student" not in st["round_2"]
    assert not (tmp_path / "checkpoint.pt").exists()
    round_one = {p: (tmp_path / p / "checkpoint.pt").read_bytes() for p in ("base", "expert_0", "expert_1", "student")}
    out, calls, students = _run_two_rounds(tmp_path, monkeypatch, resume=True)
    # finished rounds and stages are skipped; the interrupted expert continues
    assert [c["run_dir"] for c in calls] == ["expert_1"] and calls[0]["resume"] is True
    assert students == ["round_2/student"]
    assert all((tmp_path / p / "checkpoint.pt").read_bytes() == b for p, b in round_one.items())
    _assert_same_run(tmp_path, full_dir)
    # a second resume does nothing
    out2, calls, students = _run_two_rounds(tmp_path, monkeypatch, resume=True)
    assert out2 == out and calls == [] and students == []


def test_kill_in_round_two_student_then_resume_equals_uninterrupted(two_rounds, tmp_path, monkeypatch):
    full_dir = two_rounds[0]
    with pytest.raises(Killed):
        _run_two_rounds(tmp_path, monkeypatch, kill_student="round_2")
    st = dnc_state(tmp_path)["stages"]
    assert all(e["done"] for e in st["round_2"]["experts"].values()) and "student" not in st["round_2"]
    partial = load_checkpoint(tmp_path / "round_2" / "student")
    assert partial["epoch"] == 1 and not partial["finished"]
    out, calls, students = _run_two_rounds(tmp_path, monkeypatch, resume=True)
    assert calls == [] and students == ["round_2/student"]
    _assert_same_run(tmp_path, full_dir)
    assert (tmp_path / "checkpoint.pt").read_bytes() == out.read_bytes()


def test_resume_with_other_rounds_is_refused(two_rounds):
    with pytest.raises(ValueError, match="rounds: stored 2, given 3"):
        dnc(tiny_config(epochs=1), two_round_options(rounds=3), run_dir=two_rounds[0], data=DATA, resume=True)
