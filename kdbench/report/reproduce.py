"""Compare kdbench's numbers with a paper's published ones (``kdbench reproduce``).

Given the result rows of one reproduction and the published cells of its paper(s), build one
line per published cell: the paper's number, kdbench's mean ± std over seeds at the *same*
selection rule (last or best epoch), the mean at the other rule beside it, the gap Δ and a
verdict (:mod:`kdbench.report.published`). Then write it as::

    reproduce_<slug>.md               one markdown table per paper table, warnings, summary
    reproduce_<slug>.csv              the comparison table as is
    published_vs_kdbench_<slug>.png   published (x) against kdbench (y), y = x and its band
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import KdbenchError
from ..suites import Tolerance
from .aggregate import Stat, schedule_label, slugify
from .markdown import write_text
from .published import (
    ERROR_METRICS,
    METRIC_NAME,
    METRICS,
    NOT_REAL,
    NOT_RUN,
    OTHER_RULE,
    OUTSIDE,
    RULE_NAME,
    SELECTIONS,
    WITHIN,
    Cell,
    fmt_value,
    rule_text,
)
from .reproduce_markdown import reproduction_markdown
from .reproduce_plot import plot_reproduction
from .rows import BASELINE, TEACHER, Col, numeric

#: The comparison table's columns, in order.
COLUMNS = ("table", "pair", "method", "paper_method", "measured_on", "metric", "selection", "published",
           "kdbench", "kdbench_std", "other_rule", "other_rule_name", "seeds", "delta",
           "tolerance", "verdict", "schedule", "real_data", "source", "note")

# |Δ| is compared with the tolerance after float subtraction (70.73 - 70.23 = 0.5000000000000071):
# a gap that equals the tolerance in the printed digits must count as within.
_EPS = 1e-9


# -- the comparison -----------------------------------------------------------------------------
def compare(rows: pd.DataFrame, cells: Sequence[Cell], tolerance: Tolerance) -> pd.DataFrame:
    """One line per published cell, with kdbench's matching runs aggregated beside it.

    Args:
        rows: result rows as from ``kdbench.report.load_rows``, already filtered to the runs of
            this reproduction (one run per seed and cell).
        cells: the published cells, in the order the lines should have.
        tolerance: the rule for the within/outside verdict.

    Returns:
        A frame with the columns ``COLUMNS``; ``attrs["tolerance"]`` holds ``tolerance``.

    Raises:
        KdbenchError: a cell with an unknown metric or selection rule, or runs that cannot be
            aggregated (several runs of one seed, missing accuracy or test size).
    """
    rows = _normalised(rows)
    lines = [_line(rows, cell, tolerance) for cell in cells]
    table = pd.DataFrame(lines, columns=list(COLUMNS))
    table.attrs["tolerance"] = tolerance
    return table


def _normalised(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with the optional columns compare() reads filled in."""
    missing = [c for c in (Col.KIND, Col.METHOD, Col.STUDENT) if c not in rows]
    if missing:
        raise KdbenchError(f"the result rows lack the column(s) {', '.join(missing)}; pass rows "
                           "as returned by kdbench.report.load_rows")
    rows = rows.copy()
    # Rows written before a column existed: no teachers, full schedule, real data.
    # No method_variant: no variant (rows from before the column existed, or methods that declare none).
    defaults = {Col.TEACHERS: "", Col.SCHEDULE: "", Col.SHORTENED: False, Col.REAL_DATA: True, Col.TRANSFER: "",
                Col.METHOD_VARIANT: ""}
    for col, default in defaults.items():
        rows[col] = rows[col].where(rows[col].notna(), default) if col in rows else default
    for col, kind in ((Col.TEACHERS, str), (Col.SCHEDULE, str), (Col.SHORTENED, bool), (Col.REAL_DATA, bool),
                      (Col.TRANSFER, str), (Col.METHOD_VARIANT, str)):
        rows[col] = rows[col].astype(kind)
    return rows


def method_and_variant(method: str) -> tuple[str, str]:
    """A cell's method as (kdbench method, variant tag): 'kd+ls' -> ('kd', 'ls'), 'kd' -> ('kd', '').

    The tag is what ``Method.variant()`` returns for the runs (their ``method_variant`` column), so
    tables label them 'kd+ls'; a suite maps a paper's name to such a label in ``method_names``.
    """
    base, _, variant = method.partition("+")
    return base, variant


