"""Run configurations, as dataclasses whose defaults are the papers' values: PretrainConfig for
every contrastive run and DnCConfig for the DnC options on top of it.

Each field is declared with :func:`opt`, which keeps with the field everything the command line
needs: its help, its choices, its flag (by default ``--field-name``; ``--no-field-name`` for a
field that is on by default) and whether it changes what a run computes. :func:`config_flags`
lists them, the CLI builds its flags from that list, and ``RUNTIME_FIELDS`` (the fields a resumed
run may change) follows from it. Checkpoints and DnC's state file store the configs as flat
dicts; a resumed run checks that the fields which change the result match the stored ones.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from dataclasses import dataclass, field

from ..data import DATASETS
from ..data.augment import INPUT_NORMS
from ..data.base import PRETRAIN_SETS
from ..eval.metrics import GROUP_RULES
from ..nn import METHODS
from ..ops.prune import PRUNE_SCOPES
from .kmeans import KMEANS_BACKENDS, KMEANS_METRICS
from .models import EMBEDDINGS

COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")  # torch.compile modes
STUDENT_INITS = ("scratch", "base")


# ---------------------------------------------------------------- fields and their flags
def opt(default=dataclasses.MISSING, help: str = "", *, group: str = "", flag=None, choices=None,
        any_value: bool = False, affects_results: bool = True, parse=None, nargs=None, metavar=None, const=None,
        options=None, default_factory=dataclasses.MISSING):
    """A config field (``dataclasses.field``) with its command-line metadata.

    help:     what the field means; ``{default}`` in it becomes the field's default.
    group:    the ``--help`` section of its flag ("data", "model", ...).
    flag:     the flag's spelling; None derives it (``--batch-size`` for ``batch_size``,
              ``--no-cifar-stem`` for a bool that defaults to True); False: no flag.
    choices:  the allowed values; the config refuses others unless ``any_value`` (the flag still
              offers only these, e.g. the built-in data sets while a caller may pass its own data).
    affects_results: False for fields that only change how a run executes; a resumed run may
              change those.
    parse:    turns the flag's text into the value (default: the field's type); a ValueError
              becomes the flag's error message.
    nargs, metavar: as in argparse.
    const:    the value a flag given without a value stands for (with ``nargs="?"``), or the
              value a flag that takes no value sets (the field keeps its default otherwise).
    options:  for a dict field: a dataclass whose fields (declared with ``opt``) are flags that
              set keys of the dict.
    """
    meta = {"help": help, "group": group, "flag": flag, "choices": choices, "any_value": any_value,
            "affects_results": affects_results, "parse": parse, "nargs": nargs, "metavar": metavar, "const": const,
            "options": options}
    return field(default=default, default_factory=default_factory, metadata={"sdclr_fast": meta})


@dataclass(frozen=True)
class Flag:
    """The command-line flag of one config field (see :func:`opt`).

    ``kind`` is "value" (the flag takes a value), "off" / "on" (a bool that defaults to True /
    False: ``--no-x`` / ``--x``), "toggle" (a bool that may be None: ``--x`` / ``--no-x``) or
    "const" (the flag takes no value and sets ``const``). ``help`` has the default filled in.
    ``key``: the dict key it sets when ``field`` is a dict field (``data_options``), else None.
    """

    field: str
    name: str
    dest: str
    kind: str
    help: str
    group: str
    type: typing.Callable | None = None
    choices: tuple | None = None
    nargs: int | str | None = None
    metavar: str | tuple | None = None
    const: object = None
    affects_results: bool = True
    key: str | None = None


def _meta(f: dataclasses.Field) -> dict:
    return f.metadata.get("sdclr_fast", {})


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return " ".join(_show(v) for v in value)
    return str(value)


def _plain_type(hint):
    """int for ``int | None`` and the like; None when the hint is no single plain type."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
    return args[0] if len(args) == 1 and args[0] in (int, float, str) else None


