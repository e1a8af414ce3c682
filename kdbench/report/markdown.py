"""Text outputs of a benchmark: number formatting, the markdown table and its sections, the CSV.

``table_<slug>.md`` holds the methods × pairs table (mean ± std over seeds, Δ vs ce), the
teacher ensembles, the cost of each model and the provenance of the runs; ``table_<slug>.csv``
the same numbers long-form (one line per method, pair and model).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..files import atomic_write
from .aggregate import (
    Benchmark,
    Entry,
    PairColumn,
    aggregate,
    method_order,
    pairs_of,
    schedule_label,
    setup_rows,
    throughput_setups,
)
from .rows import (
    BASELINE,
    METRICS,
    TEACHER,
    Col,
    distinct,
    is_teacher,
    mean_of,
    numeric,
    unit,
)
from .cost import REFERENCE, cost_frame, teacher_cost_frame
from .transfer import errors_table

#: Marks a cell that averages several runs of one seed.
DUP_MARK = "‡"


# -- numbers ------------------------------------------------------------------------------------
def fmt(x: float, digits: int = 2) -> str:
    """A number with ``digits`` decimals; '' for NaN."""
    return "" if pd.isna(x) else f"{x:.{digits}f}"


def fmt_count(x: float) -> str:
    """Parameters/FLOPs for humans: 272474 -> '0.27M', 1.2e9 -> '1.20G'."""
    if pd.isna(x):
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div or (unit == "M" and abs(x) >= 1e4):
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _value(e: Entry, usual_n: int, spread: bool = True) -> str:
    """'71.23 ± 0.45' ('71.23' for one seed or without spread), then Δ, then '[n=k]' when n is
    unusual and the repeated-seed mark."""
    text = fmt(e.stat.mean)
    if spread and e.stat.n > 1:
        text += f" ± {fmt(e.stat.std)}"
    if spread and not pd.isna(e.delta) and e.method not in (TEACHER, BASELINE):
        text += f" ({e.delta:+.2f})"
    text += f" [n={e.stat.n}]" if e.stat.n != usual_n else ""
    return text + (DUP_MARK if e.repeated_seed else "")


def _cell(entries: Sequence[Entry], usual_n: int) -> str:
    """One markdown cell: '72.10 ± 0.30 (+0.87)'; an ensemble's teachers as 'mean / mean'."""
    return " / ".join(_value(e, usual_n, spread=len(entries) == 1) for e in entries)


