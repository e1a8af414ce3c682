"""Reading a suite's published numbers: the CSV files its ``[reproduce]`` section names.

Each line is one cell of a paper's table (:class:`kdbench.report.reproduce.Cell`), with the source it was
read from; :func:`read_published` keeps the cells of the suite's tables and pairs.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from typing import Any

from .errors import KdbenchError
from .suites import Suite

#: A published CSV's value columns: top-1 %, a count of test errors, or test errors in percent.
_VALUE_COLUMNS = ("top1", "test_errors", "test_error_pct")


def _measured_on(rec: Mapping[str, str], where: str) -> dict[str, Any]:
    """The optional columns saying what a cell was measured on: the student's transfer set (its label,
    e.g. 'without 3'), a bias adjustment ('given' offsets, or 'val': searched on held-out images) and
    one class's test images only (``of_class``: e.g. the errors on the 3s)."""
    bias = (rec.get("bias") or "").strip()
    if bias not in ("", "given", "val"):
        raise KdbenchError(f"{where}: bias must be empty, 'given' or 'val', got '{bias}'")
    of_class = (rec.get("of_class") or "").strip()
    if of_class and not of_class.isdigit():
        raise KdbenchError(f"{where}: of_class must be a class index (e.g. 3), got '{of_class}'")
    return {"transfer": (rec.get("transfer") or "").strip(), "bias": bias,
            "of_class": int(of_class) if of_class else None}


def read_published(suite: Suite, model_name: Any) -> list[dict[str, Any]]:
    """The published cells of a suite's pairs, as dicts for ``kdbench.report.reproduce.Cell``.

    ``model_name`` maps a paper's model name to a timm name (``kdbench.models.timm_name``).
    A CSV has columns table, teacher, student, method, a value column (``top1``, ``test_errors`` or
    ``test_error_pct``), selection (``last_epoch``/``best_epoch``) and source, plus optional
    ``note``, ``transfer``, ``bias`` and ``of_class`` (see :func:`_measured_on`).
    """
    if suite.reproduce is None:
        return []
    rep = suite.reproduce
    names = dict(rep.method_names)
    wanted = {(p.teachers, p.student) for p in suite.pairs}
    cells = []
    for path in rep.published:
        with open(path, newline="", encoding="utf-8") as f:
            for i, rec in enumerate(csv.DictReader(f), start=2):
                where = f"{path}, line {i}"
                if rep.tables and rec.get("table", "") not in rep.tables:
                    continue
                metric = next((m for m in _VALUE_COLUMNS if rec.get(m)), "")
                if not metric:
                    raise KdbenchError(f"{where}: needs a value in one of the columns {', '.join(_VALUE_COLUMNS)}")
                if rec[metric].strip().upper() == "N/A":
                    continue  # the paper reports no number for this cell (e.g. FSP on wrn_40_1)
                teachers = tuple(model_name(t) for t in rec["teacher"].split("+"))
                student = model_name(rec["student"])
                if (teachers, student) not in wanted:
                    continue
                selection = rec["selection"].removesuffix("_epoch")
                if selection not in ("last", "best"):
                    raise KdbenchError(f"{where}: selection must be last_epoch or best_epoch, got "
                                       f"'{rec['selection']}'")
                try:
                    value = float(rec[metric])
                except ValueError:
                    raise KdbenchError(f"{where}: {metric} '{rec[metric]}' is not a number (or N/A)") from None
                cells.append(dict(
                    teachers=teachers, student=student, method=names.get(rec["method"], rec["method"]),
                    paper_method=rec["method"], metric=metric, value=value, selection=selection,
                    source=rec["source"], table=rec.get("table", ""), note=rec.get("note", "") or "",
                    **_measured_on(rec, where),
                ))
    return cells
