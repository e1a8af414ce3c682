"""Compare kdbench's numbers with a paper's published ones (``kdbench reproduce``).

Given the result rows of one reproduction and the published cells of its paper(s), build one
line per published cell: the paper's number, kdbench's mean ± std over seeds at the *same*
selection rule (last or best epoch), the mean at the other rule beside it, the gap Δ and a
verdict. Then write it as::

    reproduce_<slug>.md               one markdown table per paper table, warnings, summary
    reproduce_<slug>.csv              the comparison table as is
    published_vs_kdbench_<slug>.png   published (x) against kdbench (y), y = x and its band

Verdicts: ``within`` / ``outside`` the tolerance, ``not run`` (no kdbench run matches the cell,
also when kdbench has no such method) and ``not real data`` (the runs used synthetic stand-in
images: no verdict on a reproduction is given).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd

from kdbench.errors import KdbenchError
from kdbench.report import (
    _MARKERS,
    _RC,
    BASELINE,
    TEACHER,
    Stat,
    _figure,
    _fmt,
    _md_escape,
    _md_table,
    _numeric,
    method_colours,
    save_figure,
    schedule_label,
    slugify,
    write_text,
)
from kdbench.suites import Tolerance

METRICS = ("top1", "test_errors")
SELECTIONS = ("last", "best")
_RULE_NAME = {"last": "last epoch", "best": "best epoch"}
_OTHER = {"last": "best", "best": "last"}
_METRIC_NAME = {"top1": "top-1 %", "test_errors": "test errors"}

WITHIN, OUTSIDE, NOT_RUN, NOT_REAL = "within", "outside", "not run", "not real data"

#: The comparison table's columns, in order.
COLUMNS = ("table", "pair", "method", "paper_method", "metric", "selection", "published",
           "kdbench", "kdbench_std", "other_rule", "other_rule_name", "seeds", "delta",
           "tolerance", "verdict", "schedule", "real_data", "source", "note")

NOT_REAL_WARNING = ("**kdbench column: NOT REAL DATA** (synthetic stand-in images; a check that "
                    "the suite runs end to end, not a reproduction)")

# |Δ| is compared with the tolerance after float subtraction (70.73 - 70.23 = 0.5000000000000071):
# a gap that equals the tolerance in the printed digits must count as within.
_EPS = 1e-9


@dataclass(frozen=True)
class Cell:
    """One published number."""

    teachers: tuple[str, ...]  # timm model names of the pair's teacher(s)
    student: str  # timm model name of the pair's student
    method: str  # kdbench method name, "teacher", "ce", or a paper method kdbench lacks
    paper_method: str  # the paper's own name for it ("fitnet", "student_ce", ...)
    metric: str  # "top1" (percent) or "test_errors" (count of misclassified test images)
    value: float
    selection: str  # "last" (last-epoch accuracy) or "best" (best-epoch accuracy)
    source: str  # citation, e.g. "CRD (Tian et al., ICLR 2020) Table 1"
    table: str = ""  # which paper table, e.g. "1"; may be ""
    note: str = ""  # e.g. "mean of 5 runs"

    @property
    def pair(self) -> str:
        """'teacher+teacher→student', the store's spelling of a pair."""
        return f"{'+'.join(self.teachers)}→{self.student}"


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
    missing = [c for c in ("kind", "method", "student") if c not in rows]
    if missing:
        raise KdbenchError(f"the result rows lack the column(s) {', '.join(missing)}; pass rows "
                           "as returned by kdbench.report.load_rows")
    rows = rows.copy()
    # Rows written before a column existed: no teachers, full schedule, real data.
    defaults = {"teachers": "", "schedule": "", "shortened": False, "real_data": True}
    for col, default in defaults.items():
        rows[col] = rows[col].where(rows[col].notna(), default) if col in rows else default
    rows["teachers"] = rows["teachers"].astype(str)
    rows["schedule"] = rows["schedule"].astype(str)
    rows["shortened"] = rows["shortened"].astype(bool)
    rows["real_data"] = rows["real_data"].astype(bool)
    return rows


def matching_rows(rows: pd.DataFrame, cell: Cell) -> pd.DataFrame:
    """The runs a cell is compared with (a teacher or ce run may serve several pairs' cells)."""
    teacher = rows["kind"] == TEACHER
    if cell.method == TEACHER:
        if len(cell.teachers) != 1:
            raise KdbenchError(f"the teacher cell of {cell.pair} ({cell.source}) names "
                               f"{len(cell.teachers)} teachers; give one cell per teacher")
        return rows[teacher & (rows["student"] == cell.teachers[0])]
    mask = ~teacher & (rows["method"] == cell.method) & (rows["student"] == cell.student)
    if cell.method != BASELINE:  # ce runs serve every pair with their student
        mask &= rows["teachers"] == "+".join(cell.teachers)
    return rows[mask]


