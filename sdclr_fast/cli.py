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
from .train.config import RECIPES, DnCConfig, PretrainConfig, config_flags, parse_ratio, recipe_fields

RUN_METHODS = METHODS + ("dnc",)
BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
_DEFAULTS = PretrainConfig()


# ---------------------------------------------------------------- flags from the config classes
def _argument_type(parse, field: str):
    """``parse`` as an argparse type: its ValueError becomes the flag's one-line message (argparse
    names the flag, so the field's name is dropped from it)."""
    if parse in (int, float, str):
        return parse

    def typed(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{field} ")) from None

    typed.__name__ = field
    return typed


def add_config_flags(parser: argparse.ArgumentParser, cls, *, prefix: str = "", groups=None) -> dict:
    """One flag per field of config class ``cls`` that has one (:func:`config_flags`), in the
    argument group named by the field (``groups``: {group name: argument group}; a missing one is
    added with that name as its title). A flag not given leaves no attribute (argparse.SUPPRESS),
    so that a resumed run can tell the flags given from the stored configuration, ``--ratio none``
    included; :func:`config_values` reads them back. Returns {dest: argparse action}."""
    groups = {} if groups is None else groups
    actions = {}
    for flag in config_flags(cls, prefix):
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        kw = dict(dest=flag.dest, default=argparse.SUPPRESS, help=flag.help.replace("%", "%%"))
        if flag.kind == "value":
            kw.update(type=_argument_type(flag.type, flag.field), choices=flag.choices, nargs=flag.nargs,
                      metavar=flag.metavar)
            if flag.nargs == "?":
                kw["const"] = flag.const
        else:
            kw["action"] = {"off": "store_false", "on": "store_true", "const": "store_const",
                            "toggle": argparse.BooleanOptionalAction}[flag.kind]
            if flag.kind == "const":
                kw["const"] = flag.const
        actions[flag.dest] = groups[flag.group].add_argument(flag.name, **kw)
    return actions


def config_values(args, cls, *, prefix: str = "") -> dict:
    """{field: value} of the fields of ``cls`` whose flags were given; the flags of a dict field's
    keys (``--data-workers`` of ``data_options``) give that field a dict of them."""
    out = {}
    for flag in config_flags(cls, prefix):
        if not hasattr(args, flag.dest):
            continue
        value = getattr(args, flag.dest)
        if flag.key is None:
            out[flag.field] = value
        else:
            out.setdefault(flag.field, {})[flag.key] = value
    return out


def _on_top(config, given: dict):
    """``config`` with the fields ``given`` on the command line; a dict field's given keys are
    merged into its stored dict."""
    dicts = {k: {**getattr(config, k), **v} for k, v in given.items() if isinstance(getattr(config, k), dict)}
    return config.replace(**{**given, **dicts})


# ---------------------------------------------------------------- pretrain
def _directory(text):
    if not text.strip():  # '' would be the current directory
        raise argparse.ArgumentTypeError("must name a directory, got an empty string")
    return text


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    """The pretrain flags: the run's own (run directory, resume, ...) and one per
    :class:`PretrainConfig` field (:func:`add_config_flags`). A config flag not given sets
    nothing, so that a resumed run can tell the flags given on the command line from the stored
    configuration; the documented defaults (the papers' values, from PretrainConfig) are filled
    in by :func:`config_from_args`."""
    groups = {name: p.add_argument_group(name) for name in ("run", "data", "model", "optimisation", "execution")}
    g = groups["run"]
    g.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="start from an official SDCLR recipe: cifar-lt (the defaults) or imagenet100-lt (ResNet-50, "
                        "224 px, crop scale 0.08-1, blur 0.5, batch 256, 500 epochs, sparsity 0.3, tau 0.3 for "
                        "sdclr and 0.2 for the other methods, as the official runs; give "
                        "--dataset imagefolder --data-root with the ImageNet-100-LT list); flags given still win")
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
    method = add_config_flags(p, PretrainConfig, groups=groups)["method"]
    method.choices = RUN_METHODS  # DnC is an orchestrator over the methods, not a PretrainConfig method
    method.help += "; dnc = Divide and Contrast (base model, k-means experts, distillation)"


