"""Command line: ``sdclr-fast {pretrain,eval,bench,demo}`` (also ``python -m sdclr_fast``)."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from . import __version__
from .nn import METHODS
from .train.config import (KMEANS_BACKENDS, KMEANS_METRICS, RECIPES, STUDENT_INITS, DnCConfig, PretrainConfig,
                           parse_prune_block, recipe_fields)
from .train.models import EMBEDDINGS

RUN_METHODS = METHODS + ("dnc",)
BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
_DEFAULTS = PretrainConfig()


# ---------------------------------------------------------------- pretrain
def _directory(text):
    if not text.strip():  # '' would be the current directory
        raise argparse.ArgumentTypeError("must name a directory, got an empty string")
    return text


def _ratio(text):
    if text.lower() in ("none", "keep"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'none', got {text!r}") from None
    return value


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    """The pretrain flags. Their argparse defaults are None so that a resumed run can tell the
    flags given on the command line from the stored configuration; the documented defaults
    (the papers' values, from PretrainConfig) are filled in by :func:`config_from_args`."""
    d = _DEFAULTS
    g = p.add_argument_group("run")
    g.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="start from an official SDCLR recipe: cifar-lt (the defaults) or imagenet100-lt (ResNet-50, "
                        "224 px, crop scale 0.08-1, blur 0.5, batch 256, 500 epochs, sparsity 0.3, tau 0.3 for "
                        "sdclr and 0.2 for the other methods, as the official runs; give "
                        "--dataset imagefolder --data-root with the ImageNet-100-LT list); flags given still win")
    g.add_argument("--method", choices=RUN_METHODS, default=None,
                   help=f"pretraining method (default {d.method}): simclr = both views through the dense "
                        f"network; sdclr = view 2 through the pruned self-competitor; moclr = SimCLR's loss "
                        f"between online predictions and an EMA target network's projections (DnC's base "
                        f"method); dnc = Divide and Contrast (base model, k-means experts, distillation)")
    g.add_argument("--run-dir", required=True, type=_directory,
                   help="directory for checkpoint.pt, config.json, split.json, metrics.jsonl")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last complete epoch (a finished run is "
                        "left as is; flags that change the result must match the stored ones)")
    g.add_argument("--stop-at-epoch", type=int, default=None,
                   help="stop with a resumable checkpoint once this many epochs are complete (for jobs "
                        "with a wall-time limit); default: train to --epochs")
    g.add_argument("--init-checkpoint", default=None,
                   help="initialise the model weights from this checkpoint (fresh optimiser and schedule)")
    g = p.add_argument_group("data")
    from .data import DATASETS

    g.add_argument("--dataset", choices=DATASETS, default=None,
                   help=f"training data (default {d.dataset}); fashion-mnist-lt reads Debian's "
                        f"dataset-fashion-mnist, the others need --data-root")
    g.add_argument("--data-root", default=None,
                   help="folder of the data set files (cifar: the folder holding cifar-10-batches-py / "
                        "cifar-100-python; imagefolder: the folder with train/<class>/; webdataset: the "
                        "shards, e.g. 'shards/train-{000000..000127}.tar')")
    g.add_argument("--ratio", type=_ratio, default=None,
                   help=f"imbalance factor n_max/n_min of the long-tailed split (default {d.ratio:g}, the "
                        f"SDCLR protocol; 'none' keeps the training pool as is)")
    g.add_argument("--split", type=int, default=None,
                   help=f"which random long-tailed draw to use (default {d.split}; the protocol reports 0-4)")
    g.add_argument("--balanced-subset", dest="pretrain_set", action="store_const", const="balanced", default=None,
                   help="pretrain on the class-balanced subset D_b of the long-tailed split's size (SDCLR's "
                        "balanced baseline); evaluation groups still follow the long-tailed counts")
    g.add_argument("--train-list", default=None,
                   help="webdataset: a file of the sample keys to train on, one per line (e.g. a long-tailed "
                        "subset; default: the whole stream)")
    g.add_argument("--fewshot-list", default=None,
                   help="imagefolder: a list file ('relative/path label' lines) of the few-shot probe set, e.g. the "
                        "official ImageNet-100-LT 1%% list imageNet_100_sub_balance_train_0.01 (drawn from the full "
                        "training set); eval --shots with its per-class size uses it")
    g.add_argument("--data-workers", type=int, default=None,
                   help="webdataset: DataLoader workers decoding each rank's shards (default 2; part of the "
                        "data order, keep it on --resume)")
    g.add_argument("--shuffle-buffer", type=int, default=None,
                   help="webdataset: samples in each reader's seeded shuffle buffer (default 1000)")
    g.add_argument("--eval-dataset", choices=DATASETS, default=None,
                   help="labelled data set whose probe / test sets evaluate the run (needed when the training "
                        "data has none: --dataset webdataset)")
    g.add_argument("--eval-data-root", default=None, help="the folder of --eval-dataset")
    g.add_argument("--split-file", dest="official_split", default=None,
                   help="CIFAR: the official SDCLR split/ folder; --split k (1-5) then loads its split{k}_D_i / "
                        "_D_b / _S_b and trainIdxList / valIdxList instead of drawing the splits")
    g.add_argument("--no-permute-classes", dest="permute_classes", action="store_false", default=None,
                   help="give the head/tail ranks to the classes in index order (default: a seeded permutation "
                        "per split, as the official splits do)")
    g.add_argument("--image-size", type=int, default=None,
                   help="resize images to this square size (default: native, 32 for CIFAR, 28 for "
                        "Fashion-MNIST)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None,
                   help=f"backbone: resnet18, resnet34, resnet50 or timm:<name>[:key=value,...], any timm "
                        f"model made a self-competitor (default {d.arch}, as in SDCLR)")
    g.add_argument("--width", type=int, default=None,
                   help=f"channels of the first ResNet stage (default {d.width}, the standard ResNet-18)")
    g.add_argument("--proj-dim", type=int, default=None,
                   help=f"output size of the projection head (default {d.proj_dim})")
    g.add_argument("--no-cifar-stem", dest="cifar_stem", action="store_false", default=None,
                   help="use the ImageNet stem (7x7 stride-2 conv and max-pool) instead of the CIFAR stem "
                        "(3x3 stride 1, no pool; the default, as in SDCLR)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default {d.epochs}, SDCLR on CIFAR-LT)")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch size, split over DDP processes (default {d.batch_size})")
    g.add_argument("--lr", type=float, default=None,
                   help=f"peak SGD learning rate (default {d.lr:g}, SDCLR's value for batch 512; it is not "
                        f"rescaled when you change --batch-size)")
    g.add_argument("--momentum", type=float, default=None, help=f"SGD momentum (default {d.momentum:g})")
    g.add_argument("--weight-decay", type=float, default=None,
                   help=f"SGD weight decay (default {d.weight_decay:g})")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"linear warm-up epochs before the per-step cosine decay (default "
                        f"{d.warmup_epochs:g}; clipped to the run length)")
    g.add_argument("--temperature", type=float, default=None,
                   help=f"NT-Xent temperature (default {d.temperature:g})")
    g.add_argument("--sparsity", type=float, default=None,
                   help="SDCLR: fraction of backbone conv weights pruned in the self-competitor "
                        f"(default {d.sparsity:g}); masks are recomputed at the start of every epoch")
    g.add_argument("--prune-scope", choices=("global", "layer"), default=None,
                   help="SDCLR: one magnitude threshold over all convs (global, the paper's, default) or "
                        "one per conv (layer)")
    g.add_argument("--prune-block", type=_prune_block, default=None, metavar="OUTxIN",
                   help="SDCLR: prune whole OUTxIN channel blocks (all taps) instead of single weights, e.g. "
                        "32x32: on CUDA the pruned branch then skips the empty blocks in the Triton kernels "
                        "(where the tuned table says they win; cuDNN otherwise); default unstructured")
    g.add_argument("--moclr-momentum", type=float, default=None,
                   help=f"MoCLR: base EMA momentum of the target network (default {d.moclr_momentum:g}, "
                        f"BYOL's), raised to 1 over the run with BYOL's cosine schedule")
    g.add_argument("--random-prune", type=float, default=None,
                   help="SDCLR: the part of --sparsity pruned at random instead of by magnitude (the official "
                        "random_prune_percent; default 0)")
    g.add_argument("--crop-scale", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help=f"area range of the random resized crop (default {d.crop_scale[0]:g} {d.crop_scale[1]:g}, "
                        f"SDCLR on CIFAR; its ImageNet recipe uses 0.08 1)")
    g.add_argument("--eval-groups", choices=("thirds", "imagenet-lt"), default=None,
                   help="major / moderate / minor classes of the evaluation: thirds of the classes ranked by count "
                        "(the official CIFAR rule; default) or > 100 / 20-100 / < 20 training images (the official "
                        "ImageNet-100-LT rule, set by --recipe imagenet100-lt)")
    g.add_argument("--input-norm", choices=("imagenet", "dataset"), default=None,
                   help="statistics the [0, 1] inputs are normalised with: imagenet (ImageNet mean/std, what the "
                        "official models apply inside the network; default) or dataset (the training split's)")
    g.add_argument("--blur-prob", type=float, default=None,
                   help="probability of the Gaussian blur of a view (default 0; SDCLR's ImageNet recipe 0.5)")
    g.add_argument("--seed", type=int, default=None,
                   help=f"seed of the split draw, the initial weights, the data order and the augmentation "
                        f"(default {d.seed})")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available); under torchrun each process "
                        "uses cuda:LOCAL_RANK")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the forward passes (default: on for CUDA, off on CPU)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CUDA, off on CPU)")
    g.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=("default", "max-autotune", "reduce-overhead"),
                   help="torch.compile the training step (both forwards, loss and backward in "
                        "one graph) with this mode; --compile alone means 'default'; "
                        "'reduce-overhead' adds CUDA graphs (default off)")
    g.add_argument("--no-sync-bn", dest="sync_bn", action="store_false", default=None,
                   help="keep per-process BatchNorm statistics under DDP (default: SyncBatchNorm)")
    g.add_argument("--threads", dest="num_threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    g.add_argument("--log-every", type=int, default=None,
                   help=f"steps between progress-bar / metrics.jsonl updates (default {d.log_every})")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=None,
                   help="do not write TensorBoard scalars (written by default when tensorboard is installed)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no tqdm progress bar")
    g.add_argument("--checkpoint-every-steps", type=int, default=None,
                   help="also write a resumable checkpoint every N optimiser steps inside an epoch (for "
                        "long epochs on preemptible machines; default: at epoch ends and on SIGTERM/SIGUSR1)")


