"""Divide and Contrast (DnC; Tian, Hénaff, van den Oord, ICCV 2021): the orchestrator of its
stages on top of the contrastive loop, and the stage markers in ``dnc.json``.

DnC alternates contrastive learning and clustering. Round 1 trains a base model on all data
(MoCLR, DnC's method, by default; SimCLR or SDCLR optional), clusters its embeddings, trains one
expert per cluster and distils base and experts into a student. Each further round
(``DnCConfig.rounds``) takes the previous round's student as its base: its features are
clustered, the experts start from its weights, and base + experts are distilled into a new
student. Everything stays under one run directory, each stage resumable on its own::

    run_dir/
      dnc.json              stage markers of every round, the DnC options, the base configuration
      split.json            the data split every stage uses
      base/                 round 1's base model, trained on the whole long-tailed training split
      clusters.json         round 1: k-means assignment of every training image, centroids, sizes,
                            class histogram and purity per cluster (inspection only)
      expert_<k>/           round 1: one expert per cluster, initialised from the base model and
                            trained with the same contrastive loss on that cluster only (its
                            negatives are all from the same cluster: the hard negatives)
      student/              round 1: one network distilled from base + experts
      round_<r>/            round r >= 2: clusters.json, expert_<k>/, student/ (its base is the
                            student of round r - 1)
      clusters.md           sizes, purity and class histogram of every round's clusters
      checkpoint.pt         the last round's student (a hard link), so that
                            ``sdclr-fast eval --run-dir run_dir`` evaluates DnC like any other run

Choices made here (documented because DnC has no public code):

* **What is clustered.** The base model's backbone features (the representation the probes
  use: the online network of a MoCLR base, the dense branch of an SDCLR base) of the *eval
  view* of every training image, L2-normalised; ``cluster_on="projection"`` clusters the
  projection-head output instead (:mod:`sdclr_fast.train.clustering`).
* **What is distilled.** Each teacher's backbone features (``distill_target="projection"``: its
  projection output), computed under ``no_grad`` with the teacher in eval mode from the *same
  augmented view* the student sees, as DnC does. Both augmented views of a batch are used, each
  as its own student sample. Loss: ``2 - 2 cos`` onto the base embedding and onto the embedding
  of the expert that owns the image's cluster (:mod:`sdclr_fast.train.distill`, which also
  holds the student's loop).
* **The student** has the base model's architecture (``build_model`` with the base's
  arguments; for an SDCLR base the dense branch is trained and evaluated) plus one MLP
  prediction head per teacher. Its checkpoint has the same format as a pretraining checkpoint
  (``model`` / ``model_args`` / ``config``), with the heads stored under ``dnc_heads``, so
  :func:`sdclr_fast.train.load_model` and the evaluation path load it unchanged. The student's
  own projection head (and MoCLR predictor) is not trained (distillation never uses it); only
  its backbone matters. When a later round's experts start from that student, they start with
  those untrained heads and a target network copied from the student.
* **Cost.** Experts partition the data, so ``expert_epochs`` cost about that many epochs of the
  full set in total; a student epoch costs about 1.5-2 contrastive epochs (two extra no-grad
  teacher forwards per view: the base and the owning expert). With all budgets equal to E, one
  round costs about 3.5-4 x E contrastive epochs, each further round about 2.5-3 x E more.
* **Tiny clusters.** Long-tailed data makes small clusters as a matter of course (the tail is
  what lands in them). An expert trained by ``w`` processes (all ranks, or its group of ranks with
  ``parallel_experts``; 1 without torchrun) uses the batch ``min(batch_size, size - size % w)``,
  so that every rank gets the same number of images, and needs at least
  ``MIN_IMAGES_PER_RANK = 2`` images per rank: with one image per process the per-process batch
  statistics of BN are those of a single image's two views (SDCLR's per-branch BN has one row
  and cannot train at all), and one image has no negative. A smaller cluster is not trained:
  the round's base model serves as its expert, a line says so, ``dnc.json`` marks it
  ``"trained": false`` with the reason, and the student regresses those images onto the base
  embedding twice. Experts clip their gradient norm (``expert_grad_clip``, 100): on a cluster
  of near-identical images, BN's per-channel variance over a few values falls below its eps and
  its backward multiplies the gradient by up to 1/sqrt(eps) per layer, which overflowed an
  unclipped MoCLR expert's weights.
* **Resume.** ``dnc.json`` records each finished stage of each round (and each finished
  expert). With ``resume=True`` finished rounds and stages are skipped and the interrupted one
  continues from its last checkpoint (an interrupted expert resumes, finished experts are not
  retrained). The student loop saves everything a bit-identical CPU resume needs (weights,
  heads, optimiser, schedule, RNG and data-order states) at the end of every epoch, like
  :func:`pretrain`.

Under torchrun every stage runs on all ranks: the base, each expert and the student train with
DDP (:func:`pretrain`, :func:`distill_student`); for clustering each rank embeds its share of the
training split (whole extraction batches, so every feature equals the one-process one), rank 0
gathers them, runs k-means (faiss, on the GPU where faiss-gpu is installed, or the torch
implementation) and writes clusters.json, which every rank then reads: the assignment is the
one-process result by construction. Only rank 0 writes the shared files (dnc.json,
clusters.json, clusters.md, the final link); the run directory must be on a file system every
rank sees. With ``parallel_experts`` the ranks are split into groups
(``torch.distributed.new_group``) of ``world // min(world, k)`` ranks and the groups train
different experts at the same time, each expert with DDP on its group.

On a stream (``--dataset webdataset``, :mod:`sdclr_fast.data.webdataset`) the clustering reads
every rank's shards once, in order; clusters.json also holds the sample keys, and each expert
trains on the stream filtered to its cluster's keys.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..files import link_or_copy, read_json, write_json, write_text
from . import pretrain as _pretrain_module
from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from .clustering import CLUSTERS_NAME, cluster_stage, cluster_summary, clusters_markdown, read_clusters
from .config import DnCConfig, PretrainConfig
from .distill import distill_student
from .models import load_model
from .distributed import (DistInfo, all_gather_object, barrier, init_distributed, new_groups, shutdown,
                          within_group)
from .run import (Execution, Preempted, StopCheck, config_differences_error, read_again, read_for_run,
                  resolve_device, run_data, run_lock, stop_requested, stop_signals, write_run_files)

__all__ = ["dnc", "dnc_state", "round_dir", "STATE_NAME", "CLUSTERS_MD_NAME"]

STATE_NAME = "dnc.json"
CLUSTERS_MD_NAME = "clusters.md"
STATE_FORMAT = 1
MIN_IMAGES_PER_RANK = 2  # an expert's per-process batch: BN statistics of more than one image


# ---------------------------------------------------------------- state file
def _read_state(path) -> dict:
    return read_json(path, what="DnC state file", formats=(STATE_FORMAT,))


def dnc_state(run_dir) -> dict:
    """The stage markers of a DnC run directory (``dnc.json``)."""
    return _read_state(Path(run_dir) / STATE_NAME)


def stored_configs(run_dir):
    """(base PretrainConfig, DnCConfig) stored in a DnC run directory, or None when there is none."""
    path = Path(run_dir) / STATE_NAME
    if not path.exists():
        return None
    state = read_for_run(path, _read_state)  # the run that follows takes this read over
    return PretrainConfig.from_dict(state["base_config"]), DnCConfig.from_dict(state["dnc"])


_METHOD_LABELS = {"moclr": "DnC", "simclr": "DnC (SimCLR base)", "sdclr": "DnC (SDCLR base)"}


def _stage_configs(base: PretrainConfig, opt: DnCConfig, round_no: int = 1):
    """(base, expert, student) PretrainConfigs of round ``round_no`` (the base one is used by
    round 1 only). Labels name the round when there are several."""
    extra = dict(base.extra)
    base_cfg = base.replace(method=opt.base_method, epochs=opt.base_epochs or base.epochs,
                            extra={**extra, "label": f"DnC base ({opt.base_method})", "dnc_stage": "base"})
    expert_cfg = base.replace(method=opt.base_method, epochs=opt.expert_epochs or base.epochs,
                              grad_clip=opt.expert_grad_clip, extra={**extra, "dnc_stage": "expert"})
    lr = opt.distill_lr if opt.distill_lr is not None else 0.1 * base.batch_size / 256
    label = _METHOD_LABELS[opt.base_method]
    if opt.rounds > 1:
        label = f"{label} round {round_no} student"
        expert_cfg.extra["dnc_round"] = round_no
    student_cfg = base.replace(method=opt.base_method, epochs=opt.student_epochs or base.epochs, lr=lr,
                               extra={**extra, "label": label, "dnc_stage": "student", "dnc": opt.to_dict(),
                                      **({"dnc_round": round_no} if opt.rounds > 1 else {})})
    return base_cfg, expert_cfg, student_cfg


def round_dir(run_dir, round_no: int) -> Path:
    """Where round ``round_no`` (1-based) keeps its clusters, experts and student: the run
    directory itself for round 1, ``run_dir/round_<r>`` after it."""
    return Path(run_dir) if round_no == 1 else Path(run_dir) / f"round_{round_no}"


def _rel(path, root):
    return os.path.relpath(Path(path).resolve(), Path(root).resolve())


# ---------------------------------------------------------------- the pipeline
def dnc(config: PretrainConfig, options: DnCConfig | None = None, *, run_dir, resume: bool = False,
        data=None, init_checkpoint=None) -> Path:
    """Run (or resume) the DnC rounds and return the last round's student checkpoint.

    config:  the base :class:`PretrainConfig` (data set, architecture, batch, lr, seed, device...);
             its ``method`` is replaced by ``options.base_method`` and its ``epochs`` by the stage
             budgets that are set.
    options: the :class:`DnCConfig` (default: DnC's defaults).
    run_dir: the DnC run directory (see the module docstring for its layout).
    resume:  skip finished rounds and stages and continue the interrupted one. Without it, a run directory
             that already holds a DnC run is an error.
    data:    a ready ``ContrastiveData`` (default: built from ``config``, or from the run's
             split.json when it exists).
    init_checkpoint: initialise the base model from this checkpoint.
    """
    options = options if options is not None else DnCConfig()
    if not isinstance(config, PretrainConfig):
        raise ValueError(f"config must be a PretrainConfig, got {type(config).__name__}")
    if not isinstance(options, DnCConfig):
        raise ValueError(f"options must be a DnCConfig, got {type(options).__name__}")
    config = config.replace(method=options.base_method)
    config.validate()
    options.validate()
    run_dir = Path(run_dir)
    dist_info = init_distributed(resolve_device(config.device).type)
    try:
        with run_lock(run_dir, dist_info), stop_signals():
            return _dnc(config, options, run_dir, resume, data, init_checkpoint, dist_info)
    finally:
        shutdown(dist_info)


def _readable(ckpt) -> bool:
    """Whether a finished stage's checkpoint can be read. An unreadable one (a damaged file) sends
    the stage back through its resume, which continues from the previous checkpoint kept beside it
    and says so in one line."""
    try:
        load_checkpoint(ckpt)
        return True
    except CheckpointError:
        return False


def _say(dist_info):
    return print if dist_info.is_main else (lambda *a, **k: None)


def _between_stages(run_dir, done: str, dist_info: DistInfo, device):
    # every rank stops or none does (a signal may reach one rank only)
    if StopCheck(dist_info, 1, device)(0, force=True):
        raise Preempted(f"stopped by {stop_requested()} after DnC's {done}; the DnC run {str(run_dir)!r} "
                        f"continues with --resume")


def _dnc(config, options, run_dir, resume, data, init_checkpoint, dist_info):
    state_path = run_dir / STATE_NAME
    say = _say(dist_info)

    # ---- the state file: refuse to overwrite a run, refuse to resume a different one
    if state_path.exists():
        if not resume:
            raise ValueError(f"run_dir {str(run_dir)!r} already holds a DnC run ({STATE_NAME}); pass "
                             f"resume=True (--resume) to continue it, or choose another run directory")
        state = read_again(state_path, _read_state)  # once per command: stored_configs may have read it
        diff = DnCConfig.from_dict(state["dnc"]).differences(options)
        diff.update(PretrainConfig.from_dict(state["base_config"]).differences(config))
        if diff:
            raise config_differences_error(diff, f"the DnC run in {str(run_dir)!r}")
        state["dnc"], state["base_config"] = options.to_dict(), config.to_dict()  # runtime fields
    else:
        state = {"format": STATE_FORMAT, "dnc": options.to_dict(), "base_config": config.to_dict(), "stages": {}}

    def mark():  # every rank keeps the same state; rank 0 writes it
        if dist_info.is_main:
            write_json(state_path, state, what="the DnC state")

    # ---- data: one split for every stage
    data = run_data(config, run_dir, data)
    barrier(dist_info)  # every rank has read the state file before rank 0 writes it
    if dist_info.is_main:
        write_run_files(run_dir, data)
    mark()
    barrier(dist_info)
    base_cfg = _stage_configs(config, options)[0]
    ex = Execution.of(config, dist_info)

    # ---- round 1, stage 1: the base model
    stages = state["stages"]
    base_dir = run_dir / "base"
    if stages.get("base", {}).get("done") and _readable(run_dir / stages["base"]["checkpoint"]):
        base_ckpt = run_dir / stages["base"]["checkpoint"]
        say(f"DnC base: done ({base_ckpt})")
    else:
        say(f"DnC stage 1/3: base {options.base_method} model, {base_cfg.epochs} epochs -> {base_dir}")
        base_ckpt = _pretrain_module.pretrain(base_cfg, run_dir=base_dir, data=data, resume=resume,
                                              init_checkpoint=init_checkpoint)
        stages["base"] = {"done": True, "checkpoint": _rel(base_ckpt, run_dir)}
        mark()
    _between_stages(run_dir, "base model", dist_info, ex.device)

    cluster_records = []
    for r in range(1, options.rounds + 1):
        # round 1's markers sit at the top of "stages" (the layout of one-round runs); round r >= 2's
        # under "round_<r>"
        marks = stages if r == 1 else stages.setdefault(f"round_{r}", {})
        student_ckpt = _round(r, marks, mark, config, options, run_dir, data, base_ckpt, resume, ex,
                              cluster_records, dist_info)
        base_ckpt = student_ckpt  # the next round's base is this round's student
    return student_ckpt


def _round(r, marks, mark, config, options, run_dir, data, base_ckpt, resume, ex, cluster_records, dist_info):
    """Stages 2 and 3 of round ``r`` on top of ``base_ckpt``; returns the round's student."""
    say = _say(dist_info)
    _, expert_cfg, student_cfg = _stage_configs(config, options, r)
    rdir = round_dir(run_dir, r)
    tag = "" if options.rounds == 1 else f"round {r}/{options.rounds}: "
    name = "DnC" if options.rounds == 1 else f"DnC round {r}"

    # ---- stage 2a: k-means on the base embeddings
    clusters_path = rdir / CLUSTERS_NAME
    if marks.get("clusters", {}).get("done") and clusters_path.exists():
        clusters = read_clusters(clusters_path)
        if clusters["train_indices"] != data.train.indices.tolist():
            raise ValueError(f"{str(clusters_path)!r} was computed on another training split")
        say(f"{name} clusters: done, {cluster_summary(clusters)}")
    else:
        say(f"{tag}DnC stage 2/3: k-means (k={options.k}, {options.kmeans_metric}, {options.cluster_on}) "
            f"on the base embeddings")
        # every rank embeds its share, rank 0 clusters (None on the other ranks)
        record = cluster_stage(load_model(base_ckpt, device=ex.device), data, options, seed=config.seed,
                               batch_size=config.batch_size, device=ex.device, amp=ex.amp, dist_info=dist_info)
        summary = None
        if dist_info.is_main:
            write_json(clusters_path, record, what="the DnC clusters")
            summary = {"sizes": record["sizes"], "backend": record["backend"]}
        summary = all_gather_object(summary, dist_info)[0]
        marks["clusters"] = {"done": True, "file": _rel(clusters_path, run_dir), **summary}
        mark()
        barrier(dist_info)
        clusters = read_clusters(clusters_path)
        say(f"{name} clusters: {cluster_summary(clusters)} ({clusters['backend']}, {clusters['iterations']} "
            f"iterations)")
    cluster_records.append((r, clusters))
    if dist_info.is_main:
        write_text(run_dir / CLUSTERS_MD_NAME, clusters_markdown(cluster_records, data.class_names),
                   what="the DnC clusters report")
    assignments = clusters["assignments"]
    _between_stages(run_dir, f"{tag}clustering", dist_info, ex.device)

    # ---- stage 2b: one expert per cluster, initialised from the base model
    experts = marks.setdefault("experts", {})
    todo = [(k, (assignments == k).nonzero().flatten()) for k in range(options.k)]
    # a trained expert whose checkpoint is unreadable is resumed (from its previous checkpoint)
    done = {k for k, _ in todo if experts.get(str(k), {}).get("done") and (
        not experts[str(k)].get("trained", True) or _readable(run_dir / experts[str(k)]["checkpoint"]))}
    for k in sorted(done):
        say(f"{name} expert {k}: done ({run_dir / experts[str(k)]['checkpoint']})")
    todo = [(k, m) for k, m in todo if k not in done]
    parallel = options.parallel_experts and dist_info.enabled
    while True:  # skipping a cluster can change the group size of the others
        ranks = _expert_ranks(dist_info.world_size, len(todo), parallel)
        small = [(k, m) for k, m in todo if m.numel() < MIN_IMAGES_PER_RANK * ranks]
        if not small:
            break
        for k, members in small:
            n = int(members.numel())
            reason = (f"{n} image(s), fewer than {MIN_IMAGES_PER_RANK} per process for the {ranks} process(es) "
                      f"that would train it")
            say(f"{name} expert {k}: cluster has {reason}; the base model is its expert")
            experts[str(k)] = {"done": True, "checkpoint": _rel(base_ckpt, run_dir), "size": n, "trained": False,
                               "reason": reason}
        mark()
        todo = [(k, m) for k, m in todo if m.numel() >= MIN_IMAGES_PER_RANK * ranks]

    def train_expert(k, members, talk):
        label = f"DnC expert {k}" if options.rounds == 1 else f"DnC round {r} expert {k}"
        n, w = int(members.numel()), _expert_ranks(dist_info.world_size, len(todo), parallel)
        cfg_k = expert_cfg.replace(batch_size=min(expert_cfg.batch_size, n - n % w),
                                   extra={**expert_cfg.extra, "label": label, "dnc_cluster": k})
        talk(f"{tag}DnC stage 2/3: expert {k + 1}/{options.k} on {n} images, batch {cfg_k.batch_size}, "
             f"{cfg_k.epochs} epochs -> {rdir / f'expert_{k}'}")
        return _pretrain_module.pretrain(cfg_k, run_dir=rdir / f"expert_{k}", indices=members, data=data,
                                         init_checkpoint=base_ckpt, resume=resume)

    def finished(k, ckpt, members):
        experts[str(k)] = {"done": True, "checkpoint": _rel(ckpt, run_dir), "size": int(members.numel()),
                           "trained": True}
        mark()

    if parallel and len(todo) > 1:
        _parallel_experts(todo, train_expert, finished, dist_info, run_dir, tag)
    else:
        for k, members in todo:
            finished(k, train_expert(k, members, say), members)
            _between_stages(run_dir, f"{tag}expert {k}", dist_info, ex.device)
    expert_ckpts = [run_dir / experts[str(k)]["checkpoint"] for k in range(options.k)]

    # ---- stage 3: the student
    student_dir = rdir / "student"
    final = run_dir / CHECKPOINT_NAME
    if marks.get("student", {}).get("done") and _readable(run_dir / marks["student"]["checkpoint"]):
        student_ckpt = run_dir / marks["student"]["checkpoint"]
        say(f"{name} student: done ({student_ckpt})")
    else:
        say(f"{tag}DnC stage 3/3: distilling base + {options.k} experts into a student, "
            f"{student_cfg.epochs} epochs -> {student_dir}")
        student_ckpt = distill_student(student_cfg, options, run_dir=student_dir, data=data,
                                       base_checkpoint=base_ckpt, expert_checkpoints=expert_ckpts,
                                       assignments=assignments, resume=resume)
        marks["student"] = {"done": True, "checkpoint": _rel(student_ckpt, run_dir)}
        mark()
    if r == options.rounds:
        if dist_info.is_main and not (final.exists() and os.path.samefile(final, student_ckpt)):
            link_or_copy(student_ckpt, final, what="the DnC run's final checkpoint")
        marks["student"]["final"] = CHECKPOINT_NAME
        mark()
        barrier(dist_info)
    if r < options.rounds:
        _between_stages(run_dir, f"{tag}student", dist_info, ex.device)
    return student_ckpt


def _expert_groups(world: int, n_experts: int) -> int:
    """How many groups of ranks train ``n_experts`` experts in parallel: the most, up to one per
    expert, that divide the ranks evenly."""
    n_groups = max(1, min(world, n_experts))
    while world % n_groups:
        n_groups -= 1
    return n_groups


def _expert_ranks(world: int, n_experts: int, parallel: bool) -> int:
    """The number of processes that train each expert (with DDP among them)."""
    return world // _expert_groups(world, n_experts) if parallel and n_experts > 1 else world


def _parallel_experts(todo, train_expert, finished, dist_info, run_dir, tag):
    """Train the experts of ``todo`` concurrently: the ranks are split into ``g = min(world, len(todo))``
    groups (fewer when g does not divide the world size), group j trains experts j, j + g, ... with
    DDP on its own ranks. Every rank then learns which experts finished; a stop signal or an error
    in any group stops every rank (finished experts stay marked)."""
    n_groups = _expert_groups(dist_info.world_size, len(todo))
    g, sub = new_groups(dist_info, n_groups)
    done, failure, error = {}, None, None
    talk = print if sub.is_main else (lambda *a, **k: None)
    with within_group(sub):
        try:
            for i, (k, members) in enumerate(todo):
                if i % n_groups == g:
                    done[k] = str(train_expert(k, members, talk))
        except Preempted as exc:
            failure = f"preempted: {exc}"
        except Exception as exc:  # re-raised below, after the other groups have been told
            failure, error = f"{type(exc).__name__}: {exc}", exc
    reports = all_gather_object((done if sub.is_main else {}, failure), dist_info)
    members_of = dict(todo)
    for rank_done, _ in reports:
        for k, ckpt in sorted(rank_done.items()):
            finished(k, Path(ckpt), members_of[k])
    if error is not None:
        raise error
    failures = [f for _, f in reports if f is not None]
    if any(not f.startswith("preempted") for f in failures):
        raise RuntimeError(f"DnC {tag}experts: another group of ranks failed ({failures[0]})")
    if failures:
        raise Preempted(f"stopped by a stop signal during DnC's {tag}experts; the DnC run {str(run_dir)!r} "
                        f"continues with --resume")