def config_from_args(args, **overrides) -> PretrainConfig:
    """PretrainConfig from parsed pretrain flags: the defaults (the papers' values), the recipe,
    the flags given, then ``overrides`` (e.g. ``method="sdclr"`` for a DnC stage)."""
    explicit = config_values(args, PretrainConfig)
    method = overrides.get("method") or explicit.get("method") or _DEFAULTS.method
    given = recipe_fields(args.recipe, method) if getattr(args, "recipe", None) else {}
    given.update(explicit)
    given.update(overrides)
    if given.get("method") == "dnc":
        given.pop("method")
    if given.get("dataset") in ("imagefolder", "webdataset") and "ratio" not in given:
        given["ratio"] = None  # an image folder or a stream is taken as it is unless a ratio is asked for
    return PretrainConfig(**given)


def cmd_pretrain(args) -> int:
    if getattr(args, "method", None) == "dnc":
        run_dnc(args)
        return 0
    from .train.checkpoint import CHECKPOINT_NAME, load_newest_checkpoint
    from .train.pretrain import pretrain
    from .train.run import read_for_run

    run_dir = Path(args.run_dir)
    ckpt = run_dir / CHECKPOINT_NAME
    if args.resume and ckpt.exists():
        # the previous checkpoint stands in for an unreadable newest one; the run says which it used.
        # The run takes over this read instead of loading the file again.
        stored = PretrainConfig.from_dict(read_for_run(ckpt, load_newest_checkpoint)[0]["config"])
        given = config_values(args, PretrainConfig)
        if given.get("method") not in (None, stored.method):
            raise ValueError(f"--resume: {str(ckpt)!r} is a {stored.method} run, not {given['method']}")
        config = _on_top(stored, given)
    else:
        config = config_from_args(args)
    path = pretrain(config, run_dir=run_dir, resume=args.resume, stop_at_epoch=args.stop_at_epoch,
                    init_checkpoint=args.init_checkpoint)
    _main_print(f"checkpoint: {path}")
    return 0


# ---------------------------------------------------------------- pretrain --method dnc
def add_dnc_arguments(parser: argparse.ArgumentParser) -> None:
    """The --dnc-* flags of ``sdclr-fast pretrain --method dnc``, one per :class:`DnCConfig` field.
    A flag not given sets nothing, so that ``--resume`` can tell given flags from stored options;
    the documented defaults come from :class:`DnCConfig`."""
    add_config_flags(parser, DnCConfig, prefix="dnc", groups={"": parser.add_argument_group("DnC (--method dnc)")})


def dnc_configs_from_args(args):
    """(base PretrainConfig, DnCConfig) for ``pretrain --method dnc``. With --resume the stored
    configuration of the run is used and the flags given override it (a change that alters the
    result is then refused by the pipeline)."""
    from .train.dnc import stored_configs

    given = config_values(args, DnCConfig, prefix="dnc")
    stored = stored_configs(args.run_dir) if args.resume else None
    if stored is not None:
        base, options = stored
        explicit = config_values(args, PretrainConfig)
        explicit.pop("method", None)
        base, options = _on_top(base, explicit), options.replace(**given)
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
def add_probe_arguments(p) -> None:
    """The probe flags that ``eval`` and ``study`` share: which probes, the few-shot size, the
    linear probe's epochs, kNN's k and the per-class size of the probe's training set."""
    from .train.evaluate import PROBE_CHOICES

    p.add_argument("--probe", choices=PROBE_CHOICES, default="all",
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


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", action="append", required=True, dest="run_dirs", type=_directory,
                   help="a run directory (or checkpoint file) to evaluate; repeat to compare runs")
    add_probe_arguments(p)
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
    add_probe_arguments(g)
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
    p.add_argument("--ratio", type=_argument_type(parse_ratio, "ratio"), default=argparse.SUPPRESS,
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
    flags["root="] = "--data-root"
    if command == "pretrain":  # DnCConfig's messages name its fields, whose flags are --dnc-*
        flags.update({f.field: f.name for f in config_flags(DnCConfig, "dnc") if "_" in f.field})
    names = "|".join(re.escape(k) for k in sorted(flags, key=len, reverse=True))
    return re.sub(rf"(?<![\w.-])({names})(?![\w.])", lambda m: flags[m.group(1)], text)