_RUN_ONLY = {"run_dir", "resume", "stop_at_epoch", "init_checkpoint", "command", "func", "debug", "recipe"}


def _prune_block(text):
    try:
        return parse_prune_block(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("prune_block ")) from None  # argparse names the flag


def _explicit(args) -> dict:
    """PretrainConfig fields given on the command line."""
    names = {f for f in PretrainConfig.__dataclass_fields__}
    return {k: v for k, v in vars(args).items() if k in names and v is not None and k not in _RUN_ONLY}


def config_from_args(args, **overrides) -> PretrainConfig:
    """PretrainConfig from parsed pretrain flags: the defaults (the papers' values), the flags
    given, then ``overrides`` (e.g. ``method="sdclr"`` for a DnC stage)."""
    explicit = _explicit(args)
    method = overrides.get("method") or explicit.get("method") or _DEFAULTS.method
    given = recipe_fields(args.recipe, method) if getattr(args, "recipe", None) else {}
    given.update(explicit)
    given.update(overrides)
    if given.get("method") == "dnc":
        given.pop("method")
    if given.get("dataset") in ("imagefolder", "webdataset") and "ratio" not in given:
        given["ratio"] = None  # an image folder or a stream is taken as it is unless a ratio is asked for
    stream = {k: getattr(args, a) for k, a in (("train_list", "train_list"), ("num_workers", "data_workers"),
                                               ("shuffle_buffer", "shuffle_buffer"), ("fewshot_list", "fewshot_list"))
              if getattr(args, a, None) is not None}
    if stream:
        given["data_options"] = {**given.get("data_options", {}), **stream}
    return PretrainConfig(**given)


