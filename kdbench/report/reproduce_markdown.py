"""``reproduce_<slug>.md``: a comparison table (from ``reproduce.compare``) as markdown.

Warnings first (synthetic data, shortened schedule), then the summary, a legend of the columns,
one table per paper table, the cells of methods not run, the ordering check and notes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..suites import Tolerance
from .markdown import fmt, md_escape, md_table
from .published import (
    METRIC_NAME,
    NOT_REAL,
    NOT_RUN,
    OTHER_RULE,
    OUTSIDE,
    RULE_NAME,
    WITHIN,
    fmt_delta,
    fmt_value,
    is_shortened,
    rule_text,
    table_heading,
)
from .rows import BASELINE, TEACHER

NOT_REAL_WARNING = ("**kdbench column: NOT REAL DATA** (synthetic stand-in images; a check that "
                    "the suite runs end to end, not a reproduction)")


def unimplemented(table: pd.DataFrame) -> dict[str, int]:
    """Methods with published cells but no kdbench value anywhere in ``table``, with their count.

    Teacher and ce are never counted: kdbench always has them, so their absence is a missing run.
    """
    counts: dict[str, int] = {}
    for method, group in table.groupby("method", sort=False):
        if method not in (TEACHER, BASELINE) and (group["verdict"] == NOT_RUN).all():
            counts[str(method)] = len(group)
    return counts


def summary(table: pd.DataFrame) -> str:
    """'N of M cells within tolerance', M counting the cells with a within/outside verdict."""
    judged = table["verdict"].isin([WITHIN, OUTSIDE])
    within = int((table["verdict"] == WITHIN).sum())
    text = f"{within} of {int(judged.sum())} cells within tolerance"
    others = [(int((table["verdict"] == v).sum()), v) for v in (NOT_REAL, NOT_RUN)]
    extra = [f"{n} {v}" for n, v in others if n]
    return text + (f" ({'; '.join(extra)})" if extra else "")


def _column_names(group: pd.DataFrame) -> tuple[list[str], bool]:
    """The header of one paper table; True when each cell must name its selection rule."""
    metrics, selections = set(group["metric"]), set(group["selection"])
    unit = f" {METRIC_NAME[next(iter(metrics))]}" if len(metrics) == 1 else ""
    if len(selections) == 1:
        rule = rule_text(selections)
        other = RULE_NAME[OTHER_RULE[next(iter(selections))]]
        return ["pair", "method", f"published{unit} ({rule})", f"kdbench ({rule})",
                f"kdbench ({other})", "Δ (allowed)", "verdict"], False
    return ["pair", "method", f"published{unit}", "kdbench, same rule", "kdbench, other rule",
            "Δ (allowed)", "verdict"], True


def _md_line(line: pd.Series, per_cell_rule: bool, mixed_metrics: bool) -> list[str]:
    metric = line["metric"]
    unit = f" {METRIC_NAME[metric]}" if mixed_metrics else ""
    rule = f" ({RULE_NAME[line['selection']]})" if per_cell_rule else ""
    method = line["method"]
    if line["paper_method"] and line["paper_method"] != method:
        method += f" ({line['paper_method']})"
    if isinstance(line.get("measured_on"), str) and line["measured_on"]:
        method += f"; {line['measured_on']}"
    if line["seeds"]:
        kdbench = fmt_value(line["kdbench"], metric)
        if not pd.isna(line["kdbench_std"]):
            kdbench += f" ± {fmt_value(line['kdbench_std'], metric)}"
        kdbench += f" (n={int(line['seeds'])})"
        other = fmt_value(line["other_rule"], metric)
        other += f" ({line['other_rule_name']})" if per_cell_rule and other != "—" else ""
        allowed = fmt(line["tolerance"], 1 if metric == "test_errors" else 2)
        delta = f"{fmt_delta(line['delta'], metric)} (±{allowed})"
    else:
        kdbench, other, delta = "—", "—", "—"
    verdict = line["verdict"]
    if verdict != NOT_RUN and is_shortened(line["schedule"]):
        verdict += " (shortened)"
    return [line["pair"], method, f"{fmt_value(line['published'], metric)}{unit}{rule}",
            kdbench, other, delta, verdict]


def _aligned(table: str) -> str:
    """Left-align the text columns (pair, method, verdict) of a comparison table."""
    lines = table.split("\n")
    lines[1] = "| :--- | :--- | ---: | ---: | ---: | ---: | :--- |"
    return "\n".join(lines)


def _paper_table(name: str, group: pd.DataFrame) -> list[str]:
    """The section of one paper table: heading, source, the table and the cells' notes."""
    header, per_cell_rule = _column_names(group)
    lines = [_md_line(line, per_cell_rule, group["metric"].nunique() > 1) for _, line in group.iterrows()]
    sources = "; ".join(dict.fromkeys(group["source"]))
    parts = ["", f"## {md_escape(table_heading(name))}", "", f"Source: {md_escape(sources)}",
             "", _aligned(md_table(header, lines))]
    notes = [f"{line['pair']} {line['method']}: {line['note']}" for _, line in group.iterrows() if line["note"]]
    if notes:
        parts += [""] + [f"- {md_escape(n)}" for n in notes]
    return parts


def _warnings(table: pd.DataFrame) -> list[str]:
    """Synthetic data and shortened schedules, each with the blank line after it."""
    parts = []
    if (table["verdict"] == NOT_REAL).any():
        parts += [NOT_REAL_WARNING, ""]
    shortened = sorted({s for s in table["schedule"] if is_shortened(s)})
    if shortened:
        parts += [(f"**Shortened schedule** ({'; '.join(shortened)}): kdbench trained for "
                   "fewer epochs than the paper, so its numbers are not expected to match; lines "
                   "marked (shortened)."), ""]
    return parts


def reproduction_markdown(table: pd.DataFrame, *, title: str, tolerance: Tolerance,
                          ordering_lines: Sequence[str] = (), extra_notes: Sequence[str] = (),
                          plot: Path | None = None, sections: Sequence[str] = ()) -> str:
    """The reproduction report: warnings, summary, legend, one table per paper table, notes."""
    parts = [f"# {md_escape(title)}", "", *_warnings(table), f"**{summary(table)}.**", ""]
    parts += [
        ("- published: the paper's number at its selection rule (last epoch, or best epoch: "
         "the best test accuracy over training, chosen on the test set as the DKD tables do)."),
        ("- kdbench: mean ± sample standard deviation over n seeds, at the same rule as the "
         "published number; beside it the mean at the other rule."),
        ("- Δ = kdbench − published: positive means kdbench is higher (for test errors: more "
         "errors); in parentheses the largest |Δ| still within."),
        f"- within: {tolerance.rule()}.",
    ]
    missing = unimplemented(table)
    shown = table[~table["method"].isin(list(missing))]
    for name, group in shown.groupby("table", sort=False):
        parts += _paper_table(str(name), group)
    if missing:
        listed = ", ".join(f"{m} ({n})" for m, n in missing.items())
        parts += ["", "Published cells of methods not run here (no kdbench plugin, or not among the methods run): "
                  f"{md_escape(listed)}."]
    parts += list(sections)
    if ordering_lines:
        parts += ["", "## Ordering (kdbench means)", ""]
        parts += [f"- {md_escape(line)}" for line in ordering_lines]
    if extra_notes:
        parts += ["", "## Notes", ""] + [f"- {md_escape(n)}" for n in extra_notes]
    if plot is not None:
        parts += ["", f"Plot: [{plot.stem}]({plot.name})"]
    return "\n".join(parts) + "\n"
