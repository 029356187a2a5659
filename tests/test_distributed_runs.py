"""Every method and every DnC stage under two gloo processes on the CPU (the torchrun
environment set by hand, torch.multiprocessing.spawn): SimCLR / SDCLR / MoCLR without the
deprecated gather, DnC end to end with its clustering equal to the one-process result, a DnC run
stopped inside an expert and inside the student and resumed equal bit for bit to an
uninterrupted one, and the experts trained in parallel on groups of ranks."""
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sdclr_fast.data.augment import with_input_norm
from sdclr_fast.train import PretrainConfig, load_checkpoint, load_model
from sdclr_fast.train.clustering import cluster_stage, read_clusters

from helpers import assert_same_state, fix_clusters, free_port  # noqa: E402
from helpers import tiny_dnc_config as tiny_config, tiny_dnc_data as tiny_data, tiny_dnc_options  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def tiny_options(**kw):
    """tiny_dnc_options with a 1-epoch base stage; ``kw`` overrides."""
    return tiny_dnc_options(**{"base_epochs": 1, **kw})


def spawn(fn, *args, world=2):
    mp.spawn(_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _worker(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fn(rank, *args)


# ---------------------------------------------------------------- SimCLR / SDCLR / MoCLR
def _pretrain_job(rank, method, run_dir):
    from sdclr_fast.train.pretrain import pretrain

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain(tiny_config(method=method, epochs=1), run_dir=run_dir, data=tiny_data())
    deprecated = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    Path(run_dir, f"warnings_{rank}.txt").write_text("\n".join(deprecated))


@pytest.mark.parametrize("method", ["simclr", "sdclr", "moclr"])
def test_two_process_pretraining_without_deprecated_gather(tmp_path, method):
    spawn(_pretrain_job, method, str(tmp_path))
    st = load_checkpoint(tmp_path / "checkpoint.pt")
    assert st["finished"] and len(st["rng"]) == 2
    for rank in range(2):  # the loss gathers through the functional collective, no deprecation warning
        assert (tmp_path / f"warnings_{rank}.txt").read_text() == ""


# ---------------------------------------------------------------- DnC
# Fixed DnC clusters (k-means' outcome moves with the CPU): cluster 1 is class "a" (24 images, 3
# steps of batch 8), cluster 0 the other 36 images (4 steps).
CLUSTERS = (tiny_data().train.labels != 0).long().mul(-1).add(1).tolist()
# A tail cluster of 5 images (classes "d" and "c"): fewer than the batch of 8, an odd count on two
# ranks (batch 4 there: 2 images per rank), and fewer than 2 images per rank for 4 ranks.
TAIL = [2 if i in set(range(52, 57)) else (1 if i < 24 else 0) for i in range(60)]


def _dnc_job(rank, run_dir, options, stop_in=None, stop_step=1, clusters=CLUSTERS):
    """One DnC attempt on fixed clusters; with ``stop_in`` ("expert_1" / "student") rank 1 alone
    receives a stop request after ``stop_step`` steps of that stage, as a SIGTERM reaching one
    rank would."""
    import sdclr_fast.train.dnc as dnc_module
    import sdclr_fast.train.pretrain as loop
    from sdclr_fast.train import run
    from sdclr_fast.train.run import Preempted

    fix_clusters(dnc_module, clusters, save_real_to=Path(run_dir, "kmeans.json") if rank == 0 else None)

    armed = {"on": False}
    real_call = run.StopCheck.__call__

    def call(self, steps_done, force=False):
        if armed["on"] and rank == 1 and steps_done == stop_step and not force:
            run.request_stop("SIGTERM")
        return real_call(self, steps_done, force)

    def arming(real, name):
        def wrapped(*a, **kw):
            armed["on"] = Path(kw["run_dir"]).name == stop_in
            try:
                return real(*a, **kw)
            finally:
                armed["on"] = False
        return wrapped

    run.StopCheck.__call__ = call
    loop.pretrain = arming(loop.pretrain, "pretrain")
    dnc_module.distill_student = arming(dnc_module.distill_student, "student")
    try:
        dnc_module.dnc(tiny_config(), options, run_dir=run_dir, data=tiny_data(), resume=True)
    except Preempted:
        Path(run_dir, f"preempted_{rank}").write_text("1")


OPTS = tiny_options(expert_epochs=1, student_epochs=1)


@pytest.fixture(scope="module")
def full_dnc(tmp_path_factory):
    """One uninterrupted two-process DnC run (MoCLR base, k = 2)."""
    run_dir = tmp_path_factory.mktemp("dnc_full")
    spawn(_dnc_job, str(run_dir), OPTS)
    return run_dir


def test_dnc_two_processes_end_to_end(full_dnc):
    from sdclr_fast.train.dnc import dnc_state

    state = dnc_state(full_dnc)
    assert state["stages"]["student"]["done"] and sorted(state["stages"]["experts"]) == ["0", "1"]
    student = load_checkpoint(full_dnc / "checkpoint.pt")
    assert len(student["rng"]) == 2 and student["finished"]
    for k in range(2):  # the experts trained with DDP on both ranks
        assert len(load_checkpoint(full_dnc / f"expert_{k}" / "checkpoint.pt")["rng"]) == 2
    # clustering: the features embedded on two ranks and clustered on rank 0 give exactly the
    # one-process record of the same base model (k-means' own record; the run used fixed clusters)
    data = with_input_norm(tiny_data(), tiny_config().input_norm)  # the run's data, as run_data gives it
    one = cluster_stage(load_model(full_dnc / "base" / "checkpoint.pt"), data, OPTS, seed=3, batch_size=8)
    two = read_clusters(full_dnc / "kmeans.json")
    assert torch.equal(two["assignments"], torch.tensor(one["assignments"]))
    assert torch.equal(two["centroids"], torch.tensor(one["centroids"], dtype=torch.float32))
    assert read_clusters(full_dnc)["assignments"].tolist() == CLUSTERS
    assert (full_dnc / "clusters.md").exists()


def _stopped_then_resumed(part, stage):
    spawn(_dnc_job, str(part), OPTS, stage)  # the signal reaches rank 1 only: both ranks stop
    assert (part / "preempted_0").exists() and (part / "preempted_1").exists()
    for f in part.glob("preempted_*"):
        f.unlink()
    marks = dnc_state_of(part)
    stopped = load_checkpoint(part / stage / "checkpoint.pt")
    spawn(_dnc_job, str(part), OPTS)
    assert not list(part.glob("preempted_*"))
    return marks, stopped


def dnc_state_of(run_dir):
    from sdclr_fast.train.dnc import dnc_state

    return dnc_state(run_dir)["stages"]


def test_dnc_two_processes_stopped_in_an_expert_resumes_bit_identical(full_dnc, tmp_path):
    marks, stopped = _stopped_then_resumed(tmp_path, "expert_1")
    assert marks["experts"]["0"]["done"] and "1" not in marks["experts"] and not stopped["finished"]
    for name in ("expert_1", "student"):
        a = load_checkpoint(full_dnc / name / "checkpoint.pt")
        b = load_checkpoint(tmp_path / name / "checkpoint.pt")
        for key in ("model", "optimizer", "rng"):
            assert_same_state(a[key], b[key], f"{name}.{key}")


def test_dnc_two_processes_stopped_in_the_student_resumes_bit_identical(full_dnc, tmp_path):
    marks, stopped = _stopped_then_resumed(tmp_path, "student")
    assert not marks.get("student", {}).get("done") and stopped["position"] == 1  # mid-epoch
    a, b = load_checkpoint(full_dnc / "checkpoint.pt"), load_checkpoint(tmp_path / "checkpoint.pt")
    for key in ("model", "dnc_heads", "optimizer", "rng"):
        assert_same_state(a[key], b[key], key)


def test_dnc_parallel_experts_one_expert_per_rank(tmp_path):
    from sdclr_fast.train.dnc import dnc_state
    from sdclr_fast.train.pretrain import pretrain

    opts = tiny_options(parallel_experts=True, student_epochs=1)
    spawn(_dnc_job, str(tmp_path / "run"), opts)
    marks = dnc_state(tmp_path / "run")["stages"]
    assert marks["student"]["done"] and sorted(marks["experts"]) == ["0", "1"]
    assignments = read_clusters(tmp_path / "run")["assignments"]
    for k in range(2):
        got = load_checkpoint(tmp_path / "run" / f"expert_{k}" / "checkpoint.pt")
        assert len(got["rng"]) == 1  # trained by one rank alone
        # the same as training that expert in one process
        ref = pretrain(PretrainConfig.from_dict(got["config"]), run_dir=tmp_path / f"ref_{k}", data=tiny_data(),
                       indices=(assignments == k).nonzero().flatten(),
                       init_checkpoint=tmp_path / "run" / "base" / "checkpoint.pt")
        assert_same_state(got["model"], load_checkpoint(ref)["model"], f"expert_{k}")


# ---------------------------------------------------------------- sub-groups
def _group_loss_job(rank, out_dir):
    import torch.distributed as dist

    from sdclr_fast.ops.info_nce import info_nce
    from sdclr_fast.ops.nt_xent import nt_xent

    dist.init_process_group("gloo")
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    z = [torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(q), dtype=torch.float64) for q in range(4)]
    mine = z[rank].clone().requires_grad_(True)
    nt = nt_xent(mine[0], mine[1], 0.3, reduction="none", gather_distributed=group)
    nce = info_nce(mine[0], mine[1], 0.3, reduction="none", gather_distributed=group)
    (nt.sum() + nce.sum()).backward()
    torch.save({"nt": nt.detach(), "nce": nce.detach(), "grad": mine.grad}, f"{out_dir}/group_{rank}.pt")
    dist.barrier()  # leave together: see helpers.free_port
    dist.destroy_process_group()


def test_losses_gather_over_a_sub_group_only(tmp_path):
    """gather_distributed=<ProcessGroup>: ranks {0, 1} and {2, 3} each form one batch; each rank's
    per-row losses are those of its rows in the one-process loss of its group's batch."""
    from sdclr_fast.ops.info_nce import info_nce
    from sdclr_fast.ops.nt_xent import nt_xent

    spawn(_group_loss_job, str(tmp_path), world=4)
    z = [torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(q), dtype=torch.float64) for q in range(4)]
    for a in (0, 2):
        z1 = torch.cat([z[a][0], z[a + 1][0]]).requires_grad_(True)
        z2 = torch.cat([z[a][1], z[a + 1][1]]).requires_grad_(True)
        nt = nt_xent(z1, z2, 0.3, reduction="none")
        nce = info_nce(z1, z2, 0.3, reduction="none")
        (nt.sum() + nce.sum()).backward()  # sums: each rank's rows get the gradient of the group's total
        for i, q in enumerate((a, a + 1)):
            got = torch.load(tmp_path / f"group_{q}.pt")
            rows = torch.cat([torch.arange(5) + 5 * i, torch.arange(5) + 10 + 5 * i])
            torch.testing.assert_close(got["nt"], nt.detach()[rows], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got["nce"], nce.detach()[5 * i:5 * i + 5], rtol=1e-12, atol=1e-12)
            grad = torch.stack([z1.grad[5 * i:5 * i + 5], z2.grad[5 * i:5 * i + 5]])
            torch.testing.assert_close(got["grad"], grad, rtol=1e-12, atol=1e-12)


