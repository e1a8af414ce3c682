"""The figures of a benchmark, and the figure helpers every report plot shares.

Per benchmark::

    acc_vs_params_<slug>.png        metric against student parameters (log x)
    acc_vs_throughput_<slug>.png    metric against inference throughput (one file per device)
    bars_<slug>.png                 per pair, one bar per method; teachers as dashed lines

Figures are drawn without pyplot (no global state) and written atomically. matplotlib is
imported inside the functions: reading rows or comparing numbers does not need it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..files import atomic_write
from ..suites import PAIR_ARROW, pair_label
if TYPE_CHECKING:
    from matplotlib.figure import Figure

from .aggregate import (
    Benchmark,
    Entry,
    PairColumn,
    aggregate,
    method_order,
    pairs_of,
    slugify,
    throughput_setups,
)
from .markdown import fmt
from .rows import BASELINE, METRICS, TEACHER, Col, distinct, method_key, unit

#: Markers that tell pairs (or paper tables) apart; "o" and "*" are kept for ce and teachers.
MARKERS = ("s", "D", "^", "v", "P", "X", "<", ">", "h", "p", "d", "8")
#: matplotlib settings for every report figure.
RC = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
      "xtick.labelsize": 9, "ytick.labelsize": 9,
      "axes.spines.top": False, "axes.spines.right": False}


# -- shared helpers -----------------------------------------------------------------------------
def method_colours(methods: Iterable[str]) -> dict[str, str]:
    """A fixed colour per method across every plot: teacher black, ce grey, the rest tab10/tab20."""
    from matplotlib import colormaps
    palette = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]  # 7 is grey
    palette += list(colormaps["tab20"].colors[1::2])
    others = sorted(set(methods) - {TEACHER, BASELINE}, key=method_key)
    colours = {TEACHER: "black", BASELINE: "#7f7f7f"}
    for i, m in enumerate(others):
        colours[m] = _hex(palette[i % len(palette)])
    return colours


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb[:3])


def style():
    """A context in which figures get the report's look (``RC``)."""
    from matplotlib import rc_context
    return rc_context(RC)


def figure(width: float, height: float):
    """A pyplot-free figure on the Agg canvas (no global state, safe in threads and tests)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    """Atomically write a figure as PNG at 150 dpi."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))


def side_legend(ax, sections: Sequence[tuple[str, Sequence[tuple[Any, str]]]], *, x: float) -> None:
    """One legend right of ``ax``: each section a bold heading, then its (handle, label) entries;
    an empty line between sections."""
    from matplotlib.lines import Line2D
    blank = Line2D([], [], linestyle="none")
    handles: list[Any] = []
    labels: list[str] = []
    heads = []
    for head, entries in sections:
        if handles:
            handles.append(blank)
            labels.append("")
        heads.append(len(labels))
        handles.append(blank)
        labels.append(head)
        for handle, label in entries:
            handles.append(handle)
            labels.append(label)
    legend = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(x, 1.0), frameon=False,
                       handletextpad=0.4, borderaxespad=0.0)
    texts = legend.get_texts()
    for i in heads:
        texts[i].set_fontweight("bold")


def point(colour: str, marker: str, **kw) -> Any:
    """A legend handle: one marker, no line."""
    from matplotlib.lines import Line2D
    return Line2D([], [], color=colour, marker=marker, linestyle="none", **kw)


# -- a benchmark's figures ----------------------------------------------------------------------
def plot_benchmark(bench: Benchmark, entries: Sequence[Entry], metric: str, colours: dict[str, str],
                   out_dir: Path) -> list[Path]:
    """Write every figure of one benchmark; return the paths written."""
    with style():
        plots = [plot_acc_vs_params(bench, entries, metric, colours,
                                    out_dir / f"acc_vs_params_{bench.slug}.png")]
        plots += plot_acc_vs_throughput(bench, metric, colours, out_dir)
        plots.append(plot_acc_vs_cost(bench, entries, metric, colours, out_dir / f"acc_vs_cost_{bench.slug}.png"))
        plots.append(plot_bars(bench, entries, metric, colours, out_dir / f"bars_{bench.slug}.png"))
    return [p for p in plots if p is not None]


