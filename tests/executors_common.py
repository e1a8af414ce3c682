"""What executor tests compare: the fields of a row that are a pure function of its run's spec.

Times, hosts, throughput and the command line differ between executors and machines; the
accuracies, the loss history and the identity of the run must not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PURE_FIELDS = ("run_id", "kind", "method", "student", "teachers", "seed", "status", "epochs", "hparams",
               "top1_last", "top1_best", "top5_last", "best_epoch", "history_top1", "history_loss", "agreement",
               "params", "extra_params")


def result_fields(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in PURE_FIELDS}


def store_rows(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Every row of a results folder by run id, reduced to :func:`result_fields`."""
    rows = (json.loads(p.read_text()) for p in sorted((Path(results_dir) / "runs").glob("*.json")))
    return {r["run_id"]: result_fields(r) for r in rows}
