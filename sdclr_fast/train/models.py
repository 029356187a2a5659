"""Model I/O for every run: the model arguments a checkpoint stores, rebuilding and loading a
model from a checkpoint, building timm backbones (``--arch timm:<name>``), and the
dense-branch embedding that probes, clustering and distillation read."""
from __future__ import annotations

import sys

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint

EMBEDDINGS = ("features", "projection")
TIMM_PREFIX = "timm:"


def is_timm_arch(arch) -> bool:
    """Whether `arch` names a timm model (``timm:<name>[:key=value,...]``)."""
    return isinstance(arch, str) and arch.startswith(TIMM_PREFIX)


def model_args(config, in_channels: int, image_size: int | None = None) -> dict:
    """Arguments of ``build_model_from_args`` for a run (stored in every checkpoint). A timm
    arch also stores `image_size`, the size of the images the model sees (a ViT's img_size)."""
    args = dict(arch=config.arch, method=config.method, in_channels=int(in_channels), width=config.width,
                cifar_stem=config.cifar_stem, proj_dim=config.proj_dim)
    if is_timm_arch(config.arch):
        if image_size is None:
            raise ValueError(f"image_size: a timm arch ({config.arch}) needs the data's image size")
        args["image_size"] = int(image_size)
    return args


def build_model_from_args(args: dict):
    if is_timm_arch(args.get("arch")):
        return build_timm_model(**args)
    from ..nn import build_model

    return build_model(**args)


# ------------------------------------------------------------------ timm
# timm imports torchvision (for its data transforms and FrozenBatchNorm2d). PyPI's torchvision
# wheels are built against CUDA torch: next to a CPU-only torch its C++ library (_C.so, which
# needs libtorch_cuda) does not load. torchvision itself copes with that (its ops then raise
# "Couldn't load custom C++ ops" when called), except for two fake-kernel registrations that
# it runs unconditionally at import, for the ops torchvision::nms and torchvision::qnms, which
# then do not exist: `import torchvision` (and so `import timm`) fails with "operator
# torchvision::nms does not exist". Only in that case `import_timm` declares those two
# schemas (no implementation: calling them still fails) and imports again. Model building
# uses none of torchvision's C++ ops. Where torchvision loads, timm is imported unchanged.
_TV_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
               "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_tv_library = None  # kept alive: a torch.library.Library unregisters its ops when collected


def import_timm():
    """The timm module, also on a machine where torchvision's C++ ops cannot load beside the
    installed torch (see above). Raises ImportError when timm is not installed."""
    global _tv_library
    try:
        import timm
        return timm
    except RuntimeError as exc:
        if "torchvision::" not in str(exc) or _tv_library is not None:
            raise
    _tv_library = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
    for schema in _TV_SCHEMAS:
        _tv_library.define(schema)
    for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "timm")]:
        del sys.modules[name]  # the half-imported packages of the failed attempt
    import timm
    return timm


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """`model` with every BatchNorm replaced by its SyncBatchNorm (parameters and buffers kept),
    as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does, except that a model holding timm's
    BatchNorm + activation layers (BatchNormAct2d, a BatchNorm subclass) goes through timm's
    converter: torch's would replace such a layer by a plain SyncBatchNorm and drop its
    activation. Dual layers convert both branches either way.

    Examples:
        >>> from sdclr_fast.nn import resnet18
        >>> m = convert_sync_batchnorm(resnet18(width=8))
        >>> type(m.bn1.dense).__name__, type(m.bn1.pruned).__name__
        ('SyncBatchNorm', 'SyncBatchNorm')
    """
    timm_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).__module__.startswith("timm.")
                    for m in model.modules())
    if timm_norm:
        return import_timm().layers.convert_sync_batchnorm(model, process_group)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)


