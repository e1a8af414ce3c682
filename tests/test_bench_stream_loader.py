"""benchmarks/stream_loader.py runs end to end on the CPU and refuses bad input: tiny settings, which check that
it works and writes what it promises (labelled a smoke run), not how fast anything is."""

from __future__ import annotations

import json
import subprocess
import sys

from tiny import REPO

SCRIPT = REPO / "benchmarks" / "stream_loader.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_script_runs_both_loaders_side_by_side(tmp_path):
    proc = run_script("--images", "20", "--rounds", "1", "--workers", "1", "--size", "32", "--batch", "4",
                      "--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "stream_loader-cpu.json").read_text())
    assert set(report["images_per_s"]) == {"kdbench", "timm"} and report["smoke"] is True
    assert report["ratio"] > 0 and report["git_commit"] and "stream_loader.py" in report["command"]
    md = (tmp_path / "stream_loader-cpu.md").read_text()
    assert "SMOKE RUN" in md and "kdbench / timm" in md


def test_script_refuses_bad_input(tmp_path):
    proc = run_script("--images", "0", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--images and --rounds must be at least 1" in proc.stderr
