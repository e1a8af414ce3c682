"""The results store: one flat JSON row per finished run, written atomically.

Layout of a results folder::

    runs/<run_id>.json       one finished run (student or teacher), a flat row: it marks the run done
    teachers/<id>.pt         cached teacher weights, shared by every run of a sweep
    state/<run_id>/          a run in progress: checkpoint.pt (its last finished epoch), lock, error.txt
    report/...               tables and plots derived by `kdbench report`

A row file appears only when its run has finished (written to a temporary file, then renamed),
so an interrupted sweep leaves no half-written result and the next identical command resumes:
finished runs are skipped and an interrupted one continues from its last epoch checkpoint. Every
writer holds the run's lock (an ``fcntl`` lock, released by the kernel when a process dies), so
two sweeps or many workers sharing one folder never train or write the same run twice at once.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .. import distributed
from ..errors import KdbenchError
from ..executors.base import OK
from ..files import atomic_write_bytes, disk_error, warn
from .columns import Col


class Busy(Exception):
    """Another live process holds this run's lock (it is training it now)."""


def _clean(value: Any) -> Any:
    # JSON has no NaN; a missing measurement is null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_row_file(path: Path) -> dict[str, Any] | None:
    """A row file's contents, or None (with a warning naming it) when a crash left it damaged."""
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        warn(f"skipping damaged run file {path} ({type(exc).__name__}: {exc}); delete it, or re-run the sweep "
             "to redo that run")
        return None
    if not isinstance(row, dict) or "run_id" not in row:
        warn(f"skipping damaged run file {path} (not a run row); delete it, or re-run the sweep to redo that run")
        return None
    return row


def bad_result(row: dict[str, Any]) -> str:
    """Why a row that says its run finished (status ok) has no usable result ('' when it has one)."""
    if row.get(Col.STATUS, OK) != OK:
        return ""
    top1 = row.get(Col.TOP1_LAST)
    if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not math.isfinite(top1):
        return f"has status ok but top1_last {top1!r}, not a number"
    return ""


class ResultsStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.teachers = self.root / "teachers"
        self.state = self.root / "state"

    def row_path(self, run_id: str) -> Path:
        return self.runs / f"{run_id}.json"

    def has(self, run_id: str) -> bool:
        """True when the run's row exists and is readable; a damaged row counts as not done, and so does
        a row of a finished run (status ok) whose top1_last is not a number: it is run again."""
        path = self.row_path(run_id)
        row = read_row_file(path) if path.is_file() else None
        if row is not None and (why := bad_result(row)):
            warn(f"run file {path} {why}; that run counts as not done and is run again")
            return False
        return row is not None

    def read(self, run_id: str) -> dict[str, Any]:
        return json.loads(self.row_path(run_id).read_text())

    def write(self, row: dict[str, Any]) -> Path:
        path = self.row_path(row["run_id"])
        data = json.dumps({k: _clean(v) for k, v in row.items()}, indent=1, sort_keys=False)
        atomic_write_bytes(path, data.encode() + b"\n")
        return path

    def rows(self) -> list[dict[str, Any]]:
        """Every readable row; damaged files, and files not named <run_id>.json (a copy of a row would
        count as another seed), are reported by name and skipped."""
        files = sorted(p for p in self.runs.glob("*.json") if not p.name.startswith("."))
        rows = []
        for path, row in zip(files, map(read_row_file, files)):
            if row is not None and path.name != f"{row['run_id']}.json":
                warn(f"skipping run file {path}: it holds run {row['run_id']}, whose file is "
                     f"{row['run_id']}.json (a copy?); delete or rename it")
            elif row is not None:
                rows.append(row)
        return rows

    def teacher_path(self, teacher_id: str) -> Path:
        return self.teachers / f"{teacher_id}.pt"

    def predictions_path(self, run_id: str) -> Path:
        """A run's test-set predictions (:mod:`kdbench.predictions`), written before its row."""
        return self.root / "predictions" / f"{run_id}.pt"

    def cache_path(self, name: str) -> Path:
        """A teacher-output cache (:mod:`kdbench.train.teacher_cache`): derived data, safe to delete."""
        return self.root / "cache" / f"{name}.pt"

    # -- runs in progress -----------------------------------------------------------------
    def state_dir(self, run_id: str) -> Path:
        return self.state / run_id

    def checkpoint_path(self, run_id: str) -> Path:
        return self.state_dir(run_id) / "checkpoint.pt"

    def error_path(self, run_id: str) -> Path:
        return self.state_dir(run_id) / "error.txt"

    @contextmanager
    def lock(self, run_id: str, *, wait: bool) -> Iterator[None]:
        """Hold the run's lock; raise :class:`Busy` when another process holds it and ``wait`` is False."""
        path = self.state_dir(run_id) / "lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise disk_error(exc, path) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise Busy(run_id) from None
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextmanager
    def main_lock(self, run_id: str, *, wait: bool) -> Iterator[None]:
        """:meth:`lock`, taken by rank 0 alone under DDP (torchrun's ranks are one trainer).

        Every rank raises :class:`Busy` when rank 0 could not take it.
        """
        with ExitStack() as stack:
            got = True
            if distributed.is_main():
                try:
                    stack.enter_context(self.lock(run_id, wait=wait))
                except Busy:
                    got = False
            if not distributed.broadcast_object(got):
                raise Busy(run_id)
            yield

    def finish(self, run_id: str) -> None:
        """Drop a finished run's working state (its checkpoint): its row now stands for it."""
        shutil.rmtree(self.state_dir(run_id), ignore_errors=True)

    def record_error(self, run_id: str, text: str) -> Path:
        path = self.error_path(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def check_writable(self) -> None:
        """Fail before any training when the results folder cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # A file of this process's own: two sweeps starting at once must not delete each other's.
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".kdbench-write-test.")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise KdbenchError(f"results folder {self.root} is not writable ({exc.strerror or exc}); choose a "
                               "writable --results-dir (or set KDBENCH_RESULTS)") from None