@functools.cache
def config_flags(cls, prefix: str = "") -> tuple:
    """The :class:`Flag` of every field of config class ``cls`` that has one, in field order; a
    dict field declared with ``options`` (``data_options``) contributes one flag per key.
    ``prefix`` ("dnc") gives the flags ``--dnc-k`` and the dests ``dnc_k``.

    Examples:
        >>> [(f.name, f.kind) for f in config_flags(PretrainConfig) if f.field in ("lr", "amp", "sync_bn")]
        [('--lr', 'value'), ('--amp', 'toggle'), ('--no-sync-bn', 'off')]
        >>> [f.name for f in config_flags(DnCConfig, prefix="dnc")][:2]
        ['--dnc-k', '--dnc-base-method']
    """
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        m = _meta(f)
        if m.get("options") is not None:
            out += [dataclasses.replace(sub, field=f.name, key=sub.field)
                    for sub in config_flags(m["options"], prefix)]
        elif m and m["flag"] is not False:
            out.append(_flag(f, m, hints[f.name], prefix))
    return tuple(out)


def _flag(f: dataclasses.Field, m: dict, hint, prefix: str) -> Flag:
    name = f.name.replace("_", "-")
    pre = f"{prefix}-" if prefix else ""
    dest = f"{prefix}_{f.name}" if prefix else f.name
    default = f.default if f.default is not dataclasses.MISSING else None
    help = m["help"].replace("{default}", _show(default))
    common = dict(field=f.name, dest=dest, help=help, group=m["group"], affects_results=m["affects_results"])
    if hint in (bool, bool | None):
        kind = "toggle" if hint == bool | None else "off" if default else "on"
        if kind == "off":  # the flag is --no-x: say what it turns off
            common["help"] = f"turn off (on by default): {help}"
        spelled = f"--{pre}{'no-' if kind == 'off' else ''}{name}"
        return Flag(name=m["flag"] or spelled, kind=kind, **common)
    if m["const"] is not None and m["nargs"] is None:
        return Flag(name=m["flag"] or f"--{pre}{name}", kind="const", const=m["const"], **common)
    parse = m["parse"] or _plain_type(hint)
    if parse is None:
        raise TypeError(f"{f.name}: opt() needs parse= for a field of type {hint}")
    return Flag(name=m["flag"] or f"--{pre}{name}", kind="value", type=parse, choices=m["choices"], nargs=m["nargs"],
                metavar=m["metavar"], const=m["const"], **common)


def runtime_fields(cls) -> frozenset:
    """The fields of config class ``cls`` that only change how a run executes (``affects_results=False``)."""
    return frozenset(f.name for f in dataclasses.fields(cls) if not _meta(f).get("affects_results", True))


# ---------------------------------------------------------------- checks both configs share
def check_int(obj, name: str, lo: int = 1, allow_none: bool = False) -> None:
    """ValueError naming ``name`` unless ``obj.name`` is an int >= ``lo`` (or None if allowed)."""
    v = getattr(obj, name)
    if allow_none and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name} must be a {'positive' if lo == 1 else 'non-negative'} int, got {v!r}")


def check_number(obj, name: str, lo=None, hi=None, lo_open: bool = False, allow_none: bool = False) -> None:
    """ValueError naming ``name`` unless ``obj.name`` is a finite number in [lo, hi] (lo excluded
    with ``lo_open``), or None if allowed."""
    v = getattr(obj, name)
    if allow_none and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v!r}")


def check_fields(obj) -> None:
    """The checks every config field declares with :func:`opt`: its choices (None also where it
    is the default) and, for bool fields, that the value is a bool (or None where allowed)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        m, v = _meta(f), getattr(obj, f.name)
        optional = f.default is None
        if hints[f.name] in (bool, bool | None) and not (isinstance(v, bool) or (optional and v is None)):
            either = "True, False or None (auto)" if optional else "a bool"
            raise ValueError(f"{f.name} must be {either}, got {v!r}")
        if m.get("choices") and not m["any_value"] and v not in m["choices"] and not (optional and v is None):
            raise ValueError(f"{f.name} must be {'None or ' if optional else ''}one of {m['choices']}, got {v!r}")


def parse_prune_block(value):
    """(out, in) channel block from "32x32" (or a 2-list); ValueError naming prune_block."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"prune_block must look like OUTxIN, e.g. 32x32, got {value!r}")
        value = [int(p) for p in parts]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"prune_block must be two ints (out, in), got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in value):
        raise ValueError(f"prune_block must be positive ints, got {value!r}")
    return tuple(int(v) for v in value)