def test_dnc_parallel_experts_on_groups_of_two_ranks(tmp_path):
    """Four ranks, two experts: each expert trains with DDP on its own pair of ranks."""
    from sdclr_fast.train.dnc import dnc_state

    opts = tiny_options(parallel_experts=True, base_epochs=1, expert_epochs=1, student_epochs=1)
    spawn(_dnc_job, str(tmp_path), opts, world=4)
    marks = dnc_state(tmp_path)["stages"]
    assert marks["student"]["done"] and sorted(marks["experts"]) == ["0", "1"]
    for k in range(2):
        st = load_checkpoint(tmp_path / f"expert_{k}" / "checkpoint.pt")
        assert st["finished"] and len(st["rng"]) == 2  # DDP on a group of two ranks
    assert len(load_checkpoint(tmp_path / "checkpoint.pt")["rng"]) == 4


def test_dnc_with_an_sdclr_base_under_two_processes(tmp_path):
    """An SDCLR base: the student's dual-BN shell has a pruned branch its loss never reaches."""
    from sdclr_fast.train.dnc import dnc_state

    spawn(_dnc_job, str(tmp_path), tiny_options(base_method="sdclr", expert_epochs=1, student_epochs=1))
    assert dnc_state(tmp_path)["stages"]["student"]["done"]
    assert len(load_checkpoint(tmp_path / "checkpoint.pt")["rng"]) == 2