def _line(rows: pd.DataFrame, cell: Cell, tolerance: Tolerance) -> dict:
    """The comparison line of one cell."""
    _check_cell(cell)
    runs = matching_rows(rows, cell)
    other = _OTHER[cell.selection]
    line = {
        "table": cell.table, "pair": cell.pair, "method": cell.method,
        "paper_method": cell.paper_method, "metric": cell.metric, "selection": cell.selection,
        "published": float(cell.value), "kdbench": math.nan, "kdbench_std": math.nan,
        "other_rule": math.nan, "other_rule_name": _RULE_NAME[other], "seeds": 0,
        "delta": math.nan, "tolerance": math.nan, "verdict": NOT_RUN, "schedule": "",
        "real_data": None, "source": cell.source, "note": cell.note,
    }
    if runs.empty:
        return line
    _check_runs(runs, cell)
    stat = Stat.of(_values(runs, cell, cell.selection))
    if stat.n == 0:
        raise KdbenchError(f"the runs of {cell.method} on {cell.pair} record no top1_"
                           f"{cell.selection} ({_run_ids(runs)}); re-run them or delete their run "
                           "files")
    real = bool(runs["real_data"].all())
    allowed = tolerance.allowed(cell.metric, cell.value, stat.std)
    delta = stat.mean - cell.value
    line.update(
        kdbench=stat.mean, kdbench_std=stat.std, seeds=stat.n,
        other_rule=Stat.of(_values(runs, cell, other)).mean, delta=delta, tolerance=allowed,
        verdict=NOT_REAL if not real else WITHIN if abs(delta) <= allowed + _EPS else OUTSIDE,
        schedule="; ".join(schedule_label(g) for _, g in runs.groupby("schedule", sort=True)),
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


def _check_runs(runs: pd.DataFrame, cell: Cell) -> None:
    """Refuse runs that are not seeds of one experiment: their mean would be no published cell's."""
    if "seed" in runs:
        seeds = runs["seed"].dropna()
        if seeds.duplicated().any():
            raise KdbenchError(
                f"{len(runs)} runs of {cell.method} on {cell.pair} share a seed "
                f"({_run_ids(runs)}); pass compare() one run per seed (filter the rows to one "
                "schedule and hyperparameter setting)")
    if "hparams" in runs:
        settings = {h for h in runs["hparams"].dropna() if h not in ("", "{}")}
        if len(settings) > 1:
            raise KdbenchError(
                f"the runs of {cell.method} on {cell.pair} use {len(settings)} hyperparameter "
                f"settings ({_run_ids(runs)}); filter the rows to the paper's setting")


def _run_ids(runs: pd.DataFrame) -> str:
    return ", ".join(map(str, runs["run_id"])) if "run_id" in runs else f"{len(runs)} rows"


def _values(runs: pd.DataFrame, cell: Cell, selection: str) -> pd.Series:
    """Per run, the cell's metric at ``selection``: top-1 %, or the count of test errors."""
    top1 = _numeric(runs, f"top1_{selection}")
    if cell.metric == "top1":
        return top1
    size = _numeric(runs, "test_size")
    if size.isna().any():
        raise KdbenchError(f"the runs of {cell.method} on {cell.pair} do not record test_size "
                           f"({_run_ids(runs)}), which the test-error count needs; re-run them "
                           "with this kdbench")
    # Accuracy is a rounded percentage of a whole number of images: round back to that count.
    return np.round((100.0 - top1) * size / 100.0)


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
    for (pair, metric), group in table.groupby(["pair", "metric"], sort=False):
        means = group.drop_duplicates("method").set_index("method")["kdbench"]
        if any(m not in means or pd.isna(means[m]) for m in ordering):
            continue
        values = [float(means[m]) for m in ordering]
        better = (lambda a, b: a < b) if metric == "test_errors" else (lambda a, b: a > b)
        holds = all(better(a, b) for a, b in pairwise(values))
        text = f"{ordering[0]} {_fmt_value(values[0], metric)}"
        for method, prev, value in zip(ordering[1:], values, values[1:]):
            sign = "<" if prev < value else ">" if prev > value else "="
            text += f" {sign} {method} {_fmt_value(value, metric)}"
        rows = group[group["method"].isin(ordering)]
        # Each mean is at its own cell's rule: a pair's cells normally share one.
        rule = _rule_text(set(rows["selection"])) or "each cell's rule"
        unit = "test errors" if metric == "test_errors" else f"top-1 % ({rule})"
        synthetic = " (not real data)" if (rows["verdict"] == NOT_REAL).any() else ""
        out.append(f"{pair}: {text} {unit} — {'holds' if holds else 'does not hold'}{synthetic}")
    return out


def _fmt_value(x: float, metric: str) -> str:
    """Top-1 with two decimals; an error count as a whole number unless a mean of seeds isn't."""
    if pd.isna(x):
        return "—"
    if metric == "test_errors":
        return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"
    return _fmt(x)


def _fmt_delta(x: float, metric: str) -> str:
    return "—" if pd.isna(x) else ("+" if x > 0 else "") + _fmt_value(x, metric)


# -- markdown -----------------------------------------------------------------------------------
def _is_shortened(schedule: object) -> bool:
    # schedule_label() always puts "shortened" into the label of a shortened run.
    return "shortened" in str(schedule).lower()


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


def _rule_text(selections: set[str]) -> str:
    return _RULE_NAME[next(iter(selections))] if len(selections) == 1 else ""


def _column_names(group: pd.DataFrame) -> tuple[list[str], bool]:
    """The header of one paper table; True when each cell must name its selection rule."""
    metrics, selections = set(group["metric"]), set(group["selection"])
    unit = f" {_METRIC_NAME[next(iter(metrics))]}" if len(metrics) == 1 else ""
    if len(selections) == 1:
        rule = _rule_text(selections)
        other = _RULE_NAME[_OTHER[next(iter(selections))]]
        return ["pair", "method", f"published{unit} ({rule})", f"kdbench ({rule})",
                f"kdbench ({other})", "Δ (allowed)", "verdict"], False
    return ["pair", "method", f"published{unit}", "kdbench, same rule", "kdbench, other rule",
            "Δ (allowed)", "verdict"], True


def _md_line(line: pd.Series, per_cell_rule: bool, mixed_metrics: bool) -> list[str]:
    metric = line["metric"]
    unit = f" {_METRIC_NAME[metric]}" if mixed_metrics else ""
    rule = f" ({_RULE_NAME[line['selection']]})" if per_cell_rule else ""
    method = line["method"]
    if line["paper_method"] and line["paper_method"] != method:
        method += f" ({line['paper_method']})"
    if line["seeds"]:
        kdbench = _fmt_value(line["kdbench"], metric)
        if not pd.isna(line["kdbench_std"]):
            kdbench += f" ± {_fmt_value(line['kdbench_std'], metric)}"
        kdbench += f" (n={int(line['seeds'])})"
        other = _fmt_value(line["other_rule"], metric)
        other += f" ({line['other_rule_name']})" if per_cell_rule and other != "—" else ""
        allowed = _fmt(line["tolerance"], 1 if metric == "test_errors" else 2)
        delta = f"{_fmt_delta(line['delta'], metric)} (±{allowed})"
    else:
        kdbench, other, delta = "—", "—", "—"
    verdict = line["verdict"]
    if verdict != NOT_RUN and _is_shortened(line["schedule"]):
        verdict += " (shortened)"
    return [line["pair"], method, f"{_fmt_value(line['published'], metric)}{unit}{rule}",
            kdbench, other, delta, verdict]


def _aligned(md_table: str) -> str:
    """Left-align the text columns (pair, method, verdict) of a comparison table."""
    lines = md_table.split("\n")
    lines[1] = "| :--- | :--- | ---: | ---: | ---: | ---: | :--- |"
    return "\n".join(lines)


def _heading(table_name: str) -> str:
    if not table_name:
        return "Published cells"
    return table_name if table_name.lower().startswith("table") else f"Table {table_name}"


def markdown(table: pd.DataFrame, *, title: str, tolerance: Tolerance,
             ordering_lines: Sequence[str] = (), extra_notes: Sequence[str] = (),
             plot: Path | None = None) -> str:
    """The reproduction report: warnings, summary, legend, one table per paper table, notes."""
    parts = [f"# {_md_escape(title)}", ""]
    if (table["verdict"] == NOT_REAL).any():
        parts += [NOT_REAL_WARNING, ""]
    shortened = sorted({s for s in table["schedule"] if _is_shortened(s)})
    if shortened:
        parts += [(f"**Shortened schedule** ({'; '.join(shortened)}): kdbench trained for "
                   "fewer epochs than the paper, so its numbers are not expected to match; lines "
                   "marked (shortened)."), ""]
    parts += [f"**{summary(table)}.**", ""]
    parts += [
        ("- published: the paper's number at its selection rule (last epoch, or best epoch: "
         "the best test accuracy over training)."),
        ("- kdbench: mean ± sample standard deviation over n seeds, at the same rule as the "
         "published number; beside it the mean at the other rule."),
        ("- Δ = kdbench − published: positive means kdbench is higher (for test errors: more "
         "errors); in parentheses the largest |Δ| still within."),
        f"- within: {tolerance.rule()}.",
    ]
    missing = unimplemented(table)
    shown = table[~table["method"].isin(list(missing))]
    for name, group in shown.groupby("table", sort=False):
        header, per_cell_rule = _column_names(group)
        lines = [_md_line(line, per_cell_rule, group["metric"].nunique() > 1)
                 for _, line in group.iterrows()]
        sources = "; ".join(dict.fromkeys(group["source"]))
        parts += ["", f"## {_md_escape(_heading(str(name)))}", "", f"Source: {_md_escape(sources)}",
                  "", _aligned(_md_table(header, lines))]
        notes = [f"{line['pair']} {line['method']}: {line['note']}"
                 for _, line in group.iterrows() if line["note"]]
        if notes:
            parts += [""] + [f"- {_md_escape(n)}" for n in notes]
    if missing:
        listed = ", ".join(f"{m} ({n})" for m, n in missing.items())
        parts += ["", "Published cells of methods not run here (no kdbench plugin, or not among the methods run): "
                  f"{_md_escape(listed)}."]
    if ordering_lines:
        parts += ["", "## Ordering (kdbench means)", ""]
        parts += [f"- {_md_escape(line)}" for line in ordering_lines]
    if extra_notes:
        parts += ["", "## Notes", ""] + [f"- {_md_escape(n)}" for n in extra_notes]
    if plot is not None:
        parts += ["", f"Plot: [{plot.stem}]({plot.name})"]
    return "\n".join(parts) + "\n"


# -- the plot -----------------------------------------------------------------------------------
def plot(table: pd.DataFrame, path: Path, *, title: str, tolerance: Tolerance) -> Path | None:
    """Published (x) against kdbench's mean (y), one subplot per metric; None without a point.

    Error bars are kdbench's std over seeds; the dashed line is y = x and the shaded band the
    tolerance floor around it (±points for top-1, ±relative for test errors).
    """
    from matplotlib import rc_context

    points = table[table["kdbench"].notna()]
    if points.empty:
        return None
    metrics = [m for m in METRICS if m in set(points["metric"])]
    colours = method_colours(set(table["method"]))
    # Marker by paper table; by source when no cell names its table.
    by = "table" if (points["table"] != "").any() else "source"
    markers = {k: _MARKERS[i % len(_MARKERS)] for i, k in enumerate(dict.fromkeys(points[by]))}
    width = 5.6 * len(metrics) + 3.2
    with rc_context(_RC):
        fig = _figure(width, 5.8)
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        for ax, metric in zip(axes, metrics):
            _panel(ax, points[points["metric"] == metric], metric, tolerance, colours, by, markers)
        _plot_legend(axes[-1], points, metrics, tolerance, colours, by, markers)
        # About 11 characters of the title font per inch: wrap so the title never runs past
        # the figure's edges.
        fig.suptitle(_plot_title(table, title, int(width * 11)), fontsize=_RC["axes.titlesize"])
        return save_figure(fig, path)


def _band(metric: str, tolerance: Tolerance) -> str:
    return (f"±{tolerance.points:g} points" if metric == "top1"
            else f"±{tolerance.relative:.0%} of published")


def _panel(ax, points: pd.DataFrame, metric: str, tolerance: Tolerance,
           colours: dict[str, str], by: str, markers: dict[str, str]) -> None:
    """One metric's scatter with y = x and the tolerance band, on equal axes."""
    for _, p in points.iterrows():
        err = None if pd.isna(p["kdbench_std"]) else p["kdbench_std"]
        ax.errorbar(p["published"], p["kdbench"], yerr=err, fmt=markers[p[by]],
                    color=colours[p["method"]], markersize=7, markeredgecolor="white",
                    markeredgewidth=0.6, capsize=3, elinewidth=1.1, zorder=3)
    spread = points["kdbench_std"].fillna(0.0)
    values = pd.concat([points["published"], points["kdbench"] - spread,
                        points["kdbench"] + spread])
    lo, hi = float(values.min()), float(values.max())
    pad = max(0.08 * (hi - lo), 1.0 if metric == "top1" else 0.1 * hi + 1.0)
    lo, hi = lo - pad, hi + pad
    if metric == "test_errors":
        lo = max(lo, 0.0)  # no negative error counts
    xs = np.linspace(lo, hi, 200)
    if metric == "top1":
        below, above = xs - tolerance.points, xs + tolerance.points
    else:
        below, above = xs * (1 - tolerance.relative), xs * (1 + tolerance.relative)
    ax.fill_between(xs, below, above, color="#888888", alpha=0.15, linewidth=0, zorder=1)
    ax.plot(xs, xs, linestyle="--", color="#555555", linewidth=1.0, zorder=2)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.grid(color="#eeeeee", zorder=0)
    rule = _rule_text(set(points["selection"])) or "each cell's rule: last or best epoch"
    name = _METRIC_NAME[metric]
    ax.set_xlabel(f"published {name} ({rule})")
    ax.set_ylabel(f"kdbench {name}, mean ± std over seeds\n({rule})")


def _plot_legend(ax, points: pd.DataFrame, metrics: Sequence[str], tolerance: Tolerance,
                 colours: dict[str, str], by: str, markers: dict[str, str]) -> None:
    """One legend right of the last panel: colour = method, marker = paper table (or source),
    then the reference line and bands."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    blank = Line2D([], [], linestyle="none")
    heads = ["method (colour)", f"{'paper table' if by == 'table' else 'source'} (marker)",
             "reference"]
    handles, labels = [blank], [heads[0]]
    for method in dict.fromkeys(points["method"]):
        handles.append(Line2D([], [], color=colours[method], marker="o", linestyle="none"))
        labels.append(method)
    handles += [blank, blank]
    labels += ["", heads[1]]
    for key, marker in markers.items():
        handles.append(Line2D([], [], color="#555555", marker=marker, linestyle="none"))
        labels.append(textwrap.fill(_heading(key) if by == "table" else key, 28))
    handles += [blank, blank, Line2D([], [], linestyle="--", color="#555555")]
    labels += ["", heads[2], "y = x"]
    for metric in metrics:
        handles.append(Patch(color="#888888", alpha=0.15, linewidth=0))
        labels.append(textwrap.fill(f"{_METRIC_NAME[metric]}: {_band(metric, tolerance)}", 28))
    legend = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.04, 1.0),
                       frameon=False, handletextpad=0.4, borderaxespad=0.0)
    for text in legend.get_texts():
        if text.get_text() in heads:
            text.set_fontweight("bold")


def _plot_title(table: pd.DataFrame, title: str, width: int) -> str:
    """``title`` wrapped to ``width`` characters, then the warnings that apply to kdbench."""
    marks = []
    if (table["verdict"] == NOT_REAL).any():
        marks.append("kdbench: NOT REAL DATA (synthetic stand-in images)")
    if any(_is_shortened(s) for s in table["schedule"]):
        marks.append("kdbench: shortened schedule")
    return "\n".join([textwrap.fill(title, width), *marks])


# -- writing ------------------------------------------------------------------------------------
def write_reproduction(table: pd.DataFrame, out_dir: Path, *, suite: str, title: str,
                       ordering_lines: Sequence[str] = (), extra_notes: Sequence[str] = (),
                       tolerance: Tolerance | None = None) -> list[Path]:
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

    Returns:
        The markdown, CSV and (when any cell has a kdbench value) PNG paths.
    """
    if tolerance is None:
        tolerance = table.attrs.get("tolerance") or Tolerance()
    out = Path(out_dir)
    slug = slugify(suite)
    png = plot(table, out / f"published_vs_kdbench_{slug}.png", title=title, tolerance=tolerance)
    csv = write_text(out / f"reproduce_{slug}.csv", table.to_csv(index=False))
    md = write_text(out / f"reproduce_{slug}.md",
                    markdown(table, title=title, tolerance=tolerance,
                             ordering_lines=ordering_lines, extra_notes=extra_notes, plot=png))
    return [md, csv] + ([png] if png is not None else [])


__all__ = ["COLUMNS", "Cell", "Tolerance", "check_ordering", "compare", "markdown",
           "matching_rows", "plot", "summary", "unimplemented", "write_reproduction"]