def cmd_pretrain(args) -> int:
    if args.method == "dnc":
        run_dnc(args)
        return 0
    from .train.checkpoint import CHECKPOINT_NAME, load_newest_checkpoint
    from .train.pretrain import pretrain

    run_dir = Path(args.run_dir)
    ckpt = run_dir / CHECKPOINT_NAME
    if args.resume and ckpt.exists():
        # the previous checkpoint stands in for an unreadable newest one; the run says which it used
        stored = PretrainConfig.from_dict(load_newest_checkpoint(ckpt)[0]["config"])
        given = _explicit(args)
        if given.get("method") not in (None, stored.method):
            raise ValueError(f"--resume: {str(ckpt)!r} is a {stored.method} run, not {given['method']}")
        config = stored.replace(**given)
    else:
        config = config_from_args(args)
    path = pretrain(config, run_dir=run_dir, resume=args.resume, stop_at_epoch=args.stop_at_epoch,
                    init_checkpoint=args.init_checkpoint)
    _main_print(f"checkpoint: {path}")
    return 0


# ---------------------------------------------------------------- pretrain --method dnc
_DNC_FLAGS = {  # DnCConfig field -> flag
    "k": "--dnc-k", "base_method": "--dnc-base-method", "base_epochs": "--dnc-base-epochs",
    "expert_epochs": "--dnc-expert-epochs", "student_epochs": "--dnc-student-epochs",
    "kmeans_iters": "--dnc-kmeans-iters", "kmeans_backend": "--dnc-kmeans-backend",
    "kmeans_metric": "--dnc-kmeans-metric", "cluster_on": "--dnc-cluster-on",
    "distill_target": "--dnc-distill-target", "distill_lr": "--dnc-distill-lr",
    "head_hidden": "--dnc-head-hidden", "base_weight": "--dnc-base-weight",
    "expert_weight": "--dnc-expert-weight", "student_init": "--dnc-student-init",
    "rounds": "--dnc-rounds", "parallel_experts": "--dnc-parallel-experts",
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
                   help=f"contrastive method of the base model and the experts (default {d.base_method}, "
                        f"DnC's MoCLR; sdclr gives an SDCLR base, a combination not published before)")
    g.add_argument("--dnc-rounds", type=int, default=None,
                   help=f"divide-and-contrast rounds (default {d.rounds}); each further round clusters the "
                        f"previous student's features, trains experts from it and distils a new student "
                        f"(round r >= 2 in run_dir/round_<r>/)")
    g.add_argument("--dnc-base-epochs", type=int, default=None,
                   help="epochs of the base model on the whole training split (default: --epochs)")
    g.add_argument("--dnc-expert-epochs", type=int, default=None,
                   help="epochs of each expert on its own cluster (default: --epochs)")
    g.add_argument("--dnc-student-epochs", type=int, default=None,
                   help="epochs of the distillation into the student (default: --epochs)")
    g.add_argument("--dnc-kmeans-iters", type=int, default=None,
                   help=f"maximum Lloyd iterations of k-means (default {d.kmeans_iters})")
    g.add_argument("--dnc-kmeans-backend", choices=KMEANS_BACKENDS, default=None,
                   help="k-means implementation: faiss (its GPU index with faiss-gpu, else CPU), torch (on "
                        "the training device) or auto = faiss where installed (default auto)")
    g.add_argument("--dnc-kmeans-metric", choices=KMEANS_METRICS, default=None,
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
    g.add_argument("--dnc-student-init", choices=STUDENT_INITS, default=None,
                   help=f"student initialisation: a fresh network or the base model's weights "
                        f"(default {d.student_init})")
    g.add_argument("--dnc-parallel-experts", action="store_true", default=None,
                   help="under torchrun, train the experts at the same time on disjoint groups of ranks "
                        "(W ranks, k experts: min(W, k) groups; 8 GPUs and k = 8: one expert per GPU) "
                        "instead of one after the other on all ranks")


def dnc_configs_from_args(args):
    """(base PretrainConfig, DnCConfig) for ``pretrain --method dnc``. With --resume the stored
    configuration of the run is used and the flags given override it (a change that alters the
    result is then refused by the pipeline)."""
    from .train.dnc import stored_configs

    given = {f: getattr(args, f"dnc_{f}") for f in _DNC_FLAGS if getattr(args, f"dnc_{f}", None) is not None}
    stored = stored_configs(args.run_dir) if args.resume else None
    if stored is not None:
        base, options = stored
        explicit = _explicit(args)
        explicit.pop("method", None)
        base, options = base.replace(**explicit), DnCConfig.from_dict({**options.to_dict(), **given})
    else:
        options = DnCConfig(**given)
        base = config_from_args(args, method=options.base_method)
    return base.replace(method=options.base_method), options


def run_dnc(args):
    """``sdclr-fast pretrain --method dnc``: returns the student's checkpoint."""
    from .train import dnc as dnc_module

    if args.stop_at_epoch is not None:
        raise ValueError("--stop-at-epoch is not supported with --method dnc; interrupt the run and "
                         "--resume it (each stage continues from its last epoch)")
    base, options = dnc_configs_from_args(args)
    path = dnc_module.dnc(base, options, run_dir=Path(args.run_dir), resume=args.resume,
                          init_checkpoint=args.init_checkpoint)
    _main_print(f"checkpoint: {path}")
    return path


# ---------------------------------------------------------------- eval
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", action="append", required=True, dest="run_dirs", type=_directory,
                   help="a run directory (or checkpoint file) to evaluate; repeat to compare runs")
    p.add_argument("--probe", choices=("full", "fewshot", "knn", "all"), default="all",
                   help="full = linear probe on the balanced train set (30 epochs, lr 30, SDCLR); fewshot = "
                        "the same probe on --shots per class (100 epochs); knn = weighted k-NN; all = the "
                        "three (default)")
    p.add_argument("--shots", type=float, default=0.01,
                   help="few-shot probe size: an int >= 1 of images per class, or a fraction of the "
                        "smallest class (default 0.01, SDCLR's 1%%)")
    p.add_argument("--probe-epochs", type=int, default=None,
                   help="linear-probe epochs (default: the protocol's 30 full / 100 few-shot; the "
                        "milestones scale with it)")
    p.add_argument("--knn-k", type=int, default=200, help="neighbours of the kNN probe (default 200)")
    p.add_argument("--probe-per-class", type=int, default=None,
                   help="train the full-shot probe and kNN on this many images per class of the probe pool "
                        "(cheaper on a CPU; default: the whole pool, as the protocol)")
    p.add_argument("--batch-size", type=int, default=512, help="feature-extraction batch size (default 512)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None,
                   help="folder for report.md, report.json and the per-class plots (default: the first "
                        "--run-dir, or the folder of the checkpoint file)")
    p.add_argument("--title", default="Linear evaluation", help="report title")
    p.add_argument("--all-threads", action="store_true",
                   help="evaluate with torch's CPU thread count instead of one thread (faster on many cores, but "
                        "the numbers of one checkpoint then depend on the thread count; default: one thread, "
                        "identical tables under any OMP_NUM_THREADS)")
    from .data import DATASETS

    p.add_argument("--eval-dataset", choices=[d for d in DATASETS if d != "webdataset"], default=None,
                   help="evaluate on this labelled data set's probe / test sets instead of each run's own (a run "
                        "on a stream has none; default: the run's --eval-dataset, else its training data set)")
    p.add_argument("--eval-data-root", default=None, help="the folder of --eval-dataset")


