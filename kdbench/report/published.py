"""A paper's published number (:class:`Cell`) and the words a comparison with it uses.

Shared by the comparison (:mod:`kdbench.report.reproduce`) and its markdown and plot.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..suites import pair_label
from .markdown import fmt

#: What a cell may report: top-1 (percent) or the count of misclassified test images.
METRICS = ("top1", "test_errors", "test_error_pct")
METRIC_NAME = {"top1": "top-1 %", "test_errors": "test errors", "test_error_pct": "test error %"}
#: Metrics where fewer is better.
ERROR_METRICS = ("test_errors", "test_error_pct")
#: Which epoch's accuracy a cell reports: the last; the best over training, chosen on the test set (the
#: DKD tables' rule); or the one with the best validation top-1 (runs whose recipe has a val_fraction).
SELECTIONS = ("last", "best", "val_best")
RULE_NAME = {"last": "last epoch", "best": "best epoch", "val_best": "best validation epoch"}
OTHER_RULE = {"last": "best", "best": "last", "val_best": "best"}

#: Verdicts: within / outside the tolerance; ``not run`` (no kdbench run matches the cell, also
#: when kdbench has no such method); ``not real data`` (the runs used synthetic stand-in images:
#: no verdict on a reproduction is given).
WITHIN, OUTSIDE, NOT_RUN, NOT_REAL = "within", "outside", "not run", "not real data"


@dataclass(frozen=True)
class Cell:
    """One published number."""

    teachers: tuple[str, ...]  # timm model names of the pair's teacher(s)
    student: str  # timm model name of the pair's student
    method: str  # kdbench method name, "teacher", "ce", or a paper method kdbench lacks
    paper_method: str  # the paper's own name for it ("fitnet", "student_ce", ...)
    metric: str  # "top1" (percent) or "test_errors" (count of misclassified test images)
    value: float
    selection: str  # "last" (last-epoch accuracy), "best" (best epoch on the test set) or "val_best"
    source: str  # citation, e.g. "CRD (Tian et al., ICLR 2020) Table 1"
    table: str = ""  # which paper table, e.g. "1"; may be ""
    note: str = ""  # e.g. "mean of 5 runs"
    transfer: str = ""  # the student's transfer set, by its label ("without 3"); "" = the training set
    bias: str = ""  # "" (as trained), "given" (the suite's bias offsets), "val" (offsets searched on held-out images)
    of_class: int | None = None  # count only the test images of this class (errors on the 3s)

    @property
    def measured_on(self) -> str:
        """What besides the pair the cell is about: 'transfer without 3 · bias given · on class 3'."""
        parts = [f"transfer {self.transfer}" if self.transfer else "",
                 {"given": "bias offsets given", "val": "bias searched on held-out images"}.get(self.bias, ""),
                 f"on class {self.of_class}" if self.of_class is not None else ""]
        return " · ".join(p for p in parts if p)

    @property
    def pair(self) -> str:
        """'teacher+teacher→student', the store's spelling of a pair."""
        return pair_label(self.teachers, self.student)


def fmt_value(x: float, metric: str) -> str:
    """Top-1 with two decimals; an error count as a whole number unless a mean of seeds isn't."""
    if pd.isna(x):
        return "—"
    if metric == "test_errors":
        return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"
    if metric == "test_error_pct":
        return f"{x:.1f}%"
    return fmt(x)


def fmt_delta(x: float, metric: str) -> str:
    """A difference with its sign: '+0.60', '-3'."""
    return "—" if pd.isna(x) else ("+" if x > 0 else "") + fmt_value(x, metric)


def rule_text(selections: set[str]) -> str:
    """The name of the one selection rule in ``selections``; '' when they mix rules."""
    return RULE_NAME[next(iter(selections))] if len(selections) == 1 else ""


def is_shortened(schedule: object) -> bool:
    """True for the schedule label of a shortened run."""
    # aggregate.schedule_label() always puts "shortened" into the label of a shortened run.
    return "shortened" in str(schedule).lower()


def table_heading(table_name: str) -> str:
    """How a paper table is named: '1' -> 'Table 1'; no name -> 'Published cells'."""
    if not table_name:
        return "Published cells"
    return table_name if table_name.lower().startswith("table") else f"Table {table_name}"
