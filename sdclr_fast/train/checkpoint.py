"""Atomic checkpoints that can be validated before they are trusted.

A checkpoint is written with :func:`sdclr_fast.files.atomic_write` (temporary file, fsync,
rename), so a run killed while saving leaves the previous complete checkpoint in place. Loading checks that the file is a torch zip,
that it carries this project's format key and version, and (when asked) that it was written for
the same method and architecture; every failure is a :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import io
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write, link_or_copy

FORMAT = "sdclr-fast-checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, foreign or written for another run."""


def save_checkpoint(state: dict, path, *, keep_previous: bool = True) -> Path:
    """Write ``state`` (plus the format key and version) to ``path`` atomically.

    keep_previous: first make the current file ``checkpoint.prev.pt`` (a hard link, renamed into
    place), so that at every moment both names hold a complete checkpoint and a newest one that
    turns out unreadable still leaves the one before it.
    """
    path = Path(path)
    # Serialised in memory first: torch.save turns an OSError of the file (a full disk) into a
    # RuntimeError about zip positions, which could not be reported as a failed write.
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    if keep_previous and path.exists():
        link_or_copy(path, previous_path(path), what="the previous checkpoint")
    return atomic_write(path, buffer.getbuffer(), what="the checkpoint")


def previous_path(path) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint before ``path``: ``checkpoint.prev.pt``
    beside ``checkpoint.pt``, ``<name>.prev.pt`` beside any other ``<name>.pt``."""
    path = Path(path)
    return path.with_name(PREVIOUS_NAME) if path.name == CHECKPOINT_NAME else path.with_suffix(".prev" + path.suffix)


def load_checkpoint(path, *, map_location="cpu", expect: dict | None = None) -> dict:
    """Read and validate a checkpoint written by :func:`save_checkpoint`.

    path:   the .pt file, or a run directory holding ``checkpoint.pt``.
    expect: e.g. {"method": "sdclr", "arch": "resnet18"}; each key must equal the stored
            config's value.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or not a torch checkpoint "
                              f"(not a complete zip archive)")
    try:
        # weights_only: a checkpoint is data; never run pickled code from a file we are handed.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            KeyError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} could not be read (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an sdclr-fast checkpoint (no format key {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {state.get('version')!r}; "
                              f"this sdclr-fast reads version {VERSION}")
    for key in ("config", "model", "epoch"):
        if key not in state:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks the entry {key!r}")
    state["path"] = str(path)
    check_expected(state, expect)
    return state


def check_expected(state: dict, expect: dict | None) -> None:
    """Raise CheckpointError where a loaded state's config differs from ``expect``'s entries."""
    cfg = state["config"]
    for key, want in (expect or {}).items():
        if cfg.get(key) != want:
            raise CheckpointError(f"checkpoint {state['path']!r} was written for {key}={cfg.get(key)!r}, "
                                  f"expected {key}={want!r}")


def load_newest_checkpoint(path, *, map_location="cpu", expect: dict | None = None) -> tuple:
    """:func:`load_checkpoint` of ``path``, or of the previous checkpoint kept beside it
    (:func:`previous_path`) when ``path`` itself is missing, truncated or corrupt (a kill or a
    full disk during a copy, a damaged file system).

    Returns ``(state, note)``: ``note`` is None when ``path`` was read, else one line naming
    the file used and why, for the caller to print. A readable checkpoint written for another
    run (``expect``) is never passed over. Raises :class:`CheckpointError` (about ``path``)
    when neither file is readable.

    Examples:
        >>> state, note = load_newest_checkpoint("runs/a")  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    try:
        state = load_checkpoint(path, map_location=map_location)
        note = None
    except CheckpointError as exc:
        previous = previous_path(path)
        if not previous.exists():
            raise
        try:
            state = load_checkpoint(previous, map_location=map_location)
        except CheckpointError as prev_exc:
            raise CheckpointError(f"{exc}; the previous checkpoint is unusable too: {prev_exc}") from None
        where = f"epoch {state['epoch']}" + (f", step {state['step']}" if "step" in state else "")
        note = (f"warning: {exc}; using the previous checkpoint {str(previous)!r} ({where}) instead")
    check_expected(state, expect)
    return state, note


# ---------------------------------------------------------------- RNG states
def capture_rng(data_generator: torch.Generator | None = None) -> dict:
    """Every random state a step draws from: torch CPU / CUDA, NumPy, Python, data order."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "python": _python_state_to_tensors(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if data_generator is not None:
        state["data"] = data_generator.get_state()
    return state


def restore_rng(state: dict, data_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    random.setstate(_python_state_from_tensors(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # another machine: keep this process's device state, seeded from the saved one
            torch.cuda.set_rng_state(cuda_states[min(torch.cuda.current_device(), len(cuda_states) - 1)])
    if data_generator is not None and "data" in state:
        data_generator.set_state(state["data"])


# weights_only loading accepts tensors and plain containers, so the NumPy / Python states are
# stored as tensors instead of their native (pickled-object) form.
def _numpy_state_to_tensors(st):
    name, keys, pos, has_gauss, cached = st
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_tensors(d):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _python_state_to_tensors(st):
    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_from_tensors(d):
    return (d["version"], tuple(int(v) for v in d["internal"].tolist()), d["gauss"])
