"""Training runs: the SimCLR / SDCLR loop (``pretrain``), what every run shares (``run``: set-up,
data, resume check, metrics, NaN guard), model I/O (``models``), checkpoints, evaluation of runs;
DnC's orchestrator (``dnc``) and its stages (``clustering`` with ``kmeans``, ``distill``).

Typical use::

    from sdclr_fast.train import PretrainConfig, load_model
    from sdclr_fast.train.pretrain import pretrain
    ckpt = pretrain(PretrainConfig(method="sdclr", dataset="cifar10-lt", data_root="..."), run_dir="runs/a")
    model = load_model(ckpt)   # SelfCompetitor with masks and dual BN, eval mode

Names are imported on first use so that ``import sdclr_fast.train.kmeans`` stays light. The
function ``pretrain`` lives in the module ``sdclr_fast.train.pretrain`` (the package attribute
``pretrain`` is that module, as Python binds a package's submodules to their names).
"""
from importlib import import_module

_EXPORTS = {
    "PretrainConfig": "config",
    "DnCConfig": "config",
    "load_model": "models",
    "DenseEncoder": "models",
    "read_metrics": "run",
    "NonFiniteLossError": "run",
    "ContrastiveForward": "pretrain",
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "warmup_cosine": "schedule",
    "warmup_cosine_factor": "schedule",
    "evaluate_checkpoint": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
