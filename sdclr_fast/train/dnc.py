"""Divide and Contrast (DnC; Tian, Hénaff, van den Oord, ICCV 2021) on top of the SimCLR /
SDCLR loop.

Three stages, each resumable on its own, all under one run directory::

    run_dir/
      dnc.json              stage markers, the DnC options and the base configuration
      split.json            the data split every stage uses
      base/                 stage 1: SimCLR or SDCLR on the whole long-tailed training split
      clusters.json         stage 2a: k-means assignment of every training image, centroids, sizes
      expert_<k>/           stage 2b: one expert per cluster, initialised from the base model and
                            trained with the same contrastive loss on that cluster only (its
                            negatives are all from the same cluster: the hard negatives)
      student/              stage 3: one network distilled from base + experts
      checkpoint.pt         the student's final checkpoint (a hard link), so that
                            ``sdclr-fast eval --run-dir run_dir`` evaluates DnC like any other run

Choices made here (documented because DnC has no public code):

* **What is clustered.** The base model's backbone features (the representation the probes
  use, dense branch for an SDCLR base) of the *eval view* of every training image,
  L2-normalised; ``cluster_on="projection"`` clusters the projection-head output instead.
  k-means is spherical (cosine) by default; see :mod:`sdclr_fast.train.kmeans`. Cluster ids are
  renumbered by decreasing size (ties: smallest first member), so the numbering does not depend
  on the backend.
* **What is distilled.** Each teacher's backbone features (``distill_target="projection"``: its
  projection output), computed under ``no_grad`` with the teacher in eval mode from the *same
  augmented view* the student sees, as DnC does. Both augmented views of a batch are used, each
  as its own student sample. Loss: ``2 - 2 cos`` onto the base embedding and onto the embedding
  of the expert that owns the image's cluster (:mod:`sdclr_fast.train.distill`).
* **The student** has the base model's architecture (``build_model`` with the base's
  arguments; for an SDCLR base the dense branch is trained and evaluated) plus one MLP
  prediction head per teacher. Its checkpoint has the same format as a pretraining checkpoint
  (``model`` / ``model_args`` / ``config``), with the heads stored under ``dnc_heads``, so
  :func:`sdclr_fast.train.load_model` and the evaluation path load it unchanged. The student's
  own projection head is not trained (distillation never uses it); only its backbone matters.
* **Cost.** Experts partition the data, so ``expert_epochs`` cost about that many epochs of the
  full set in total; a student epoch costs about 1.5-2 contrastive epochs (two extra no-grad
  teacher forwards per view: the base and the owning expert). With all budgets equal to E, DnC
  costs about 3.5-4 x E contrastive epochs.
* **Tiny clusters.** An expert trains with batch ``min(batch_size, cluster size)``; a cluster
  of fewer than two images cannot be contrasted, so the base model serves as its expert.
* **Resume.** ``dnc.json`` records each finished stage (and each finished expert). With
  ``resume=True`` finished stages are skipped and the interrupted one continues from its last
  checkpoint (an interrupted expert resumes, finished experts are not retrained). The student
  loop saves everything a bit-identical CPU resume needs (weights, heads, optimiser, schedule,
  RNG and data-order states) at the end of every epoch, like :func:`pretrain`.

The DnC stages run in one process (no DDP for the student stage).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import numbers
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import CHECKPOINT_NAME, CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .config import METHODS, PretrainConfig
from .distill import DnCStudent, teacher_targets

__all__ = ["DnCConfig", "add_dnc_arguments", "run_dnc", "dnc", "cluster_stage", "embed_images", "distill_student",
           "load_student", "read_clusters", "dnc_state", "STATE_NAME", "CLUSTERS_NAME"]

STATE_NAME = "dnc.json"
CLUSTERS_NAME = "clusters.json"
STATE_FORMAT = 1
EMBEDDINGS = ("features", "projection")
INITS = ("scratch", "base")
# DnC options that only change how a run executes; they may differ on resume.
_RUNTIME = frozenset({"kmeans_backend"})


# ---------------------------------------------------------------- options
@dataclass
class DnCConfig:
    """The DnC options on top of the base :class:`PretrainConfig`.

    k:               number of clusters / experts (DnC uses 5 or 10).
    base_method:     "simclr" (DnC's choice) or "sdclr" (an SDCLR base, unpublished).
    base_epochs, expert_epochs, student_epochs: stage budgets; None takes the base config's
                     ``epochs``. Each expert runs that many epochs over its own cluster, so the
                     expert stage as a whole costs about ``expert_epochs`` epochs of the full set.
    kmeans_iters:    Lloyd iterations at most.
    kmeans_backend:  "auto" (faiss where installed), "faiss" or "torch" (on the run's device).
    kmeans_metric:   "cosine" (spherical k-means) or "euclidean", on normalised embeddings.
    cluster_on:      "features" (backbone output) or "projection" (head output) of the base.
    distill_target:  "features" or "projection": which teacher embedding the heads regress.
    distill_lr:      peak SGD lr of the student (None: 0.1 * batch_size / 256); same momentum,
                     weight decay, warm-up and cosine schedule as the base config.
    head_hidden:     hidden width of the prediction heads (None: the backbone feature size).
    base_weight, expert_weight: weights of the two regression terms.
    student_init:    "scratch" (a fresh network, seeded) or "base" (start from the base weights).
    """

    k: int = 5
    base_method: str = "simclr"
    base_epochs: int | None = None
    expert_epochs: int | None = None
    student_epochs: int | None = None
    kmeans_iters: int = 50
    kmeans_backend: str = "auto"
    kmeans_metric: str = "cosine"
    cluster_on: str = "features"
    distill_target: str = "features"
    distill_lr: float | None = None
    head_hidden: int | None = None
    base_weight: float = 1.0
    expert_weight: float = 1.0
    student_init: str = "scratch"

    def __post_init__(self):
        self.validate()

    def validate(self):
        def pos_int(name, allow_none=False):
            v = getattr(self, name)
            if allow_none and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        pos_int("k")
        pos_int("kmeans_iters")
        for name in ("base_epochs", "expert_epochs", "student_epochs", "head_hidden"):
            pos_int(name, allow_none=True)
        choice("base_method", METHODS)
        choice("kmeans_backend", ("auto", "faiss", "torch"))
        choice("kmeans_metric", ("cosine", "euclidean"))
        choice("cluster_on", EMBEDDINGS)
        choice("distill_target", EMBEDDINGS)
        choice("student_init", INITS)
        for name in ("base_weight", "expert_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.base_weight == 0 and self.expert_weight == 0:
            raise ValueError("base_weight and expert_weight cannot both be 0")
        if self.distill_lr is not None:
            v = self.distill_lr
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"distill_lr must be a finite number > 0, got {v!r}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DnC options {unknown}")
        return cls(**d)


# ---------------------------------------------------------------- command line
_FLAGS = {  # DnCConfig field -> flag
    "k": "--dnc-k", "base_method": "--dnc-base-method", "base_epochs": "--dnc-base-epochs",
    "expert_epochs": "--dnc-expert-epochs", "student_epochs": "--dnc-student-epochs",
    "kmeans_iters": "--dnc-kmeans-iters", "kmeans_backend": "--dnc-kmeans-backend",
    "kmeans_metric": "--dnc-kmeans-metric", "cluster_on": "--dnc-cluster-on",
    "distill_target": "--dnc-distill-target", "distill_lr": "--dnc-distill-lr",
    "head_hidden": "--dnc-head-hidden", "base_weight": "--dnc-base-weight",
    "expert_weight": "--dnc-expert-weight", "student_init": "--dnc-student-init",
}


def add_dnc_arguments(parser: argparse.ArgumentParser) -> None:
    """The --dnc-* flags of ``sdclr-fast pretrain --method dnc``. Their argparse defaults are None
    so that ``--resume`` can tell given flags from stored options; the documented defaults come
    from :class:`DnCConfig`."""
    d = DnCConfig()
    g = parser.add_argument_group("DnC (--method dnc)")
    g.add_argument("--dnc-k", type=int, default=None,
                   help=f"number of k-means clusters, i.e. experts (default {d.k}; DnC uses 5 or 10)")
    g.add_argument("--dnc-base-method", choices=METHODS, default=None,
                   help=f"contrastive method of the base model and the experts (default {d.base_method}; "
                        f"sdclr gives an SDCLR base, a combination not published before)")
    g.add_argument("--dnc-base-epochs", type=int, default=None,
                   help="epochs of the base model on the whole training split (default: --epochs)")
    g.add_argument("--dnc-expert-epochs", type=int, default=None,
                   help="epochs of each expert on its own cluster (default: --epochs)")
    g.add_argument("--dnc-student-epochs", type=int, default=None,
                   help="epochs of the distillation into the student (default: --epochs)")
    g.add_argument("--dnc-kmeans-iters", type=int, default=None,
                   help=f"maximum Lloyd iterations of k-means (default {d.kmeans_iters})")
    g.add_argument("--dnc-kmeans-backend", choices=("auto", "faiss", "torch"), default=None,
                   help="k-means implementation: faiss (CPU), torch (on the training device) or auto = "
                        "faiss where installed (default auto)")
    g.add_argument("--dnc-kmeans-metric", choices=("cosine", "euclidean"), default=None,
                   help=f"spherical (cosine) or Euclidean k-means on the L2-normalised embeddings "
                        f"(default {d.kmeans_metric})")
    g.add_argument("--dnc-cluster-on", choices=EMBEDDINGS, default=None,
                   help=f"base embedding that is clustered: backbone features or projection-head output "
                        f"(default {d.cluster_on})")
    g.add_argument("--dnc-distill-target", choices=EMBEDDINGS, default=None,
                   help=f"teacher embedding the student's heads regress (default {d.distill_target})")
    g.add_argument("--dnc-distill-lr", type=float, default=None,
                   help="peak SGD learning rate of the student (default 0.1 x batch size / 256)")
    g.add_argument("--dnc-head-hidden", type=int, default=None,
                   help="hidden width of the student's prediction heads (default: backbone feature size)")
    g.add_argument("--dnc-base-weight", type=float, default=None,
                   help=f"weight of the base-teacher regression term (default {d.base_weight:g})")
    g.add_argument("--dnc-expert-weight", type=float, default=None,
                   help=f"weight of the expert-teacher regression term (default {d.expert_weight:g})")
    g.add_argument("--dnc-student-init", choices=INITS, default=None,
                   help=f"student initialisation: a fresh network or the base model's weights "
                        f"(default {d.student_init})")


def _given_dnc(args) -> dict:
    return {f: getattr(args, f"dnc_{f}") for f in _FLAGS if getattr(args, f"dnc_{f}", None) is not None}


def run_dnc(args) -> Path:
    """Entry point of ``sdclr-fast pretrain --method dnc``: returns the student's checkpoint.

    args is the parsed pretrain namespace (pretrain flags + the --dnc-* flags). With --resume the
    stored configuration of the run is used and flags given on the command line override it
    (a change that alters the result is refused by the stage it concerns).
    """
    from ..cli import _explicit, config_from_args

    if getattr(args, "stop_at_epoch", None) is not None:
        raise ValueError("--stop-at-epoch is not supported with --method dnc; interrupt the run and "
                         "--resume it (each stage continues from its last epoch)")
    run_dir = Path(args.run_dir)
    given = _given_dnc(args)
    state_path = run_dir / STATE_NAME
    if getattr(args, "resume", False) and state_path.exists():
        stored = _read_state(state_path)
        options = DnCConfig.from_dict({**stored["dnc"], **given})
        explicit = _explicit(args)
        explicit.pop("method", None)
        base = PretrainConfig.from_dict(stored["base_config"]).replace(**explicit)
    else:
        options = DnCConfig(**given)
        base = config_from_args(args, method=options.base_method)
    if base.method != options.base_method:
        base = base.replace(method=options.base_method)
    path = dnc(base, options, run_dir=run_dir, resume=bool(getattr(args, "resume", False)),
               init_checkpoint=getattr(args, "init_checkpoint", None))
    print(f"checkpoint: {path}")
    return path


# ---------------------------------------------------------------- state file
def _read_state(path) -> dict:
    path = Path(path)
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable DnC state file: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{str(path)!r} is not a DnC state file of format {STATE_FORMAT}")
    return state


def _write_json(path, payload):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)  # a kill never leaves a half-written marker


def dnc_state(run_dir) -> dict:
    """The stage markers of a DnC run directory (``dnc.json``)."""
    return _read_state(Path(run_dir) / STATE_NAME)


def _stage_configs(base: PretrainConfig, opt: DnCConfig):
    extra = dict(base.extra)
    base_cfg = base.replace(method=opt.base_method, epochs=opt.base_epochs or base.epochs,
                            extra={**extra, "label": f"DnC base ({opt.base_method})", "dnc_stage": "base"})
    expert_cfg = base.replace(method=opt.base_method, epochs=opt.expert_epochs or base.epochs,
                              extra={**extra, "dnc_stage": "expert"})
    lr = opt.distill_lr if opt.distill_lr is not None else 0.1 * base.batch_size / 256
    label = "DnC" if opt.base_method == "simclr" else "DnC (SDCLR base)"
    student_cfg = base.replace(method=opt.base_method, epochs=opt.student_epochs or base.epochs, lr=lr,
                               extra={**extra, "label": label, "dnc_stage": "student", "dnc": opt.to_dict()})
    return base_cfg, expert_cfg, student_cfg


# ---------------------------------------------------------------- embeddings and clusters
class _Embed(torch.nn.Module):
    """Dense-branch embedding of a SelfCompetitor: backbone features or projection output."""

    def __init__(self, model, which):
        super().__init__()
        self.model = model
        self.which = which

    def forward(self, x):
        if self.which == "features":
            return self.model.features(x, branch="dense")
        return self.model(x, branch="dense")


def embed_images(model, images, data, which="features", *, batch_size=512, device=None, amp=False):
    """L2-normalised float32 embeddings (N, D) of ``images`` (an ImageSet or uint8 tensor) under
    the deterministic eval transform, model frozen in eval mode."""
    from ..eval.features import extract_features

    feats = extract_features(_Embed(model, which), images, data.mean, data.std, batch_size=batch_size,
                             device=device, autocast_dtype=torch.bfloat16 if amp else None)
    return F.normalize(feats.features, dim=1)


def _canonical(assignments, k):
    """Renumber clusters by decreasing size, ties by their first member, so the numbering does
    not depend on the backend's arbitrary one. Returns (new assignments, old id of each new id)."""
    n = assignments.shape[0]
    sizes = torch.bincount(assignments, minlength=k)
    first = torch.full((k,), n, dtype=torch.long)
    first.scatter_reduce_(0, assignments, torch.arange(n), reduce="amin")
    order = sorted(range(k), key=lambda j: (-int(sizes[j]), int(first[j])))
    remap = torch.empty(k, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(k)
    return remap[assignments], order


def cluster_stage(model, data, opt: DnCConfig, *, seed=0, batch_size=512, device=None, amp=False) -> dict:
    """Embed the training split with the base model, run k-means and return the clusters record
    (what ``clusters.json`` holds)."""
    from .kmeans import kmeans

    device = torch.device(device) if device is not None else torch.device("cpu")
    if opt.k > len(data.train):
        raise ValueError(f"--dnc-k={opt.k} exceeds the {len(data.train)} training images")
    t0 = time.perf_counter()
    emb = embed_images(model, data.train, data, opt.cluster_on, batch_size=batch_size, device=device, amp=amp)
    t_embed = time.perf_counter() - t0
    backend = opt.kmeans_backend
    res = kmeans(emb, opt.k, iters=opt.kmeans_iters, seed=seed, metric=opt.kmeans_metric, backend=backend)
    assignments, order = _canonical(res.assignments.cpu(), opt.k)
    centroids = res.centroids.cpu()[torch.tensor(order)]
    sizes = torch.bincount(assignments, minlength=opt.k)
    # labels are never seen by the method; this table is only for inspecting the clusters
    classes = int(data.num_classes)
    class_counts = torch.zeros(opt.k, classes, dtype=torch.long)
    class_counts.index_put_((assignments, data.train.labels), torch.ones_like(assignments), accumulate=True)
    return {
        "k": opt.k, "backend": res.backend, "metric": res.metric, "embedding": opt.cluster_on,
        "iterations": res.iterations, "inertia": res.inertia, "seed": int(seed),
        "embed_seconds": t_embed, "kmeans_seconds": time.perf_counter() - t0 - t_embed,
        "sizes": sizes.tolist(),
        "class_counts": class_counts.tolist(),
        "train_indices": data.train.indices.tolist(),
        "assignments": assignments.tolist(),
        "centroids": centroids.tolist(),
    }


def read_clusters(run_dir_or_file) -> dict:
    """``clusters.json`` of a DnC run, with ``assignments`` (int64) and ``centroids`` (float32)
    as tensors."""
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / CLUSTERS_NAME
    rec = json.loads(path.read_text())
    rec["assignments"] = torch.tensor(rec["assignments"], dtype=torch.long)
    rec["centroids"] = torch.tensor(rec["centroids"], dtype=torch.float32)
    return rec


# ---------------------------------------------------------------- the pipeline
def dnc(config: PretrainConfig, options: DnCConfig | None = None, *, run_dir, resume: bool = False,
        data=None, init_checkpoint=None) -> Path:
    """Run (or resume) the three DnC stages and return the student's final checkpoint.

    config:  the base :class:`PretrainConfig` (data set, architecture, batch, lr, seed, device...);
             its ``method`` is replaced by ``options.base_method`` and its ``epochs`` by the stage
             budgets that are set.
    options: the :class:`DnCConfig` (default: DnC's defaults).
    run_dir: the DnC run directory (see the module docstring for its layout).
    resume:  skip finished stages and continue the interrupted one. Without it, a run directory
             that already holds a DnC run is an error.
    data:    a ready ``ContrastiveData`` (default: built from ``config``, or from the run's
             split.json when it exists).
    init_checkpoint: initialise the base model from this checkpoint.
    """
    from . import pretrain as _pt

    options = options if options is not None else DnCConfig()
    if not isinstance(config, PretrainConfig):
        raise ValueError(f"config must be a PretrainConfig, got {type(config).__name__}")
    if not isinstance(options, DnCConfig):
        raise ValueError(f"options must be a DnCConfig, got {type(options).__name__}")
    config = config.replace(method=options.base_method)
    config.validate()
    options.validate()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("DnC runs in a single process; launch it without torchrun")
    run_dir = Path(run_dir)
    state_path = run_dir / STATE_NAME

    # ---- the state file: refuse to overwrite a run, refuse to resume a different one
    if state_path.exists():
        if not resume:
            raise ValueError(f"run_dir {str(run_dir)!r} already holds a DnC run ({STATE_NAME}); pass "
                             f"resume=True (--resume) to continue it, or choose another run directory")
        state = _read_state(state_path)
        old_opt = DnCConfig.from_dict(state["dnc"])
        diff = {k: (a, b) for (k, a), b in zip(old_opt.to_dict().items(), options.to_dict().values())
                if a != b and k not in _RUNTIME}
        old_cfg = PretrainConfig.from_dict(state["base_config"])
        diff.update(old_cfg.differences(config))
        if diff:
            listing = ", ".join(f"{k}: stored {a!r}, given {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume the DnC run in {str(run_dir)!r} with a different "
                             f"configuration ({listing})")
        state["dnc"], state["base_config"] = options.to_dict(), config.to_dict()  # runtime fields
    else:
        state = {"format": STATE_FORMAT, "dnc": options.to_dict(), "base_config": config.to_dict(),
                 "stages": {}}
    stages = state["stages"]

    # ---- data: one split for every stage
    if data is None:
        from ..data import build_dataset

        split_file = run_dir if (run_dir / "split.json").exists() else None
        data = build_dataset(config.dataset, config.data_root, ratio=config.ratio, seed=config.seed,
                             split=config.split, image_size=config.image_size, split_file=split_file)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "split.json").exists():
        data.save_split(run_dir)
    _write_json(state_path, state)
    base_cfg, expert_cfg, student_cfg = _stage_configs(config, options)
    device = _pt.resolve_device(config)
    amp = config.amp if config.amp is not None else device.type == "cuda"

    # ---- stage 1: the base model
    base_dir = run_dir / "base"
    if stages.get("base", {}).get("done"):
        base_ckpt = _abs(stages["base"]["checkpoint"], run_dir)
        print(f"DnC base: done ({base_ckpt})")
    else:
        print(f"DnC stage 1/3: base {options.base_method} model, {base_cfg.epochs} epochs -> {base_dir}")
        base_ckpt = _pt.pretrain(base_cfg, run_dir=base_dir, data=data, resume=resume,
                                 init_checkpoint=init_checkpoint)
        stages["base"] = {"done": True, "checkpoint": _rel(base_ckpt, run_dir)}
        _write_json(state_path, state)

    # ---- stage 2a: k-means on the base embeddings
    clusters_path = run_dir / CLUSTERS_NAME
    if stages.get("clusters", {}).get("done") and clusters_path.exists():
        clusters = read_clusters(clusters_path)
        if clusters["train_indices"] != data.train.indices.tolist():
            raise ValueError(f"{str(clusters_path)!r} was computed on another training split")
        print(f"DnC clusters: done, sizes {clusters['sizes']}")
    else:
        print(f"DnC stage 2/3: k-means (k={options.k}, {options.kmeans_metric}, {options.cluster_on}) "
              f"on the base embeddings")
        base_model = _pt.load_model(base_ckpt, device=device)
        record = cluster_stage(base_model, data, options, seed=config.seed, batch_size=base_cfg.batch_size,
                               device=device, amp=amp)
        del base_model
        _write_json(clusters_path, record)
        stages["clusters"] = {"done": True, "file": CLUSTERS_NAME, "sizes": record["sizes"],
                              "backend": record["backend"]}
        _write_json(state_path, state)
        clusters = read_clusters(clusters_path)
        print(f"DnC clusters: sizes {record['sizes']} ({record['backend']}, {record['iterations']} iterations)")
    assignments = clusters["assignments"]

    # ---- stage 2b: one expert per cluster
    experts = stages.setdefault("experts", {})
    expert_ckpts = []
    for k in range(options.k):
        key = str(k)
        if experts.get(key, {}).get("done"):
            expert_ckpts.append(_abs(experts[key]["checkpoint"], run_dir))
            print(f"DnC expert {k}: done ({expert_ckpts[-1]})")
            continue
        members = (assignments == k).nonzero().flatten()
        if members.numel() < 2:
            # one image has no negative and no other view pairs: nothing to contrast
            print(f"DnC expert {k}: cluster has {members.numel()} image(s); the base model is its expert")
            experts[key] = {"done": True, "checkpoint": _rel(base_ckpt, run_dir), "size": int(members.numel()),
                            "trained": False}
            expert_ckpts.append(base_ckpt)
            _write_json(state_path, state)
            continue
        cfg_k = expert_cfg.replace(batch_size=min(expert_cfg.batch_size, int(members.numel())),
                                   extra={**expert_cfg.extra, "label": f"DnC expert {k}", "dnc_cluster": k})
        print(f"DnC stage 2/3: expert {k + 1}/{options.k} on {members.numel()} images, {cfg_k.epochs} epochs "
              f"-> {run_dir / f'expert_{k}'}")
        ckpt = _pt.pretrain(cfg_k, run_dir=run_dir / f"expert_{k}", indices=members, data=data,
                            init_checkpoint=base_ckpt, resume=resume)
        experts[key] = {"done": True, "checkpoint": _rel(ckpt, run_dir), "size": int(members.numel()),
                        "trained": True}
        _write_json(state_path, state)
        expert_ckpts.append(Path(ckpt))

    # ---- stage 3: the student
    student_dir = run_dir / "student"
    if stages.get("student", {}).get("done"):
        student_ckpt = _abs(stages["student"]["checkpoint"], run_dir)
        print(f"DnC student: done ({student_ckpt})")
    else:
        print(f"DnC stage 3/3: distilling base + {options.k} experts into a student, "
              f"{student_cfg.epochs} epochs -> {student_dir}")
        student_ckpt = distill_student(student_cfg, options, run_dir=student_dir, data=data,
                                       base_checkpoint=base_ckpt, expert_checkpoints=expert_ckpts,
                                       assignments=assignments, resume=resume)
        final = run_dir / CHECKPOINT_NAME
        _link_or_copy(student_ckpt, final)
        stages["student"] = {"done": True, "checkpoint": _rel(student_ckpt, run_dir), "final": CHECKPOINT_NAME}
        _write_json(state_path, state)
    return student_ckpt


def _rel(path, root):
    return os.path.relpath(Path(path).resolve(), Path(root).resolve())


def _abs(path, root):
    return Path(root) / path


def _link_or_copy(src, dst):
    """Make run_dir/checkpoint.pt the student's checkpoint (hard link, else a copy) atomically."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ---------------------------------------------------------------- stage 3: distillation loop
def _embed_fn(which):
    if which == "features":
        return lambda m, x: m.features(x, branch="dense")
    return lambda m, x: m(x, branch="dense")


def distill_student(config: PretrainConfig, options: DnCConfig, *, run_dir, data, base_checkpoint,
                    expert_checkpoints, assignments, resume=False, stop_at_epoch=None) -> Path:
    """Train the DnC student in ``run_dir`` and return its checkpoint (the format of
    :func:`pretrain`'s, plus ``dnc_heads``). ``assignments[i]`` is the cluster of training image
    i (a position in ``data.train``); ``expert_checkpoints[k]`` is cluster k's expert.
    ``stop_at_epoch`` stops with a resumable checkpoint once that many epochs are complete."""
    from ..data import BatchIterator, TwoViewAugment
    from . import pretrain as _pt
    from .schedule import warmup_cosine

    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT_NAME
    assignments = torch.as_tensor(assignments, dtype=torch.long).cpu()
    if assignments.shape != (len(data.train),):
        raise ValueError(f"assignments must have one cluster id per training image ({len(data.train)}), "
                         f"got shape {tuple(assignments.shape)}")
    if len(expert_checkpoints) != options.k:
        raise ValueError(f"expected {options.k} expert checkpoints, got {len(expert_checkpoints)}")
    # relative to the student's folder, so that a moved run directory still resumes
    teacher_paths = {"base": _rel(base_checkpoint, run_dir),
                     "experts": [_rel(p, run_dir) for p in expert_checkpoints]}

    resumed = None
    if ckpt_path.exists():
        if not resume:
            raise ValueError(f"run_dir {str(run_dir)!r} already holds {CHECKPOINT_NAME}; pass resume=True "
                             f"(--resume) to continue it")
        resumed = load_checkpoint(ckpt_path)
        diff = PretrainConfig.from_dict(resumed["config"]).differences(config)
        if diff:
            listing = ", ".join(f"{k}: stored {a!r}, given {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume {str(ckpt_path)!r} with a different configuration ({listing})")
        if resumed.get("dnc_teachers") != teacher_paths:
            raise ValueError(f"cannot resume {str(ckpt_path)!r}: it was distilled from other teachers")
        if resumed.get("finished"):
            print(f"{ckpt_path}: student already finished; nothing to do")
            return ckpt_path

    device = _pt.resolve_device(config)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    amp = config.amp if config.amp is not None else device.type == "cuda"
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    batch_size = min(config.batch_size, len(data.train))
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "split.json").exists():
        data.save_split(run_dir)
    (run_dir / _pt.CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2))

    # ---- teachers: frozen, eval mode (BN running statistics, dense branch)
    base_teacher = _pt.load_model(base_checkpoint, device=device)
    cache = {str(base_checkpoint): base_teacher}
    experts = []
    for p in expert_checkpoints:
        if str(p) not in cache:
            cache[str(p)] = _pt.load_model(p, device=device)
        experts.append(cache[str(p)])
    for m in cache.values():
        m.requires_grad_(False)
        if channels_last:
            m.to(memory_format=torch.channels_last)
    margs = load_checkpoint(base_checkpoint)["model_args"]
    embed = _embed_fn(options.distill_target)

    # ---- student: the base architecture + one prediction head per teacher
    _pt._seed_everything(config.seed)
    shell = _pt.build_model_from_args(margs)
    if options.student_init == "base":
        _pt._load_weights(shell, load_checkpoint(base_checkpoint))
    feature_dim = int(shell.backbone.feature_dim)
    target_dim = feature_dim if options.distill_target == "features" else int(margs["proj_dim"])
    student = DnCStudent(_Embed(shell, "features"), feature_dim, options.k, target_dim,
                         hidden_dim=options.head_hidden).to(device)
    if channels_last:
        student.to(memory_format=torch.channels_last)
    # the shell's projection head is not trained by distillation: leave it out of the optimiser
    params = list(shell.backbone.parameters()) + list(student.heads.parameters())
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    order = torch.Generator()
    order.manual_seed(config.seed)
    batches = BatchIterator(data.train, batch_size, shuffle=True, drop_last=True, generator=order, device=device)
    steps_per_epoch = len(batches)
    total_steps = steps_per_epoch * config.epochs
    scheduler = warmup_cosine(optimizer, total_steps, round(config.warmup_epochs_effective * steps_per_epoch))
    augment = TwoViewAugment(config.image_size or data.image_size, data.in_channels, data.mean,
                             data.std).to(device)
    cluster_of = assignments.to(device)
    _pt._seed_everything(config.seed + 7919)

    start_epoch, global_step = 0, 0
    if resumed is not None:
        _pt._load_weights(shell, resumed)
        student.heads.load_state_dict(resumed["dnc_heads"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        restore_rng(resumed["rng"][0], order)
        start_epoch, global_step = int(resumed["epoch"]), int(resumed["step"])
        print(f"resuming {ckpt_path} after epoch {start_epoch}/{config.epochs}")

    log = _pt._MetricsLog(run_dir, True, config.tensorboard, start_epoch)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    try:
        last_epoch = config.epochs if stop_at_epoch is None else min(config.epochs, int(stop_at_epoch))
        for epoch in range(start_epoch, last_epoch):
            student.train()
            t_epoch = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            bar = None
            if config.progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=steps_per_epoch, desc=f"dnc student epoch {epoch + 1}/{config.epochs}",
                           leave=False, dynamic_ncols=True)
            for step, batch in enumerate(batches):
                with torch.no_grad():
                    v1, v2 = augment(batch.images)
                x = torch.cat([v1, v2])
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                c = cluster_of[batch.index].repeat(2)
                with autocast:
                    base_t, expert_t = teacher_targets(x, c, base_teacher, experts, embed)
                    base_p, expert_p = student(x)
                loss = student_loss(base_p, base_t, expert_p, expert_t, c, options)
                if not bool(torch.isfinite(loss.detach())):
                    raise _pt.NonFiniteLossError(
                        f"student loss became {float(loss)} at epoch {epoch + 1}, step {step + 1}; the last "
                        f"good checkpoint was kept. Lower --dnc-distill-lr or disable --amp, then --resume.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach()
                global_step += 1
                if (step + 1) % config.log_every == 0 or step + 1 == steps_per_epoch:
                    lval = float(loss.detach())
                    lr = optimizer.param_groups[0]["lr"]
                    if bar is not None:
                        bar.set_postfix(loss=f"{lval:.4f}", lr=f"{lr:.3g}")
                    log.write({"kind": "step", "epoch": epoch, "step": global_step, "loss": lval, "lr": lr},
                              global_step)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            epoch_s = time.perf_counter() - t_epoch
            row = {"kind": "epoch", "epoch": epoch, "step": global_step,
                   "loss": float(loss_sum / steps_per_epoch), "lr": optimizer.param_groups[0]["lr"],
                   "images_per_s": steps_per_epoch * batch_size / epoch_s, "epoch_s": epoch_s}
            log.write(row, global_step)
            save_checkpoint({
                "config": config.to_dict(), "model_args": margs, "model": shell.state_dict(),
                "dnc_heads": student.heads.state_dict(), "dnc_teachers": teacher_paths,
                "dnc_head_dims": [feature_dim, int(options.head_hidden or feature_dim), target_dim],
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": [capture_rng(order)], "epoch": epoch + 1, "step": global_step,
                "finished": epoch + 1 == config.epochs, "train_indices": None,
                "init_checkpoint": str(base_checkpoint) if options.student_init == "base" else None,
                "last_epoch_metrics": row,
            }, ckpt_path)
    finally:
        log.close()
    return ckpt_path


def student_loss(base_pred, base_target, expert_preds, expert_target, clusters, options: DnCConfig):
    from .distill import dnc_distillation_loss

    return dnc_distillation_loss(base_pred, base_target, expert_preds, expert_target, clusters,
                                 base_weight=options.base_weight, expert_weight=options.expert_weight)


def load_student(checkpoint_path, *, device="cpu"):
    """The full DnC student (backbone + prediction heads) from its checkpoint, in eval mode.
    For evaluation the plain :func:`sdclr_fast.train.load_model` is enough (it loads the
    backbone as a SelfCompetitor and ignores the heads)."""
    from . import pretrain as _pt

    state = load_checkpoint(checkpoint_path)
    if "dnc_heads" not in state:
        raise CheckpointError(f"{state['path']!r} is not a DnC student checkpoint (no 'dnc_heads')")
    shell = _pt.build_model_from_args(state["model_args"])
    _pt._load_weights(shell, state)
    feature_dim, hidden, target_dim = state["dnc_head_dims"]
    k = DnCConfig.from_dict(state["config"]["extra"]["dnc"]).k
    student = DnCStudent(_Embed(shell, "features"), feature_dim, k, target_dim, hidden_dim=hidden)
    student.heads.load_state_dict(state["dnc_heads"])
    return student.to(device).eval()
