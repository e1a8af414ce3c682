"""benchmarks/gpu_acceptance.py runs end to end on the CPU (reduced, eager) and keeps its CUDA commands valid.

The CPU run checks that the script works and writes what it promises, not the GPU behaviour it is for
(torch.compile, CUDA graphs, the CUDA tests): those need a GPU session.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from tiny import REPO

SCRIPT = REPO / "benchmarks" / "gpu_acceptance.py"


def _load(path, name: str):
    """A benchmark script as a module (registered first: its dataclasses look their module up)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _module():
    return _load(SCRIPT, "gpu_acceptance")


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@pytest.mark.slow
def test_reduced_cpu_run_passes_and_writes_results(tmp_path):
    proc = _run("--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_acceptance-cpu.json").read_text())
    ga = _module()
    assert [c["name"] for c in report["checks"]] == list(ga.CHECKS)
    for c in report["checks"]:
        assert c["status"] in ("ok", "skipped"), c
        assert c["status"] == "ok" or c["reason"], c
        assert c["ok"] == (c["status"] == "ok")
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["cuda_tests"] == "skipped" and status["engine_vs_reference_fp32"] == "skipped"
    assert status["engine_probe"] == status["compiled_vs_eager"] == status["worker_sweep"] == "ok"
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["engine_probe"]["details"]["compile_exercised"] is False
    assert by_name["cuda_tests"]["details"]["collected"] > 0  # the CUDA tests' ids still exist
    rows = by_name["worker_sweep"]["details"]["rows"]
    assert rows and all(r["status"] == "ok" and r["throughput_img_s"] > 0 for r in rows)
    assert report["ok"] and not report["failed"] and report["reduced"] and report["device_slug"] == "cpu"
    assert report["git_commit"] and report["versions"]["torch"] and "gpu_acceptance.py" in report["command"]
    md = (tmp_path / "gpu_acceptance-cpu.md").read_text()
    assert report["device"] in md and report["command"] in md and "all checks passed" in md
    logs = tmp_path / "gpu_acceptance-cpu-logs"
    assert {"engine_probe.log", "worker_sweep.log", "engine_vs_reference.log"} <= {p.name for p in logs.iterdir()}
    assert "| engine_probe | ok |" in proc.stdout  # the summary table


def test_bad_check_name_is_refused(tmp_path):
    proc = _run("--device", "cpu", "--only", "no_such_check", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "no_such_check" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_cuda_commands_parse():
    """The full CUDA run's sweep and benchmark commands are valid (CI cannot run them)."""
    from kdbench.cli.args import build_parser

    ga = _module()
    plan = ga.make_plan("cuda", False, None, None, 4)
    assert plan.compile and plan.parallel and plan.probe_options == ("fp32", "bf16") and not plan.cmp_methods
    args = build_parser().parse_args(["run", *plan.sweep_args, "--results-dir", "x"])
    assert (args.runs_per_gpu, args.precision, args.compile, args.teacher_cache) == (2, "bf16", "on", "on")
    assert args.gpus == "all" and args.methods == "kd,fitnets" and args.suite == "digits"
    module = _load(REPO / "benchmarks" / "engine_vs_reference.py", "engine_vs_reference")
    on_cpu = [a if a != "cuda" else "cpu" for a in plan.evr_args]  # parse_args refuses cuda without a GPU
    parsed = module.parse_args([*on_cpu, "--precision", "fp32", "--out", "x"])
    assert (parsed.steps, parsed.rounds, parsed.workers) == (30, 2, 8)


def test_pytest_summary_counts():
    ga = _module()
    assert ga.pytest_counts("x\n24 passed, 2 skipped, 3 warnings in 9.1s\n") == {
        "passed": 24, "skipped": 2, "warning": 3}
    assert ga.pytest_counts("37 tests collected in 2.0s") == {"tests collected": 37}
    assert ga.pytest_counts("1 failed, 1 error in 1s") == {"failed": 1, "error": 1}
    assert ga.pytest_counts("nothing") == {}


def test_probe_graph_growth_bound():
    """The engine probe fails when dynamo's graph count grows with epochs or ce_weight changes (issue 17, item 6),
    allowing epoch 0's graphs and the first ce_weight 0's graphs (the engine weighs terms outside the graph)."""
    growth = _module()._graph_growth
    weights = (1.0, 0.25, 4.0, 0.0, 1.0)
    assert growth(None, [None] * 5, weights) == ""  # nothing compiled (the CPU run)
    assert growth(10, [12, 12, 12, 14, 14], weights) == ""
    assert growth(10, [12], weights) == ""
    assert "grew from 2 to 4 at epoch 1 (ce_weight 0.25)" in growth(10, [12, 14], weights)  # epoch 1 recompiled
    assert growth(10, [12, 12, 12, 14], weights) == ""  # the first ce_weight 0 drops the ce term: new graphs
    msg = growth(10, [12, 12, 14], weights)  # a new non-zero ce_weight recompiled
    assert "grew from 2 to 4 at epoch 2 (ce_weight 4)" in msg
    assert "at epoch 4 (ce_weight 1)" in growth(10, [12, 12, 12, 14, 16], weights)
