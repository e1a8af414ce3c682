"""From rows to table entries: benchmarks, labels, columns and mean ± std over seeds.

Rows are grouped into *benchmarks* by ``(dataset, schedule, precision)``: datasets, schedules
and precisions are never mixed in one table or plot. Within a benchmark a table has one row per
method (see :func:`method_order`) and one column per teachers→student pair (:class:`PairColumn`);
an :class:`Entry` is one model's mean ± std over seeds in one such cell.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..suites import PAIR_ARROW, pair_label
from .rows import BASELINE, TEACHER, Col, is_teacher, mean_of, method_key, numeric


# -- grouping -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Benchmark:
    """The rows of one (dataset, schedule, precision): one table and one set of plots."""

    dataset: str
    schedule: str
    slug: str
    rows: pd.DataFrame
    precision: str = "fp32"
    transfer: str = ""  # the students' transfer set ('without 3'); '' for the training set itself

    @property
    def title(self) -> str:
        """'dataset · schedule', with a shortened schedule always labelled as such (and a precision
        other than fp32 and a transfer set named)."""
        text = f"{self.dataset} · {schedule_label(self.rows)}"
        text += f" · {self.precision}" if self.precision != "fp32" else ""
        return text + (f" · transfer: {self.transfer}" if self.transfer else "")


def schedule_label(rows: pd.DataFrame) -> str:
    """The schedule string of ``rows``, marked '(shortened)' if it does not already say so."""
    schedule = str(rows[Col.SCHEDULE].iloc[0])
    if rows[Col.SHORTENED].any() and "shortened" not in schedule.lower():
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
    Students distilled on a transfer set (``transfer``) get a table of their own: a student that never saw a 3 is
    no seed of one that did. Every table has the teachers its students name, whatever their schedule, and a
    table of teachers only is left out when each of them is in such a table already.
    """
    out: list[Benchmark] = []
    used: set[str] = set()
    precision = (rows[Col.PRECISION].fillna("fp32") if Col.PRECISION in rows
                 else pd.Series("fp32", index=rows.index))
    transfer = (rows[Col.TRANSFER].fillna("").astype(str) if Col.TRANSFER in rows
                else pd.Series("", index=rows.index))
    for (dataset, schedule, prec, tr), group in rows.groupby([Col.DATASET, Col.SCHEDULE, precision, transfer],
                                                             sort=True):
        slug = base = f"{slugify(dataset)}_{slugify(schedule_label(group))}" + (f"_{prec}" if prec != "fp32" else "") \
            + (f"_{slugify(tr)}" if tr else "")
        k = 2
        while slug in used:
            slug, k = f"{base}-{k}", k + 1
        used.add(slug)
        # The teachers its students name, whatever schedule trained them (a 150-epoch teacher of 60-epoch students, a
        # fine-tuned pretrained one): a table shows what its students distilled from.
        group = with_their_teachers(group, rows[(rows[Col.DATASET] == dataset) & (precision == prec)])
        labelled = label_teacher_seeds(label_code(label_variants(label_method_variants(group))))
        out.append(Benchmark(dataset, str(group[Col.SCHEDULE].iloc[0]), slug, labelled, str(prec), str(tr)))
    # A table of teachers only, each of them already beside its students in another table, would repeat them.
    shown = {r for b in out if not is_teacher(b.rows).all() for r in b.rows.loc[is_teacher(b.rows), Col.RUN_ID]}
    return [b for b in out if not (is_teacher(b.rows).all() and set(b.rows[Col.RUN_ID]) <= shown)]


