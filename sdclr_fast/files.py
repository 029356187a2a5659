"""Writing files that a killed or failing run never leaves half-written, and the lock that
keeps two processes out of one run directory.

Every file the package writes (checkpoints, config / split / cluster / state JSON, reports,
plots, metrics) goes through :func:`atomic_write`: the bytes go to a temporary file in the same
folder, are fsynced, and the temporary file is renamed over the target (atomic on POSIX). On any
error the temporary file is removed and the previous version of the target stays as it was. An
``OSError`` (a full disk, a read-only folder, a missing permission) is re-raised as
:class:`WriteError`, one line that names the path and what was being written.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Union

__all__ = ["WriteError", "atomic_write", "write_json", "write_text", "link_or_copy", "remove_debris", "LOCK_NAME",
           "DirectoryLockedError", "lock_directory"]

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

    payload: bytes (or a buffer), str (UTF-8) or a callable ``f(binary_file)`` that writes the
             content (e.g. ``lambda f: fig.savefig(f, format="png")``).
    what:    a few words for the error message ("the checkpoint", "split.json").
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; results are shared as the umask says
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


def _umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it; put it back at once
    os.umask(mask)
    return mask


def remove_debris(folder) -> list:
    """Remove the temporary files a killed or failed write left in ``folder`` (``.<name>.*.tmp`` of
    :func:`atomic_write`, ``.<name>.tmp`` of :func:`link_or_copy`); call it only while holding the
    folder's lock. Returns the paths removed."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file():
            p.unlink()
            removed.append(p)
    return removed


def write_text(path, text: str, *, what: str = "a file") -> Path:
    return atomic_write(path, text, what=what)


def write_json(path, obj, *, what: str | None = None, indent: int | None = 1) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent), what=what or Path(path).name)


def read_json(path, *, what: str, formats=None) -> dict:
    """The JSON object stored in ``path``, a ``{"format": ...}`` one of ``formats`` where given.
    Anything else (a missing, unreadable or damaged file, another kind of JSON) raises one
    ValueError that names the file and ``what`` it should have been ("a DnC state file")."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable {what}: {exc}") from None
    if not isinstance(obj, dict) or (formats is not None and obj.get("format") not in formats):
        expected = "" if formats is None else f" of format {' or '.join(map(str, formats))}"
        raise ValueError(f"{str(path)!r} is not a {what}{expected}")
    return obj


def link_or_copy(src, dst, *, what: str = "a file") -> Path:
    """Make ``dst`` the same file as ``src`` atomically: a hard link (a copy where the file system
    has none) under a temporary name, renamed over ``dst``."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as exc:
        if tmp.exists():
            tmp.unlink()
        raise WriteError(dst, what, exc) from exc
    return dst


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


# ---------------------------------------------------------------- run-directory lock
LOCK_NAME = ".lock"
_HELD: dict = {}  # resolved directory -> [open lock file, depth]: re-entrant within a process


class DirectoryLockedError(RuntimeError):
    """Another live process holds the lock of this directory."""


class lock_directory:
    """An advisory ``fcntl`` lock on ``folder/.lock`` for the life of a run.

    The kernel drops the lock when the holding process dies, however it dies, so a killed run
    never leaves a stale lock. A second process gets :class:`DirectoryLockedError` at once
    (naming the holder's pid and host, read from the lock file) and nothing in the folder is
    changed. Nested use in one process (DnC's orchestrator around its stages) is allowed.
    ``enabled=False`` (ranks other than 0 under torchrun) makes it a no-op.
    """

    def __init__(self, folder, *, enabled: bool = True, what: str = "run directory"):
        self.folder, self.enabled, self.what = Path(folder), enabled, what
        self.key = None

    def __enter__(self):
        if not self.enabled:
            return self
        key = str(self.folder.resolve())
        if key in _HELD:
            _HELD[key][1] += 1
            self.key = key
            return self
        path = self.folder / LOCK_NAME
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.what} {str(self.folder)!r} is a file, not a directory; choose "
                                     f"another directory")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise WriteError(path, f"the lock of the {self.what}", exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WriteError(path, f"the lock of the {self.what}", exc) from exc
            raise DirectoryLockedError(f"{self.what} {str(self.folder)!r} is in use by {holder} (lock file "
                                       f"{str(path)!r}); wait for that run to end or choose another "
                                       f"directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        _HELD[key] = [fd, 1]
        self.key = key
        return self

    def __exit__(self, *exc):
        if self.key is None:
            return False
        entry = _HELD[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self.key]
            os.close(entry[0])  # releases the flock; the file stays (removing it would race a waiter)
        self.key = None
        return False
