"""Metrics the report derives from each run's stored test-set predictions (:mod:`kdbench.predictions`).

A row holds top-1/top-5 and per-class scores; its predictions file holds what else there is to know. Here they
become columns of the rows frame, so every table and plot reads them as it reads ``top1_last``:

- ``precision_macro``, ``recall_macro``, ``f1_macro``: macro averages over classes (%);
- ``ece``: expected calibration error with 15 bins (%), ``nll``: negative log-likelihood (nats);
- ``kl_teacher``: KL(teacher ‖ student) at T = 1, ``kl_teacher_t`` at the method's temperature (nats), against
  the teacher's predictions, or the mean of the teachers' probabilities for several.

All at the last epoch. Rows written before predictions were kept, or whose teachers' predictions are missing,
get NaN (blank cells) and keep every column they have.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import torch
import torch.nn.functional as F

from .. import metrics, predictions
from ..errors import KdbenchError
from ..sweep.columns import Col
from ..sweep.store import ResultsStore

#: The columns derived here.
DERIVED = ("precision_macro", "recall_macro", "f1_macro", "ece", "nll", "kl_teacher", "kl_teacher_t")


def check_test_sets(rows: pd.DataFrame, store: ResultsStore) -> None:
    """Refuse rows of one dataset label scored on different test sets: their numbers would share a table while
    measuring different images. The error names a file of each."""
    if Col.TEST_SET not in rows:
        return
    for dataset, group in rows.groupby(Col.DATASET):
        ids = group[Col.TEST_SET].dropna().astype(str)
        ids = ids[ids != ""]
        if ids.nunique() > 1:
            first, other = ids.iloc[0], next(i for i in ids if i != ids.iloc[0])
            a = store.row_path(str(group.loc[ids.index[ids == first][0], Col.RUN_ID]))
            b = store.row_path(str(group.loc[ids.index[ids == other][0], Col.RUN_ID]))
            raise KdbenchError(f"rows of dataset {dataset} were scored on different test sets ({first} in {a}, "
                               f"{other} in {b}); report them from separate results folders, or delete the rows "
                               "of the one you do not want")


def add_derived(rows: pd.DataFrame, loaded: dict[str, tuple[torch.Tensor, torch.Tensor, int]]) -> pd.DataFrame:
    """``rows`` with the :data:`DERIVED` columns from their predictions (:func:`load_predictions`; NaN where a row
    has none)."""
    rows = rows.copy()
    values: dict[str, list[float]] = {name: [] for name in DERIVED}
    for _, row in rows.iterrows():
        got = _derive(row, loaded)
        for name in DERIVED:
            values[name].append(got.get(name, math.nan))
    for name in DERIVED:
        rows[name] = values[name]
    return rows


def load_predictions(rows: pd.DataFrame, store: ResultsStore) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Each row's predictions that exist, by run id: (fp32 logits, labels, number of classes)."""
    out = {}
    if Col.PREDICTIONS not in rows:
        return out
    for _, row in rows.iterrows():
        name = row.get(Col.PREDICTIONS)
        if not isinstance(name, str) or not name:
            continue
        run_id = str(row[Col.RUN_ID])
        path = store.root / name
        if not path.is_file():
            raise KdbenchError(f"row {store.row_path(run_id)} names predictions file {path}, which is missing; "
                               "delete the row and re-run the sweep to redo that run")
        data = predictions.load(path, run_id=run_id, test_set=str(row.get(Col.TEST_SET, "")),
                                test_size=int(row[Col.TEST_SIZE]), row_file=store.row_path(run_id))
        logits = data["logits"].float()
        out[run_id] = (logits, data["labels"], logits.shape[1])
    return out


def _derive(row: pd.Series, loaded: dict) -> dict[str, float]:
    run_id = str(row[Col.RUN_ID])
    if run_id not in loaded:
        return {}
    logits, labels, classes = loaded[run_id]
    precision, recall, f1 = metrics.macro_prf(logits.argmax(1), labels, classes)
    got = {"precision_macro": precision, "recall_macro": recall, "f1_macro": f1,
           "ece": metrics.expected_calibration_error(F.softmax(logits.double(), 1), labels),
           "nll": metrics.nll(logits, labels)}
    ids = [t for t in str(row.get(Col.TEACHER_IDS, "") or "").split("+") if t]
    if ids and all(t in loaded for t in ids):
        teachers = [loaded[t][0] for t in ids]
        got["kl_teacher"] = metrics.kl_to_teacher(teachers, logits, 1.0)
        got["kl_teacher_t"] = metrics.kl_to_teacher(teachers, logits, _temperature(row))
    return got


def _temperature(row: pd.Series) -> float:
    """The method's softmax temperature (hyperparameter ``temperature``), NaN for a method without one."""
    try:
        value = json.loads(str(row.get(Col.HPARAMS, "") or "{}")).get("temperature")
    except (ValueError, AttributeError):
        return math.nan
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