def cmd_eval(args) -> int:
    from .files import lock_directory
    from .train.evaluate import evaluate_runs, format_table, resolve_checkpoint, write_outputs

    out = Path(args.out) if args.out else resolve_checkpoint(args.run_dirs[0]).parent
    with lock_directory(out, what="output directory"):  # not while a run is writing there
        data = None
        if args.eval_dataset is not None:
            from .data import build_dataset

            data = build_dataset(args.eval_dataset, args.eval_data_root)
        results = evaluate_runs(args.run_dirs, probe=args.probe, shots=args.shots, probe_epochs=args.probe_epochs,
                                knn_k=args.knn_k, batch_size=args.batch_size, device=args.device,
                                probe_per_class=args.probe_per_class, data=data, deterministic=not args.all_threads)
        print(format_table(results))
        paths = write_outputs(results, out, title=args.title)
    print(f"report: {paths['report']}")
    return 0


# ---------------------------------------------------------------- analyze-pruning
def add_analyze_pruning_arguments(p: argparse.ArgumentParser) -> None:
    from .train.analyze import BN_CHOICES, MODES, SPARSITIES

    p.add_argument("--run-dir", action="append", required=True, dest="run_dirs",
                   help="a run directory (or checkpoint file); repeat for several runs: runs of one method (e.g. "
                        "splits or class permutations) are reported as mean +- std")
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES),
                   help=f"fractions of the backbone conv weights pruned (default {' '.join(map(str, SPARSITIES))})")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="magnitude (SDCLR's global rule) and / or random pruning (default both)")
    p.add_argument("--bn", choices=BN_CHOICES, default="recalibrate",
                   help="re-estimate the BatchNorm statistics of each pruned network on the long-tailed training "
                        "split (default) or keep the stored ones")
    p.add_argument("--probe-epochs", type=int, default=None, help="linear-probe epochs (default 30)")
    p.add_argument("--probe-per-class", type=int, default=None,
                   help="train the probe and kNN on this many images per class of the probe pool (default all)")
    p.add_argument("--test-per-class", type=int, default=None,
                   help="classify this many test images per class (a seeded draw; default the whole test set)")
    p.add_argument("--loss-per-class", type=int, default=None,
                   help="measure the per-sample loss on at most this many long-tailed training images per class "
                        "(a seeded draw; default all)")
    p.add_argument("--bn-images", type=int, default=None,
                   help="re-estimate BatchNorm on this many long-tailed training images drawn at random (default all)")
    p.add_argument("--knn-k", type=int, default=200, help="neighbours of the kNN probe (default 200)")
    p.add_argument("--batch-size", type=int, default=512, help="feature-extraction batch size (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks, probes and views (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None,
                   help="folder for pruning_damage.md / .json / .png (default: <first --run-dir>/pruning)")


