"""Derive tables and plots from the results store (``kdbench report``).

The store is ``<results_dir>/runs/<run_id>.json``: one flat JSON object (a *row*) per finished
run. Nothing here is ever hand-edited: every table and plot is rebuilt from the rows.

Rows are grouped into *benchmarks* by ``(dataset, schedule)``; datasets and schedules are never
mixed in one table or plot. Per benchmark the report writes::

    table_<slug>.md                 methods x teacher→student pairs: mean ± std over seeds, Δ vs ce
    table_<slug>.csv                the same numbers, long-form (one line per method, pair, model)
    acc_vs_params_<slug>.png        metric against student parameters (log x)
    acc_vs_throughput_<slug>.png    metric against inference throughput (one file per device)
    bars_<slug>.png                 per pair, one bar per method; teachers as dashed lines

and ``index.md`` links them all. Two method names are part of the contract: ``teacher`` (rows
of kind ``teacher``: the teacher models themselves) and ``ce`` (the label-only baseline, one run
of which serves every pair with its student). Every other method is treated alike.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kdbench.errors import KdbenchError, unknown
from kdbench.store import atomic_write, read_row_file, warn

TEACHER = "teacher"
BASELINE = "ce"

#: Metrics a report can be built on, and how titles name them.
METRICS: dict[str, str] = {
    "top1_last": "top-1 at the last epoch",
    "top1_best": "top-1 at the best epoch",
    "top5_last": "top-5 at the last epoch",
    "top5_best": "top-5 at the best epoch",
}

#: Columns every row must have (the rest may be missing and show as blanks).
REQUIRED = ("run_id", "kind", "method", "student", "dataset", "schedule")
_TEXT_COLUMNS = ("run_id", "kind", "method", "method_paper", "teachers", "student", "dataset",
                 "schedule", "throughput_device", "throughput_dtype", "device", "git_commit",
                 "command", "kdbench_version", "torch_version", "timm_version", "finished_at")
_DUP_MARK = "‡"


# -- loading ------------------------------------------------------------------------------------
def load_rows(results_dir: str | os.PathLike[str], *, finished_only: bool = True) -> pd.DataFrame:
    """Read every ``runs/*.json`` under ``results_dir`` (sorted by file name) into one frame.

    A file damaged by a crash is reported by name (a warning) and skipped. With ``finished_only``,
    rows whose run did not finish cleanly (status "diverged") are left out: they have no accuracy
    to average. Raises KdbenchError when the store is missing or holds no readable row.
    """
    runs = Path(results_dir) / "runs"
    files = sorted(runs.glob("*.json")) if runs.is_dir() else []
    files = [p for p in files if not p.name.startswith(".")]  # a writer's temp file
    records = [r for r in map(_read_row, files) if r is not None]
    if not records:
        raise KdbenchError(f"no finished runs were found in {runs}; run `kdbench run` first")
    rows = pd.DataFrame.from_records(records)
    rows["status"] = rows["status"].fillna("ok").astype(str) if "status" in rows else "ok"
    if finished_only:
        rows = finished(rows, runs)
    for col in _TEXT_COLUMNS:
        rows[col] = rows[col].fillna("").astype(str) if col in rows else ""
    if "shortened" not in rows:  # derive it for rows written before the column existed
        rows["shortened"] = _numeric(rows, "epochs") < _numeric(rows, "recipe_epochs")
    rows["shortened"] = rows["shortened"].fillna(False).astype(bool)
    return rows


def finished(rows: pd.DataFrame, where: Path) -> pd.DataFrame:
    """The rows of runs that finished with a result (not diverged)."""
    rows = rows[rows["status"] == "ok"].reset_index(drop=True)
    if rows.empty:
        raise KdbenchError(f"no run in {where} finished with a result (every one diverged); see `status` and "
                           "`error` in its files")
    return rows


def _numeric(rows: pd.DataFrame, col: str) -> pd.Series:
    """A column as floats (NaN where missing or not a number)."""
    if col not in rows:
        return pd.Series(math.nan, index=rows.index, dtype=float)
    return pd.to_numeric(rows[col], errors="coerce").astype(float)


def _read_row(path: Path) -> dict | None:
    """One run file as a dict, or None (with a warning naming it) for a damaged or incomplete file."""
    row = read_row_file(path)
    if row is None:
        return None
    missing = [c for c in REQUIRED if c not in row]
    if missing:
        warn(f"skipping run file {path}: it lacks {', '.join(missing)}; delete it or re-run that run")
        return None
    return row


# -- grouping -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Benchmark:
    """The rows of one (dataset, schedule, precision): one table and one set of plots."""

    dataset: str
    schedule: str
    slug: str
    rows: pd.DataFrame
    precision: str = "fp32"

    @property
    def title(self) -> str:
        """'dataset · schedule', with a shortened schedule always labelled as such (and a precision
        other than fp32 named)."""
        text = f"{self.dataset} · {schedule_label(self.rows)}"
        return text + (f" · {self.precision}" if self.precision != "fp32" else "")


def schedule_label(rows: pd.DataFrame) -> str:
    """The schedule string of ``rows``, marked '(shortened)' if it does not already say so."""
    schedule = str(rows["schedule"].iloc[0])
    if rows["shortened"].any() and "shortened" not in schedule.lower():
        schedule += " (shortened)"
    return schedule


def slugify(text: str) -> str:
    """A file-name-safe lower-case slug: 'crd, 240 epochs' -> 'crd-240ep'."""
    text = re.sub(r"\s*epochs?\b", "ep", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "x"


def benchmarks(rows: pd.DataFrame) -> list[Benchmark]:
    """Split rows into benchmarks by (dataset, schedule, precision), sorted, each with a unique slug.

    bf16 and fp32 runs are separate tables: averaging them as seeds of one cell would hide the very
    difference a precision comparison looks for. Rows from before precision was recorded are fp32.
    """
    out: list[Benchmark] = []
    used: set[str] = set()
    precision = rows["precision"].fillna("fp32") if "precision" in rows else pd.Series("fp32", index=rows.index)
    for (dataset, _, prec), group in rows.groupby(["dataset", "schedule", precision], sort=True):
        slug = base = f"{slugify(dataset)}_{slugify(schedule_label(group))}" + (f"_{prec}" if prec != "fp32" else "")
        k = 2
        while slug in used:
            slug, k = f"{base}-{k}", k + 1
        used.add(slug)
        out.append(Benchmark(dataset, str(group["schedule"].iloc[0]), slug,
                             label_teacher_seeds(label_variants(group)), str(prec)))
    return out


def label_teacher_seeds(rows: pd.DataFrame) -> pd.DataFrame:
    """Name teachers whose seed a pair fixed (``model@N``) by that label, in student and teacher rows.

    Three seeds of one architecture are three teachers (an ensemble, or one teacher shared by all
    student seeds): the table must not average them as if they were seeds of one.
    """
    if "pair" not in rows:
        return rows
    students = (rows["kind"] != TEACHER) & rows["pair"].astype(str).str.contains("@", regex=False)
    if not students.any():
        return rows
    rows = rows.copy()
    rows.loc[students, "teachers"] = rows.loc[students, "pair"].astype(str).str.split("→").str[0]
    labels = {t for v in rows.loc[students, "teachers"] for t in v.split("+") if "@" in t}
    seeds = _numeric(rows, "seed")
    for label in labels:
        model, _, seed = label.rpartition("@")
        mask = (rows["kind"] == TEACHER) & (rows["student"] == model) & (seeds == float(seed))
        rows.loc[mask, "student"] = label
    return rows


def label_variants(rows: pd.DataFrame) -> pd.DataFrame:
    """Give each hyperparameter setting of a method its own row label: 'kd[temperature=8.0]'.

    Runs of one method with different hyperparameters are different experiments, never seeds
    of one cell. A method run with a single setting per pair keeps its plain name.
    """
    if "hparams" not in rows:
        return rows
    rows = rows.copy()
    for method, group in rows.groupby("method"):
        settings = {h: json.loads(h) for h in group["hparams"].dropna().unique() if isinstance(h, str)}
        per_pair = group.groupby([group["teachers"].astype(str), group["student"].astype(str)])["hparams"].nunique()
        if len(settings) < 2 or per_pair.max() < 2:
            continue  # one setting per pair (a suite may set one per pair, e.g. DKD's beta): no variants
        keys = sorted({k for hp in settings.values() for k in hp})
        differ = [k for k in keys if len({json.dumps(hp.get(k)) for hp in settings.values()}) > 1]
        for text, hp in settings.items():
            label = ",".join(f"{k}={hp.get(k)}" for k in differ)
            rows.loc[(rows["method"] == method) & (rows["hparams"] == text), "method"] = f"{method}[{label}]"
    return rows


# -- aggregation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """A table column: the teachers a student was distilled from (empty: no teacher)."""

    student: str
    teachers: tuple[str, ...]

    @property
    def key(self) -> str:
        """The store's spelling, 'a+b→s'."""
        return f"{'+'.join(self.teachers)}→{self.student}"

    @property
    def label(self) -> str:
        """The human spelling, 'a+b → s'."""
        return f"{'+'.join(self.teachers)} → {self.student}".strip()


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (NaN for one value) and count of a metric over seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        arr = np.asarray([v for v in values if v is not None and not pd.isna(v)], dtype=float)
        if arr.size == 0:
            return cls(math.nan, math.nan, 0)
        std = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
        return cls(float(arr.mean()), std, int(arr.size))


@dataclass(frozen=True)
class Entry:
    """One aggregated table cell part: a method's runs of one model within one pair column."""

    method: str
    pair: Pair
    model: str
    stat: Stat
    delta: float  # mean minus the mean of ce with the same student; NaN where not applicable
    params: float
    extra_params: float
    flops_per_image: float
    throughput_img_s: float  # NaN when the runs measured throughput on different devices
    throughput_device: str
    repeated_seed: bool  # some seed appears in more than one run of this cell


def _teachers(value: str) -> tuple[str, ...]:
    return tuple(t for t in str(value).split("+") if t)


def _is_teacher(rows: pd.DataFrame) -> pd.Series:
    return rows["kind"] == TEACHER


def method_order(rows: pd.DataFrame) -> list[str]:
    """Methods in table order: teacher, ce, then the others alphabetically."""
    names = set(rows.loc[~_is_teacher(rows), "method"])
    head = [TEACHER] if _is_teacher(rows).any() else []
    head += [BASELINE] if BASELINE in names else []
    return head + sorted(names - {BASELINE, TEACHER})


def pairs_of(rows: pd.DataFrame) -> list[Pair]:
    """The table columns: every (teachers, student) of the student runs, then a column for
    each ce-only student and each teacher that no student run names."""
    students = rows[~_is_teacher(rows)]
    distilled = students[students["method"] != BASELINE]
    pairs = {Pair(s, _teachers(t)) for s, t in zip(distilled["student"], distilled["teachers"])}
    covered = {p.student for p in pairs}
    ce_students = set(students.loc[students["method"] == BASELINE, "student"])
    pairs |= {Pair(s, ()) for s in ce_students - covered}
    named = {t for p in pairs for t in p.teachers}
    pairs |= {Pair("", (t,)) for t in rows.loc[_is_teacher(rows), "student"] if t not in named}
    return sorted(pairs, key=lambda p: (p.student == "", p.student, len(p.teachers), p.teachers))


def _mean_of(rows: pd.DataFrame, col: str) -> float:
    return float(_numeric(rows, col).mean()) if len(rows) else math.nan


def _entry(method: str, pair: Pair, model: str, runs: pd.DataFrame, metric: str,
           ce: Stat | None) -> Entry:
    """Aggregate the runs of one cell part; Δ against ``ce`` where given."""
    stat = Stat.of(_numeric(runs, metric))
    devices = sorted(set(runs.get("throughput_device", pd.Series(dtype=str))) - {""})
    seeds = runs["seed"].dropna().tolist() if "seed" in runs else []
    return Entry(
        method=method, pair=pair, model=model, stat=stat,
        delta=stat.mean - ce.mean if ce is not None else math.nan,
        params=_mean_of(runs, "params"), extra_params=_mean_of(runs, "extra_params"),
        flops_per_image=_mean_of(runs, "flops_per_image"),
        throughput_img_s=_mean_of(runs, "throughput_img_s") if len(devices) <= 1 else math.nan,
        throughput_device="+".join(devices),
        repeated_seed=len(seeds) != len(set(seeds)),
    )


def aggregate(rows: pd.DataFrame, metric: str) -> list[Entry]:
    """Aggregate one benchmark's rows into table entries, in table order (method, pair, model).

    A ``teacher`` entry is made per teacher of a pair (two for an ensemble of two); the ``ce``
    entry of a pair aggregates the ce runs of that pair's student, so one ce run serves every pair
    with that student. Δ is against that ce entry.
    """
    teachers, students = rows[_is_teacher(rows)], rows[~_is_teacher(rows)]
    ce_runs = students[students["method"] == BASELINE]
    ce_stats = {s: Stat.of(_numeric(g, metric)) for s, g in ce_runs.groupby("student")}
    keyed = students.assign(_teachers=students["teachers"].map(_teachers))
    entries: list[Entry] = []
    for method in method_order(rows):
        for pair in pairs_of(rows):
            ce = ce_stats.get(pair.student)
            if method == TEACHER:
                for t in pair.teachers:
                    runs = teachers[teachers["student"] == t]
                    entries.append(_entry(method, pair, t, runs, metric, None))
                continue
            if method == BASELINE:
                runs = ce_runs[ce_runs["student"] == pair.student]
            else:
                mask = (keyed["method"] == method) & (keyed["student"] == pair.student)
                runs = keyed[mask & (keyed["_teachers"] == pair.teachers)]
            entries.append(_entry(method, pair, pair.student, runs, metric, ce))
    return [e for e in entries if e.stat.n > 0]


# -- number formatting --------------------------------------------------------------------------
def _fmt(x: float, digits: int = 2) -> str:
    return "" if pd.isna(x) else f"{x:.{digits}f}"


def _fmt_count(x: float) -> str:
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
    text = _fmt(e.stat.mean)
    if spread and e.stat.n > 1:
        text += f" ± {_fmt(e.stat.std)}"
    if spread and not pd.isna(e.delta) and e.method not in (TEACHER, BASELINE):
        text += f" ({e.delta:+.2f})"
    text += f" [n={e.stat.n}]" if e.stat.n != usual_n else ""
    return text + (_DUP_MARK if e.repeated_seed else "")


def _cell(entries: Sequence[Entry], usual_n: int) -> str:
    """One markdown cell: '72.10 ± 0.30 (+0.87)'; an ensemble's teachers as 'mean / mean'."""
    return " / ".join(_value(e, usual_n, spread=len(entries) == 1) for e in entries)


# -- tables -------------------------------------------------------------------------------------
def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _md_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; the first column left-aligned, the rest right."""
    align = [":---"] + ["---:"] * (len(header) - 1)
    out = [header, align, *lines]
    return "\n".join("| " + " | ".join(_md_escape(c) for c in line) + " |" for line in out)


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


def metric_table(entries: Sequence[Entry], pairs: Sequence[Pair],
                 methods: Sequence[str]) -> tuple[str, list[str]]:
    """The main markdown table and its footnotes."""
    ns = Counter(e.stat.n for e in entries)
    usual_n = ns.most_common(1)[0][0] if ns else 0
    cells = {(e.method, e.pair): [] for e in entries}
    for e in entries:
        cells[(e.method, e.pair)].append(e)
    lines = [[m] + [_cell(cells.get((m, p), []), usual_n) for p in pairs] for m in methods]
    table = _md_table(["method"] + [p.label for p in pairs], lines)
    notes = [_seeds_note(usual_n, varies=len(ns) > 1)]
    if any(not pd.isna(e.delta) and e.method != BASELINE for e in entries):
        notes.append(f"In parentheses: Δ, the difference of means against `{BASELINE}` with the same "
                     f"student, dataset and schedule; none where that student has no `{BASELINE}` run.")
    if any(len(cells.get((TEACHER, p), [])) > 1 for p in pairs):
        notes.append("An ensemble's teacher cell lists each teacher's mean, "
                     "in the order of the column name.")
    if any(e.repeated_seed for e in entries):
        notes.append(f"{_DUP_MARK}: the cell averages several runs with the same seed "
                     "(e.g. different hyperparameters).")
    return table, notes


def _models(rows: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(model, role, rows) for each student and teacher model of a benchmark."""
    teachers = _is_teacher(rows)
    out = [(m, "student", g) for m, g in rows[~teachers].groupby("student", sort=True)]
    return out + [(m, "teacher", g) for m, g in rows[teachers].groupby("student", sort=True)]


def _throughput_setups(rows: pd.DataFrame) -> list[tuple[str, str, str]]:
    """Distinct (device, batch, dtype) throughput measurements, sorted."""
    if "throughput_img_s" not in rows:
        return []
    measured = rows[pd.to_numeric(rows["throughput_img_s"], errors="coerce").notna()]
    keys = zip(measured["throughput_device"], _batches(measured), measured["throughput_dtype"])
    return sorted(set(keys))


def _batches(rows: pd.DataFrame) -> pd.Series:
    """The throughput batch size of each row as text ('' where unknown)."""
    if "throughput_batch" not in rows:
        return pd.Series("", index=rows.index, dtype=str)
    return rows["throughput_batch"].map(_fmt_int)


def _fmt_int(x: object) -> str:
    return "" if pd.isna(x) else f"{int(x)}" if isinstance(x, (int, float, np.number)) else str(x)


def _setup_rows(rows: pd.DataFrame, setup: tuple[str, str, str]) -> pd.DataFrame:
    device, batch, dtype = setup
    mask = (rows["throughput_device"] == device) & (_batches(rows) == batch)
    return rows[mask & (rows["throughput_dtype"] == dtype)]


def _setup_text(setup: tuple[str, str, str]) -> str:
    device, batch, dtype = setup
    return ", ".join(x for x in (device or "unknown device", batch and f"batch {batch}", dtype) if x)


def cost_table(rows: pd.DataFrame) -> tuple[str, list[str]]:
    """Per model: parameters, FLOPs/image and throughput, one throughput column per device setup."""
    setups = _throughput_setups(rows)
    header = ["model", "role", "params", "FLOPs/image"]
    header += [f"images/s ({_setup_text(s)})" for s in setups]
    lines = []
    for model, role, group in _models(rows):
        line = [model, role, _fmt_count(_mean_of(group, "params")),
                _fmt_count(_mean_of(group, "flops_per_image"))]
        for s in setups:
            line.append(_fmt(_mean_of(_setup_rows(group, s), "throughput_img_s"), 0) or "—")
        lines.append(line)
    notes = []
    if setups:
        notes.append("Throughput is inference images/s, averaged over the runs of each model.")
    devices = sorted({s[0] for s in setups})
    if len(devices) > 1:
        notes.insert(0, f"**These runs measured throughput on {len(devices)} different devices "
                        f"({', '.join(devices)}): the columns are not comparable with each other.**")
    return _md_table(header, lines), notes


def _distinct(rows: pd.DataFrame, col: str) -> list[str]:
    return sorted(set(rows[col]) - {""}) if col in rows else []


def provenance(rows: pd.DataFrame) -> str:
    """The footer: versions, commits, devices, commands and the number of runs."""
    def listed(col: str) -> str:
        values = _distinct(rows, col)
        return ", ".join(f"`{v}`" for v in values) if values else "unknown"

    finished = _distinct(rows, "finished_at")
    when = f", finished {finished[0]} … {finished[-1]}" if finished else ""
    lines = [
        "## Provenance", "",
        f"- runs: {len(rows)}{when}",
        f"- kdbench version: {listed('kdbench_version')}",
        f"- git commit: {listed('git_commit')}",
        f"- device: {listed('device')}",
        f"- torch: {listed('torch_version')}; timm: {listed('timm_version')}",
        "- commands:",
    ]
    lines += [f"  - `{c}`" for c in _distinct(rows, "command")] or ["  - unknown"]
    return "\n".join(lines)


def ensemble_section(rows: pd.DataFrame) -> list[str]:
    """Each multi-teacher ensemble's own top-1 beside its members' (last epoch), when there is one."""
    acc = _numeric(rows, "teacher_ensemble_top1")
    runs = rows[acc.notna()]
    if runs.empty:
        return []
    by_id = dict(zip(rows["run_id"], _numeric(rows, "top1_last")))
    lines = []
    for ids, group in runs.groupby(runs["teacher_ids"].astype(str), sort=True):
        seeds = str(group["teacher_seeds"].iloc[0]) if "teacher_seeds" in group else ""
        members = ids.split("+")
        names = str(group["teachers"].iloc[0]).split("+")
        member_acc = ", ".join(f"{n}{'@' + s if s and '@' not in n else ''} {_fmt(by_id.get(i, math.nan))}"
                               for n, s, i in zip(names, (seeds.split("+") if seeds else [""] * len(names)), members))
        lines.append([_md_escape("+".join(names)), member_acc, _fmt(float(_numeric(group, "teacher_ensemble_top1").iloc[0]))])
    return ["", "## Teacher ensembles", "",
            "Top-1 at the last epoch of each teacher, and of their ensemble (the mean of their class "
            "probabilities), on the test set.", "",
            _md_table(["teachers", "each teacher", "ensemble"], lines)]


def markdown(bench: Benchmark, entries: Sequence[Entry], metric: str,
             plots: Sequence[Path] = ()) -> str:
    """The whole markdown report of one benchmark."""
    rows = bench.rows
    main, main_notes = metric_table(entries, pairs_of(rows), method_order(rows))
    costs, cost_notes = cost_table(rows)
    parts = [f"# {bench.title} — {METRICS[metric]}", ""]
    if rows["shortened"].any():
        parts += [f"**Shortened schedule** ({schedule_label(rows)}): numbers are not comparable with "
                  "results trained on the full recipe.", ""]
    if "real_data" in rows and (rows["real_data"] == False).any():  # noqa: E712 (missing counts as real)
        parts += ["**NOT REAL DATA**: these runs trained on synthetic stand-in images; the numbers only show "
                  "that the runs work end to end.", ""]
    parts += [main, ""]
    parts += [f"- {n}" for n in main_notes]
    papers = rows[~_is_teacher(rows)].drop_duplicates("method")
    papers = [(m, p) for m, p in zip(papers["method"], papers["method_paper"]) if p]
    if papers:
        parts += ["", "Methods: " + "; ".join(f"`{m}`: {p}" for m, p in sorted(papers))]
    parts += ensemble_section(rows)
    parts += ["", "## Models", ""] + [f"- {n}" for n in cost_notes] + ["", costs]
    if plots:
        parts += ["", "Plots: " + ", ".join(f"[{p.stem}]({p.name})" for p in plots)]
    parts += ["", provenance(rows), ""]
    return "\n".join(parts)


def csv_frame(bench: Benchmark, entries: Sequence[Entry], metric: str) -> pd.DataFrame:
    """The long-form CSV: one line per (method, pair, model).

    ``pair``, ``teachers`` and ``student`` name the table column; ``model`` is the model the numbers
    are of (the student, or for ``teacher`` lines each teacher of the pair). ``delta_vs_ce`` is 0 for
    ``ce`` itself and empty for teachers or where the student has no ce run.
    """
    schedule = schedule_label(bench.rows)
    return pd.DataFrame([{
        "dataset": bench.dataset, "schedule": schedule,
        "shortened": bool(bench.rows["shortened"].any()),
        "method": e.method, "pair": e.pair.key, "teachers": "+".join(e.pair.teachers),
        "student": e.pair.student, "model": e.model, "metric": metric,
        "mean": e.stat.mean, "std": e.stat.std, "n": e.stat.n,
        "delta_vs_ce": e.delta if e.method != BASELINE else (0.0 if e.stat.n else math.nan),
        "params": e.params, "extra_params": e.extra_params, "flops_per_image": e.flops_per_image,
        "throughput_img_s": e.throughput_img_s, "throughput_device": e.throughput_device,
    } for e in entries])


# -- atomic writes ------------------------------------------------------------------------------
def write_text(path: Path, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# -- plots --------------------------------------------------------------------------------------
_MARKERS = ("s", "D", "^", "v", "P", "X", "<", ">", "h", "p", "d", "8")
_RC = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
       "xtick.labelsize": 9, "ytick.labelsize": 9,
       "axes.spines.top": False, "axes.spines.right": False}


def method_colours(methods: Iterable[str]) -> dict[str, str]:
    """A fixed colour per method across every plot: teacher black, ce grey, the rest tab10/tab20."""
    from matplotlib import colormaps
    palette = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]  # 7 is grey
    palette += list(colormaps["tab20"].colors[1::2])
    others = sorted(set(methods) - {TEACHER, BASELINE})
    colours = {TEACHER: "black", BASELINE: "#7f7f7f"}
    for i, m in enumerate(others):
        colours[m] = _hex(palette[i % len(palette)])
    return colours


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb[:3])


def _figure(width: float, height: float):
    """A pyplot-free figure on the Agg canvas (no global state, safe in threads and tests)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    """Atomically write a figure as PNG at 150 dpi."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))


def _count_formatter(unit: str):
    """Log-axis tick labels: 270000 -> '0.27M' (unit 'M') or 12000 -> '12k' (unit 'k')."""
    from matplotlib.ticker import FuncFormatter
    div = {"M": 1e6, "k": 1e3}[unit]
    def fmt(x: float, _pos: int) -> str:
        return f"{x / div:.3g}{unit}" if x >= div or unit == "M" else f"{x:.3g}"
    return FuncFormatter(fmt)


def _legend(ax, colours: dict[str, str], methods: Sequence[str],
            pair_markers: dict[Pair, str]) -> None:
    """One legend outside the axes: colour = method, marker = teacher → student pair."""
    from matplotlib.lines import Line2D
    blank = Line2D([], [], linestyle="none")
    handles, labels = [blank], ["method (colour)"]
    for m in methods:
        marker, size = ("*", 11) if m == TEACHER else ("o", 7)
        handles.append(Line2D([], [], color=colours[m], marker=marker, linestyle="none",
                              markersize=size))
        labels.append(m)
    if pair_markers:
        handles += [blank, blank]
        labels += ["", "teacher → student (marker)"]
        for pair, marker in pair_markers.items():
            handles.append(Line2D([], [], color="#555555", marker=marker, linestyle="none",
                                  markersize=7))
            labels.append(pair.label)
    legend = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                       handletextpad=0.4, borderaxespad=0.0)
    for text in legend.get_texts():
        if text.get_text() in ("method (colour)", "teacher → student (marker)"):
            text.set_fontweight("bold")


def _scatter(entries: Sequence[Entry], x_of: Callable[[Entry], float], *, xlabel: str, unit: str,
             title: str, ylabel: str, colours: dict[str, str], path: Path) -> Path | None:
    """Metric against a per-model x (log scale): one marker per (method, pair), teachers as stars.

    Markers of one model share an x; they are spread slightly sideways so error bars stay visible,
    and the model names are written at their true x along the top axis.
    """
    from matplotlib.ticker import LogLocator, NullFormatter, NullLocator

    points = [e for e in _plot_entries(entries) if x_of(e) > 0 and not pd.isna(e.stat.mean)]
    if not points:
        return None
    methods = [m for m in dict.fromkeys(e.method for e in points)]
    pair_markers = {p: _MARKERS[i % len(_MARKERS)] for i, p in enumerate(dict.fromkeys(
        e.pair for e in points if e.method not in (TEACHER, BASELINE)))}
    by_model: dict[str, list[Entry]] = {}
    for e in points:
        by_model.setdefault(e.model, []).append(e)

    model_x = {model: float(np.mean([x_of(e) for e in group])) for model, group in by_model.items()}
    lo, hi = min(model_x.values()), max(model_x.values())
    pad = max(10 ** 0.15, (hi / lo) ** 0.08)
    span = math.log10(hi * pad / (lo / pad))  # decades shown
    steps = _spreads(model_x, {m: len(g) for m, g in by_model.items()}, span)

    fig = _figure(10.0, 5.6)
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
    xs = list(model_x.values())
    ax.set_xlim(lo / pad, hi * pad)
    subs = (1.0, 2.0, 3.0, 5.0) if span < 1.2 else (1.0, 2.0, 5.0) if span < 3 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(_count_formatter(unit))
    ax.xaxis.set_minor_formatter(NullFormatter())
    top = ax.secondary_xaxis("top")
    top.set_xticks(xs, list(model_x), rotation=60, ha="left", rotation_mode="anchor", fontsize=8)
    top.xaxis.set_minor_locator(NullLocator())
    top.tick_params(length=3, color="#999999")
    for x in xs:
        ax.axvline(x, color="#dddddd", linewidth=0.8, zorder=1)
    ax.margins(y=0.08)
    ax.grid(axis="y", color="#eeeeee", zorder=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend(ax, colours, methods, pair_markers)
    return save_figure(fig, path)


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


def plot_acc_vs_params(bench: Benchmark, entries: Sequence[Entry], metric: str,
                       colours: dict[str, str], path: Path) -> Path | None:
    """acc_vs_params: metric against student parameters (log x); None if no run has params."""
    return _scatter(entries, lambda e: e.params, unit="M",
                    xlabel="parameters of the trained model (log scale)",
                    title=f"{bench.title}\n{METRICS[metric]}", ylabel=f"{METRICS[metric]} (%)",
                    colours=colours, path=path)


def plot_acc_vs_throughput(bench: Benchmark, metric: str, colours: dict[str, str],
                           out_dir: Path) -> list[Path]:
    """acc_vs_throughput: metric against inference images/s (log x), one file per device."""
    rows = bench.rows
    setups = _throughput_setups(rows)
    devices = sorted({s[0] for s in setups})
    written = []
    for device in devices:
        sub = rows[rows["throughput_device"] == device]
        described = "; ".join(_setup_text(s) for s in setups if s[0] == device)
        suffix = f"_{slugify(device)}" if len(devices) > 1 else ""
        on = device or "unknown device"
        path = _scatter(aggregate(sub, metric), lambda e: e.throughput_img_s, unit="k",
                        xlabel=f"inference throughput, images/s (log scale; {described})",
                        title=f"{bench.title}\n{METRICS[metric]} vs throughput on {on}",
                        ylabel=f"{METRICS[metric]} (%)", colours=colours,
                        path=out_dir / f"acc_vs_throughput_{bench.slug}{suffix}.png")
        if path:
            written.append(path)
    return written


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
    fig = _figure(min(16.0, max(6.5, 0.55 * n_bars + 1.2 * len(pairs) + 2.5)), 5.0)
    ax = fig.add_subplot()
    x, centres, extent, used = 0.0, [], [], []
    teacher_means: dict[Pair, dict[str, float]] = {}
    label_bars, rotation = n_bars <= 40, 0 if n_bars <= 14 else 90
    for pair in pairs:
        start = x
        for m in methods:
            e = cell.get((m, pair))
            if e is None:
                continue
            err = None if pd.isna(e.stat.std) else e.stat.std
            ax.bar(x, e.stat.mean, width=0.8, yerr=err, color=colours[m], capsize=3, zorder=2,
                   label=m if m not in used else None,
                   error_kw={"elinewidth": 1, "ecolor": "#333333"})
            used.append(m)
            extent.append(e.stat.mean + (err or 0))
            extent.append(e.stat.mean - (err or 0))
            if label_bars:
                ax.annotate(_fmt(e.stat.mean, 1), (x, e.stat.mean + (err or 0)), xytext=(0, 3),
                            textcoords="offset points", ha="center", va="bottom", fontsize=8,
                            rotation=rotation, zorder=4,
                            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white",
                                  "edgecolor": "none"})
            x += 1.0
        end = max(x - 1.0, start)
        teachers = [e for e in entries if e.method == TEACHER and e.pair == pair]
        for t in teachers:
            ax.hlines(t.stat.mean, start - 0.45, end + 0.45, colors="black", linestyles="--",
                      linewidth=1.3, zorder=3, label=TEACHER if TEACHER not in used else None)
            used.append(TEACHER)
            extent.append(t.stat.mean)
        # Teacher values go in the group's axis label: text on the dashed lines collides with
        # the bar labels whenever a teacher and a student score alike.
        teacher_means[pair] = {t.model: t.stat.mean for t in teachers}
        centres.append((start + end) / 2)
        x = end + 2.0
    if extent:
        ax.set_ylim(*_y_range(extent))
    ax.set_xticks(centres, [_wrap_pair(p, teacher_means.get(p, {})) for p in pairs], fontsize=8.5)
    ax.tick_params(axis="x", length=0)
    ax.grid(axis="y", color="#eeeeee", zorder=0)
    ax.set_ylabel(f"{METRICS[metric]} (%)")
    ax.set_title(f"{bench.title}\n{METRICS[metric]}, mean ± std over seeds")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="method")
    return save_figure(fig, path)


def _wrap_pair(pair: Pair, teacher_means: dict[str, float] | None = None) -> str:
    means = teacher_means or {}
    names = [f"{t} ({_fmt(means[t], 1)})" if t in means else t for t in pair.teachers]
    teachers = "+\n".join(names) if names else "(no teacher)"
    return f"{teachers}\n→ {pair.student or '(teacher only)'}"


# -- the report ---------------------------------------------------------------------------------
def build_benchmark(bench: Benchmark, metric: str, colours: dict[str, str],
                    out_dir: Path) -> list[Path]:
    """Write one benchmark's plots, CSV and markdown table; return their paths."""
    from matplotlib import rc_context

    entries = aggregate(bench.rows, metric)
    slug = bench.slug
    with rc_context(_RC):
        plots = [plot_acc_vs_params(bench, entries, metric, colours,
                                    out_dir / f"acc_vs_params_{slug}.png")]
        plots += plot_acc_vs_throughput(bench, metric, colours, out_dir)
        plots.append(plot_bars(bench, entries, metric, colours, out_dir / f"bars_{slug}.png"))
    plots = [p for p in plots if p is not None]
    csv_text = csv_frame(bench, entries, metric).to_csv(index=False)
    csv = write_text(out_dir / f"table_{slug}.csv", csv_text)
    md = write_text(out_dir / f"table_{slug}.md", markdown(bench, entries, metric, plots))
    return [md, csv, *plots]


def index(benches: Sequence[Benchmark], files: dict[str, list[Path]], metric: str,
          results_dir: Path) -> str:
    """index.md: per benchmark, a link to every table and plot."""
    runs = sum(len(b.rows) for b in benches)
    lines = ["# kdbench report", "",
             f"Metric: {METRICS[metric]}. Built from {runs} finished runs in `{results_dir}`.", ""]
    for bench in benches:
        lines += [f"## {bench.title}", ""]
        lines += [f"- [{p.name}]({p.name})" for p in files[bench.slug]]
        lines.append("")
    return "\n".join(lines)


def build_report(results_dir: str | os.PathLike[str],
                 out_dir: str | os.PathLike[str] | None = None, *,
                 metric: str = "top1_last") -> list[Path]:
    """Write every benchmark's tables and plots plus ``index.md``; return the written paths.

    ``index.md`` is the last path. ``out_dir`` defaults to ``results_dir``.
    """
    if metric not in METRICS:
        raise unknown("metric", metric, METRICS)
    results = Path(results_dir)
    everything = load_rows(results, finished_only=False)
    rows = finished(everything, results / "runs")
    if metric not in rows:
        raise KdbenchError(f"no run in {results / 'runs'} records the metric '{metric}'")
    out = Path(out_dir) if out_dir is not None else results
    out.mkdir(parents=True, exist_ok=True)
    benches = benchmarks(rows)
    # After benchmarks(): variant labels (kd[temperature=8.0]) get colours of their own.
    colours = method_colours({m for b in benches for m in b.rows["method"]})
    files = {b.slug: build_benchmark(b, metric, colours, out) for b in benches}
    written = [p for b in benches for p in files[b.slug]]
    text = index(benches, files, metric, results)
    diverged = everything[everything["status"] != "ok"]
    if len(diverged):
        text += "\n## Runs without a result\n\nLeft out of every table above:\n\n" + "".join(
            f"- `{r.run_id}` {r.method} {r.get('pair', '')} seed {r.get('seed', '')}: **{r.status}**: "
            f"{r.get('error', '')}\n" for _, r in diverged.iterrows())
    return written + [write_text(out / "index.md", text)]


__all__ = ["METRICS", "Benchmark", "Entry", "Pair", "Stat", "aggregate", "benchmarks",
           "build_report", "load_rows", "method_colours", "method_order", "pairs_of", "slugify"]
