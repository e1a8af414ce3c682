"""benchmarks/default_command.py runs end to end and writes what it promises (tiny settings: this
checks the script, not the time; the smoke outputs are labelled as not the full schedule)."""

from __future__ import annotations

import json
import subprocess
import sys

from tiny import REPO

SCRIPT = REPO / "benchmarks" / "default_command.py"


def test_default_command_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--reference-repeats", "1", "--", "--limit", "48", "--epochs",
                           "1", "--throughput-batch", "8"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "default_command-cpu-smoke.json").read_text())
    assert report["shortened"] and report["rows_written"] > 3
    assert report["command_timed"].startswith("kdbench run --methods all --quiet --limit 48")
    assert len(report["reference_s"]["before"]) == 1 and len(report["reference_s"]["after"]) == 1
    assert report["reference_units"] == report["wall_s"] / report["reference_s"]["median"] > 0
    md = (tmp_path / "default_command-cpu-smoke.md").read_text()
    assert "NOT the default command's full schedule" in md and "reference units" in md


def test_a_failing_command_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--reference-repeats", "1", "--", "--methods",
                           "no_such"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode != 0 and "failed; nothing written" in proc.stderr
    assert not list(tmp_path.iterdir())
