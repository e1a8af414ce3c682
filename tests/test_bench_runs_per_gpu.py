"""benchmarks/runs_per_gpu.py runs end to end on the CPU (tiny settings) and refuses bad input.

This checks that the script works and writes what it promises, not how many runs per hour a
device gives (that needs a GPU and a real schedule).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tiny import REPO

SCRIPT = REPO / "benchmarks" / "runs_per_gpu.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=REPO)


def test_script_times_each_packing_and_writes_results(tmp_path):
    proc = _run("--device", "cpu", "--dataset", "digits", "--pair", "cifar_resnet8:cifar_resnet8", "--runs", "2",
                "--packing", "1,2", "--epochs", "1", "--limit", "64", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "runs_per_gpu-cpu.json").read_text())
    assert [t["runs_per_device"] for t in report["table"]] == [1, 2]
    for t in report["table"]:
        assert t["wall_s"] > 0 and t["runs_per_hour"] == 2 * 3600 / t["wall_s"]
    assert "runs_per_gpu.py" in report["command"] and report["provenance"]["git_commit"]
    assert "| 2 |" in (tmp_path / "runs_per_gpu-cpu.md").read_text()


def test_bad_packing_is_refused(tmp_path):
    proc = _run("--device", "cpu", "--packing", "0,2", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--packing values" in proc.stderr
    assert not list(tmp_path.iterdir())
