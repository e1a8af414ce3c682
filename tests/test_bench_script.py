"""benchmarks/engine_vs_reference.py runs end to end on the CPU and rejects bad input clearly.

Tiny settings (two steps of the embedded digits data, one round, one loader worker): this checks
that the script works and writes what it promises, not how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tiny import REPO

SCRIPT = REPO / "benchmarks" / "engine_vs_reference.py"
TINY_RUN = ["--device", "cpu", "--dataset", "digits", "--teacher", "cifar_resnet8", "--student", "cifar_resnet8",
            "--steps", "2", "--rounds", "1", "--workers", "1"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def test_script_runs_and_writes_results(tmp_path):
    proc = run_script(*TINY_RUN, "--teacher-cache", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio engine / reference:" in proc.stdout
    assert "ratio engine + teacher cache / reference:" in proc.stdout
    report = json.loads((tmp_path / "engine_vs_reference-cpu-fp32.json").read_text())
    assert set(report["arms"]) == {"reference", "engine", "engine + teacher cache"}
    for name, arm in report["arms"].items():
        assert len(arm["round_images_per_s"]) == 1, name
        assert arm["median_images_per_s"] > 0, name
        assert 0 < arm["fraction_of_peak"], name
    assert report["images_per_round"] == 2 * 64
    assert report["teacher_cache"]["build_time_s"] > 0
    assert report["flops_per_step"]["step"] > report["flops_per_step"]["student_forward_backward"] > 0
    assert report["provenance"]["git_commit"] and "engine_vs_reference.py" in report["command"]
    md = (tmp_path / "engine_vs_reference-cpu-fp32.md").read_text()
    assert "Ratio engine / reference" in md and report["command"] in md


def test_script_rejects_unknown_model(tmp_path):
    proc = run_script(*TINY_RUN, "--student", "no_such_model", "--out", str(tmp_path))
    assert proc.returncode != 0
    assert "no_such_model" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_script_rejects_unknown_dataset(tmp_path):
    proc = run_script(*TINY_RUN, "--dataset", "no_such_set", "--out", str(tmp_path))
    assert proc.returncode != 0
    assert "no_such_set" in proc.stderr and "Traceback" not in proc.stderr
