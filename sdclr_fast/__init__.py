"""sdclr-fast: fused kernels and a training loop for contrastive learning on long-tailed data.

The public ops and modules are imported on first use, so `import sdclr_fast` stays cheap
(Triton and the C++ extension load only when an op that needs them is called).
"""
from importlib import import_module

__version__ = "0.2.0.dev0"  # the only place it is written (pyproject.toml reads it); see CHANGELOG.md

_EXPORTS = {
    "nt_xent": "sdclr_fast.ops.nt_xent",
    "NTXentLoss": "sdclr_fast.ops.nt_xent",
    "info_nce": "sdclr_fast.ops.info_nce",
    "MemoryBank": "sdclr_fast.ops.info_nce",
    "magnitude_threshold": "sdclr_fast.ops.prune",
    "magnitude_masks": "sdclr_fast.ops.prune",
    "prune_model": "sdclr_fast.ops.prune",
    "MagnitudePruning": "sdclr_fast.ops.prune",
    "global_magnitude_unstructured": "sdclr_fast.ops.prune",
    "masked_conv2d": "sdclr_fast.ops.masked_conv",
    "prepare_mask": "sdclr_fast.ops.masked_conv",
    "masked_linear": "sdclr_fast.ops.masked_linear",
    "MaskedConv2d": "sdclr_fast.nn",
    "MaskedLinear": "sdclr_fast.nn",
    "DualLayerNorm": "sdclr_fast.nn",
    "self_competitor": "sdclr_fast.nn",
    "DualBatchNorm1d": "sdclr_fast.nn",
    "DualBatchNorm2d": "sdclr_fast.nn",
    "ProjectionHead": "sdclr_fast.nn",
    "SelfCompetitor": "sdclr_fast.nn",
    "build_model": "sdclr_fast.nn",
    "resnet18": "sdclr_fast.nn",
    "resnet50": "sdclr_fast.nn",
    "build_dataset": "sdclr_fast.data",
    "TwoViewAugment": "sdclr_fast.data",
    "evaluate_backbone": "sdclr_fast.eval",
    "linear_probe": "sdclr_fast.eval",
    "knn_predict": "sdclr_fast.eval",
    "PretrainConfig": "sdclr_fast.train",
    "kmeans": "sdclr_fast.train.kmeans",
    "dnc_distillation_loss": "sdclr_fast.train.distill",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sdclr_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