@pytest.mark.parametrize("world, parallel, ranks", [(2, False, 2), (2, True, 1), (4, True, 2), (4, False, 4)])
def test_dnc_tail_cluster_smaller_than_the_batch(tmp_path, world, parallel, ranks):
    """A cluster of 5 images, smaller than the world batch of 8 (the tail of long-tailed data),
    trained by ``ranks`` processes (parallel experts: 3 experts on 2 ranks -> groups of 1; on 4
    ranks -> 2 groups of 2). With 2 processes its batch is 4 (a batch of 5 cannot be split over
    2 ranks: that used to stop the run); with 4 it would give one image per process, so the base
    model stands in as its expert and dnc.json says why. No NaN, no crash, the student trains."""
    from sdclr_fast.train.dnc import dnc_state

    opts = tiny_options(k=3, parallel_experts=parallel, base_epochs=1, expert_epochs=2, student_epochs=1)
    spawn(_dnc_job, str(tmp_path), opts, None, 1, TAIL, world=world)
    stages = dnc_state(tmp_path)["stages"]
    experts = stages["experts"]
    assert stages["student"]["done"] and experts["0"]["trained"] and experts["1"]["trained"]
    if ranks < 4:
        st = load_checkpoint(tmp_path / "expert_2" / "checkpoint.pt")
        assert experts["2"]["trained"] and st["finished"] and len(st["rng"]) == ranks
        assert st["config"]["batch_size"] == 5 - 5 % ranks
    else:
        assert experts["2"] == {"done": True, "checkpoint": "base/checkpoint.pt", "size": 5, "trained": False,
                                "reason": "5 image(s), fewer than 2 per process for the 4 process(es) that would "
                                          "train it"}
        assert not (tmp_path / "expert_2").exists()