def cmd_analyze_pruning(args) -> int:
    from .train.analyze import analyze_checkpoint, format_summary, write_analysis
    from .train.evaluate import resolve_checkpoint

    analyses = {}
    for rd in args.run_dirs:
        label, res = analyze_checkpoint(rd, sparsities=args.sparsities, modes=args.modes, bn=args.bn,
                                        probe_epochs=args.probe_epochs, probe_per_class=args.probe_per_class,
                                        test_per_class=args.test_per_class, loss_per_class=args.loss_per_class,
                                        bn_images=args.bn_images, knn_k=args.knn_k, batch_size=args.batch_size,
                                        seed=args.seed, device=args.device,
                                        progress=lambda m, rd=rd: print(f"{rd}: {m}", flush=True))
        analyses.setdefault(label.split(" (")[0], []).append(res)  # "SDCLR (split_1)" -> "SDCLR"
    out = Path(args.out) if args.out else resolve_checkpoint(args.run_dirs[0]).parent / "pruning"
    print(format_summary(analyses))
    settings = {k: getattr(args, k) for k in ("sparsities", "modes", "bn", "probe_epochs", "probe_per_class",
                                              "test_per_class", "loss_per_class", "bn_images", "knn_k", "seed")}
    paths = write_analysis(analyses, out, notes=f"Runs: {', '.join(map(str, args.run_dirs))}. Settings: "
                                                + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".")
    print(f"report: {paths['report']}")
    return 0


