"""The hyperparameter-sweep figure: a method's error against the one hyperparameter a sweep varied.

Per benchmark and per method run at three or more values of a single numeric hyperparameter
(``[sweep.kd] temperature = [...]``)::

    sweep_<method>_<hparam>_<slug>.png   test error (%) against the value, one line per pair,
                                         the same student's ce run as a dashed line of its colour

Reading the curve (where it is flat, where it has a minimum) is what a sweep is for, and a table of
nine ``kd[temperature=...]`` rows hides it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..suites import PAIR_ARROW
from .aggregate import Benchmark, slugify
from .plots import wrap_title
from .rows import ACCURACIES, BASELINE, METRICS, Col, is_teacher, numeric


def swept(rows: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(method, hyperparameter, its runs with a ``value`` column) for every one-hyperparameter sweep."""
    if Col.HPARAMS not in rows:
        return []
    out = []
    students = rows[~is_teacher(rows)]
    for method, group in students.groupby(students[Col.METHOD].astype(str).str.split("[", regex=False).str[0]):
        settings = [json.loads(h) for h in group[Col.HPARAMS].dropna().unique() if isinstance(h, str)]
        keys = sorted({k for hp in settings for k in hp})
        differ = [k for k in keys if len({json.dumps(hp.get(k)) for hp in settings}) > 1]
        if len(differ) != 1:
            continue
        key = differ[0]
        values = group[Col.HPARAMS].map(lambda h, key=key: json.loads(h).get(key) if isinstance(h, str) else None)
        # Numbers only, checked first: a setting that differs as a list (per-pair stages) is no sweep, and
        # lists cannot be counted as unique values.
        if not all(isinstance(v, (int, float)) for v in values.dropna()) or values.nunique() < 3:
            continue
        runs = group.assign(value=values.astype(float))
        # Only the pairs the sweep ran at several values: a pair run at one value has no curve.
        swept_pairs = runs.groupby(Col.PAIR)["value"].nunique()
        curves = runs[runs[Col.PAIR].isin(swept_pairs[swept_pairs > 1].index)]
        if len(curves):  # a value per pair (a suite's per-pair setting) is no sweep: no empty figure
            out.append((str(method), key, curves))
    return out


def plot_sweeps(bench: Benchmark, metric: str, out_dir: Path) -> list[Path]:
    """One figure per sweep of ``bench`` (see the module docstring); [] when it has none, or when ``metric`` is no
    accuracy (the figures show test error, 100 − accuracy)."""
    if metric not in ACCURACIES:
        return []
    return [_plot(bench, method, key, runs, metric, out_dir) for method, key, runs in swept(bench.rows)]


def _plot(bench: Benchmark, method: str, key: str, runs: pd.DataFrame, metric: str, out_dir: Path) -> Path:
    from .plots import figure, save_figure
    fig = figure(6.4, 4.2)
    ax = fig.add_subplot()
    baselines = bench.rows[bench.rows[Col.METHOD] == BASELINE]
    colours = [f"C{i}" for i in range(10)]
    for i, (pair, group) in enumerate(runs.groupby(Col.PAIR, sort=True)):
        colour = colours[i % len(colours)]
        err = 100 - numeric(group, metric)
        stats = err.groupby(group["value"]).agg(["mean", "std", "count"]).sort_index()
        label = f"{pair} (n={int(stats['count'].min())}" + (f"–{int(stats['count'].max())})"
                                                             if stats["count"].nunique() > 1 else ")")
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), color=colour, marker="o",
                    capsize=3, label=label)
        student = str(pair).split(PAIR_ARROW)[-1]
        ce = 100 - numeric(baselines[baselines[Col.STUDENT] == student], metric)
        if len(ce):
            ax.axhline(ce.mean(), color=colour, linestyle="--", linewidth=1,
                       label=f"{BASELINE} {student} (labels only, n={len(ce)})")
    values = runs["value"]
    if values.min() > 0 and values.max() / values.min() >= 10:
        ax.set_xscale("log")
    ax.set_xticks(sorted(values.unique()), labels=[_tick(v) for v in sorted(values.unique())])
    ax.set_xlabel(f"{method}.{key}")
    ax.set_ylabel(f"test error (%) = 100 − {METRICS[metric]}")
    ax.set_title(wrap_title(f"{bench.title}\n{method}: error against {key}, mean ± std over seeds", fig))
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, out_dir / f"sweep_{slugify(method)}_{slugify(key)}_{bench.slug}.png")


def _tick(value: float) -> str:
    return str(int(value)) if math.isclose(value, round(value)) else f"{value:g}"


def sweep_lines(bench: Benchmark, metric: str) -> Sequence[str]:
    """Markdown: per sweep, each pair's value with the lowest mean error (what the figure shows); none for a
    metric that is no accuracy."""
    lines: list[str] = []
    if metric not in ACCURACIES:
        return lines
    for method, key, runs in swept(bench.rows):
        for pair, group in runs.groupby(Col.PAIR, sort=True):
            err = (100 - numeric(group, metric)).groupby(group["value"]).mean()
            lines.append(f"- {method} on {pair}: lowest mean test error {err.min():.2f}% at {key} = "
                         f"{_tick(float(err.idxmin()))} (highest {err.max():.2f}% at {_tick(float(err.idxmax()))})")
    return lines
