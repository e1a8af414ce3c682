"""The test-error section of a benchmark distilled on a transfer set: errors on the classes it leaves
out, and with each bias adjustment (given offsets; offsets searched on held-out images)."""

from __future__ import annotations

import json

import pandas as pd

from ..suites import pair_label
from .aggregate import split_teachers
from .rows import TEACHER, Col, is_teacher, numeric


def _mean(rows: pd.DataFrame, *cols: str) -> str:
    """The mean over the runs of a count (the sum of ``cols``): a whole number for one run, one decimal for
    several; '' when absent."""
    values = sum((numeric(rows, c) for c in cols), pd.Series(0.0, index=rows.index)).dropna()
    if values.empty:
        return ""
    return f"{values.mean():.0f}" if len(values) == 1 else f"{values.mean():.1f}"


def _offsets(rows: pd.DataFrame, col: str) -> str:
    """The offsets the runs used ('+3.5 on 3', '7: -7.6, 8: +1'); the runs' distinct ones joined by ' / '."""
    def text(offsets: dict[str, float]) -> str:
        if len(set(offsets.values())) == 1:
            return f"{next(iter(offsets.values())):+g} on {', '.join(offsets)}"
        return ", ".join(f"{c}: {o:+g}" for c, o in offsets.items())

    texts = sorted({t for t in rows[col].fillna("").astype(str) if t}) if col in rows else []
    return " / ".join(text(json.loads(t)) for t in texts)


def _absent(rows: pd.DataFrame) -> list[int]:
    if Col.TRANSFER_ABSENT not in rows:
        return []
    return sorted({int(c) for t in rows[Col.TRANSFER_ABSENT].dropna() if str(t) for c in json.loads(str(t))})


def _has(rows: pd.DataFrame, col: str) -> bool:
    return col in rows and numeric(rows, col).notna().any()


def errors_table(rows: pd.DataFrame) -> tuple[list[str], list[list[str]], list[str]] | None:
    """(header, lines, notes): per model, method and pair, test errors overall and on the absent classes,
    without and with each bias adjustment; None for a benchmark with no absent class and no adjustment."""
    students = rows[~is_teacher(rows)]
    absent = _absent(students)
    given, val = _has(students, Col.TEST_ERRORS_BIAS_GIVEN), _has(students, Col.TEST_ERRORS_BIAS_VAL)
    if students.empty or not (absent or given or val):
        return None
    # A column per absent class; one for all of them when there are many (only 7s and 8s: 8 absent).
    groups = [[c] for c in absent] if len(absent) <= 3 else [absent]
    on = [f"on {', '.join(map(str, g))}" + ("s" if len(g) == 1 else "") for g in groups]
    header = ["method", "pair", "n", "test errors", *on]
    header += ["bias given", "errors", *on] if given else []
    header += ["bias (val)", "errors", *on] if val else []

    def counts(group: pd.DataFrame, suffix: str) -> list[str]:
        return [_mean(group, Col.TEST_ERRORS + suffix)] + [
            _mean(group, *(f"{Col.CLASS_ERRORS}{suffix}.{c}" for c in g)) for g in groups]

    lines = []
    teachers = rows[is_teacher(rows)]
    for model, group in teachers.groupby(Col.STUDENT, sort=True):
        lines.append([TEACHER, model, str(len(group)), *counts(group, "")] + [""] * (len(header) - 4 - len(on)))
    for (method, t, s), group in students.groupby([Col.METHOD, Col.TEACHERS, Col.STUDENT], sort=True):
        line = [method, pair_label(split_teachers(t), s) if t else s, str(len(group)), *counts(group, "")]
        line += [_offsets(group, Col.BIAS_GIVEN), *counts(group, "_bias_given")] if given else []
        line += [_offsets(group, Col.BIAS_VAL), *counts(group, "_bias_val")] if val else []
        lines.append(line)
    notes = ["Test errors at the last epoch, mean over the n runs (seeds); \"on 3s\": errors on the test images of "
             "class 3, a class the transfer set has no training image of (\"on 0, 1, ...\": of those classes "
             "together; each class's count is in the rows, `class_errors.<i>`)."]
    if given:
        notes.append("bias given: these offsets added to the classes' logits, as given in the suite (a paper's "
                     "value, which the paper may have tuned on the test set).")
    if val:
        images = f"{numeric(students, Col.BIAS_VAL_IMAGES).max():.0f}"
        notes.append(f"bias (val): one offset for the absent classes, searched on {images} held-out training "
                     "images the student never trained on (never on the test set); each run's own.")
    return header, lines, notes
