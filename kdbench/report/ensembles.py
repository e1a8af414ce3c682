"""Student ensembles derived from seeds (``kdbench report --ensemble-seeds``): the K students one method distilled
from one teacher (pair) with K seeds, judged as one model from their stored test-set predictions.

Per method and pair with two or more seeds: each member's top-1, the ensemble's (the mean of the members' class
probabilities), diversity (the mean over member pairs of the % of test images on which their top-1 classes
differ), the summed parameters, and the throughput of the members run one after another, derived from each
member's measured throughput (1 / Σ 1/images_per_s_i): it is not a measurement of a deployed ensemble.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from ..sweep.columns import Col
from .rows import is_teacher, numeric


@dataclass(frozen=True)
class Ensemble:
    """K students of one method and pair, with different seeds, as one model."""

    method: str
    pair: str
    seeds: tuple[int, ...]
    member_top1: tuple[float, ...]  # each member's top-1 (%), in seed order
    top1: float                     # the ensemble's: argmax of the mean of the members' probabilities
    diversity: float                # mean pairwise top-1 disagreement (%)
    params: float                   # summed over members
    throughput: float               # from seeds: derived from the members'; declared: measured as deployed
    how: str = ""                   # declared ensembles: how the deployed ensemble ran ('' from seeds)
    run_id: str = ""                # declared ensembles: the id of the row that stands for it in the tables


def ensemble_of(logits: list[torch.Tensor], labels: torch.Tensor) -> tuple[list[float], float, float]:
    """(each member's top-1, the ensemble's top-1, diversity), all in %, from the members' logits."""
    members, top1, diversity, _ = ensemble_with_probs(logits, labels)
    return members, top1, diversity


def ensemble_with_probs(logits: list[torch.Tensor], labels: torch.Tensor
                        ) -> tuple[list[float], float, float, torch.Tensor]:
    """:func:`ensemble_of` and the ensemble's mean probabilities (float64), which its row is derived from."""
    preds = [x.argmax(1) for x in logits]
    members = [100 * float((p == labels).double().mean()) for p in preds]
    mean_probs = torch.stack([F.softmax(x.double(), 1) for x in logits]).mean(0)
    top1 = 100 * float((mean_probs.argmax(1) == labels).double().mean())
    pairs = list(itertools.combinations(preds, 2))
    diversity = sum(100 * float((a != b).double().mean()) for a, b in pairs) / len(pairs) if pairs else math.nan
    return members, top1, diversity, mean_probs


def seed_ensembles(rows: pd.DataFrame, loaded: dict[str, tuple[torch.Tensor, torch.Tensor, int]]) -> list[Ensemble]:
    """Every method × pair (and hyperparameters) of ``rows`` with predictions (``loaded``, by run id:
    :func:`~kdbench.report.derived.load_predictions`) from two or more seeds."""
    students = rows[~is_teacher(rows)]
    if Col.ENSEMBLE in students:  # a declared ensemble (kdbench.report.members) is no seed of a single student
        students = students[students[Col.ENSEMBLE].fillna("").astype(str) == ""]
    students = students[students[Col.RUN_ID].astype(str).isin(loaded)]
    keys = [Col.METHOD, Col.PAIR] + ([Col.HPARAMS] if Col.HPARAMS in students else [])
    out = []
    for key, group in students.groupby(keys, sort=True):
        group = group.drop_duplicates(Col.SEED).sort_values(Col.SEED)
        if len(group) < 2:
            continue
        logits = [loaded[str(r)][0] for r in group[Col.RUN_ID]]
        labels = loaded[str(group[Col.RUN_ID].iloc[0])][1]
        members, top1, diversity = ensemble_of(logits, labels)
        tps = numeric(group, Col.THROUGHPUT)
        out.append(Ensemble(str(key[0]), str(key[1]), tuple(int(s) for s in group[Col.SEED]), tuple(members), top1,
                            diversity, float(numeric(group, Col.PARAMS).sum()),
                            1 / float((1 / tps).sum()) if tps.notna().all() and (tps > 0).all() else math.nan))
    return out
