"""Run configurations, as dataclasses whose defaults are the papers' values: PretrainConfig for
every contrastive run and DnCConfig for the DnC options on top of it.

The CLI builds them from flags, checkpoints and DnC's state file store them as plain dicts, and
a resumed run checks that the fields which change the result match the stored ones.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

from ..data.augment import INPUT_NORMS
from ..data.base import PRETRAIN_SETS
from ..eval.metrics import GROUP_RULES
from ..nn import METHODS
from .models import EMBEDDINGS
PRUNE_SCOPES = ("global", "layer")
COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")  # torch.compile modes


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


# Fields that only change how a run executes, not what it computes; they may differ on resume.
RUNTIME_FIELDS = frozenset({"device", "compile", "log_every", "tensorboard", "progress", "num_threads",
                            "checkpoint_every_steps", "eval_dataset", "eval_data_root"})


@dataclass
class PretrainConfig:
    """Everything that defines a SimCLR / SDCLR / MoCLR pretraining run (a dataclass).

    Defaults follow SDCLR (Jiang et al., ICML 2021) on CIFAR: ResNet-18 with the CIFAR stem,
    SGD lr 0.5 / momentum 0.9 / weight decay 1e-4 at batch 512, cosine schedule per step with 10
    warm-up epochs, temperature 0.2, global magnitude pruning at 0.9 recomputed every epoch.
    ``lr`` is used as given: it is not rescaled with the batch size (SDCLR's 0.5 is the value
    for batch 512; scale it yourself, e.g. linearly, when you change the batch). Each field is
    commented in the source and is a flag of ``sdclr-fast pretrain`` (``--help`` explains
    them): the method (``method``), the data (``dataset``, ``data_root``, ``ratio``, ``split``,
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

    method: str = "sdclr"
    dataset: str = "cifar10-lt"
    data_root: str | None = None
    ratio: float | None = 100.0          # imbalance factor of the long-tailed split
    split: int = 0                       # which long-tailed draw (the protocol uses 0-4)
    image_size: int | None = None        # None: the data set's native size
    arch: str = "resnet18"
    width: int = 64                      # channels of the first stage (64 = standard ResNet-18)
    proj_dim: int = 128
    cifar_stem: bool = True              # 3x3 stride-1 first conv, no max-pool (small images)
    epochs: int = 2000
    batch_size: int = 512                # global batch (split over DDP ranks)
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 10.0          # clipped to the run length
    temperature: float = 0.2
    sparsity: float = 0.9                # SDCLR only
    prune_scope: str = "global"          # SDCLR only: "global" (paper) or "layer"
    random_prune: float = 0.0            # SDCLR only: part of `sparsity` pruned at random (official random_prune_percent)
    prune_block: tuple | None = None     # SDCLR only: (out, in) channel blocks pruned whole (e.g. (32, 32)); None unstructured
    crop_scale: tuple = (0.1, 1.0)       # random resized crop's area range (SDCLR CIFAR; ImageNet 0.08-1)
    blur_prob: float = 0.0               # Gaussian blur probability (SDCLR's ImageNet recipe: 0.5)
    permute_classes: bool = True         # each split gives the head/tail ranks to a seeded class permutation
    pretrain_set: str = "long_tail"      # "long_tail" (D_i) or "balanced" (D_b of the same size: the baseline)
    input_norm: str = "imagenet"         # input normalisation: ImageNet mean/std (official) or "dataset" statistics
    eval_groups: str = "thirds"          # groups: "thirds" (official CIFAR) or "imagenet-lt" (> 100 / 20-100 / < 20)
    official_split: str | None = None    # CIFAR: the official SDCLR split/ folder (D_i, D_b, S_b .npy), --split 1-5
    data_options: dict = field(default_factory=dict)  # more options of build_dataset (webdataset: train_list,
                                                      # num_workers, shuffle_buffer)
    eval_dataset: str | None = None      # evaluation data of a run whose training set has no probe / test sets
    eval_data_root: str | None = None    # (webdataset): a labelled data set name and its root
    moclr_momentum: float = 0.996        # MoCLR only: base EMA momentum of the target (BYOL's), cosine to 1
    seed: int = 0
    device: str | None = None            # None: cuda when available, else cpu
    amp: bool | None = None              # bf16 autocast; None: on for CUDA, off on CPU
    channels_last: bool | None = None    # None: on for CUDA, off on CPU
    compile: str | None = None          # torch.compile mode of the step (COMPILE_MODES); None: eager
    sync_bn: bool = True                 # SyncBatchNorm when running under DDP
    log_every: int = 10                  # progress-bar refresh period in steps
    tensorboard: bool = True             # write TensorBoard scalars when tensorboard is installed
    progress: bool = True                # tqdm progress bar per epoch
    num_threads: int | None = None       # torch CPU threads; None leaves torch's default
    checkpoint_every_steps: int | None = None  # also a resumable checkpoint every N steps mid-epoch
    extra: dict = field(default_factory=dict)  # free-form notes kept with the run (e.g. DnC stage)

    def __post_init__(self):
        if isinstance(self.crop_scale, list):  # from JSON
            self.crop_scale = tuple(self.crop_scale)
        if isinstance(self.prune_block, (list, str)):  # from JSON / a "32x32" string
            self.prune_block = parse_prune_block(self.prune_block)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self):
        def positive_int(name, allow_none=False):
            v = getattr(self, name)
            if allow_none and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

        def finite(name, lo=None, hi=None, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if lo is not None and (v < lo or (lo_open and v == lo)):
                raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
            if hi is not None and v > hi:
                raise ValueError(f"{name} must be <= {hi}, got {v!r}")

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r} "
                             f"(DnC runs through sdclr_fast.train.dnc.dnc with a DnCConfig)")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"dataset must be a data set name, got {self.dataset!r}")
        if self.prune_scope not in PRUNE_SCOPES:
            raise ValueError(f"prune_scope must be one of {PRUNE_SCOPES}, got {self.prune_scope!r}")
        for name in ("width", "proj_dim", "epochs", "batch_size", "log_every"):
            positive_int(name)
        positive_int("image_size", allow_none=True)
        positive_int("num_threads", allow_none=True)
        positive_int("checkpoint_every_steps", allow_none=True)
        if isinstance(self.split, bool) or not isinstance(self.split, numbers.Integral) or self.split < 0:
            raise ValueError(f"split must be a non-negative int, got {self.split!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.ratio is not None:
            finite("ratio", lo=1)
        finite("lr", lo=0, lo_open=True)
        finite("momentum", lo=0, hi=1)
        finite("weight_decay", lo=0)
        finite("warmup_epochs", lo=0)
        finite("temperature", lo=0, lo_open=True)
        finite("sparsity", lo=0, hi=1)
        finite("moclr_momentum", lo=0, hi=1)
        if self.sparsity >= 1:
            raise ValueError(f"sparsity must be < 1 (some weights must stay), got {self.sparsity!r}")
        finite("random_prune", lo=0, hi=self.sparsity)
        pb = self.prune_block
        if pb is not None and (not isinstance(pb, tuple) or len(pb) != 2 or any(
                isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in pb)):
            raise ValueError(f"prune_block must be None or (out, in) positive ints, got {pb!r}")
        finite("blur_prob", lo=0, hi=1)
        cs = self.crop_scale
        if (not isinstance(cs, tuple) or len(cs) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Real)
                                                            for v in cs) or not 0 < cs[0] <= cs[1] <= 1):
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {cs!r}")
        if self.eval_groups not in GROUP_RULES:
            raise ValueError(f"eval_groups must be one of {GROUP_RULES}, got {self.eval_groups!r}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        if self.pretrain_set not in PRETRAIN_SETS:
            raise ValueError(f"pretrain_set must be one of {PRETRAIN_SETS}, got {self.pretrain_set!r}")
        if self.official_split is not None and not isinstance(self.official_split, str):
            raise ValueError(f"official_split must be a path (str) or None, got {self.official_split!r}")
        if not isinstance(self.permute_classes, bool):
            raise ValueError(f"permute_classes must be a bool, got {self.permute_classes!r}")
        if not isinstance(self.cifar_stem, bool):
            raise ValueError(f"cifar_stem must be a bool, got {self.cifar_stem!r}")
        for name in ("amp", "channels_last"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name} must be True, False or None (auto), got {getattr(self, name)!r}")
        if self.compile is True or self.compile is False:  # configs written before the modes
            self.compile = "default" if self.compile else None
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None or one of {COMPILE_MODES}, got {self.compile!r}")
        if not isinstance(self.data_options, dict):
            raise ValueError(f"data_options must be a dict, got {type(self.data_options).__name__}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")

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

    def differences(self, other: "PretrainConfig", *, ignore=RUNTIME_FIELDS) -> dict:
        """{field: (self's, other's)} for the fields that differ, runtime fields left out."""
        return _diff(self.to_dict(), other.to_dict(), ignore)

    @property
    def warmup_epochs_effective(self) -> float:
        """Warm-up clipped to the run: at most the whole run."""
        return min(float(self.warmup_epochs), float(self.epochs))


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


KMEANS_BACKENDS = ("auto", "faiss", "torch")
KMEANS_METRICS = ("cosine", "euclidean")
STUDENT_INITS = ("scratch", "base")


@dataclass
class DnCConfig:
    """The DnC options on top of the base :class:`PretrainConfig`.

    k:               number of clusters / experts (DnC uses 5 or 10).
    base_method:     contrastive method of the base model and the experts: "moclr" (DnC's),
                     "simclr" or "sdclr" (an SDCLR base, unpublished).
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
    rounds:          divide-and-contrast rounds; from the second on, the previous round's student
                     is the base that is clustered, initialises the experts and is distilled.
    parallel_experts: under torchrun, train the experts concurrently on disjoint groups of ranks
                     (e.g. 8 GPUs and k = 8: one expert per GPU) instead of one after the other on all.
    """

    k: int = 5
    base_method: str = "moclr"
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
    rounds: int = 1
    parallel_experts: bool = False

    # Options that only change how a run executes; they may differ on resume.
    RUNTIME = frozenset({"kmeans_backend"})

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
        pos_int("rounds")
        for name in ("base_epochs", "expert_epochs", "student_epochs", "head_hidden"):
            pos_int(name, allow_none=True)
        choice("base_method", METHODS)
        choice("kmeans_backend", KMEANS_BACKENDS)
        choice("kmeans_metric", KMEANS_METRICS)
        choice("cluster_on", EMBEDDINGS)
        choice("distill_target", EMBEDDINGS)
        choice("student_init", STUDENT_INITS)
        for name in ("base_weight", "expert_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.parallel_experts, bool):
            raise ValueError(f"parallel_experts must be a bool, got {self.parallel_experts!r}")
        if self.base_weight == 0 and self.expert_weight == 0:
            raise ValueError("base_weight and expert_weight cannot both be 0")
        if self.distill_lr is not None:
            v = self.distill_lr
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"distill_lr must be a finite number > 0, got {v!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DnCConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DnC options {unknown}")
        return cls(**d)

    def differences(self, other: "DnCConfig") -> dict:
        """{option: (self's, other's)} for the options that differ, runtime options left out."""
        return _diff(self.to_dict(), other.to_dict(), self.RUNTIME)
