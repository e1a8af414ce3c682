"""``kdbench report``: every table and plot of a results folder, rebuilt from its rows.

Nothing in the store is ever hand-edited: rows are grouped into benchmarks
(:func:`kdbench.report.aggregate.benchmarks`), and per benchmark the report writes
``table_<slug>.md`` and ``table_<slug>.csv`` (:mod:`kdbench.report.markdown`), ``costs_<slug>.csv``
(each method's training cost, :mod:`kdbench.report.cost`) and its figures
(:mod:`kdbench.report.plots`); ``index.md`` links them all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from ..errors import KdbenchError, unknown
from ..executors.base import OK
from ..files import output_folder
from ..sweep.store import ResultsStore
from .aggregate import Benchmark, aggregate, benchmarks, method_order, pairs_of
from .cost import cost_frame
from .markdown import benchmark_markdown, csv_frame, metric_table, student_ensemble_section, write_text
from .plots import method_colours, plot_benchmark, style
from .sweep_plot import plot_sweeps, sweep_lines
from .derived import DERIVED, add_derived, check_test_sets, load_predictions
from .ensembles import Ensemble, seed_ensembles
from .members import collapse, is_member
from .rows import METRICS, Col, finished, load_rows, numeric


def build_benchmark(bench: Benchmark, metrics: Sequence[str], colours: dict[str, str],
                    out_dir: Path, ensembles: Sequence[Ensemble] = (), declared: Sequence[Ensemble] = ()) -> list[Path]:
    """Write one benchmark's plots, CSV and markdown table; return their paths. The first metric is the main
    table's and the plots'; each further one adds a table of its own (and its lines to the CSV). ``ensembles``:
    the benchmark's student ensembles from seeds (``--ensemble-seeds``), ``declared`` those a pair declared
    (``T:S*3``): each a table and a CSV of its own."""
    metric, more = metrics[0], metrics[1:]
    entries = aggregate(bench.rows, metric)
    plots = plot_benchmark(bench, entries, metric, colours, out_dir)
    with style():
        plots += plot_sweeps(bench, metric, out_dir)
    frames = [csv_frame(bench, entries, metric)] + [csv_frame(bench, aggregate(bench.rows, m), m) for m in more]
    csv = write_text(out_dir / f"table_{bench.slug}.csv", pd.concat(frames, ignore_index=True).to_csv(index=False))
    costs = cost_frame(bench.rows)
    extra = [write_text(out_dir / f"costs_{bench.slug}.csv", costs.to_csv(index=False))] if not costs.empty else []
    text = benchmark_markdown(bench, entries, metric, plots, more=more)
    for kind, group in (("declared", declared), ("seeds", ensembles)):
        if not group:
            continue
        section = student_ensemble_section(group, declared=kind == "declared")
        text = text.rstrip("\n") + "\n" + "\n".join(section) + "\n"
        frame = pd.DataFrame([{**asdict(e), "seeds": "+".join(map(str, e.seeds)),
                               "member_top1": "+".join(f"{x:.4f}" for x in e.member_top1)} for e in group])
        name = "ensembles" if kind == "seeds" else "declared_ensembles"
        extra.append(write_text(out_dir / f"{name}_{bench.slug}.csv", frame.to_csv(index=False)))
    if lines := sweep_lines(bench, metric):
        text = text.rstrip("\n") + "\n\nSweeps (test error = 100 − " + metric + "):\n\n" + "\n".join(lines) + "\n"
    md = write_text(out_dir / f"table_{bench.slug}.md", text)
    return [md, csv, *extra, *plots]


def index(benches: Sequence[Benchmark], files: dict[str, list[Path]], metrics: Sequence[str],
          results_dir: Path) -> str:
    """index.md: per benchmark, a link to every table and plot."""
    runs = sum(len(b.rows) for b in benches)
    named = "Metric" if len(metrics) == 1 else "Metrics"
    lines = ["# kdbench report", "",
             f"{named}: {'; '.join(METRICS[m] for m in metrics)}. Built from {runs} finished runs in "
             f"`{results_dir}`.", ""]
    for bench in benches:
        # What a reader takes in at a glance first: the main table and accuracy against speed, a marker per method.
        table, notes = metric_table(aggregate(bench.rows, metrics[0]), pairs_of(bench.rows), method_order(bench.rows))
        lines += [f"## {bench.title}", "", table, ""] + [f"- {n}" for n in notes] + [""]
        lines += [f"![{p.stem}]({p.name})" for p in files[bench.slug] if p.name.startswith("acc_vs_throughput_")][:1]
        lines += ["", "All tables and plots:", ""]
        lines += [f"- [{p.name}]({p.name})" for p in files[bench.slug]]
        lines.append("")
    return "\n".join(lines)


def without_result(rows: pd.DataFrame) -> str:
    """The index section listing the runs that finished without a result ('' when none did)."""
    failed = rows[rows[Col.STATUS] != OK]
    if failed.empty:
        return ""
    return "\n## Runs without a result\n\nLeft out of every table above:\n\n" + "".join(
        f"- `{r[Col.RUN_ID]}` {r[Col.METHOD]} {r.get(Col.PAIR, '')} seed {r.get(Col.SEED, '')}: "
        f"**{r[Col.STATUS]}**: {r.get(Col.ERROR, '')}\n" for _, r in failed.iterrows())


def parse_metrics(metric: str | Sequence[str]) -> list[str]:
    """``top1_last`` or ``top1_last,ece,kl_teacher`` (or a list) as the metric names, each checked."""
    names = [m.strip() for m in metric.split(",")] if isinstance(metric, str) else list(metric)
    names = [m for m in names if m]
    if not names:
        raise KdbenchError(f"--metric names no metric; give one or more of {', '.join(METRICS)}, comma-separated")
    for m in names:
        if m not in METRICS:
            raise unknown("metric", m, METRICS)
    return list(dict.fromkeys(names))


def build_report(results_dir: str | os.PathLike[str],
                 out_dir: str | os.PathLike[str] | None = None, *,
                 metric: str | Sequence[str] = "top1_last", ensemble_seeds: bool = False) -> list[Path]:
    """Write every benchmark's tables and plots plus ``index.md``; return the written paths.

    ``index.md`` is the last path. ``out_dir`` defaults to ``results_dir``. ``metric``: one metric or several
    (comma-separated); the first is the main table's and the plots'. ``ensemble_seeds``: each method's students
    of one pair with different seeds are also judged as one ensemble (:mod:`kdbench.report.ensembles`).
    """
    metrics = parse_metrics(metric)
    results = Path(results_dir)
    store = ResultsStore(results)
    runs = store.runs
    everything = load_rows(results, finished_only=False)
    rows = finished(everything, runs)
    check_test_sets(rows, store)
    # The predictions files are read once, and only when asked for what they give.
    wanted = ensemble_seeds or any(m in DERIVED for m in metrics) or is_member(rows).any()
    loaded = load_predictions(rows, store) if wanted else {}
    rows, declared, left_out = collapse(rows, loaded)  # each declared student ensemble becomes one row per seed
    if any(m in DERIVED for m in metrics):
        rows = add_derived(rows, loaded)
    for m in metrics:
        if m not in rows or numeric(rows, m).isna().all():
            raise KdbenchError(f"no run in {runs} records the metric '{m}'" + (
                " (it is derived from stored test-set predictions, which rows written before kdbench kept them "
                "lack; re-run those runs to get it)" if m in DERIVED else ""))
    out = output_folder(Path(out_dir) if out_dir is not None else results, "report folder")
    out.mkdir(parents=True, exist_ok=True)
    benches = benchmarks(rows)
    # After benchmarks(): variant labels (kd[temperature=8.0]) get colours of their own.
    colours = method_colours({m for b in benches for m in b.rows[Col.METHOD]})
    files = {b.slug: build_benchmark(b, metrics, colours, out, seed_ensembles(b.rows, loaded) if ensemble_seeds else (),
                                     [e for e in declared if e.run_id in set(b.rows[Col.RUN_ID].astype(str))])
             for b in benches}
    written = [p for b in benches for p in files[b.slug]]
    text = index(benches, files, metrics, results) + without_result(everything)
    if left_out:
        text += "\n## Student ensembles left out\n\n" + "".join(f"- {n}\n" for n in left_out)
    return written + [write_text(out / "index.md", text)]


__all__ = ["build_report", "load_rows"]