def matching_rows(rows: pd.DataFrame, cell: Cell) -> pd.DataFrame:
    """The runs a cell is compared with (a teacher or ce run may serve several pairs' cells).

    A cell of 'kd+ls' matches kd runs whose ``method_variant`` is 'ls'; a cell of plain 'kd' only kd
    runs without a variant (rows without the column have none).
    """
    teacher = rows[Col.KIND] == TEACHER
    if cell.method == TEACHER:
        if len(cell.teachers) != 1:
            raise KdbenchError(f"the teacher cell of {cell.pair} ({cell.source}) names "
                               f"{len(cell.teachers)} teachers; give one cell per teacher")
        return rows[teacher & (rows[Col.STUDENT] == cell.teachers[0])]
    method, variant = method_and_variant(cell.method)
    variants = (rows[Col.METHOD_VARIANT].where(rows[Col.METHOD_VARIANT].notna(), "").astype(str)
                if Col.METHOD_VARIANT in rows else pd.Series("", index=rows.index))
    mask = ~teacher & (rows[Col.METHOD] == method) & (variants == variant) & (rows[Col.STUDENT] == cell.student)
    if cell.method != BASELINE:  # ce runs serve every pair with their student
        mask &= rows[Col.TEACHERS] == "+".join(cell.teachers)
    return rows[mask & (rows[Col.TRANSFER] == cell.transfer)]


def _line(rows: pd.DataFrame, cell: Cell, tolerance: Tolerance) -> dict:
    """The comparison line of one cell."""
    _check_cell(cell)
    runs = matching_rows(rows, cell)
    other = OTHER_RULE[cell.selection]
    line = {
        "table": cell.table, "pair": cell.pair, "method": cell.method, "paper_method": cell.paper_method,
        "measured_on": cell.measured_on, "metric": cell.metric, "selection": cell.selection,
        "published": float(cell.value), "kdbench": math.nan, "kdbench_std": math.nan,
        "other_rule": math.nan, "other_rule_name": RULE_NAME[other], "seeds": 0,
        "delta": math.nan, "tolerance": math.nan, "verdict": NOT_RUN, "schedule": "",
        "real_data": None, "source": cell.source, "note": cell.note,
    }
    if runs.empty:
        return line
    _check_runs(runs, cell)
    stat = Stat.of(_values(runs, cell, cell.selection))
    if stat.n == 0:
        raise KdbenchError(f"the runs of {cell.method} on {cell.pair} record no "
                           f"{Col.top1(cell.selection)} ({_run_ids(runs)}); re-run them or delete their run "
                           "files")
    real = bool(runs[Col.REAL_DATA].all())
    allowed = tolerance.allowed(cell.metric, cell.value, stat.std)
    delta = stat.mean - cell.value
    line.update(
        kdbench=stat.mean, kdbench_std=stat.std, seeds=stat.n,
        other_rule=Stat.of(_values(runs, cell, other)).mean, delta=delta, tolerance=allowed,
        verdict=NOT_REAL if not real else WITHIN if abs(delta) <= allowed + _EPS else OUTSIDE,
        schedule="; ".join(schedule_label(g) for _, g in runs.groupby(Col.SCHEDULE, sort=True)),
        real_data=real,
    )
    return line


def _check_cell(cell: Cell) -> None:
    if cell.metric not in METRICS:
        raise KdbenchError(f"published cell {cell.method} on {cell.pair} ({cell.source}) has the "
                           f"metric '{cell.metric}'; use one of {', '.join(METRICS)}")
    if cell.selection not in SELECTIONS:
        raise KdbenchError(f"published cell {cell.method} on {cell.pair} ({cell.source}) has the "
                           f"selection rule '{cell.selection}'; use one of {', '.join(SELECTIONS)}")
    if cell.metric == "top1" and (cell.bias or cell.of_class is not None):
        raise KdbenchError(f"published cell {cell.method} on {cell.pair} ({cell.source}): a bias-adjusted or "
                           "one-class cell is a count or percent of test errors; give test_errors or test_error_pct")


def _check_runs(runs: pd.DataFrame, cell: Cell) -> None:
    """Refuse runs that are not seeds of one experiment: their mean would be no published cell's."""
    if Col.SEED in runs:
        seeds = runs[Col.SEED].dropna()
        if seeds.duplicated().any():
            raise KdbenchError(
                f"{len(runs)} runs of {cell.method} on {cell.pair} share a seed "
                f"({_run_ids(runs)}); pass compare() one run per seed (filter the rows to one "
                "schedule and hyperparameter setting)")
    if Col.HPARAMS in runs:
        settings = {h for h in runs[Col.HPARAMS].dropna() if h not in ("", "{}")}
        if len(settings) > 1:
            raise KdbenchError(
                f"the runs of {cell.method} on {cell.pair} use {len(settings)} hyperparameter "
                f"settings ({_run_ids(runs)}); filter the rows to the paper's setting")


def _run_ids(runs: pd.DataFrame) -> str:
    return ", ".join(map(str, runs[Col.RUN_ID])) if Col.RUN_ID in runs else f"{len(runs)} rows"


