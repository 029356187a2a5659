"""Writing files that a killed or failing run never leaves half-written.

Every file the package writes (checkpoints, config / split / cluster / state JSON, reports,
plots, metrics) goes through :func:`atomic_write`: the bytes go to a temporary file in the same
folder, are fsynced, and the temporary file is renamed over the target (atomic on POSIX). On any
error the temporary file is removed and the previous version of the target stays as it was. An
``OSError`` (a full disk, a read-only folder, a missing permission) is re-raised as
:class:`WriteError`, one line that names the path and what was being written.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

__all__ = ["WriteError", "atomic_write", "write_json", "write_text"]

_REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted"}


class WriteError(OSError):
    """A file could not be written; the previous version (if any) is unchanged."""

    def __init__(self, path, what: str, cause: OSError):
        reason = _REASONS.get(cause.errno, cause.strerror or type(cause).__name__)
        super().__init__(cause.errno, f"could not write {what} to {str(path)!r}: {reason}; the previous "
                                      f"version (if any) was kept")
        self.path, self.what, self.cause = Path(path), what, cause

    def __str__(self):
        return self.strerror


Payload = Union[bytes, str, Callable]


def atomic_write(path, payload: Payload, *, what: str = "a file") -> Path:
    """Write ``payload`` to ``path`` atomically and durably.

    payload: bytes, str (UTF-8) or a callable ``f(binary_file)`` that writes the content (e.g.
             ``lambda f: torch.save(obj, f)``).
    what:    a few words for the error message ("the checkpoint", "split.json").
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            if callable(payload):
                payload(f)
            else:
                f.write(payload.encode() if isinstance(payload, str) else payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise WriteError(path, what, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


def write_text(path, text: str, *, what: str = "a file") -> Path:
    return atomic_write(path, text, what=what)


def write_json(path, obj, *, what: str | None = None, indent: int | None = 1) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent), what=what or Path(path).name)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk; some file systems refuse.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
