"""Decoded ImageFolder sets kept on disk, so a re-run loads uint8 tensors instead of decoding every image again.

An entry is keyed by the folder, the resolution, the ``--limit`` and every image's path, modification time and size:
an edited, added or removed image is a new entry, never a stale one. The folder is ``$KDBENCH_DECODE_CACHE``, else
``$XDG_CACHE_HOME/kdbench/decoded`` (``~/.cache/kdbench/decoded``); ``KDBENCH_DECODE_CACHE=off`` turns it off.
Entries are written atomically and are safe to delete.

Under torchrun only rank 0 decodes: the other ranks wait for its entry (a marker file says it is being built) and
load it, rather than each decoding the whole set. They poll the file system, not a collective, since decoding can
outlast any process-group timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import KdbenchError
from ..files import atomic_torch_save
from .resolution import Resolution

OFF = "off"
#: How often a waiting rank looks for rank 0's entry, and how long rank 0 may take to start decoding, in seconds
#: (it lists and stats the folder first).
POLL_S = 2.0
START_S = 600.0


def cache_dir() -> Path | None:
    """Where entries live; None when turned off."""
    given = os.environ.get("KDBENCH_DECODE_CACHE", "")
    if given.lower() == OFF:
        return None
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kdbench" / "decoded"


def entry_key(root: Path, res: Resolution, limit: int | None, files: Sequence[str]) -> str:
    """The entry's name: a hash of the folder, the resolution, the limit and each file's path, mtime and size."""
    h = hashlib.sha256(json.dumps([str(root), res.size, res.crop_pct, res.interpolation, limit]).encode())
    for name in files:
        st = os.stat(name)
        h.update(f"\0{name}\0{st.st_mtime_ns}\0{st.st_size}".encode())
    return h.hexdigest()[:24]


def load_or_decode(key: str, decode: Callable[[], dict[str, Any]], *, what: str) -> dict[str, Any]:
    """The entry ``key``, decoded by ``decode()`` and stored when missing (by rank 0 alone under torchrun)."""
    folder = cache_dir()
    if folder is None:
        return decode()
    path = folder / f"{key}.pt"
    rank = int(os.environ.get("RANK", "0")) if os.environ.get("WORLD_SIZE", "1") != "1" else 0
    if rank and not path.is_file():
        _wait_for(path, what)
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except (RuntimeError, OSError, EOFError):  # a damaged entry: decoded again (below) and replaced
            pass
    marker = path.with_suffix(".building")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{os.getpid()}\n")
    except OSError:
        return decode()  # an unwritable cache folder costs a decode, nothing else
    try:
        data = decode()
        try:
            atomic_torch_save(path, data)
        except OSError as exc:
            print(f"kdbench: warning: the decoded images of {what} could not be kept in {folder} ({exc}); the "
                  "next run decodes them again", file=sys.stderr)
        return data
    finally:
        marker.unlink(missing_ok=True)


def _wait_for(path: Path, what: str) -> None:
    """A rank other than 0 waits while rank 0 decodes; an error if rank 0 stopped without writing the entry."""
    marker = path.with_suffix(".building")
    deadline = time.monotonic() + START_S
    while not path.is_file():
        if not marker.is_file() and time.monotonic() > deadline:
            raise KdbenchError(f"rank {os.environ.get('RANK')} waited {START_S:g} s for rank 0 to decode {what} into "
                               f"{path}, but rank 0 is not decoding it (no marker file): check rank 0's error, then "
                               "re-run")
        time.sleep(POLL_S)
