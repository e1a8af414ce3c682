"""What each method costs to train, relative to ``kd``: time per epoch, extra parameters, state.

None of the anchor benchmarks tabulates this, yet it decides which method a user can afford: CRD's
memory bank and its 16,384 negatives per sample, an init stage of 30 epochs, a regressor per stage.
The time is the median steady-state epoch (``epoch_time_s``: the first epoch a process trains, with
its compilation and cold caches, left out), so it is comparable between runs that resumed and runs
that did not. The ratio to ``kd`` is taken pair by pair (the same student, teachers, data and
schedule, on the same device) and its geometric mean over pairs is shown: a method is never
compared with ``kd`` on another student.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .rows import BASELINE, Col, is_teacher, numeric

#: The reference method of the ratios.
REFERENCE = "kd"


def epoch_seconds(rows: pd.DataFrame) -> pd.Series:
    """Each run's steady epoch time; a run of one epoch (no steady epoch) falls back to its mean epoch."""
    steady = numeric(rows, Col.EPOCH_TIME)
    epochs = numeric(rows, Col.EPOCHS) + numeric(rows, Col.INIT_EPOCHS).fillna(0)
    return steady.fillna(numeric(rows, Col.TRAIN_TIME) / epochs)


def cost_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per method of the students in ``rows``: its median epoch time, the geometric mean over
    pairs of its ratio to ``kd``'s (NaN where no pair ran kd), its extra parameters (mean), init-stage
    epochs, untrained state (MB) and whether the teacher-output cache served it."""
    students = rows[~is_teacher(rows)].copy()
    if students.empty:
        return pd.DataFrame()
    students["_s"] = epoch_seconds(students)
    for col in (Col.PAIR, Col.DEVICE, Col.STUDENT):
        students[col] = students[col].astype(str) if col in students else ""
    per_pair = students.groupby([Col.METHOD, Col.PAIR, Col.DEVICE, Col.STUDENT], sort=False)["_s"].median()
    ref = students[students[Col.METHOD] == REFERENCE]
    ref_pair = ref.groupby([Col.PAIR, Col.DEVICE])["_s"].median()
    # A run without teachers (ce) has no pair of its own: kd's runs into the same student stand in for it.
    ref_student = ref.groupby([Col.STUDENT, Col.DEVICE])["_s"].median()
    # ce: the cost of training the student on labels alone, the floor every method adds to.
    ce_student = students[students[Col.METHOD] == BASELINE].groupby([Col.STUDENT, Col.DEVICE])["_s"].median()
    lines = []
    for method, group in students.groupby(Col.METHOD, sort=False):
        ratios, vs_ce = [], []
        for (pair, device, student), seconds in per_pair.loc[method].items():
            base = ref_pair.get((pair, device), ref_student.get((student, device), math.nan))
            if base > 0 and seconds > 0:
                ratios.append(seconds / base)
            floor = ce_student.get((student, device), math.nan)
            if floor > 0 and seconds > 0:
                vs_ce.append(seconds / floor)
        lines.append({
            "method": method,
            "epoch_s": float(group["_s"].median()),
            "total_s": float(numeric(group, Col.TRAIN_TIME).median()),
            "vs_kd": _geomean(ratios),
            "pairs_vs_kd": len(ratios),
            "vs_ce": _geomean(vs_ce),
            "peak_mem_mb": float(numeric(group, Col.PEAK_MEM).median()),
            "extra_params": float(numeric(group, Col.EXTRA_PARAMS).mean()),
            "init_epochs": float(numeric(group, Col.INIT_EPOCHS).max()) if Col.INIT_EPOCHS in group else 0.0,
            "state_mb": float(numeric(group, Col.METHOD_STATE_MB).max()) if Col.METHOD_STATE_MB in group else 0.0,
            "teacher_cache": bool(group[Col.TEACHER_CACHE].astype(bool).any()) if Col.TEACHER_CACHE in group else False,
            "runs": len(group),
        })
    return pd.DataFrame(lines)


def _geomean(ratios: list[float]) -> float:
    return float(np.exp(np.mean(np.log(ratios)))) if ratios else math.nan


def teacher_cost_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per teacher run of ``rows``: its training time (0 for a checkpoint kdbench did not train), the time
    its output cache took to build (as the students distilling from it alone record it: built once, loaded after),
    the student runs that distilled from it (alone or in an ensemble), and training plus cache amortised over them.
    Paid once per teacher, shared by every student."""
    teachers = rows[is_teacher(rows)]
    students = rows[~is_teacher(rows)]
    if teachers.empty or Col.TEACHER_IDS not in students:
        return pd.DataFrame()
    ids = students[Col.TEACHER_IDS].fillna("").astype(str)
    lines = []
    for _, t in teachers.iterrows():
        run_id = str(t[Col.RUN_ID])
        mine = students[ids.str.split("+").map(lambda xs, r=run_id: r in xs)]
        alone = students[ids == run_id]
        if Col.TEACHER_CACHE in alone:  # only runs the cache served record its build time
            alone = alone[alone[Col.TEACHER_CACHE].fillna(False).astype(bool)]
        else:
            alone = alone.iloc[0:0]
        cache = float(numeric(alone, Col.TEACHER_CACHE_BUILD).max()) if len(alone) else math.nan
        train_s = float(numeric(teachers.loc[[t.name]], Col.TRAIN_TIME).iloc[0])
        if t.get(Col.TRAINED_BY_KDBENCH) is False:  # a user's checkpoint: no training paid here
            train_s = 0.0
        total = train_s + (0.0 if math.isnan(cache) else cache)
        lines.append({"teacher": str(t[Col.STUDENT]), "run_id": run_id, "train_s": train_s, "cache_build_s": cache,
                      "students": len(mine), "per_student_s": total / len(mine) if len(mine) else math.nan})
    return pd.DataFrame(lines)


__all__ = ["REFERENCE", "cost_frame", "epoch_seconds", "teacher_cost_frame"]