# ---------------------------------------------------------------- study
def add_study_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("study grid")
    g.add_argument("--methods", nargs="+", choices=METHODS, default=["simclr", "sdclr"],
                   help="methods to compare (default: simclr sdclr)")
    g.add_argument("--splits", nargs="+", type=int, default=[0, 1, 2],
                   help="long-tailed splits, each with its own class permutation (default: 0 1 2)")
    g.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds per split (default: 0)")
    g.add_argument("--balanced-baseline", action="store_true",
                   help="also pretrain every cell on the class-balanced subset D_b of the same size, and report "
                        "each class's accuracy relative to it")
    g.add_argument("--probe", choices=("full", "fewshot", "knn", "all"), default="all",
                   help="probes of every cell (default all: linear full-shot, few-shot, kNN)")
    g.add_argument("--shots", type=float, default=0.01,
                   help="few-shot probe size: images per class (int >= 1) or a fraction (default 0.01)")
    g.add_argument("--probe-epochs", type=int, default=None,
                   help="linear-probe epochs (default: the protocol's 30 full / 100 few-shot)")
    g.add_argument("--knn-k", type=int, default=200, help="neighbours of the kNN probe (default 200)")
    g.add_argument("--probe-per-class", type=int, default=None,
                   help="train the full-shot probe and kNN on this many images per class of the probe pool "
                        "(cheaper on a CPU; default: the whole pool, as the protocol)")
    g.add_argument("--title", default="Study", help="report title")


def cmd_study(args) -> int:
    from .train.evaluate import parse_shots, probe_names
    from .train.study import run_study

    base = config_from_args(args)
    out = run_study(base, args.run_dir, methods=args.methods, splits=args.splits, seeds=args.seeds,
                    balanced=args.balanced_baseline, probes=probe_names(args.probe, parse_shots(args.shots)),
                    probe_epochs=args.probe_epochs, knn_k=args.knn_k, device=base.device, title=args.title,
                    probe_per_class=args.probe_per_class)
    print(f"report: {out['report']}")
    return 0


# ---------------------------------------------------------------- bench
def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*",
                   help="benchmarks to run: bench_<name>.py in bench/ (e.g. nt_xent step); default: all")
    p.add_argument("--quick", action="store_true", help="short runs (passed to every script)")
    p.add_argument("--device", default=None, help="passed to every script (default: each script's own)")


