"""The results store: one flat JSON row per finished run, written atomically.

Layout of a results folder::

    runs/<run_id>.json       one finished run (student or teacher), a flat row
    teachers/<id>.pt         cached teacher weights, shared by every run of a sweep
    report/...               tables and plots derived by `kdbench report`

A row file appears only when its run has finished (written to a temporary file, then renamed),
so an interrupted sweep leaves no half-written result and the next identical command resumes.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, sync it, then rename it into place.

    Readers see the old file or the whole new one, never a half-written one; an exception (or
    Ctrl-C) removes the temporary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _clean(value: Any) -> Any:
    # JSON has no NaN; a missing measurement is null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ResultsStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.teachers = self.root / "teachers"

    def row_path(self, run_id: str) -> Path:
        return self.runs / f"{run_id}.json"

    def has(self, run_id: str) -> bool:
        return self.row_path(run_id).is_file()

    def read(self, run_id: str) -> dict[str, Any]:
        return json.loads(self.row_path(run_id).read_text())

    def write(self, row: dict[str, Any]) -> Path:
        path = self.row_path(row["run_id"])
        data = json.dumps({k: _clean(v) for k, v in row.items()}, indent=1, sort_keys=False)
        atomic_write_bytes(path, data.encode() + b"\n")
        return path

    def rows(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.runs.glob("*.json"))]

    def teacher_path(self, teacher_id: str) -> Path:
        return self.teachers / f"{teacher_id}.pt"