def _values(runs: pd.DataFrame, cell: Cell, selection: str) -> pd.Series:
    """Per run, the cell's metric at ``selection``: top-1 %, the count of test errors, or their percent.

    A cell with a bias adjustment or on one class's images reads the counts the run measured on its
    last epoch's predictions (the bias is an offset on those logits): at the best epoch it has none.
    """
    if cell.bias or cell.of_class is not None:
        if selection != "last":
            return pd.Series(math.nan, index=runs.index)
        suffix = f"_bias_{cell.bias}" if cell.bias else ""
        column = f"{Col.CLASS_ERRORS}{suffix}.{cell.of_class}" if cell.of_class is not None \
            else f"{Col.TEST_ERRORS}{suffix}"
        errors = numeric(runs, column)
        if errors.isna().any():
            raise KdbenchError(f"the runs of {cell.method} on {cell.pair} ({cell.measured_on}) record no "
                               f"{column} ({_run_ids(runs)}); set the pair's bias in the suite and re-run them")
        return errors if cell.metric == "test_errors" else 100.0 * errors / _test_size(runs, cell)
    top1 = numeric(runs, Col.top1(selection))
    if cell.metric == "top1":
        return top1
    if cell.metric == "test_error_pct":
        return 100.0 - top1
    # Accuracy is a rounded percentage of a whole number of images: round back to that count.
    return np.round((100.0 - top1) * _test_size(runs, cell) / 100.0)


def _test_size(runs: pd.DataFrame, cell: Cell) -> pd.Series:
    size = numeric(runs, Col.TEST_SIZE)
    if size.isna().any():
        raise KdbenchError(f"the runs of {cell.method} on {cell.pair} do not record test_size "
                           f"({_run_ids(runs)}), which the test-error count needs; re-run them "
                           "with this kdbench")
    return size


# -- the ordering check -------------------------------------------------------------------------
def check_ordering(table: pd.DataFrame, ordering: Sequence[str]) -> list[str]:
    """Per pair, whether kdbench's means rank ``ordering``'s methods from best to worst.

    Higher top-1 is better, fewer test errors are better; a tie does not hold. Pairs where a
    method of ``ordering`` has no kdbench value are skipped.

    Returns:
        One line per pair, e.g. 'a→b: teacher 67 < kd 80 < ce 146 test errors — holds'.
    """
    if len(ordering) < 2:
        return []
    out = []
    # The paper's order is about models on the full training set, as trained: not about transfer
    # sets, bias offsets or one class's errors.
    if "measured_on" in table:
        table = table[table["measured_on"].fillna("") == ""]
    for (pair, metric), group in table.groupby(["pair", "metric"], sort=False):
        means = group.drop_duplicates("method").set_index("method")["kdbench"]
        if any(m not in means or pd.isna(means[m]) for m in ordering):
            continue
        values = [float(means[m]) for m in ordering]
        better = (lambda a, b: a < b) if metric in ERROR_METRICS else (lambda a, b: a > b)
        holds = all(better(a, b) for a, b in pairwise(values))
        text = f"{ordering[0]} {fmt_value(values[0], metric)}"
        for method, prev, value in zip(ordering[1:], values, values[1:]):
            sign = "<" if prev < value else ">" if prev > value else "="
            text += f" {sign} {method} {fmt_value(value, metric)}"
        rows = group[group["method"].isin(ordering)]
        # Each mean is at its own cell's rule: a pair's cells normally share one.
        rule = rule_text(set(rows["selection"])) or "each cell's rule"
        unit = METRIC_NAME[metric] if metric in ERROR_METRICS else f"top-1 % ({rule})"
        synthetic = " (not real data)" if (rows["verdict"] == NOT_REAL).any() else ""
        out.append(f"{pair}: {text} {unit} — {'holds' if holds else 'does not hold'}{synthetic}")
    return out


# -- writing ------------------------------------------------------------------------------------
def write_reproduction(table: pd.DataFrame, out_dir: Path, *, suite: str, title: str,
                       ordering_lines: Sequence[str] = (), extra_notes: Sequence[str] = (),
                       tolerance: Tolerance | None = None, sections: Sequence[str] = ()) -> list[Path]:
    """Write the markdown, CSV and plot of one reproduction; return the written paths.

    Args:
        table: the frame from ``compare``.
        out_dir: the folder to write into (created if missing).
        suite: the suite's name; the file names carry its slug.
        title: the report's title (naming schedule and data).
        ordering_lines: lines from ``check_ordering``.
        extra_notes: further lines for the notes section.
        tolerance: the rule the verdicts used; defaults to the one ``compare`` stored in
            ``table.attrs``, else ``Tolerance()``.
        sections: further markdown lines, after the tables (e.g. per-class errors of transfer sets).

    Returns:
        The markdown, CSV and (when any cell has a kdbench value) PNG paths.
    """
    if tolerance is None:
        tolerance = table.attrs.get("tolerance") or Tolerance()
    out = Path(out_dir)
    slug = slugify(suite)
    png = plot_reproduction(table, out / f"published_vs_kdbench_{slug}.png", title=title, tolerance=tolerance)
    csv = write_text(out / f"reproduce_{slug}.csv", table.to_csv(index=False))
    md = write_text(out / f"reproduce_{slug}.md",
                    reproduction_markdown(table, title=title, tolerance=tolerance,
                                          ordering_lines=ordering_lines, extra_notes=extra_notes, plot=png,
                                          sections=sections))
    return [md, csv] + ([png] if png is not None else [])


__all__ = ["COLUMNS", "Cell", "check_ordering", "compare", "matching_rows", "method_and_variant",
           "write_reproduction"]