# -- markdown -----------------------------------------------------------------------------------
def md_escape(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|")


def md_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; the first column left-aligned, the rest right."""
    align = [":---"] + ["---:"] * (len(header) - 1)
    out = [header, align, *lines]
    return "\n".join("| " + " | ".join(md_escape(c) for c in line) + " |" for line in out)


def _seeds_note(usual_n: int, varies: bool) -> str:
    """The footnote saying how many seeds a cell averages."""
    unless = " unless marked [n=k]" if varies else ""
    if usual_n == 1:
        tail = "; a marked cell is the mean ± sample standard deviation over its n seeds."
        return f"n=1: a cell is a single seed{unless}, so no standard deviation is shown" + (
            tail if varies else ".")
    tail = "; a cell with n=1 is a single seed."
    return f"Each cell is the mean ± sample standard deviation over n={usual_n} seeds{unless}" + (
        tail if varies else ".")


def metric_table(entries: Sequence[Entry], pairs: Sequence[PairColumn],
                 methods: Sequence[str]) -> tuple[str, list[str]]:
    """The main markdown table and its footnotes."""
    ns = Counter(e.stat.n for e in entries)
    usual_n = ns.most_common(1)[0][0] if ns else 0
    cells: dict[tuple[str, PairColumn], list[Entry]] = {(e.method, e.pair): [] for e in entries}
    for e in entries:
        cells[(e.method, e.pair)].append(e)
    lines = [[m] + [_cell(cells.get((m, p), []), usual_n) for p in pairs] for m in methods]
    table = md_table(["method"] + [p.label for p in pairs], lines)
    notes = [_seeds_note(usual_n, varies=len(ns) > 1)]
    if any(not pd.isna(e.delta) and e.method != BASELINE for e in entries):
        notes.append(f"In parentheses: Δ, the difference of means against `{BASELINE}` with the same "
                     f"student, dataset and schedule; none where that student has no `{BASELINE}` run.")
    if any(len(cells.get((TEACHER, p), [])) > 1 for p in pairs):
        notes.append("An ensemble's teacher cell lists each teacher's mean, "
                     "in the order of the column name.")
    if any(e.repeated_seed for e in entries):
        notes.append(f"{DUP_MARK}: the cell averages several runs with the same seed "
                     "(e.g. different hyperparameters).")
    return table, notes


def _models(rows: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(model, role, rows) for each student and teacher model of a benchmark."""
    teachers = is_teacher(rows)
    out = [(m, "student", g) for m, g in rows[~teachers].groupby(Col.STUDENT, sort=True)]
    return out + [(m, "teacher", g) for m, g in rows[teachers].groupby(Col.STUDENT, sort=True)]


def cost_table(rows: pd.DataFrame) -> tuple[str, list[str]]:
    """Per model: parameters, FLOPs/image and throughput, one throughput column per device setup."""
    setups = throughput_setups(rows)
    unmeasured = _unmeasured_throughput(rows)
    header = ["model", "role", "params", "FLOPs/image"]
    header += [f"images/s ({s.text})" for s in setups] or (["images/s"] if unmeasured.any() else [])
    lines = []
    for model, role, group in _models(rows):
        line = [model, role, fmt_count(mean_of(group, Col.PARAMS)), fmt_count(mean_of(group, Col.FLOPS))]
        missing = "not measured" if unmeasured[group.index].any() else "—"
        for s in setups:
            line.append(fmt(mean_of(setup_rows(group, s), Col.THROUGHPUT), 0) or missing)
        if not setups and unmeasured.any():
            line.append(missing)
        lines.append(line)
    notes = []
    if setups:
        notes.append("Throughput is inference images/s, averaged over the runs of each model.")
    if unmeasured.any():
        why = "; ".join(sorted({n.removeprefix("not measured: ") for n in rows.loc[unmeasured, Col.THROUGHPUT_NOTE]
                                .astype(str)}))
        notes.append(f"Throughput was not measured for {int(unmeasured.sum())} run(s): {why}.")
    devices = sorted({s.device for s in setups})
    if len(devices) > 1:
        notes.insert(0, f"**These runs measured throughput on {len(devices)} different devices "
                        f"({', '.join(devices)}): the columns are not comparable with each other.**")
    return md_table(header, lines), notes


def _unmeasured_throughput(rows: pd.DataFrame) -> pd.Series:
    """True for the rows whose throughput was not measured on purpose (``throughput_note`` says why)."""
    if Col.THROUGHPUT_NOTE not in rows:
        return pd.Series(False, index=rows.index)
    return rows[Col.THROUGHPUT_NOTE].fillna("").astype(str).str.strip() != ""


def method_cost_section(rows: pd.DataFrame) -> list[str]:
    """The training cost of each method relative to kd (:mod:`kdbench.report.cost`); none without students."""
    costs = cost_frame(rows)
    if costs.empty:
        return []
    order = {m: i for i, m in enumerate(method_order(rows))}
    costs = costs.sort_values("method", key=lambda ms: ms.map(lambda m: order.get(m, len(order))), kind="stable")
    def ratio(x: float) -> str:
        return f"{x:.2f}×" if not math.isnan(x) else "—"

    kinds = distinct(rows[~is_teacher(rows)], Col.PEAK_MEM_KIND)
    lines = [[f"`{c.method}`", fmt(c.epoch_s, 3), fmt(c.total_s, 1), ratio(c.vs_ce), ratio(c.vs_kd),
              fmt(c.peak_mem_mb, 0) or "—", fmt_count(c.extra_params), f"{c.init_epochs:g}" if c.init_epochs else "—",
              fmt(c.state_mb, 1) if c.state_mb else "—", "yes" if c.teacher_cache else "no"]
             for c in costs.itertuples()]
    header = ["method", "s/epoch", "s total", f"× {BASELINE}", f"× {REFERENCE}", "peak MB", "extra params",
              "init epochs", "state (MB)", "teacher cache"]
    section = ["", "## Training cost per method", "",
               f"Median steady-state training time per epoch (the first epoch a process trains is left out) and "
               f"median training time of a whole run (init stage and compiling included); × {BASELINE} and × "
               f"{REFERENCE}: the geometric mean over students (pairs) of the epoch time's ratio to `{BASELINE}` "
               f"on the same student (to `{REFERENCE}` on the same pair) and device. Peak MB: the median of the "
               f"runs' peak memory ({', '.join(kinds) or 'unknown'}; on the CPU the process's peak RSS, an upper "
               f"bound). Extra parameters are the method's own trained modules (regressors, embeddings); init "
               f"epochs train before the schedule and are not in s/epoch's count but are in the run's training "
               f"time; state is untrained per-image memory (CRD's bank); teacher cache: the teachers' outputs "
               f"were looked up, not computed, which makes a method cheaper than one that runs its teachers.", "",
               md_table(header, lines)]
    teachers = teacher_cost_frame(rows)
    if not teachers.empty:
        section += ["", "What the teachers cost, paid once and shared by the students that distilled from them "
                    "(training time, the output cache's build time where one was used, and their sum per student):",
                    "", md_table(["teacher", "run", "s training", "s cache build", "students", "s per student"],
                                 [[t.teacher, f"`{t.run_id}`", fmt(t.train_s, 1), fmt(t.cache_build_s, 1) or "—",
                                   str(t.students), fmt(t.per_student_s, 2) or "—"] for t in teachers.itertuples()])]
    return section


def provenance(rows: pd.DataFrame) -> str:
    """The footer: versions, commits, devices, commands and the number of runs."""
    def listed(col: str) -> str:
        values = distinct(rows, col)
        return ", ".join(f"`{v}`" for v in values) if values else "unknown"

    finished = distinct(rows, Col.FINISHED_AT)
    when = f", finished {finished[0]} … {finished[-1]}" if finished else ""
    lines = [
        "## Provenance", "",
        f"- runs: {len(rows)}{when}",
        f"- kdbench version: {listed(Col.KDBENCH_VERSION)}",
        f"- git commit: {listed(Col.GIT_COMMIT)}",
        f"- device: {listed(Col.DEVICE)}",
        f"- torch: {listed(Col.TORCH_VERSION)}; timm: {listed(Col.TIMM_VERSION)}",
        "- commands:",
    ]
    lines += [f"  - `{c}`" for c in distinct(rows, Col.COMMAND)] or ["  - unknown"]
    return "\n".join(lines)


def ensemble_section(rows: pd.DataFrame) -> list[str]:
    """Each multi-teacher ensemble's own top-1 beside its members' (last epoch), when there is one."""
    runs = rows[numeric(rows, Col.TEACHER_ENSEMBLE_TOP1).notna()]
    if runs.empty:
        return []
    top1_of = dict(zip(rows[Col.RUN_ID], numeric(rows, Col.top1("last"))))
    lines = []
    for ids, group in runs.groupby(runs[Col.TEACHER_IDS].astype(str), sort=True):
        names = str(group[Col.TEACHERS].iloc[0]).split("+")
        seeds = str(group[Col.TEACHER_SEEDS].iloc[0]) if Col.TEACHER_SEEDS in group else ""
        seeds_of = seeds.split("+") if seeds else [""] * len(names)
        # Fixed-seed teachers are already named 'model@N' (aggregate.label_teacher_seeds).
        members = ", ".join(f"{n}{'@' + s if s and '@' not in n else ''} {fmt(top1_of.get(i, math.nan))}"
                            for n, s, i in zip(names, seeds_of, ids.split("+")))
        ensemble = fmt(float(numeric(group, Col.TEACHER_ENSEMBLE_TOP1).iloc[0]))
        lines.append(["+".join(names), members, ensemble])
    return ["", "## Teacher ensembles", "",
            "Top-1 at the last epoch of each teacher, and of their ensemble (the mean of their class "
            "probabilities), on the test set.", "",
            md_table(["teachers", "each teacher", "ensemble"], lines)]


def student_ensemble_section(ensembles: Sequence[Any], *, declared: bool = False) -> list[str]:
    """The markdown of student ensembles (:class:`kdbench.report.ensembles.Ensemble`): from seeds
    (``--ensemble-seeds``), or ``declared`` by a pair (``T:S*3``), one line per seed."""
    lines = [[f"`{e.method}`", e.pair, "+".join(map(str, e.seeds)) if declared else str(len(e.seeds)),
              " / ".join(fmt(x) for x in e.member_top1), fmt(e.top1), fmt(e.top1 - statistics.fmean(e.member_top1)),
              fmt(e.diversity), fmt_count(e.params), fmt(e.throughput, 0) or "—"] + ([e.how or "—"] if declared else [])
             for e in ensembles]
    header = ["method", "pair", "seed" if declared else "K", "each member's top-1", "ensemble top-1",
              "ensemble − mean member", "diversity (%)", "params (sum)",
              "images/s, deployed" if declared else "images/s, members in turn"] + (["how it ran"] if declared else [])
    common = ("top-1 at the last epoch of each member (in {order}) and of their ensemble (the mean of their class "
              "probabilities); diversity is the mean over member pairs of the % of test images on which their top-1 "
              "classes differ.")
    if declared:
        return ["", "## Student ensembles (declared)", "",
                "Each pair written T:S*K or T:A+B trains its members from one teacher, and the ensemble is judged as "
                "one model; its row in the tables above is the ensemble's. " + common.format(order="member order") +
                " Images/s is measured on the ensemble as deployed, by member 0's run: the members one after "
                "another, and those of one architecture also batched with torch.vmap; the faster counts, and the "
                "last column gives both.", "", md_table(header, lines)]
    return ["", "## Student ensembles (seeds)", "",
            "The students one method distilled with K seeds, as one model: " + common.format(order="seed order") +
            " Images/s is derived from the members' measured throughput as if run one after another "
            "(1 / Σ 1/images/s), not measured on a deployed ensemble.", "", md_table(header, lines)]


def method_papers(rows: pd.DataFrame) -> str:
    """Each method's paper once, after all the labels it covers (a sweep's nine ``kd[...]`` share one)."""
    labels: dict[str, list[str]] = {}
    for method in method_order(rows):
        paper = rows.loc[rows[Col.METHOD] == method, Col.METHOD_PAPER].dropna().astype(str)
        if method != TEACHER and len(paper) and paper.iloc[0]:
            labels.setdefault(paper.iloc[0], []).append(f"`{method}`")
    return "; ".join(f"{', '.join(names)}: {paper}" for paper, names in labels.items())


def benchmark_markdown(bench: Benchmark, entries: Sequence[Entry], metric: str,
                       plots: Sequence[Path] = (), *, more: Sequence[str] = ()) -> str:
    """The whole markdown report of one benchmark; ``more``: further metrics, a table each after the main one."""
    rows = bench.rows
    main, main_notes = metric_table(entries, pairs_of(rows), method_order(rows))
    costs, cost_notes = cost_table(rows)
    parts = [f"# {bench.title} — {METRICS[metric]}", ""]
    if rows[Col.SHORTENED].any():
        parts += [f"**Shortened schedule** ({schedule_label(rows)}): numbers are not comparable with "
                  "results trained on the full recipe.", ""]
    if Col.REAL_DATA in rows and (rows[Col.REAL_DATA] == False).any():  # noqa: E712 (missing counts as real)
        parts += ["**NOT REAL DATA**: these runs trained on synthetic stand-in images; the numbers only show "
                  "that the runs work end to end.", ""]
    parts += [main, ""]
    parts += [f"- {n}" for n in main_notes]
    for other in more:
        table, _ = metric_table(aggregate(rows, other), pairs_of(rows), method_order(rows))
        parts += ["", f"## {METRICS[other][0].upper()}{METRICS[other][1:]} ({unit(other)})", "", table]
    if papers := method_papers(rows):
        parts += ["", "Methods: " + papers]
    parts += ensemble_section(rows)
    parts += method_cost_section(rows)
    if errors := errors_table(rows):  # a transfer set's absent classes, bias adjustment
        header, lines, notes = errors
        parts += ["", "## Test errors per class", "", md_table(header, lines), ""] + [f"- {n}" for n in notes]
    parts += ["", "## Models", ""] + [f"- {n}" for n in cost_notes] + ["", costs]
    if plots:
        parts += ["", "Plots: " + ", ".join(f"[{p.stem}]({p.name})" for p in plots)]
    parts += ["", provenance(rows), ""]
    return "\n".join(parts)


# -- CSV ----------------------------------------------------------------------------------------
def csv_frame(bench: Benchmark, entries: Sequence[Entry], metric: str) -> pd.DataFrame:
    """The long-form CSV: one line per (method, pair, model).

    ``pair``, ``teachers`` and ``student`` name the table column; ``model`` is the model the numbers
    are of (the student, or for ``teacher`` lines each teacher of the pair). ``delta_vs_ce`` is 0 for
    ``ce`` itself and empty for teachers or where the student has no ce run.
    """
    schedule = schedule_label(bench.rows)
    return pd.DataFrame([{
        "dataset": bench.dataset, "schedule": schedule, "transfer": bench.transfer,
        "shortened": bool(bench.rows[Col.SHORTENED].any()),
        "method": e.method, "pair": e.pair.key, "teachers": "+".join(e.pair.teachers),
        "student": e.pair.student, "model": e.model, "metric": metric,
        "mean": e.stat.mean, "std": e.stat.std, "n": e.stat.n,
        "delta_vs_ce": e.delta if e.method != BASELINE else (0.0 if e.stat.n else math.nan),
        "params": e.params, "extra_params": e.extra_params, "flops_per_image": e.flops_per_image,
        "throughput_img_s": e.throughput_img_s, "throughput_device": e.throughput_device,
    } for e in entries])


def write_text(path: Path, text: str) -> Path:
    """Atomically write a text file (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