def plot_acc_vs_params(bench: Benchmark, entries: Sequence[Entry], metric: str,
                       colours: dict[str, str], path: Path) -> Path | None:
    """acc_vs_params: metric against student parameters (log x); None if no run has params."""
    return _scatter(entries, lambda e: e.params, unit="M",
                    xlabel="parameters of the trained model (log scale)",
                    title=f"{bench.title}\n{METRICS[metric]}", ylabel=f"{METRICS[metric]} ({unit(metric)})",
                    colours=colours, path=path)


def plot_acc_vs_cost(bench: Benchmark, entries: Sequence[Entry], metric: str,
                     colours: dict[str, str], path: Path) -> Path | None:
    """acc_vs_cost: metric against the training time of a run (log x), teachers included; None when no run has
    one (or the runs of a cell trained on different devices)."""
    devices = "; ".join(distinct(bench.rows, Col.DEVICE)) or "unknown device"
    return _scatter(entries, lambda e: e.train_time_s, unit="s",
                    xlabel=f"training time of a run, s (log scale; {devices})",
                    title=f"{bench.title}\n{METRICS[metric]} vs training cost",
                    ylabel=f"{METRICS[metric]} ({unit(metric)})", colours=colours, path=path,
                    label_models=False)  # each method's own time: the model names would sit at averages


def plot_acc_vs_throughput(bench: Benchmark, metric: str, colours: dict[str, str],
                           out_dir: Path) -> list[Path]:
    """acc_vs_throughput: metric against inference images/s (log x), one file per device."""
    rows = bench.rows
    setups = throughput_setups(rows)
    devices = sorted({s.device for s in setups})
    written = []
    for device in devices:
        sub = rows[rows[Col.THROUGHPUT_DEVICE] == device]
        described = "; ".join(s.text for s in setups if s.device == device)
        suffix = f"_{slugify(device)}" if len(devices) > 1 else ""
        on = device or "unknown device"
        path = _scatter(aggregate(sub, metric), lambda e: e.throughput_img_s, unit="k",
                        xlabel=f"inference throughput, images/s (log scale; {described})",
                        title=f"{bench.title}\n{METRICS[metric]} vs throughput on {on}",
                        ylabel=f"{METRICS[metric]} ({unit(metric)})", colours=colours,
                        path=out_dir / f"acc_vs_throughput_{bench.slug}{suffix}.png")
        if path:
            written.append(path)
    return written


