"""Test-set predictions kept per run, and the metrics derived from them without retraining.

Every finished run writes ``predictions/<run_id>.pt`` beside its row: its last epoch's test-set logits in fp16,
the test labels, and the test set's identity (:func:`test_set_id`). ``kdbench report`` derives from them what
the row does not hold (calibration, the fit to the teacher's probabilities, macro scores): see
:data:`kdbench.report.rows.METRICS` and :mod:`kdbench.report.derived`.

The metrics themselves are plain tensor functions in :mod:`kdbench.metrics`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import KdbenchError
from .files import atomic_torch_save

def test_set_id(dataset: str, labels: Tensor) -> str:
    """The identity of a test set: its dataset label and a hash of its labels in order (16 hex digits). Two runs
    with the same id were scored on the same images in the same order, as far as the labels can tell."""
    h = hashlib.sha256(dataset.encode())
    h.update(labels.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save(path: Path, *, run_id: str, test_set: str, logits: Tensor, labels: Tensor) -> Path:
    """Write a run's predictions atomically: fp16 logits (N x classes) and int64 labels, on the CPU."""
    return atomic_torch_save(path, {"run_id": run_id, "test_set": test_set,
                                    "logits": logits.detach().to("cpu", torch.float16),
                                    "labels": labels.detach().to("cpu", torch.int64)})


def load(path: Path, *, run_id: str, test_set: str, test_size: int, row_file: Path) -> dict[str, Any]:
    """A run's predictions, checked against its row (``row_file`` is named in every error): the run id, the test
    set and its size must match, or the report would score one run's predictions as another's."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KdbenchError(f"predictions file {path} of {row_file} cannot be read ({type(exc).__name__}); delete "
                           "both and re-run the sweep to redo that run") from None
    problems = []
    if not isinstance(data, dict) or not {"run_id", "test_set", "logits", "labels"} <= set(data):
        problems.append("it is not a kdbench predictions file")
    else:
        if data["run_id"] != run_id:
            problems.append(f"it is run {data['run_id']}'s, not {run_id}'s")
        if data["test_set"] != test_set:
            problems.append(f"its test set is {data['test_set']}, the row's {test_set}")
        if len(data["labels"]) != test_size or data["logits"].shape[0] != test_size:
            problems.append(f"it holds {len(data['labels'])} test images, the row {test_size}")
    if problems:
        raise KdbenchError(f"predictions file {path} does not match its row {row_file}: {'; '.join(problems)}; "
                           "delete both and re-run the sweep to redo that run")
    return data


__all__ = ["load", "save", "test_set_id"]