def with_their_teachers(students: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """``students`` and the teacher rows among ``rows`` that they name (``teacher_ids``)."""
    if Col.TEACHER_IDS not in students:
        return students
    ids = {i for v in students[Col.TEACHER_IDS].fillna("").astype(str) for i in v.split("+") if i}
    teachers = rows[is_teacher(rows) & rows[Col.RUN_ID].isin(ids)]
    return pd.concat([students, teachers[~teachers.index.isin(students.index)]])


def label_teacher_seeds(rows: pd.DataFrame) -> pd.DataFrame:
    """Name teachers whose seed a pair fixed (``model@N``) by that label, in student and teacher rows.

    Three seeds of one architecture are three teachers (an ensemble, or one teacher shared by all
    student seeds): the table must not average them as if they were seeds of one.
    """
    if Col.PAIR not in rows:
        return rows
    students = ~is_teacher(rows) & rows[Col.PAIR].astype(str).str.contains("@", regex=False)
    if not students.any():
        return rows
    rows = rows.copy()
    # Only the pair names the seed of a fixed-seed teacher ('m@0+m@1→s'); `teachers` says 'm+m'.
    rows.loc[students, Col.TEACHERS] = rows.loc[students, Col.PAIR].astype(str).str.split(PAIR_ARROW).str[0]
    labels = {t for v in rows.loc[students, Col.TEACHERS] for t in v.split("+") if "@" in t}
    seeds = numeric(rows, Col.SEED)
    for label in labels:
        model, _, seed = label.rpartition("@")
        mask = is_teacher(rows) & (rows[Col.STUDENT] == model) & (seeds == float(seed))
        rows.loc[mask, Col.STUDENT] = label
    return rows


def label_method_variants(rows: pd.DataFrame) -> pd.DataFrame:
    """A method's declared variant is part of its label ('kd+ls': Method.variant()), whatever else ran."""
    if Col.METHOD_VARIANT not in rows:
        return rows
    tags = rows[Col.METHOD_VARIANT].fillna("").astype(str)
    if not (tags != "").any():
        return rows
    rows = rows.copy()
    rows.loc[tags != "", Col.METHOD] = rows[Col.METHOD] + "+" + tags
    return rows


def label_variants(rows: pd.DataFrame) -> pd.DataFrame:
    """Give each hyperparameter setting of a method its own row label: 'kd[temperature=8.0]'.

    Runs of one method with different hyperparameters are different experiments, never seeds
    of one cell. A method run with a single setting per pair keeps its plain name.
    """
    if Col.HPARAMS not in rows:
        return rows
    rows = rows.copy()
    for method, group in rows.groupby(Col.METHOD):
        settings = {h: json.loads(h) for h in group[Col.HPARAMS].dropna().unique() if isinstance(h, str)}
        per_pair = group.groupby([group[Col.TEACHERS].astype(str),
                                  group[Col.STUDENT].astype(str)])[Col.HPARAMS].nunique()
        if len(settings) < 2 or per_pair.max() < 2:
            continue  # one setting per pair (a suite may set one per pair, e.g. DKD's beta): no variants
        keys = sorted({k for hp in settings.values() for k in hp})
        differ = [k for k in keys if len({json.dumps(hp.get(k)) for hp in settings.values()}) > 1]
        for text, hp in settings.items():
            label = ",".join(f"{k}={hp.get(k)}" for k in differ)
            mask = (rows[Col.METHOD] == method) & (rows[Col.HPARAMS] == text)
            rows.loc[mask, Col.METHOD] = f"{method}[{label}]"
    return rows


def label_code(rows: pd.DataFrame) -> pd.DataFrame:
    """Give each version of a method's code its own row label: 'kd {code 3f2a1b9c}'.

    Rows that differ only by the method's code (``method_source``: the method file was edited
    between runs) are different methods, never seeds of one cell. A method with one version of its
    code in the benchmark keeps its plain name; rows from before the fingerprint existed count as one
    version of their own ("code ?").
    """
    if Col.METHOD_SOURCE not in rows:
        return rows
    rows = rows.copy()
    source = rows[Col.METHOD_SOURCE].fillna("").astype(str)
    for method, group in rows[~is_teacher(rows)].groupby(Col.METHOD):
        versions = sorted(set(source[group.index]))
        if len(versions) < 2:
            continue
        for version in versions:
            digest = re.search(r"sha256:([0-9a-f]{8})", version)
            tag = digest.group(1) if digest else (version.split()[0] if version else "?")
            rows.loc[group.index[source[group.index] == version], Col.METHOD] = f"{method} {{code {tag}}}"
    return rows


# -- table columns and rows ---------------------------------------------------------------------
@dataclass(frozen=True)
class PairColumn:
    """A table column: the teachers a student was distilled from (empty: no teacher).

    A teacher-only column (a teacher no student run names) has the student "".
    """

    student: str
    teachers: tuple[str, ...]

    @property
    def key(self) -> str:
        """The store's spelling, 'a+b→s'."""
        return pair_label(self.teachers, self.student)

    @property
    def label(self) -> str:
        """The human spelling, 'a+b → s'."""
        return self.key.replace(PAIR_ARROW, f" {PAIR_ARROW} ").strip()


def split_teachers(value: str) -> tuple[str, ...]:
    """A ``teachers`` value as a tuple: 'a+b' -> ('a', 'b'), '' -> ()."""
    return tuple(t for t in str(value).split("+") if t)


def method_order(rows: pd.DataFrame) -> list[str]:
    """Methods in table order: teacher, ce, then the others by name, a swept setting by its value."""
    names = set(rows.loc[~is_teacher(rows), Col.METHOD])
    head = [TEACHER] if is_teacher(rows).any() else []
    head += [BASELINE] if BASELINE in names else []
    return head + sorted(names - {BASELINE, TEACHER}, key=method_key)


def pairs_of(rows: pd.DataFrame) -> list[PairColumn]:
    """The table columns: every (teachers, student) of the student runs, then a column for
    each ce-only student and each teacher that no student run names."""
    students = rows[~is_teacher(rows)]
    distilled = students[students[Col.METHOD] != BASELINE]
    pairs = {PairColumn(s, split_teachers(t))
             for s, t in zip(distilled[Col.STUDENT], distilled[Col.TEACHERS])}
    covered = {p.student for p in pairs}
    ce_students = set(students.loc[students[Col.METHOD] == BASELINE, Col.STUDENT])
    pairs |= {PairColumn(s, ()) for s in ce_students - covered}
    named = {t for p in pairs for t in p.teachers}
    pairs |= {PairColumn("", (t,)) for t in rows.loc[is_teacher(rows), Col.STUDENT] if t not in named}
    return sorted(pairs, key=lambda p: (p.student == "", p.student, len(p.teachers), p.teachers))


# -- aggregation --------------------------------------------------------------------------------
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
    pair: PairColumn
    model: str
    stat: Stat
    delta: float  # mean minus the mean of ce with the same student; NaN where not applicable
    params: float
    extra_params: float
    flops_per_image: float
    throughput_img_s: float  # NaN when the runs measured throughput on different devices
    throughput_device: str
    repeated_seed: bool  # some seed appears in more than one run of this cell
    train_time_s: float = math.nan  # mean training time of a run; NaN when the runs trained on different devices


def _entry(method: str, pair: PairColumn, model: str, runs: pd.DataFrame, metric: str,
           ce: Stat | None) -> Entry:
    """Aggregate the runs of one cell part; Δ against ``ce`` where given."""
    stat = Stat.of(numeric(runs, metric))
    devices = sorted(set(runs.get(Col.THROUGHPUT_DEVICE, pd.Series(dtype=str))) - {""})
    seeds = runs[Col.SEED].dropna().tolist() if Col.SEED in runs else []
    return Entry(
        method=method, pair=pair, model=model, stat=stat,
        delta=stat.mean - ce.mean if ce is not None else math.nan,
        params=mean_of(runs, Col.PARAMS), extra_params=mean_of(runs, Col.EXTRA_PARAMS),
        flops_per_image=mean_of(runs, Col.FLOPS),
        throughput_img_s=mean_of(runs, Col.THROUGHPUT) if len(devices) <= 1 else math.nan,
        throughput_device="+".join(devices),
        repeated_seed=len(seeds) != len(set(seeds)),
        train_time_s=mean_of(runs, Col.TRAIN_TIME) if len(set(runs.get(Col.DEVICE, []))) <= 1 else math.nan,
    )


def aggregate(rows: pd.DataFrame, metric: str) -> list[Entry]:
    """Aggregate one benchmark's rows into table entries, in table order (method, pair, model).

    A ``teacher`` entry is made per teacher of a pair (two for an ensemble of two); the ``ce``
    entry of a pair aggregates the ce runs of that pair's student, so one ce run serves every pair
    with that student. Δ is against that ce entry.
    """
    teachers, students = rows[is_teacher(rows)], rows[~is_teacher(rows)]
    ce_runs = students[students[Col.METHOD] == BASELINE]
    ce_stats = {s: Stat.of(numeric(g, metric)) for s, g in ce_runs.groupby(Col.STUDENT)}
    teacher_tuples = students[Col.TEACHERS].map(split_teachers)
    entries: list[Entry] = []
    for method in method_order(rows):
        for pair in pairs_of(rows):
            ce = ce_stats.get(pair.student)
            if method == TEACHER:
                for t in pair.teachers:
                    runs = teachers[teachers[Col.STUDENT] == t]
                    entries.append(_entry(method, pair, t, runs, metric, None))
                continue
            if method == BASELINE:
                runs = ce_runs[ce_runs[Col.STUDENT] == pair.student]
            else:
                mask = (students[Col.METHOD] == method) & (students[Col.STUDENT] == pair.student)
                runs = students[mask & (teacher_tuples == pair.teachers)]
            entries.append(_entry(method, pair, pair.student, runs, metric, ce))
    return [e for e in entries if e.stat.n > 0]


# -- throughput setups --------------------------------------------------------------------------
class ThroughputSetup(NamedTuple):
    """One way throughput was measured; numbers from different setups are not comparable."""

    device: str
    batch: str  # the batch size as written, '' where unknown
    dtype: str

    @property
    def text(self) -> str:
        """'NVIDIA H100, batch 256, float16', leaving out what is unknown."""
        parts = (self.device or "unknown device", self.batch and f"batch {self.batch}", self.dtype)
        return ", ".join(x for x in parts if x)


def throughput_setups(rows: pd.DataFrame) -> list[ThroughputSetup]:
    """The distinct setups of the rows that measured throughput, sorted."""
    if Col.THROUGHPUT not in rows:
        return []
    measured = rows[pd.to_numeric(rows[Col.THROUGHPUT], errors="coerce").notna()]
    keys = zip(measured[Col.THROUGHPUT_DEVICE], _batches(measured), measured[Col.THROUGHPUT_DTYPE])
    return sorted({ThroughputSetup(*k) for k in keys})


def setup_rows(rows: pd.DataFrame, setup: ThroughputSetup) -> pd.DataFrame:
    """The rows measured with ``setup``."""
    mask = (rows[Col.THROUGHPUT_DEVICE] == setup.device) & (_batches(rows) == setup.batch)
    return rows[mask & (rows[Col.THROUGHPUT_DTYPE] == setup.dtype)]


def _batches(rows: pd.DataFrame) -> pd.Series:
    """The throughput batch size of each row as text ('' where unknown)."""
    if Col.THROUGHPUT_BATCH not in rows:
        return pd.Series("", index=rows.index, dtype=str)
    return rows[Col.THROUGHPUT_BATCH].map(_batch_text)


def _batch_text(x: object) -> str:
    return "" if pd.isna(x) else f"{int(x)}" if isinstance(x, (int, float, np.number)) else str(x)
