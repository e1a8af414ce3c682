"""Files written atomically: a reader sees the old file or the whole new one, never half of one."""

from __future__ import annotations

import errno
import io
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import DiskFull, KdbenchError

#: errno values that mean "no room to write": the sweep stops instead of failing run after run.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, sync it, then rename it into place.

    Readers see the old file or the whole new one, never a half-written one; an exception (or
    Ctrl-C) removes the temporary file. A full disk becomes :class:`DiskFull`, naming the file.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise disk_error(exc, path) from exc
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise disk_error(exc, path) from exc
        raise
    return path


def atomic_torch_save(path: Path, obj: object) -> Path:
    """``torch.save`` through :func:`atomic_write`. Serialised in memory first: torch's zip writer
    turns a failed write into a RuntimeError without the errno, the file write keeps it."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getbuffer())


def disk_error(exc: OSError, path: Path) -> BaseException:
    if exc.errno in _NO_SPACE:
        return DiskFull(f"disk full while writing {path} ({os.strerror(exc.errno)}); free space and re-run the same "
                        "command: finished runs are kept and an interrupted run resumes from its last epoch checkpoint")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return KdbenchError(f"cannot write {path}: {os.strerror(exc.errno)}; choose a writable --results-dir")
    return exc


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def warn(message: str) -> None:
    print(f"kdbench: warning: {message}", file=sys.stderr)


def output_folder(path: Path, what: str) -> Path:
    """``path`` when it can be a folder to write into: an error when it, or a folder above it, is a file."""
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise KdbenchError(f"{what} {path}: {p} is an existing file, not a folder; give a folder (a new one is "
                               "created), or move the file away")
    return path