def bench_scripts(names=()):
    if not BENCH_DIR.is_dir():
        raise SystemExit(f"bench/ not found at {BENCH_DIR}; the benchmarks run from a source checkout")
    found = {p.stem[len("bench_"):]: p for p in sorted(BENCH_DIR.glob("bench_*.py"))}
    if not names:
        return list(found.values())
    out = []
    for n in names:
        key = Path(n).stem
        key = key[len("bench_"):] if key.startswith("bench_") else key
        if key not in found:
            raise ValueError(f"unknown benchmark {n!r}; available: {', '.join(found) or 'none'}")
        out.append(found[key])
    return out


def cmd_bench(args) -> int:
    failed = []
    for script in bench_scripts(args.names):
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else []) + \
              (["--device", args.device] if args.device else [])
        print(f"== {script.name}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.call(cmd) != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- demo
def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", choices=RUN_METHODS, default=["simclr", "sdclr"],
                   help="methods to pretrain and compare (default: simclr sdclr)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="choose the epochs from a step time measured at start-up to fit this wall-clock "
                        "budget (the numbers then depend on the machine's load); default: the fixed schedule")
    p.add_argument("--run-dir", default="runs/demo", type=_directory,
                   help="where the runs, report.md and plots go (default runs/demo); finished runs found "
                        "there are reused, unfinished ones resumed")
    p.add_argument("--epochs", type=int, default=None,
                   help="pretraining epochs per method (default: the demo's fixed schedule)")
    p.add_argument("--data-root", default=None,
                   help="Fashion-MNIST IDX folder (default $SDCLR_FAST_FMNIST_DIR or "
                        "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, weights and augmentation (default 0)")


def cmd_demo(args) -> int:
    from .train.demo import run_demo

    run_demo(methods=args.methods, budget_minutes=args.budget_minutes, run_dir=args.run_dir, epochs=args.epochs,
             data_root=args.data_root, device=args.device, seed=args.seed)
    return 0


# ---------------------------------------------------------------- shards
def add_shards_arguments(p: argparse.ArgumentParser) -> None:
    from .data import DATASETS

    p.add_argument("--dataset", required=True, choices=[d for d in DATASETS if d != "webdataset"],
                   help="the data set whose images are written")
    p.add_argument("--data-root", default=None, help="its folder (as for pretrain)")
    p.add_argument("--out", required=True, type=_directory, help="the folder the shards and shards.json go to")
    p.add_argument("--set", dest="which", choices=("train", "probe_train", "test"), default="train",
                   help="which images: the pretraining split (default), the probe pool or the test set")
    p.add_argument("--ratio", type=_ratio, default=argparse.SUPPRESS,
                   help="imbalance factor of the long-tailed split (default: the data set's; 'none': all)")
    p.add_argument("--split", type=int, default=0, help="which long-tailed draw (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    p.add_argument("--image-size", type=int, default=None, help="resize to this square size (default: native)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--prefix", default=None, help="shard name prefix (default: the --set name)")


def cmd_shards(args) -> int:
    from .data import build_dataset
    from .data.webdataset import write_shards

    kw = {"ratio": args.ratio} if hasattr(args, "ratio") else {}
    data = build_dataset(args.dataset, args.data_root, seed=args.seed, split=args.split,
                         image_size=args.image_size, **kw)
    images = getattr(data, args.which)
    path = write_shards(images, args.out, prefix=args.prefix or args.which.replace("_", "-"),
                        shard_size=args.shard_size, mean=data.mean, std=data.std, class_names=data.class_names)
    print(f"{len(images)} images -> {path.parent} ({path.name})")
    return 0


# ---------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdclr-fast",
        description="Contrastive pretraining on long-tailed data (SimCLR, SDCLR, DnC) with fused kernels, "
                    "evaluation and benchmarks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of a one-line message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("pretrain", help="pretrain a model (SimCLR, SDCLR or DnC)",
                       description="Pretrain with SimCLR, SDCLR or DnC; checkpoints every epoch, --resume "
                                   "continues a killed run. Defaults are the SDCLR paper's CIFAR settings.")
    add_pretrain_arguments(p)
    add_dnc_arguments(p)
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("eval", help="evaluate pretrained runs (linear probe, few-shot, kNN)",
                       description="Evaluate checkpoints with a frozen backbone: accuracy overall and on the "
                                   "major / moderate / minor thirds of the classes, and their std. Prints a "
                                   "table and writes report.md and per-class plots.")
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("study", help="a grid of pretrain + eval runs (methods x splits x seeds) and one report",
                       description="Pretrain and evaluate every cell of methods x splits x seeds (optionally with "
                                   "balanced-subset baselines), resumably, and write one report: mean +- std over "
                                   "cells per method and probe, per-class plots, accuracy relative to the "
                                   "balanced run. The pretraining flags set every cell's configuration; --run-dir "
                                   "is the study's folder.")
    add_pretrain_arguments(p)
    add_study_arguments(p)
    p.set_defaults(func=cmd_study)
    p = sub.add_parser("analyze-pruning", help="per-class damage of pruning a pretrained backbone (SDCLR's premise)",
                       description="Prune the backbone of each checkpoint at several sparsities (magnitude and "
                                   "random), re-estimate its BatchNorm statistics, and report the change in kNN and "
                                   "linear-probe accuracy and in the per-sample contrastive loss per class and per "
                                   "major / moderate / minor group: a table and a plot.")
    add_analyze_pruning_arguments(p)
    p.set_defaults(func=cmd_analyze_pruning)
    p = sub.add_parser("bench", help="run the benchmark scripts in bench/",
                       description="Run bench/bench_*.py (all, or the named ones) and print their tables.")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("demo", help="pretrain and compare SimCLR and SDCLR on Fashion-MNIST-LT",
                       description="Pretrain SimCLR and SDCLR (optionally DnC) on Fashion-MNIST-LT with a "
                                   "small ResNet on a fixed schedule, evaluate them (linear probe and kNN) "
                                   "and write a comparison report and plot.")
    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("shards", help="write a data set's training images as WebDataset shards",
                       description="Write the training split of a data set (an image folder, CIFAR-LT, "
                                   "Fashion-MNIST-LT) as tar shards out/<prefix>-000000.tar ... of lossless PNGs "
                                   "keyed by source index, with the manifest out/shards.json; train on them with "
                                   "--dataset webdataset --data-root out.")
    add_shards_arguments(p)
    p.set_defaults(func=cmd_shards)
    return parser


