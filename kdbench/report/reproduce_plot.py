"""``published_vs_kdbench_<slug>.png``: a comparison table (from ``reproduce.compare``) as a figure."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..suites import Tolerance
from .plots import (
    MARKERS,
    RC,
    figure,
    method_colours,
    point,
    save_figure,
    side_legend,
    style,
)
from .published import (
    METRIC_NAME,
    METRICS,
    NOT_REAL,
    is_shortened,
    rule_text,
    table_heading,
)


def plot_reproduction(table: pd.DataFrame, path: Path, *, title: str, tolerance: Tolerance) -> Path | None:
    """Published (x) against kdbench's mean (y), one subplot per metric; None without a point.

    Error bars are kdbench's std over seeds; the dashed line is y = x and the shaded band the
    tolerance floor around it (±points for top-1, ±relative for test errors).
    """
    points = table[table["kdbench"].notna()]
    if points.empty:
        return None
    metrics = [m for m in METRICS if m in set(points["metric"])]
    colours = method_colours(set(table["method"]))
    # Marker by paper table; by source when no cell names its table.
    by = "table" if (points["table"] != "").any() else "source"
    markers = {k: MARKERS[i % len(MARKERS)] for i, k in enumerate(dict.fromkeys(points[by]))}
    width = 5.6 * len(metrics) + 3.2
    with style():
        fig = figure(width, 5.8)
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        for ax, metric in zip(axes, metrics):
            _panel(ax, points[points["metric"] == metric], metric, tolerance, colours, by, markers)
        _legend(axes[-1], points, metrics, tolerance, colours, by, markers)
        # About 11 characters of the title font per inch: wrap so the title never runs past
        # the figure's edges.
        fig.suptitle(_title(table, title, int(width * 11)), fontsize=RC["axes.titlesize"])
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
    rule = rule_text(set(points["selection"])) or "each cell's rule: last or best epoch"
    name = METRIC_NAME[metric]
    ax.set_xlabel(f"published {name} ({rule})")
    ax.set_ylabel(f"kdbench {name}, mean ± std over seeds\n({rule})")


def _legend(ax, points: pd.DataFrame, metrics: Sequence[str], tolerance: Tolerance,
            colours: dict[str, str], by: str, markers: dict[str, str]) -> None:
    """One legend right of the last panel: colour = method, marker = paper table (or source),
    then the reference line and bands."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    methods = [(point(colours[m], "o"), m) for m in dict.fromkeys(points["method"])]
    tables = [(point("#555555", marker), textwrap.fill(table_heading(key) if by == "table" else key, 28))
              for key, marker in markers.items()]
    reference = [(Line2D([], [], linestyle="--", color="#555555"), "y = x")]
    reference += [(Patch(color="#888888", alpha=0.15, linewidth=0),
                   textwrap.fill(f"{METRIC_NAME[m]}: {_band(m, tolerance)}", 28)) for m in metrics]
    side_legend(ax, [("method (colour)", methods),
                     (f"{'paper table' if by == 'table' else 'source'} (marker)", tables),
                     ("reference", reference)], x=1.04)


def _title(table: pd.DataFrame, title: str, width: int) -> str:
    """``title`` wrapped to ``width`` characters, then the warnings that apply to kdbench."""
    marks = []
    if (table["verdict"] == NOT_REAL).any():
        marks.append("kdbench: NOT REAL DATA (synthetic stand-in images)")
    if any(is_shortened(s) for s in table["schedule"]):
        marks.append("kdbench: shortened schedule")
    return "\n".join([textwrap.fill(title, width), *marks])
