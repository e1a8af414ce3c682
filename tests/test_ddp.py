"""One run on several processes (torch DDP, started by torchrun), proven on the CPU with gloo.

The proof: for a model without BatchNorm or dropout (Hinton's MLPs), two processes that each
train on half of every batch and average their gradients follow the single-process run's loss
history, since the mean of two half-batch gradients is the full batch's gradient.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdbench import distributed, zoo
from kdbench.cli import main
from kdbench.data import load_dataset
from kdbench.errors import KdbenchError
from kdbench.recipe import get_recipe
from kdbench.train import train

# 151 images: batches of 64, 64 and 23, so the last batch splits unevenly (12 + 11) and the
# slices' losses must be weighted by their size. FitNets' two-stage schedule leaves the head
# unused in its hint epoch (DDP's find_unused_parameters) and trains a regressor of its own.
# --device cpu: both ranks on the CPU with gloo, on a machine with GPUs too (NCCL would need two GPUs,
# and the comparison with the single-process run assumes fp32 eager).
SWEEP = ["run", "--device", "cpu", "--seeds", "0", "--dataset", "digits", "--pairs", "hinton_mlp_1200:hinton_mlp_800", "--limit", "151",
         "--epochs", "2", "--methods", "ce,kd,fitnets", "--set", "fitnets.stage=1",
         "--set", "fitnets.schedule=two_stage", "--throughput-batch", "8", "-q", "--no-report"]


def rows(results: Path) -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted((results / "runs").glob("*.json")):
        row = json.loads(path.read_text())
        key = (row["method"], row["student"])
        assert key not in out, f"two rows for {key}"
        out[key] = row
    return out


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "kdbench",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_two_processes_follow_the_single_process_run(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*SWEEP, "--results-dir", str(one)]) == 0
    proc = torchrun([*SWEEP, "--results-dir", str(two)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Rank 0 alone prints: the plan once, one line per run.
    assert proc.stdout.count("kdbench: 3 runs on digits") == 1, proc.stdout
    assert proc.stdout.count("kd hinton_mlp_1200→hinton_mlp_800 seed 0: top-1") == 1, proc.stdout

    single, ddp = rows(one), rows(two)
    assert set(ddp) == set(single) == {("teacher", "hinton_mlp_1200"), ("ce", "hinton_mlp_800"),
                                       ("kd", "hinton_mlp_800"), ("fitnets", "hinton_mlp_800")}
    assert len(list((two / "teachers").glob("*.pt"))) == 1
    assert not any((two / "state").iterdir())  # finished runs leave no checkpoints behind
    for key, row in ddp.items():
        ref = single[key]
        assert row["world_size"] == 2 and ref["world_size"] == 1
        assert row["run_id"] != ref["run_id"], "a DDP run must not share the single-process run's id"
        assert row["status"] == "ok" and row["train_size"] == ref["train_size"] == 151
        # The real proof: the same losses, epoch by epoch and term by term (the hint epoch included).
        h1, h2 = json.loads(ref["history_loss"]), json.loads(row["history_loss"])
        assert [sorted(h) for h in h2] == [sorted(h) for h in h1]
        for e1, e2 in zip(h1, h2):
            for term in e1:
                assert e2[term] == pytest.approx(e1[term], rel=1e-5, abs=2e-6), (key, term, h1, h2)
        assert json.loads(row["history_top1"]) == json.loads(ref["history_top1"])
        assert row["extra_params"] == ref["extra_params"]
    # The student rows name the DDP teacher (its own id too).
    assert ddp[("kd", "hinton_mlp_800")]["teacher_ids"] == ddp[("teacher", "hinton_mlp_1200")]["run_id"]

    # Run again with one more method, which fails on rank 1 only (as an out-of-memory error on one GPU
    # would): rank 0 finds the finished rows and both ranks skip them; then the failure stops the
    # sweep instead of leaving rank 0 waiting for a peer, and rank 1's traceback is kept.
    plugin = tmp_path / "boom.py"
    plugin.write_text(BOOM)
    again = torchrun([*SWEEP, "--methods", "ce,kd,fitnets,boom", "--plugin", str(plugin), "--results-dir", str(two)])
    assert again.returncode == 1, again.stdout + again.stderr
    assert "3 of 4 runs already in" in again.stdout
    assert "failed on DDP rank 1: RuntimeError: out of memory (pretend)" in again.stderr
    assert "out of memory (pretend)" in next((two / "state").glob("*/error.rank1.txt")).read_text()
    assert rows(two) == ddp


BOOM = '''
from kdbench import distributed
from kdbench.method import Method


class Boom(Method):
    name = "boom"
    paper = "a test stand-in"
    min_teachers = max_teachers = 0

    def __init__(self, *, ce_weight: float = 1.0) -> None:
        super().__init__(ce_weight=ce_weight)

    def forward(self, student, teachers, batch):
        if distributed.rank() == 1 and batch.epoch == 1:
            raise RuntimeError("out of memory (pretend)")
        return {}
'''


@pytest.mark.parametrize("opts", [["--executor", "ray"], ["--workers", "2"], ["--gpus", "0,1"]])
def test_torchrun_refuses_other_executors(opts, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the check comes before any process group
    code = main([*SWEEP, *opts, "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "torchrun" in err, err


def test_a_batch_that_does_not_split_is_refused(monkeypatch):
    data = load_dataset("digits", limit=64)
    model = zoo.create("hinton_mlp_800", num_classes=10, in_chans=1, img_size=8)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(KdbenchError, match="batch 64, which does not split evenly among 3"):
        train(model, data, get_recipe("digits").with_epochs(1), seed=0)