def _scatter(entries: Sequence[Entry], x_of: Callable[[Entry], float], *, xlabel: str, unit: str,
             title: str, ylabel: str, colours: dict[str, str], path: Path, label_models: bool = True) -> Path | None:
    """Metric against a per-model x (log scale): one marker per (method, pair), teachers as stars.

    Markers of one model share an x; they are spread slightly sideways so error bars stay visible,
    and the model names are written at their true x along the top axis.
    """
    points = [e for e in _plot_entries(entries) if x_of(e) > 0 and not pd.isna(e.stat.mean)]
    if not points:
        return None
    methods = list(dict.fromkeys(e.method for e in points))
    pair_markers = {p: MARKERS[i % len(MARKERS)] for i, p in enumerate(dict.fromkeys(
        e.pair for e in points if e.method not in (TEACHER, BASELINE)))}
    by_model: dict[str, list[Entry]] = {}
    for e in points:
        by_model.setdefault(e.model, []).append(e)
    model_x = {model: float(np.mean([x_of(e) for e in group])) for model, group in by_model.items()}
    # every marker's own x in view (a method's training time differs from its model's mean)
    lo, hi = min(min(model_x.values()), *map(x_of, points)), max(max(model_x.values()), *map(x_of, points))
    pad = max(10 ** 0.15, (hi / lo) ** 0.08)
    span = math.log10(hi * pad / (lo / pad))  # decades shown
    steps = _spreads(model_x, {m: len(g) for m, g in by_model.items()}, span)

    fig = figure(10.0, 5.6)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    for model, group in by_model.items():
        for k, e in enumerate(group):
            x = x_of(e) * 10 ** (steps[model] * (k - (len(group) - 1) / 2))
            is_teacher = e.method == TEACHER
            marker = "*" if is_teacher else "o" if e.method == BASELINE else pair_markers[e.pair]
            ax.errorbar(x, e.stat.mean, yerr=None if pd.isna(e.stat.std) else e.stat.std,
                        fmt=marker, color=colours[e.method], markersize=14 if is_teacher else 7.5,
                        markeredgecolor="white", markeredgewidth=0.6, capsize=3, elinewidth=1.2,
                        zorder=3)
    _model_axis(ax, model_x, (lo / pad, hi * pad), span, unit, label_models)
    ax.margins(y=0.08)
    ax.grid(axis="y", color="#eeeeee", zorder=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(wrap_title(title, fig))
    _scatter_legend(ax, colours, methods, pair_markers)
    return save_figure(fig, path)


#: Characters of a title (matplotlib's "large", 12 pt) that fit in one inch of figure width, with a margin.
TITLE_CHARS_PER_INCH = 11.5


def wrap_title(title: str, fig: Figure) -> str:
    """Each line of a plot title wrapped to the figure's width: a long dataset path and schedule ran off the
    figure's edges (an ImageFolder at 32 px on the imagenet recipe; a clipped schedule on the 6.4-inch sweep plot)."""
    width = max(30, int(fig.get_figwidth() * TITLE_CHARS_PER_INCH))
    return "\n".join(textwrap.fill(line, width) for line in title.split("\n"))


def _tick(x: float, unit: str, div: float) -> str:
    """An x tick: in the axis's unit, with counts of a million and more in M (2e6 img/s: '2M', not '2e+03k')."""
    if unit == "k" and x >= 1e6:
        return f"{x / 1e6:.3g}M"
    return f"{x / div:.3g}{unit}" if x >= div or unit == "M" else f"{x:.3g}"


def _model_axis(ax, model_x: dict[str, float], xlim: tuple[float, float], span: float,
                unit: str, label_models: bool = True) -> None:
    """The log x-axis of a scatter: counts below, model names at their x on top, a faint line
    at each model's x (not with ``label_models`` False: an x that is no property of the model)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    div = {"M": 1e6, "k": 1e3, "s": 1.0}[unit]  # ticks: 270000 -> '0.27M' (unit 'M'), 12000 -> '12k' ('k'), 40 -> '40s'
    xs = list(model_x.values())
    ax.set_xlim(*xlim)
    subs = (1.0, 2.0, 3.0, 5.0) if span < 1.2 else (1.0, 2.0, 5.0) if span < 3 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _tick(x, unit, div)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if not label_models:
        return
    top = ax.secondary_xaxis("top")
    top.set_xticks(xs, list(model_x), rotation=60, ha="left", rotation_mode="anchor", fontsize=8)
    top.xaxis.set_minor_locator(NullLocator())
    top.tick_params(length=3, color="#999999")
    for x in xs:
        ax.axvline(x, color="#dddddd", linewidth=0.8, zorder=1)


def _scatter_legend(ax, colours: dict[str, str], methods: Sequence[str],
                    pair_markers: dict[PairColumn, str]) -> None:
    """Colour = method, marker = teacher → student pair."""
    sections = [("method (colour)", [
        (point(colours[m], "*", markersize=11) if m == TEACHER else point(colours[m], "o", markersize=7), m)
        for m in methods])]
    if pair_markers:
        sections.append((f"teacher {PAIR_ARROW} student (marker)", [
            (point("#555555", marker, markersize=7), pair.label) for pair, marker in pair_markers.items()]))
    side_legend(ax, sections, x=1.02)


def _spreads(model_x: dict[str, float], counts: dict[str, int], span: float) -> dict[str, float]:
    """Per model, the sideways step (in decades) between its markers: wide enough to keep error
    bars apart, narrow enough that a model's markers stay closer to it than to its neighbours."""
    logs = {m: math.log10(x) for m, x in model_x.items()}
    steps = {}
    for model, n in counts.items():
        gap = min((abs(logs[model] - v) for m, v in logs.items() if m != model), default=math.inf)
        width = min(0.025 * span * (n - 1), 0.12 * span, 0.8 * gap)
        steps[model] = width / (n - 1) if n > 1 else 0.0
    return steps


def _plot_entries(entries: Sequence[Entry]) -> list[Entry]:
    """Entries as points: ce once per student, each teacher once (they repeat across columns)."""
    seen, out = set(), []
    for e in entries:
        key = (e.method, e.model) if e.method in (TEACHER, BASELINE) else (e.method, e.pair)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _y_range(values: Sequence[float]) -> tuple[float, float]:
    """A zoomed y-range: not from 0 when all values sit high, headroom for labels on top."""
    lo, hi = min(values), max(values)
    span = max(hi - lo, 1.0)
    bottom = lo - 0.35 * span
    if bottom < 0.25 * hi:
        bottom = 0.0
    return max(0.0, math.floor(bottom)), hi + 0.3 * span


def plot_bars(bench: Benchmark, entries: Sequence[Entry], metric: str, colours: dict[str, str],
              path: Path) -> Path | None:
    """bars: per pair a group of bars (one per method, ce first), teachers as dashed lines."""
    pairs = pairs_of(bench.rows)
    methods = [m for m in method_order(bench.rows) if m != TEACHER]
    cell = {(e.method, e.pair): e for e in entries if e.method != TEACHER}
    if not cell and not entries:
        return None
    n_bars = len(cell) or 1
    fig = figure(min(16.0, max(6.5, 0.55 * n_bars + 1.2 * len(pairs) + 2.5)), 5.0)
    ax = fig.add_subplot()
    bars = _Bars(ax, colours, label_bars=n_bars <= 40, rotation=0 if n_bars <= 14 else 90)
    ticks = []
    for pair in pairs:
        start = bars.x
        for m in methods:
            if (m, pair) in cell:
                bars.bar(cell[(m, pair)])
        end = max(bars.x - 1.0, start)
        teachers = [e for e in entries if e.method == TEACHER and e.pair == pair]
        for t in teachers:
            bars.teacher_line(t.stat.mean, start, end)
        # Teacher values go in the group's axis label: text on the dashed lines collides with
        # the bar labels whenever a teacher and a student score alike.
        ticks.append(((start + end) / 2, _pair_tick(pair, {t.model: t.stat.mean for t in teachers})))
        bars.x = end + 2.0
    if bars.extent:
        ax.set_ylim(*_y_range(bars.extent))
    ax.set_xticks([x for x, _ in ticks], [label for _, label in ticks], fontsize=8.5)
    ax.tick_params(axis="x", length=0)
    ax.grid(axis="y", color="#eeeeee", zorder=0)
    ax.set_ylabel(f"{METRICS[metric]} ({unit(metric)})")
    ax.set_title(wrap_title(f"{bench.title}\n{METRICS[metric]}, mean ± std over seeds", fig))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="method")
    return save_figure(fig, path)


