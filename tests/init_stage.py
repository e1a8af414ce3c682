"""Helpers shared by the tests of methods with an init stage (ab, fsp, ft) and their float64 references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tiny import TINY, TINY_STUDENT, TINY_TEACHERS

from kdbench import zoo
from kdbench.cli import main
from kdbench.train import freeze


def block_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average of each (H/size x W/size) block, written out: what adaptive pooling does for an exact divisor."""
    k = x.shape[2] // size
    out = torch.zeros(x.shape[0], x.shape[1], size, size, dtype=x.dtype)
    for i in range(size):
        for j in range(size):
            out[:, :, i, j] = x[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k].mean((2, 3))
    return out


def tiny_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The tiny student (cifar_resnet8) and a frozen teacher of its channels (cifar_resnet14)."""
    return zoo.create(TINY_STUDENT, **TINY), freeze(zoo.create(TINY_TEACHERS[0], **TINY))


def one_init_epoch_row(results: Path, method: str, pair: str, init_term: str) -> dict:
    """Run ``method`` on ``pair`` with a one-epoch init stage through the CLI; check what every such row records
    (one init epoch, its one ``init_term`` loss entry, a timed first epoch inside the training time) and return it."""
    code = main(["run", "--methods", method, "--pairs", pair, "--set", f"{method}.init_epochs=1", "--seeds", "0",
                 "--limit", "48", "--epochs", "1", "--quiet", "--no-report", "--throughput-batch", "8",
                 "--results-dir", str(results)])
    assert code == 0
    (row,) = [r for r in (json.loads(p.read_text()) for p in (results / "runs").glob("*.json"))
              if r.get("method") == method]
    assert row["init_epochs"] == 1 and row["hp.init_epochs"] == 1
    init = json.loads(row["history_init_loss"])
    assert len(init) == 1 and set(init[0]) == {init_term} and math.isfinite(init[0][init_term])
    # the init epoch is the run's first: timed, and inside the training time
    assert row["first_epoch_s"] > 0 and math.isfinite(row["epoch_time_s"])
    assert row["train_time_s"] >= row["first_epoch_s"] + row["epoch_time_s"]
    return row