def _main_print(text: str) -> None:
    """Run summaries come from one process under torchrun."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text)


def main(argv=None) -> int:
    """The command line; the exit statuses are those of docs/clusters.md. After a run stopped on a
    signal, the stop signals stay ignored in this process, which is expected to exit."""
    from .files import DirectoryLockedError, WriteError
    from .train import run

    parser = build_parser()
    args = parser.parse_args(argv)
    # Expected failures are one line on stderr and a documented status; --debug shows the traceback.
    failures = ((DirectoryLockedError, run.EXIT_LOCKED), (WriteError, run.EXIT_WRITE_FAILED),
                ((ValueError, FloatingPointError, OSError), run.EXIT_BAD_INPUT))
    run.linger_after_stop()  # a second SIGTERM after a clean stop must not turn exit 75 into 143
    try:
        return args.func(args)
    except run.Preempted as exc:  # "stopped by SIGTERM ...; resumable checkpoint ..."
        if args.debug:
            raise
        parser.exit(run.EXIT_INTERRUPTED if exc.signal == "SIGINT" else run.EXIT_PREEMPTED,
                    f"sdclr-fast {args.command}: {exc}\n")
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (data loading, evaluation)
        if args.debug:
            raise
        run.ignore_stop_signals()  # a repeated Ctrl-C while the interpreter exits must not change the status
        parser.exit(run.EXIT_INTERRUPTED, f"sdclr-fast {args.command}: interrupted (SIGINT); nothing was saved\n")
    except Exception as exc:
        for kinds, status in failures:
            if isinstance(exc, kinds) and not args.debug:
                parser.exit(status, f"sdclr-fast {args.command}: error: {_one_line(exc, parser, args.command)}\n")
        raise


def _one_line(exc: Exception, parser, command: str) -> str:
    """The error as one line, with the library's argument names (``batch_size``, ``official_split``,
    ``root=``) given as the command's flags."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:  # e.g. a missing data file
        return f"{str(exc.filename)!r}: {exc.strerror.lower()}"
    text = " ".join(str(exc).split("\n"))
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = {a.dest: a.option_strings[0] for a in sub._actions if a.option_strings and "_" in a.dest
             and a.option_strings[0].startswith("--")}
    flags.update({"root=": "--data-root", "num_workers": "--data-workers"})
    names = "|".join(re.escape(k) for k in sorted(flags, key=len, reverse=True))
    return re.sub(rf"(?<![\w.-])({names})(?![\w.])", lambda m: flags[m.group(1)], text)