class _Bars:
    """Draws the bars of :func:`plot_bars` left to right, one legend label per method."""

    def __init__(self, ax, colours: dict[str, str], *, label_bars: bool, rotation: int) -> None:
        self.ax, self.colours, self.label_bars, self.rotation = ax, colours, label_bars, rotation
        self.x = 0.0
        self.extent: list[float] = []  # every bar top and bottom and teacher line, for the y-range
        self.labelled: set[str] = set()

    def _label(self, name: str) -> str | None:
        """The legend label for the first artist of ``name``, None for the others."""
        first = name not in self.labelled
        self.labelled.add(name)
        return name if first else None

    def bar(self, e: Entry) -> None:
        err = None if pd.isna(e.stat.std) else e.stat.std
        self.ax.bar(self.x, e.stat.mean, width=0.8, yerr=err, color=self.colours[e.method], capsize=3,
                    zorder=2, label=self._label(e.method), error_kw={"elinewidth": 1, "ecolor": "#333333"})
        self.extent += [e.stat.mean + (err or 0), e.stat.mean - (err or 0)]
        if self.label_bars:
            self.ax.annotate(fmt(e.stat.mean, 1), (self.x, e.stat.mean + (err or 0)), xytext=(0, 3),
                             textcoords="offset points", ha="center", va="bottom", fontsize=8,
                             rotation=self.rotation, zorder=4,
                             bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"})
        self.x += 1.0

    def teacher_line(self, mean: float, start: float, end: float) -> None:
        self.ax.hlines(mean, start - 0.45, end + 0.45, colors="black", linestyles="--", linewidth=1.3,
                       zorder=3, label=self._label(TEACHER))
        self.extent.append(mean)


def _pair_tick(pair: PairColumn, teacher_means: dict[str, float]) -> str:
    """A bar group's axis label: the pair over three lines or more, each teacher with its mean."""
    names = [f"{t} ({fmt(teacher_means[t], 1)})" if t in teacher_means else t for t in pair.teachers]
    label = pair_label(names or ["(no teacher)"], pair.student or "(teacher only)")
    return label.replace("+", "+\n").replace(PAIR_ARROW, f"\n{PAIR_ARROW} ")