def _identical_images_expert_job(rank, run_dir, grad_clip):
    from sdclr_fast.data import ImageSet
    from sdclr_fast.train.pretrain import pretrain

    data = tiny_data()
    x = data.train.images.clone()
    x[:46] = 255  # a cluster of 46 identical white images
    data = data.__class__(**{**data.__dict__, "train": ImageSet(x, data.train.labels, data.train.indices)})
    pretrain(tiny_config(method="moclr", epochs=2, batch_size=4, grad_clip=grad_clip), run_dir=run_dir, data=data,
             indices=torch.arange(46))


def test_moclr_expert_on_a_cluster_of_identical_images_stays_finite(tmp_path):
    """The NaN of a MoCLR expert on a small cluster: 2 processes at batch 4 leave each BatchNorm of
    the 8x8 network's 1x1 layer4 and of the predictor 4 values per channel, and near-identical
    images give those almost no variance, so BN's backward multiplies the gradient by ~1/sqrt(eps)
    at each of them (gains of 200-400 measured) until the weights overflow. On AVX-512 and avx2
    this run went NaN at epoch 2, step 11 without clipping (ATEN_CPU_CAPABILITY=default happened
    to survive). DnC experts clip the gradient norm (DnCConfig.expert_grad_clip) and finish."""
    from sdclr_fast.train.config import DnCConfig

    spawn(_identical_images_expert_job, str(tmp_path), DnCConfig().expert_grad_clip)
    st = load_checkpoint(tmp_path / "checkpoint.pt")
    assert st["finished"] and st["config"]["grad_clip"] == 100.0
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "step"]
    assert len(losses) == 22 and all(math.isfinite(v) for v in losses)


def test_dnc_experts_train_with_the_expert_gradient_clip():
    from sdclr_fast.train.config import DnCConfig
    from sdclr_fast.train.dnc import _stage_configs

    base = tiny_config(grad_clip=None)
    for clip in (100.0, 3.5, None):
        base_cfg, expert_cfg, student_cfg = _stage_configs(base, DnCConfig(expert_grad_clip=clip))
        assert (base_cfg.grad_clip, expert_cfg.grad_clip, student_cfg.grad_clip) == (None, clip, None)