def _number_or_none(text: str, none_words, expected: str):
    if text.lower() in none_words:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected {expected} or 'none', got {text!r}") from None


def parse_off_or_number(text: str):
    """A number, or None for 'none' / 'off' (the flag of an optional limit)."""
    return _number_or_none(text, ("none", "off"), "a number")


def parse_ratio(text: str):
    """The --ratio text: a number, or None for 'none' / 'keep' (the pool as it is)."""
    return _number_or_none(text, ("none", "keep"), "a number >= 1")


@dataclass
class DataOptions:
    """The keys of ``PretrainConfig.data_options`` (more options of ``build_dataset``) that have
    flags; a key whose flag is not given is left out."""

    train_list: str | None = opt(None, "webdataset: a file of the sample keys to train on, one per line (e.g. a "
                                       "long-tailed subset; default: the whole stream)", group="data")
    fewshot_list: str | None = opt(None, "imagefolder: a list file ('relative/path label' lines) of the few-shot probe "
                                         "set, e.g. the official ImageNet-100-LT 1% list "
                                         "imageNet_100_sub_balance_train_0.01 (drawn from the full training set); eval "
                                         "--shots with its per-class size uses it", group="data")
    num_workers: int | None = opt(None, "webdataset: DataLoader workers decoding each rank's shards (default 2; part "
                                        "of the data order, keep it on --resume)", group="data", flag="--data-workers")
    shuffle_buffer: int | None = opt(None, "webdataset: samples in each reader's seeded shuffle buffer (default 1000)",
                                     group="data")


