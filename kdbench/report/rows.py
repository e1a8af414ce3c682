"""Result rows as a DataFrame (their columns are :class:`kdbench.sweep.columns.Col`).

Rows come from the results store (:class:`kdbench.sweep.store.ResultsStore`): one flat JSON
object per finished run, written by the sweep. Nothing here reads a run file itself.
"""

from __future__ import annotations

import math
import os

import pandas as pd

from ..errors import KdbenchError
from ..executors.base import OK
from ..files import warn
from ..sweep.columns import Col
from ..sweep.store import ResultsStore, bad_result

#: Two method names are part of the contract: ``teacher`` (rows of kind ``teacher``: the teacher
#: models themselves) and ``ce`` (the label-only baseline, one run of which serves every pair with
#: its student). Every other method is treated alike.
TEACHER = "teacher"
BASELINE = "ce"

#: Metrics (columns) a report can be built on, and how titles name them.
METRICS: dict[str, str] = {
    "top1_last": "top-1 at the last epoch",
    "top1_best": "top-1 at the best epoch on the test set (the DKD tables' rule)",
    "top5_last": "top-5 at the last epoch",
    "top5_best": "top-5 at the best epoch on the test set",
    # Runs whose recipe holds out a validation split (val_fraction); empty for the others.
    "top1_val_best": "top-1 at the epoch with the best validation top-1",
    "top5_val_best": "top-5 at the epoch with the best validation top-1",
    "agreement": "top-1 agreement with the teacher (or the teachers' ensemble) at the last epoch",
    # Derived from the stored test-set predictions (kdbench.report.derived), at the last epoch.
    "precision_macro": "macro precision at the last epoch",
    "recall_macro": "macro recall at the last epoch",
    "f1_macro": "macro F1 at the last epoch",
    "ece": "expected calibration error (15 bins) at the last epoch, lower is better",
    "nll": "test negative log-likelihood at the last epoch, lower is better",
    "kl_teacher": "KL(teacher ‖ student) at T = 1 on the test set, lower is better",
    "kl_teacher_t": "KL(teacher ‖ student) at the method's temperature on the test set, lower is better",
}
#: The unit of each metric where it is not % (a plot's axis says it).
UNITS: dict[str, str] = {"nll": "nats", "kl_teacher": "nats", "kl_teacher_t": "nats"}
#: The accuracies: what a sweep plot shows as test error, 100 − accuracy.
ACCURACIES = ("top1_last", "top1_best", "top5_last", "top5_best", "top1_val_best", "top5_val_best")


def unit(metric: str) -> str:
    """A metric's unit, '%' unless :data:`UNITS` says otherwise."""
    return UNITS.get(metric, "%")

#: Columns every row must have (the rest may be missing and show as blanks).
REQUIRED = (Col.RUN_ID, Col.KIND, Col.METHOD, Col.STUDENT, Col.DATASET, Col.SCHEDULE)
#: Columns read as text: a missing value becomes "".
TEXT_COLUMNS = (Col.RUN_ID, Col.KIND, Col.METHOD, Col.METHOD_PAPER, Col.TEACHERS, Col.STUDENT,
                Col.DATASET, Col.SCHEDULE, Col.THROUGHPUT_DEVICE, Col.THROUGHPUT_DTYPE, Col.DEVICE,
                Col.GIT_COMMIT, Col.COMMAND, Col.KDBENCH_VERSION, Col.TORCH_VERSION,
                Col.TIMM_VERSION, Col.FINISHED_AT)


def load_rows(results_dir: str | os.PathLike[str], *, finished_only: bool = True) -> pd.DataFrame:
    """Every readable row of the store in ``results_dir`` (sorted by file name), as one frame.

    A file damaged by a crash, or a row lacking a ``REQUIRED`` column, is reported (a warning)
    and skipped. With ``finished_only``, rows whose run did not finish cleanly (status
    "diverged") are left out: they have no accuracy to average. Raises KdbenchError when the
    store is missing or holds no readable row.
    """
    store = ResultsStore(results_dir)
    records = [r for r in store.rows() if _complete(r, store)]
    if not records:
        raise KdbenchError(f"no finished runs were found in {store.runs}; run `kdbench run` first")
    rows = pd.DataFrame.from_records(records)
    rows[Col.STATUS] = rows[Col.STATUS].fillna(OK).astype(str) if Col.STATUS in rows else OK
    if finished_only:
        rows = finished(rows, store.runs)
    for col in TEXT_COLUMNS:
        rows[col] = rows[col].fillna("").astype(str) if col in rows else ""
    if Col.SHORTENED not in rows:  # derive it for rows written before the column existed
        rows[Col.SHORTENED] = numeric(rows, Col.EPOCHS) < numeric(rows, Col.RECIPE_EPOCHS)
    rows[Col.SHORTENED] = rows[Col.SHORTENED].fillna(False).astype(bool)
    return rows


def _complete(row: dict, store: ResultsStore) -> bool:
    """True when ``row`` has every ``REQUIRED`` column and, if its run finished, a top1_last that is a
    number; else a warning naming its file."""
    path = store.row_path(str(row[Col.RUN_ID]))  # the store names each file by its run id
    missing = [c for c in REQUIRED if c not in row]
    why = f"lacks {', '.join(missing)}" if missing else bad_result(row)
    if why:
        warn(f"skipping run file {path}: it {why}; delete it, or re-run the sweep to redo that run")
    return not why


def finished(rows: pd.DataFrame, where: os.PathLike[str]) -> pd.DataFrame:
    """The rows of runs that finished with a result (not diverged)."""
    rows = rows[rows[Col.STATUS] == OK].reset_index(drop=True)
    if rows.empty:
        raise KdbenchError(f"no run in {where} finished with a result (every one diverged); see `status` and "
                           "`error` in its files")
    return rows


def numeric(rows: pd.DataFrame, col: str) -> pd.Series:
    """A column as floats (NaN where missing or not a number)."""
    if col not in rows:
        return pd.Series(math.nan, index=rows.index, dtype=float)
    return pd.to_numeric(rows[col], errors="coerce").astype(float)


def mean_of(rows: pd.DataFrame, col: str) -> float:
    """The mean of a numeric column (NaN for no rows)."""
    return float(numeric(rows, col).mean()) if len(rows) else math.nan


def is_teacher(rows: pd.DataFrame) -> pd.Series:
    """True for the rows of teacher models."""
    return rows[Col.KIND] == TEACHER


def distinct(rows: pd.DataFrame, col: str) -> list[str]:
    """The sorted non-empty values of a text column (none when it is missing)."""
    return sorted(set(rows[col]) - {""}) if col in rows else []


def method_key(name: str) -> tuple:
    """A sort key for method labels that orders swept settings by value: ``kd[temperature=2.0]`` before
    ``kd[temperature=12.0]`` (text order puts 12 first), then by the label itself."""
    base, _, rest = str(name).partition("[")
    values: list[tuple[int, float | str]] = []
    for part in rest.rstrip("]").split(","):
        value = part.partition("=")[2].strip()
        try:
            values.append((0, float(value)))
        except ValueError:
            values.append((1, value))
    return base, values, str(name)
