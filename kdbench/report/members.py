"""Declared student ensembles (a pair written ``T:S*3`` or ``T:A+B``): each seed's K member runs become one row.

The member rows leave the rows frame and one row per (method, ensemble, seed) takes their place, with the
ensemble's own numbers: top-1/top-5 of the mean of the members' class probabilities (from their stored test-set
predictions), summed parameters, FLOPs and training time, the throughput member 0 measured on the deployed
ensemble, and agreement with the teachers. Its student is the ensemble's name ('s×3'), so every table and plot
shows it in a column of its own beside the single students and the teachers' ensemble, and its predictions (the
log of the mean probabilities) give the derived metrics (ECE, NLL, KL to the teacher) as any run's do.

An ensemble whose members have not all finished, or lack predictions, is left out with a note.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from .. import metrics
from ..ids import digest
from ..ensemble import ensemble_size
from ..sweep.columns import Col
from .ensembles import Ensemble, ensemble_with_probs
from .rows import numeric

_KEY = [Col.METHOD, Col.ENSEMBLE, Col.TEACHER_IDS, Col.SEED, Col.HPARAMS, Col.DATASET, Col.SCHEDULE, Col.PRECISION,
        Col.TRANSFER, Col.METHOD_SOURCE]
_SUMMED = (Col.PARAMS, Col.EXTRA_PARAMS, Col.FLOPS, Col.TRAIN_TIME, Col.EPOCH_TIME, Col.FIRST_EPOCH_TIME)


def is_member(rows: pd.DataFrame) -> pd.Series:
    """Rows of ensemble members (not yet collapsed: those have a member index)."""
    if Col.ENSEMBLE not in rows or Col.MEMBER not in rows:
        return pd.Series(False, index=rows.index)
    return rows[Col.ENSEMBLE].fillna("").astype(str).ne("") & numeric(rows, Col.MEMBER).notna()


def collapse(rows: pd.DataFrame, loaded: dict[str, tuple[torch.Tensor, torch.Tensor, int]]
             ) -> tuple[pd.DataFrame, list[Ensemble], list[str]]:
    """``rows`` with each declared ensemble's member rows replaced by the ensemble's row; the ensembles (for their
    own table) and a note per ensemble left out. ``loaded`` (predictions by run id) gains the ensembles'."""
    members = is_member(rows)
    if not members.any():
        return rows, [], []
    group_rows = rows[members].copy()
    key = [k for k in _KEY if k in group_rows]
    for k in key:
        group_rows[k] = group_rows[k].fillna("").astype(str)
    made, ensembles, notes = [], [], []
    for _, group in group_rows.groupby(key, sort=True):
        first = group.iloc[0]
        size = ensemble_size(str(first[Col.ENSEMBLE]))
        group = group.assign(_m=numeric(group, Col.MEMBER)).drop_duplicates("_m", keep="last").sort_values("_m")
        where = f"{first[Col.METHOD]} {first[Col.PAIR]} seed {first[Col.SEED]}"
        missing = [str(r) for r in group[Col.RUN_ID] if str(r) not in loaded]
        if len(group) != size or missing:
            notes.append(f"student ensemble {where}: {len(group) - len(missing)} of its {size} members have finished "
                         "with predictions; it is left out until all have (re-run the sweep)")
            continue
        row, ensemble = _ensemble_row(group, loaded)
        made.append(row)
        ensembles.append(ensemble)
    out = pd.concat([rows[~members], pd.DataFrame(made)], ignore_index=True) if made else rows[~members]
    return out, sorted(ensembles, key=lambda e: (e.method, e.pair, e.seeds)), notes


def _ensemble_row(group: pd.DataFrame, loaded: dict[str, Any]) -> tuple[dict[str, Any], Ensemble]:
    ids = [str(r) for r in group[Col.RUN_ID]]
    logits = [loaded[i][0] for i in ids]
    labels, classes = loaded[ids[0]][1], loaded[ids[0]][2]
    member_top1, top1, diversity, probs = ensemble_with_probs(logits, labels)
    first = group.iloc[0]
    run_id = "ensemble-" + digest({"members": ids})[:12]
    loaded[run_id] = (probs.log().float(), labels, classes)
    row = {k: v for k, v in first.items() if not str(k).startswith((Col.CLASS_PREFIX, "history"))}
    row.update({k: float(numeric(group, k).sum()) for k in _SUMMED if k in group})
    tp = float(pd.to_numeric(pd.Series([first.get(Col.ENSEMBLE_THROUGHPUT)]), errors="coerce").iloc[0])
    row.update({
        Col.RUN_ID: run_id, Col.STUDENT: str(first[Col.ENSEMBLE]), Col.MEMBER: math.nan, Col.PREDICTIONS: "",
        Col.TOP1_LAST: top1, Col.TOP5_LAST: metrics.topk_accuracy(probs, labels, 5),
        Col.TOP1_BEST: math.nan, Col.TOP5_BEST: math.nan, Col.TOP1_VAL_BEST: math.nan, Col.TOP5_VAL_BEST: math.nan,
        Col.TEST_ERRORS: int((probs.argmax(1) != labels).sum()),
        Col.PEAK_MEM: float(numeric(group, Col.PEAK_MEM).max()) if Col.PEAK_MEM in group else math.nan,
        Col.THROUGHPUT: tp, Col.THROUGHPUT_NOTE: "" if tp == tp else "the deployed ensemble was not timed",
        Col.AGREEMENT: _agreement(probs, str(first.get(Col.TEACHER_IDS, "") or ""), loaded),
    })
    ensemble = Ensemble(str(first[Col.METHOD]), str(first[Col.PAIR]), (int(first[Col.SEED]),), tuple(member_top1),
                        top1, diversity, float(numeric(group, Col.PARAMS).sum()), tp,
                        how=str(first.get(Col.ENSEMBLE_THROUGHPUT_HOW, "") or ""), run_id=run_id)
    return row, ensemble


def _agreement(probs: torch.Tensor, teacher_ids: str, loaded: dict[str, Any]) -> float:
    """Top-1 agreement of the ensemble with its teacher (or the mean of its teachers' probabilities)."""
    ids = [t for t in teacher_ids.split("+") if t]
    if not ids or not all(t in loaded for t in ids):
        return math.nan
    teacher = torch.stack([F.softmax(loaded[t][0].double(), 1) for t in ids]).mean(0)
    return metrics.agreement(probs.argmax(1), teacher.argmax(1))