@dataclass
class PretrainConfig:
    """Everything that defines a SimCLR / SDCLR / MoCLR pretraining run (a dataclass).

    Defaults follow SDCLR (Jiang et al., ICML 2021) on CIFAR: ResNet-18 with the CIFAR stem,
    SGD lr 0.5 / momentum 0.9 / weight decay 1e-4 at batch 512, cosine schedule per step with 10
    warm-up epochs, temperature 0.2, global magnitude pruning at 0.9 recomputed every epoch.
    ``lr`` is used as given: it is not rescaled with the batch size (SDCLR's 0.5 is the value
    for batch 512; scale it yourself, e.g. linearly, when you change the batch). Each field's
    help is declared with it (:func:`opt`) and is the text of its ``sdclr-fast pretrain`` flag
    (:func:`config_flags`): the method (``method``), the data (``dataset``, ``data_root``, ``ratio``, ``split``,
    ``image_size``, ...), the model (``arch``, ``width``, ``proj_dim``, ``cifar_stem``), the
    optimisation (``epochs``, ``batch_size``, ``lr``, ...), SDCLR's pruning (``sparsity``,
    ``prune_scope``, ``random_prune``, ``prune_block``), the augmentation and how the run
    executes (``device``, ``amp``, ``channels_last``, ``compile``, ...). A run writes it to
    ``config.json``; ``to_dict`` / ``from_dict`` round-trip it, ``replace(**changes)`` returns
    a validated copy and ``differences(other)`` lists what a resume may not change.

    Raises:
        ValueError: at construction (and in ``replace`` / ``from_dict``), naming the field: an
            unknown method, scope, input normalisation, pretrain set or compile mode, a
            non-positive size, a sparsity outside [0, 1), a malformed ``prune_block`` or
            ``crop_scale``, unknown fields in ``from_dict``.

    Examples:
        >>> from sdclr_fast import PretrainConfig
        >>> config = PretrainConfig(method="sdclr", dataset="fashion-mnist-lt", epochs=8, batch_size=128)
        >>> config.lr, config.sparsity, config.temperature
        (0.5, 0.9, 0.2)
        >>> config.replace(prune_block="32x32").prune_block
        (32, 32)
        >>> PretrainConfig.from_dict(config.to_dict()) == config
        True

        A run: ``sdclr_fast.train.pretrain.pretrain(config, run_dir="runs/a")`` returns the
        final checkpoint's path (see the Pretraining page of the docs).
    """

    method: str = opt("sdclr", "pretraining method (default {default}): simclr = both views through the dense "
                               "network; sdclr = view 2 through the pruned self-competitor; moclr = SimCLR's loss "
                               "between online predictions and an EMA target network's projections (DnC's base "
                               "method)",
                      group="run", choices=METHODS)
    dataset: str = opt("cifar10-lt", "training data (default {default}); fashion-mnist-lt reads Debian's "
                                     "dataset-fashion-mnist, the others need --data-root",
                       group="data", choices=DATASETS, any_value=True)
    data_root: str | None = opt(None, "folder of the data set files (cifar: the folder holding cifar-10-batches-py / "
                                      "cifar-100-python; imagefolder: the folder with train/<class>/; webdataset: the "
                                      "shards, e.g. 'shards/train-{000000..000127}.tar')", group="data")
    ratio: float | None = opt(100.0, "imbalance factor n_max/n_min of the long-tailed split (default {default}, the "
                                     "SDCLR protocol; 'none' keeps the training pool as is)",
                              group="data", parse=parse_ratio)
    split: int = opt(0, "which random long-tailed draw to use (default {default}; the protocol reports 0-4)",
                     group="data")
    image_size: int | None = opt(None, "resize images to this square size (default: native, 32 for CIFAR, 28 for "
                                       "Fashion-MNIST)", group="data")
    arch: str = opt("resnet18", "backbone: resnet18, resnet34, resnet50 or timm:<name>[:key=value,...], any timm model "
                                "made a self-competitor (default {default}, as in SDCLR)", group="model")
    width: int = opt(64, "channels of the first ResNet stage (default {default}, the standard ResNet-18)",
                     group="model")
    proj_dim: int = opt(128, "output size of the projection head (default {default})", group="model")
    cifar_stem: bool = opt(True, "the CIFAR stem, 3x3 stride-1 first conv and no max-pool, as in SDCLR (off: the "
                                 "ImageNet stem, 7x7 stride-2 conv and max-pool)", group="model")
    epochs: int = opt(2000, "training epochs (default {default}, SDCLR on CIFAR-LT)", group="optimisation")
    batch_size: int = opt(512, "global batch size, split over DDP processes (default {default})",
                          group="optimisation")
    lr: float = opt(0.5, "peak SGD learning rate (default {default}, SDCLR's value for batch 512; it is not rescaled "
                         "when you change --batch-size)", group="optimisation")
    momentum: float = opt(0.9, "SGD momentum (default {default})", group="optimisation")
    weight_decay: float = opt(1e-4, "SGD weight decay (default {default})", group="optimisation")
    grad_clip: float | None = opt(None, "clip the gradients' global L2 norm to this value before each optimiser "
                                        "step ('none', the default: no clipping, as the official SDCLR code; DnC "
                                        "experts take --dnc-expert-grad-clip)", group="optimisation",
                                  parse=parse_off_or_number)
    warmup_epochs: float = opt(10.0, "linear warm-up epochs before the per-step cosine decay (default {default}; "
                                     "clipped to the run length)", group="optimisation")
    temperature: float = opt(0.2, "NT-Xent temperature (default {default})", group="optimisation")
    sparsity: float = opt(0.9, "SDCLR: fraction of backbone conv weights pruned in the self-competitor (default "
                               "{default}); masks are recomputed at the start of every epoch", group="optimisation")
    prune_scope: str = opt("global", "SDCLR: one magnitude threshold over all convs (global, the paper's, default) or "
                                     "one per conv (layer)", group="optimisation", choices=PRUNE_SCOPES)
    random_prune: float = opt(0.0, "SDCLR: the part of --sparsity pruned at random instead of by magnitude (the "
                                   "official random_prune_percent; default {default})", group="optimisation")
    prune_block: tuple | None = opt(None, "SDCLR: prune whole OUTxIN channel blocks (all taps) instead of single "
                                          "weights, e.g. 32x32: on CUDA the pruned branch then skips the empty blocks "
                                          "in the Triton kernels (where the tuned table says they win; cuDNN "
                                          "otherwise); default unstructured",
                                    group="optimisation", parse=parse_prune_block, metavar="OUTxIN")
    crop_scale: tuple = opt((0.1, 1.0), "area range of the random resized crop (default {default}, SDCLR on CIFAR; its "
                                        "ImageNet recipe uses 0.08 1)",
                            group="optimisation", parse=float, nargs=2, metavar=("LO", "HI"))
    blur_prob: float = opt(0.0, "probability of the Gaussian blur of a view (default {default}; SDCLR's ImageNet "
                                "recipe 0.5)", group="optimisation")
    permute_classes: bool = opt(True, "the head/tail ranks go to a seeded permutation of the classes per split, as "
                                      "the official splits do (off: to the classes in index order)",
                                group="data")
    pretrain_set: str = opt("long_tail", "pretrain on the class-balanced subset D_b of the long-tailed split's size "
                                         "(balanced: SDCLR's balanced baseline) instead of the long-tailed split D_i "
                                         "(long_tail, the default); evaluation groups still follow the long-tailed "
                                         "counts",
                            group="data", choices=PRETRAIN_SETS, flag="--balanced-subset", const="balanced")
    input_norm: str = opt("imagenet", "statistics the [0, 1] inputs are normalised with: imagenet (ImageNet "
                                      "mean/std, what the official models apply inside the network; default) or "
                                      "dataset (the training split's)", group="optimisation", choices=INPUT_NORMS)
    eval_groups: str = opt("thirds", "major / moderate / minor classes of the evaluation: thirds of the classes ranked "
                                     "by count (the official CIFAR rule; default) or > 100 / 20-100 / < 20 training "
                                     "images (the official ImageNet-100-LT rule, set by --recipe imagenet100-lt)",
                           group="optimisation", choices=GROUP_RULES)
    official_split: str | None = opt(None, "CIFAR: the official SDCLR split/ folder; --split k (1-5) then loads its "
                                           "split{k}_D_i / _D_b / _S_b and trainIdxList / valIdxList instead of "
                                           "drawing the splits", group="data", flag="--split-file")
    data_options: dict = opt(help="more options of build_dataset, by key (webdataset: train_list, num_workers, "
                                  "shuffle_buffer; imagefolder: fewshot_list)",
                             group="data", options=DataOptions, default_factory=dict)
    eval_dataset: str | None = opt(None, "labelled data set whose probe / test sets evaluate the run (needed when the "
                                         "training data has none: --dataset webdataset)",
                                   group="data", choices=DATASETS, any_value=True, affects_results=False)
    eval_data_root: str | None = opt(None, "the folder of --eval-dataset", group="data", affects_results=False)
    moclr_momentum: float = opt(0.996, "MoCLR: base EMA momentum of the target network (default {default}, BYOL's), "
                                       "raised to 1 over the run with BYOL's cosine schedule", group="optimisation")
    seed: int = opt(0, "seed of the split draw, the initial weights, the data order and the augmentation (default "
                       "{default})", group="optimisation")
    device: str | None = opt(None, "cpu, cuda or cuda:N (default: cuda when available); under torchrun each process "
                                   "uses cuda:LOCAL_RANK", group="execution", affects_results=False)
    amp: bool | None = opt(None, "bf16 autocast for the forward passes (default: on for CUDA, off on CPU)",
                           group="execution")
    channels_last: bool | None = opt(None, "channels_last memory format (default: on for CUDA, off on CPU)",
                                     group="execution")
    compile: str | None = opt(None, "torch.compile the training step (both forwards, loss and backward in one graph) "
                                    "with this mode; --compile alone means 'default'; 'reduce-overhead' adds CUDA "
                                    "graphs (default off)",
                              group="execution", choices=COMPILE_MODES, nargs="?", const="default",
                              affects_results=False)
    sync_bn: bool = opt(True, "SyncBatchNorm under DDP (off: per-process BatchNorm statistics)",
                        group="execution")
    log_every: int = opt(10, "steps between progress-bar / metrics.jsonl updates (default {default})",
                         group="execution", affects_results=False)
    tensorboard: bool = opt(True, "TensorBoard scalars, written when tensorboard is installed",
                            group="execution", affects_results=False)
    progress: bool = opt(True, "a tqdm progress bar per epoch", group="execution", affects_results=False)
    num_threads: int | None = opt(None, "torch CPU threads (default: torch's choice)", group="execution",
                                  flag="--threads", affects_results=False)
    checkpoint_every_steps: int | None = opt(None, "also write a resumable checkpoint every N optimiser steps inside "
                                                   "an epoch (for long epochs on preemptible machines; default: at "
                                                   "epoch ends and on SIGTERM/SIGUSR1)",
                                             group="execution", affects_results=False)
    extra: dict = opt(help="free-form notes kept with the run (e.g. DnC stage)", flag=False, default_factory=dict)

    def __post_init__(self):
        if isinstance(self.crop_scale, list):  # from JSON
            self.crop_scale = tuple(self.crop_scale)
        if isinstance(self.prune_block, (list, str)):  # from JSON / a "32x32" string
            self.prune_block = parse_prune_block(self.prune_block)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r} "
                             f"(DnC runs through sdclr_fast.train.dnc.dnc with a DnCConfig)")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"dataset must be a data set name, got {self.dataset!r}")
        if self.compile is True or self.compile is False:  # configs written before the modes
            self.compile = "default" if self.compile else None
        check_fields(self)
        for name in ("width", "proj_dim", "epochs", "batch_size", "log_every"):
            check_int(self, name)
        for name in ("image_size", "num_threads", "checkpoint_every_steps"):
            check_int(self, name, allow_none=True)
        check_int(self, "split", lo=0)
        check_int(self, "seed", lo=0)
        check_number(self, "ratio", lo=1, allow_none=True)
        check_number(self, "lr", lo=0, lo_open=True)
        check_number(self, "momentum", lo=0, hi=1)
        check_number(self, "grad_clip", lo=0, lo_open=True, allow_none=True)
        check_number(self, "weight_decay", lo=0)
        check_number(self, "warmup_epochs", lo=0)
        check_number(self, "temperature", lo=0, lo_open=True)
        check_number(self, "sparsity", lo=0, hi=1)
        check_number(self, "moclr_momentum", lo=0, hi=1)
        if self.sparsity >= 1:
            raise ValueError(f"sparsity must be < 1 (some weights must stay), got {self.sparsity!r}")
        check_number(self, "random_prune", lo=0, hi=self.sparsity)
        pb = self.prune_block
        if pb is not None and (not isinstance(pb, tuple) or len(pb) != 2 or any(
                isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in pb)):
            raise ValueError(f"prune_block must be None or (out, in) positive ints, got {pb!r}")
        check_number(self, "blur_prob", lo=0, hi=1)
        cs = self.crop_scale
        if (not isinstance(cs, tuple) or len(cs) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Real)
                                                            for v in cs) or not 0 < cs[0] <= cs[1] <= 1):
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {cs!r}")
        if self.official_split is not None and not isinstance(self.official_split, str):
            raise ValueError(f"official_split must be a path (str) or None, got {self.official_split!r}")
        for name in ("data_options", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        # Configs written before input_norm existed normalised with the data set's statistics.
        return cls(**{"input_norm": "dataset", **d})

    def replace(self, **changes) -> "PretrainConfig":
        return dataclasses.replace(self, **changes)

    def differences(self, other: "PretrainConfig", *, ignore=None) -> dict:
        """{field: (self's, other's)} for the fields that differ, the fields in ``ignore``
        (default: ``RUNTIME_FIELDS``) left out."""
        return _diff(self.to_dict(), other.to_dict(), RUNTIME_FIELDS if ignore is None else ignore)

    @property
    def warmup_epochs_effective(self) -> float:
        """Warm-up clipped to the run: at most the whole run."""
        return min(float(self.warmup_epochs), float(self.epochs))


# Fields that only change how a run executes, not what it computes; they may differ on resume.
RUNTIME_FIELDS = runtime_fields(PretrainConfig)

# Presets of the official SDCLR recipes: the fields a recipe sets before the flags given (which win).
RECIPES = {
    "cifar-lt": {},  # PretrainConfig's defaults are SDCLR's CIFAR-LT recipe
    # cmds/shell_scrips/imagenet-100-res50-LT.sh of the official code (split imageNet_100_LT_train)
    "imagenet100-lt": dict(dataset="imagefolder", ratio=None, arch="resnet50", cifar_stem=False, image_size=224,
                           crop_scale=(0.08, 1.0), blur_prob=0.5, batch_size=256, epochs=500, lr=0.5,
                           sparsity=0.3, temperature=0.2, eval_groups="imagenet-lt"),
}
# Per-method exceptions of a recipe: the official ImageNet-100-LT SDCLR runs use tau 0.3 (its README
# and camera_ready.sh), its SimCLR runs 0.2.
RECIPE_METHOD_FIELDS = {"imagenet100-lt": {"sdclr": dict(temperature=0.3)}}


def recipe_fields(name: str, method: str) -> dict:
    """The fields recipe ``name`` sets for ``method`` (a copy): ``RECIPES[name]`` with the method's
    exceptions from ``RECIPE_METHOD_FIELDS``. Raises ValueError for an unknown recipe.

    Examples:
        >>> [recipe_fields("imagenet100-lt", m)["temperature"] for m in ("sdclr", "simclr")]
        [0.3, 0.2]
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    return {**RECIPES[name], **RECIPE_METHOD_FIELDS.get(name, {}).get(method, {})}


def _diff(a: dict, b: dict, ignore=frozenset()) -> dict:
    return {k: (a[k], b[k]) for k in a if k not in ignore and a[k] != b[k]}



@dataclass
class DnCConfig:
    """The DnC options on top of the base :class:`PretrainConfig` (a dataclass).

    The number of clusters / experts ``k``, the contrastive method of the base model and the
    experts (``base_method``), the stage budgets (``base_epochs``, ``expert_epochs``,
    ``student_epochs``; None takes the base config's ``epochs``), the k-means settings
    (``kmeans_iters``, ``kmeans_backend``, ``kmeans_metric``, ``cluster_on``), the distillation
    (``distill_target``, ``distill_lr``, ``head_hidden``, ``base_weight``, ``expert_weight``,
    ``student_init``), the number of ``rounds`` and ``parallel_experts``. Each option's help is
    declared with it (:func:`opt`) and is the text of its ``--dnc-*`` flag of ``sdclr-fast
    pretrain --method dnc``. ``kmeans_backend`` may change on resume, the others may not.

    Raises:
        ValueError: at construction, naming the option: a non-positive count, an unknown choice,
            a negative weight (or both weights 0), a non-positive ``distill_lr``.

    Examples:
        >>> DnCConfig(k=10).differences(DnCConfig(k=10, kmeans_backend="torch"))
        {}
    """

    k: int = opt(5, "number of k-means clusters, i.e. experts (default {default}; DnC uses 5 or 10)")
    base_method: str = opt("moclr", "contrastive method of the base model and the experts (default {default}, DnC's "
                                    "MoCLR; sdclr gives an SDCLR base, a combination not published before)",
                           choices=METHODS)
    base_epochs: int | None = opt(None, "epochs of the base model on the whole training split (default: --epochs)")
    expert_epochs: int | None = opt(None, "epochs of each expert on its own cluster (default: --epochs); the expert "
                                          "stage as a whole then costs about that many epochs of the full set")
    student_epochs: int | None = opt(None, "epochs of the distillation into the student (default: --epochs)")
    kmeans_iters: int = opt(50, "maximum Lloyd iterations of k-means (default {default})")
    kmeans_backend: str = opt("auto", "k-means implementation: faiss (its GPU index with faiss-gpu, else CPU), torch "
                                      "(on the training device) or auto = faiss where installed (default {default})",
                              choices=KMEANS_BACKENDS, affects_results=False)
    kmeans_metric: str = opt("cosine", "spherical (cosine) or Euclidean k-means on the L2-normalised embeddings "
                                       "(default {default})", choices=KMEANS_METRICS)
    cluster_on: str = opt("features", "base embedding that is clustered: backbone features or projection-head output "
                                      "(default {default})", choices=EMBEDDINGS)
    distill_target: str = opt("features", "teacher embedding the student's heads regress (default {default})",
                              choices=EMBEDDINGS)
    distill_lr: float | None = opt(None, "peak SGD learning rate of the student (default 0.1 x batch size / 256); "
                                         "same momentum, weight decay, warm-up and cosine schedule as the base")
    head_hidden: int | None = opt(None, "hidden width of the student's prediction heads (default: backbone feature "
                                        "size)")
    base_weight: float = opt(1.0, "weight of the base-teacher regression term (default {default})")
    expert_weight: float = opt(1.0, "weight of the expert-teacher regression term (default {default})")
    student_init: str = opt("scratch", "student initialisation: a fresh network (seeded) or the base model's weights "
                                       "(default {default})", choices=STUDENT_INITS)
    rounds: int = opt(1, "divide-and-contrast rounds (default {default}); each further round clusters the previous "
                         "student's features, trains experts from it and distils a new student (round r >= 2 in "
                         "run_dir/round_<r>/)")
    expert_grad_clip: float | None = opt(
        100.0, "clip each expert's global gradient norm to this value before its optimiser steps ('none': off; "
               "default {default}, far above the usual norms). Not in the DnC paper: a small cluster of "
               "near-identical images leaves BatchNorm a few values per channel with almost no variance, and its "
               "backward then multiplies the gradient by up to 1/sqrt(eps) per layer until the weights overflow",
        parse=parse_off_or_number)
    parallel_experts: bool = opt(False, "under torchrun, train the experts at the same time on disjoint groups of "
                                        "ranks (W ranks, k experts: min(W, k) groups; 8 GPUs and k = 8: one expert "
                                        "per GPU) instead of one after the other on all ranks")

    def __post_init__(self):
        self.validate()

    def validate(self):
        check_fields(self)
        for name in ("k", "kmeans_iters", "rounds"):
            check_int(self, name)
        for name in ("base_epochs", "expert_epochs", "student_epochs", "head_hidden"):
            check_int(self, name, allow_none=True)
        check_number(self, "base_weight", lo=0)
        check_number(self, "expert_weight", lo=0)
        if self.base_weight == 0 and self.expert_weight == 0:
            raise ValueError("base_weight and expert_weight cannot both be 0")
        check_number(self, "distill_lr", lo=0, lo_open=True, allow_none=True)
        check_number(self, "expert_grad_clip", lo=0, lo_open=True, allow_none=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DnCConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DnC options {unknown}")
        return cls(**d)

    def replace(self, **changes) -> "DnCConfig":
        return dataclasses.replace(self, **changes)

    def differences(self, other: "DnCConfig") -> dict:
        """{option: (self's, other's)} for the options that differ, runtime options left out."""
        return _diff(self.to_dict(), other.to_dict(), runtime_fields(DnCConfig))