def parse_timm_arch(arch: str) -> tuple[str, dict]:
    """``timm:<name>[:key=value,...]`` -> (name, keyword arguments for timm.create_model), values
    as int, float, True / False or str, e.g. ``timm:vit_tiny_patch16_224:patch_size=4,depth=2``."""
    if not is_timm_arch(arch):
        raise ValueError(f"arch must start with {TIMM_PREFIX!r}, got {arch!r}")
    name, _, opts = arch[len(TIMM_PREFIX):].partition(":")
    if not name:
        raise ValueError(f"arch {arch!r}: the timm model name is missing")
    kwargs = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise ValueError(f"arch {arch!r}: options must be key=value pairs, got {item!r}")
        if key in ("pretrained", "num_classes", "in_chans", "img_size"):
            raise ValueError(f"arch {arch!r}: {key} is set by sdclr-fast (no download, pooled "
                             f"features, the data's channels and size)")
        for conv in (int, float):
            try:
                value = conv(value)
                break
            except ValueError:
                pass
        else:
            value = {"True": True, "False": False}.get(value, value)
        kwargs[key] = value
    return name, kwargs


def timm_backbone(arch: str, in_channels: int, image_size: int):
    """A timm model as a feature extractor: built with ``pretrained=False`` (nothing is
    downloaded), ``num_classes=0`` (the forward returns the pooled features, (B,
    num_features)), `in_channels` input channels and, for models that take it (ViTs),
    ``img_size=image_size``."""
    timm = import_timm()
    name, kwargs = parse_timm_arch(arch)
    if name not in timm.list_models():
        raise ValueError(f"arch {arch!r}: timm has no model {name!r}")
    kwargs.update(pretrained=False, num_classes=0, in_chans=int(in_channels))
    try:
        return timm.create_model(name, img_size=int(image_size), **kwargs)
    except TypeError as exc:  # a model without img_size (CNNs take any size)
        if "img_size" not in str(exc):
            raise
    return timm.create_model(name, **kwargs)


def build_timm_model(arch, method="sdclr", in_channels=3, image_size=32, proj_dim=128, width=None,
                     cifar_stem=None, hidden_dim=None):
    """The model of a SimCLR / SDCLR / MoCLR run on a timm backbone (`timm_backbone`), made a
    self-competitor by ``sdclr_fast.nn.self_competitor`` with its default pruning set and
    exclusions: dual norms and SDCLR's 3-layer head for 'sdclr', shared norms and SimCLR's
    head for 'simclr' and 'moclr' (plus MoCLR's predictor). `width` and `cifar_stem` belong to
    the bundled ResNets and are ignored (a timm model's own name and options set them)."""
    from ..nn import METHODS, moclr_predictor, sdclr_head, self_competitor, simclr_head

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    backbone = timm_backbone(arch, in_channels, image_size)
    dim = backbone.feature_dim = int(backbone.num_features)  # the name the package's backbones use
    head = (sdclr_head if method == "sdclr" else simclr_head)(dim, proj_dim, hidden_dim)
    predictor = moclr_predictor(proj_dim, dim if hidden_dim is None else hidden_dim) \
        if method == "moclr" else None
    model = self_competitor(backbone, head, dual_norms=method == "sdclr", predictor=predictor)
    model.method, model.arch = method, arch
    return model


def load_weights(model: nn.Module, state: dict) -> nn.Module:
    """Load a checkpoint's ``model`` entry, with an error naming the file when it does not fit."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {state['path']!r} does not fit this model: {exc}") from None
    return model


def load_model(checkpoint_path, *, device="cpu", expect: dict | None = None):
    """The pretrained model (a ``SelfCompetitor`` with its masks and BN statistics) from a
    checkpoint written by a pretraining run or a DnC stage, in eval mode on ``device``."""
    state = load_checkpoint(checkpoint_path, expect=expect)
    if "model_args" not in state:
        raise CheckpointError(f"checkpoint {state['path']!r} lacks the entry 'model_args'")
    model = load_weights(build_model_from_args(state["model_args"]), state)
    return model.to(device).eval()


class DenseEncoder(nn.Module):
    """The dense branch of a ``SelfCompetitor`` as a plain encoder: its backbone features (what
    the linear probe and kNN see, the default) or its projection-head output."""

    def __init__(self, model: nn.Module, which: str = "features"):
        super().__init__()
        if which not in EMBEDDINGS:
            raise ValueError(f"which must be one of {EMBEDDINGS}, got {which!r}")
        self.model = model
        self.which = which

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.which == "features":
            return self.model.features(x, branch="dense")
        return self.model(x, branch="dense")
