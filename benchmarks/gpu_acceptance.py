#!/usr/bin/env python
"""The GPU acceptance run: what a session on a new GPU (an H100 or H200) runs first.

Each check runs in its own subprocess, with its output in a log file, so that a crash, a hung
compile or a broken CUDA context in one of them does not end the others. Every check runs, in
order; a failure is recorded and the run goes on. The checks:

1. ``engine_probe``: a KD step whose ``ce_weight`` changes every epoch (1, 0.25, 4, 0, 1), compiled
   (CUDA graphs on CUDA) against eager, step by step on the same batches and from the same weights:
   the loss terms (forward) and every gradient (backward) must agree, so a weight baked into a
   recorded CUDA graph would show at the first replay after it changes. Dynamo's graph count must
   not grow with epochs or ``ce_weight`` changes (see ``_graph_growth`` for the graphs allowed).
2. ``compiled_vs_eager``: every method (with two teachers where it takes them), with and without
   the teacher cache, trained eagerly and compiled: every epoch's mean loss terms within a stated
   relative tolerance.
3. ``cuda_tests``: the tests that need CUDA, with ``KDBENCH_TEST_DEVICE=auto``, CUDA's sync debug
   mode ("warn") set before every test and ``CUDA_LAUNCH_BLOCKING=1``; a skipped test is a failure.
4. ``worker_sweep``: ``kdbench run`` on the digits suite (kd and FitNets, seeds 0 and 1) with two
   worker processes per GPU, bf16, the teacher cache and ``--compile on``; every row's status,
   times, throughput and memory are printed.
5. ``engine_vs_reference`` and ``engine_vs_reference_fp32``: a short
   ``benchmarks/engine_vs_reference.py`` in the device's default precision and in fp32.
5b. ``stream_loader``: ``benchmarks/stream_loader.py``, kdbench's streaming loader against timm's
   ``create_loader`` (1,500 synthetic JPEGs, 8 workers): at least 0.95x on CUDA.
6. ``log_grep``: every log is searched for "skipping cudagraphs", "overwritten", "recompile" and
   "invalid device" (any match fails).
7. ``time_budget``: the whole run within 8 minutes (full CUDA runs only).

On the CPU (``--device cpu``, always ``--reduced``) the same code paths run small and eager, so CI
keeps the script working: torch.compile is not exercised (it takes minutes on a CPU), and the CUDA
tests are only collected (their ids must still exist) and recorded as skipped.

The results go to ``--out`` (default ``results/perf``) as ``gpu_acceptance-<device>.json`` and
``.md``, with the device, the exact command, the commit and the versions; the logs go to
``gpu_acceptance-<device>-logs/`` beside them. The exit status is 1 when any check failed.

    python benchmarks/gpu_acceptance.py                                   # a GPU machine: the full run
    python benchmarks/gpu_acceptance.py --device cpu --out /tmp/acc      # reduced, eager (what CI runs)
    python benchmarks/gpu_acceptance.py --only engine_probe,cuda_tests   # rerun some checks
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the kdbench next to this file is the one checked.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from kdbench import provenance  # noqa: E402
from kdbench.files import atomic_write  # noqa: E402
from kdbench.metrics import device_name  # noqa: E402

SCRIPT = Path(__file__).resolve()
BUDGET_S = 480  # the promise: under 8 minutes on one H100 or H200 (the full CUDA run)
CHECKS = ("engine_probe", "compiled_vs_eager", "cuda_tests", "worker_sweep", "engine_vs_reference",
          "engine_vs_reference_fp32", "stream_loader", "log_grep", "time_budget")
META_CHECKS = ("log_grep", "time_budget")  # about the run itself: they run whatever --only selects
# Run in parallel on CUDA (correctness only, no timings): the host's cores compile them side by side.
PARALLEL_GROUP = ("engine_probe", "compiled_vs_eager", "cuda_tests")
# Any of these in any log fails log_grep (matched case-insensitively).
LOG_PATTERNS = ("skipping cudagraphs", "overwritten", "recompile", "invalid device")
LOG_HEADER = "# gpu_acceptance:"  # the lines this script writes into a log (not searched)

# The tests that need a CUDA GPU (skipped elsewhere). A CPU run collects them, so a renamed test fails CI.
CUDA_TESTS = (
    "tests/test_fast_engine.py::test_gpu_syncs_do_not_grow_with_steps",
    "benchmarks/test_bench_engine.py::test_engine_step_cuda_fast",
    "benchmarks/test_bench_engine.py::test_method_loss_step_cuda_bf16",
)
# pytest with CUDA's sync debug mode on for every test (a test that sets it itself, and resets it to 0,
# does not turn it off for the tests after it). Syncs then warn; the warnings are counted in the log.
SYNC_DEBUG_PYTEST = """\
import sys, pytest, torch
class SyncDebug:
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
sys.exit(pytest.main(sys.argv[1:], plugins=[SyncDebug()]))
"""

# The engine probe and compiled_vs_eager: the embedded digits data (150 images: two full batches of
# 64 and a short one of 22, which gets its own CUDA graph) and a tiny CIFAR ResNet pair.
BATCH = 64
IMAGES = 150
TEACHER, STUDENT = "cifar_resnet8", "cifar_resnet8"
CE_WEIGHTS = (1.0, 0.25, 4.0, 0.0, 1.0)  # the probe's ce_weight, epoch by epoch
PROBE_KD_WEIGHT = 0.05  # small: cross-entropy dominates the gradient, so a stale ce_weight shows in it
# Relative tolerances, compiled against eager. The probe starts both arms of every step from the same
# weights, so only one step's rounding separates them; a stale ce_weight would be off by >= 75%.
PROBE_RTOL = {"fp32": 1e-3, "bf16": 5e-2}
CMP_RTOL = 1e-3  # each epoch's mean of each loss term, fp32, compiled vs eager, after up to 2 epochs
REDUCED_METHODS = ("kd", "fitnets", "ensemble_kd")  # logits + cache, stage maps + ce_weight 0, two teachers


@dataclass(frozen=True)
class Plan:
    """What one invocation runs: the device, full or reduced, and the settings of each check."""

    device: str
    reduced: bool
    compile: bool
    probe_options: tuple[str, ...]  # "fp32" and/or "bf16" (bf16 also channels_last)
    cmp_methods: tuple[str, ...]  # empty: every registered method
    cmp_epochs: int
    sweep_args: tuple[str, ...]
    sweep_checks_compile: bool
    evr_args: tuple[str, ...]
    evr_fp32_separate: bool  # False on the CPU, whose default precision is fp32
    stream_args: tuple[str, ...]  # benchmarks/stream_loader.py's
    parallel: bool
    timeouts: dict[str, int]  # each check's time limit, seconds
    deadline_s: int  # the whole run's: a check never runs past it, so the report is always written


# Each check's time limit (seconds), on CUDA and on the CPU. Caps for a hung check, not estimates.
TIMEOUTS = {"cuda": {"engine_probe": 240, "compiled_vs_eager": 360, "cuda_tests": 420, "worker_sweep": 300,
                     "engine_vs_reference": 180, "engine_vs_reference_fp32": 180, "stream_loader": 120},
            "cpu": dict.fromkeys(CHECKS, 300)}
# The whole run's deadline: 9.5 minutes on CUDA (a GPU session's command may get 10), generous on the CPU.
DEADLINE_S = {"cuda": 570, "cpu": 1800}
RESERVE_S = 10  # kept back from the deadline for the log search and writing the report


def make_plan(device: str, reduced: bool, parallel: bool | None, timeout_s: int | None,
              sweep_epochs: int, deadline_s: int | None = None) -> Plan:
    cuda = device == "cuda"
    sweep = ["--suite", "digits", "--methods", "kd,fitnets", "--seeds", "0,1", "--teacher-cache", "on", "-q",
             "--no-report"]
    if cuda:
        sweep += ["--device", "cuda", "--gpus", "all", "--runs-per-gpu", "2", "--precision", "bf16", "--compile", "on"]
    else:
        sweep += ["--device", "cpu", "--workers", "2", "--precision", "fp32", "--compile", "off",
                  "--throughput-batch", "16"]
    if reduced:  # one pair (one teacher), a few images, one epoch
        sweep += ["--pairs", "hinton_mlp_300@0:hinton_mlp_30", "--limit", "64", "--epochs", "1"]
    else:
        sweep += ["--epochs", str(sweep_epochs)]
    evr = ["--device", device]
    if reduced:
        evr += ["--dataset", "digits", "--teacher", "cifar_resnet8", "--student", "cifar_resnet8", "--steps", "2",
                "--rounds", "1", "--workers", "1"]
    else:
        evr += ["--steps", "30", "--rounds", "2", "--workers", "8"]
    return Plan(
        device=device, reduced=reduced, compile=cuda,
        probe_options=("fp32", "bf16") if cuda and not reduced else ("fp32",),
        cmp_methods=REDUCED_METHODS if reduced else (),
        cmp_epochs=1 if reduced else 2,
        sweep_args=tuple(sweep), sweep_checks_compile=cuda,
        evr_args=tuple(evr), evr_fp32_separate=cuda,
        stream_args=("--device", device) + (("--images", "40", "--rounds", "1", "--workers", "1", "--size", "32",
                                             "--batch", "8") if reduced else ("--images", "1500", "--rounds", "3",
                                                                              "--workers", "8")),
        parallel=(cuda and not reduced) if parallel is None else (parallel and cuda),
        timeouts={k: timeout_s or v for k, v in TIMEOUTS[device].items()},
        deadline_s=deadline_s or DEADLINE_S[device],
    )


# ----------------------------------------------------------------------------- running a step


@dataclass
class Context:
    plan: Plan
    out: Path
    logs: Path
    only: frozenset[str]
    launch_blocking: bool
    command: str = ""
    commit: str = ""
    started: float = field(default_factory=time.perf_counter)

    def time_left(self) -> float:
        return self.plan.deadline_s - RESERVE_S - (time.perf_counter() - self.started)


@dataclass
class Ran:
    rc: int | None  # None: killed at the time limit
    seconds: float
    log: Path

    def why(self) -> str:
        """Why the process did not succeed, in words."""
        if self.rc is None:
            return f"timed out after {self.seconds:.0f} s" if self.seconds else \
                "not started: the run's deadline was too close"
        return f"exit status {self.rc}"

    def tail(self, n: int = 25) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if not ln.startswith(LOG_HEADER)]
        return "\n".join(lines[-n:])


def run_logged(ctx: Context, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Ran:
    """Run ``argv`` from the repository root with its stdout and stderr in ``<logs>/<name>.log``.

    It runs in its own process group, so that at the time limit its workers are ended with it.
    """
    log = ctx.logs / f"{name}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    limit = min(ctx.plan.timeouts[name], ctx.time_left())
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write(f"{LOG_HEADER} $ {''.join(f'{k}={v} ' for k, v in (env or {}).items())}{shlex.join(argv)}\n")
        f.flush()
        if limit < RESERVE_S:
            f.write(f"{LOG_HEADER} not started: the run's deadline ({ctx.plan.deadline_s} s) is too close\n")
            return Ran(None, 0.0, log)
        proc = subprocess.Popen(list(argv), cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group: the check and its workers
            proc.wait()
            rc = None
            f.write(f"{LOG_HEADER} killed after {limit:.0f} s (the check's time limit, or the run's deadline)\n")
    return Ran(rc, time.perf_counter() - t0, log)


def result(name: str, status: str, seconds: float, summary: str, details: dict[str, Any] | None = None,
           log: Path | None = None, reason: str = "") -> dict[str, Any]:
    """One check's record: status ok, failed or skipped (with the reason)."""
    r = {"name": name, "status": status, "ok": status == "ok", "seconds": round(seconds, 2), "summary": summary,
         "details": details or {}}
    if reason or status != "ok":
        r["reason"] = reason or summary
    if log is not None:
        r["log"] = log.name
    return r


def failed_run(name: str, ran: Ran, what: str) -> dict[str, Any]:
    return result(name, "failed", ran.seconds, f"{what}: {ran.why()}", {"log_tail": ran.tail()}, ran.log)


def internal_check(ctx: Context, name: str) -> dict[str, Any]:
    """Run one of this script's own checks (engine_probe, compiled_vs_eager) in a child process."""
    out = ctx.logs / f"{name}.result.json"
    out.unlink(missing_ok=True)
    argv = [sys.executable, str(SCRIPT), "--internal", name, "--result", str(out), "--device", ctx.plan.device]
    argv += ["--reduced"] if ctx.plan.reduced else []
    ran = run_logged(ctx, name, argv)
    if not out.exists():
        return failed_run(name, ran, "the check's process ended without a result")
    r = json.loads(out.read_text())
    status = "ok" if r["ok"] and ran.rc == 0 else "failed"
    return result(name, status, ran.seconds, r["summary"], r["details"], ran.log)


# ----------------------------------------------------------------------------- the checks


def check_engine_probe(ctx: Context) -> dict[str, Any]:
    return internal_check(ctx, "engine_probe")


def check_compiled_vs_eager(ctx: Context) -> dict[str, Any]:
    return internal_check(ctx, "compiled_vs_eager")


def pytest_counts(text: str) -> dict[str, int]:
    """The counts of pytest's last summary line ("3 passed, 1 skipped, 2 warnings in 9.1s")."""
    for line in reversed(text.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?|"
                           r"tests? collected)", line)
        if found:
            return {k.rstrip("s") if k.endswith(("errors", "warnings")) else k: int(n) for n, k in found}
    return {}


def check_cuda_tests(ctx: Context) -> dict[str, Any]:
    name = "cuda_tests"
    if ctx.plan.device != "cuda":
        # Collect them only: their ids must still exist where a GPU session will run them.
        ran = run_logged(ctx, name, [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                     *CUDA_TESTS])
        counts = pytest_counts(ran.log.read_text(errors="replace"))
        collected = counts.get("tests collected", counts.get("test collected", 0))
        if ran.rc != 0 or not collected:
            return failed_run(name, ran, "collecting the CUDA tests failed (a test was renamed or removed?)")
        return result(name, "skipped", ran.seconds, f"needs CUDA; its {collected} tests were collected (ids valid)",
                      {"tests": list(CUDA_TESTS), "collected": collected}, ran.log,
                      reason=f"needs a CUDA GPU (device {ctx.plan.device}); collected only")
    env = {"KDBENCH_TEST_DEVICE": "auto"}
    if ctx.launch_blocking:
        env["CUDA_LAUNCH_BLOCKING"] = "1"
    ran = run_logged(ctx, name, [sys.executable, "-c", SYNC_DEBUG_PYTEST, "-q", "-rs", "-p", "no:cacheprovider",
                                 *CUDA_TESTS], env)
    text = ran.log.read_text(errors="replace")
    counts = pytest_counts(text)
    details = {"tests": list(CUDA_TESTS), "counts": counts, "env": env, "sync_debug_mode": "warn",
               "sync_warning_lines": sum("synchroniz" in ln for ln in text.splitlines())}
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no pytest summary line"
    if ran.rc != 0 or counts.get("skipped") or not counts.get("passed"):
        why = (ran.why() if ran.rc != 0 else
               "a CUDA test was skipped: is CUDA visible to pytest?" if counts.get("skipped") else "no test passed")
        return result(name, "failed", ran.seconds, f"{summary} ({why})", {**details, "log_tail": ran.tail(40)},
                      ran.log)
    return result(name, "ok", ran.seconds, summary, details, ran.log)


SWEEP_COLUMNS = ("kind", "method", "pair", "seed", "status", "train_time_s", "first_epoch_s", "epoch_time_s",
                 "throughput_img_s", "throughput_note", "peak_mem_mb", "peak_mem_kind", "precision", "compiled",
                 "teacher_cache", "teacher_cache_build_s", "compile_error", "top1_last")


def check_worker_sweep(ctx: Context) -> dict[str, Any]:
    name = "worker_sweep"
    with tempfile.TemporaryDirectory(prefix="kdbench-acceptance-") as tmp:
        argv = [sys.executable, "-m", "kdbench", "run", *ctx.plan.sweep_args, "--results-dir", tmp]
        ran = run_logged(ctx, name, argv)
        rows = [json.loads(p.read_text()) for p in sorted((Path(tmp) / "runs").glob("*.json"))]
    rows = [{k: r.get(k) for k in SWEEP_COLUMNS} for r in rows]
    rows.sort(key=lambda r: (r["kind"] != "teacher", str(r["method"]), str(r["pair"]), r["seed"] or 0))
    for line in sweep_table(rows):
        print(f"  {line}", flush=True)
    problems = [f"{r['method']} {r['pair']} seed {r['seed']}: status {r['status']}" for r in rows
                if r["status"] != "ok"]
    if ctx.plan.sweep_checks_compile:
        problems += [f"{r['method']} {r['pair']} seed {r['seed']}: not compiled ({r['compile_error'] or 'no reason'})"
                     for r in rows if r["compiled"] is not True]
        problems += [f"{r['method']} {r['pair']} seed {r['seed']}: precision {r['precision']}"
                     for r in rows if r["precision"] != "bf16"]
    problems += [f"kd {r['pair']} seed {r['seed']}: no teacher cache" for r in rows
                 if r["method"] == "kd" and r["teacher_cache"] is not True]
    students = [r for r in rows if r["kind"] == "student"]
    details = {"command": "kdbench " + shlex.join(["run", *ctx.plan.sweep_args]), "rows": rows,
               "wall_s": round(ran.seconds, 2),
               "student_runs_per_hour": round(len(students) * 3600 / ran.seconds, 1) if students else None}
    if ran.rc != 0 or not students or problems:
        details["problems"] = problems
        details["log_tail"] = ran.tail()
        why = ran.why() if ran.rc != 0 else ("; ".join(problems[:3]) or "no student rows")
        return result(name, "failed", ran.seconds, f"{len(rows)} rows: {why}", details, ran.log)
    return result(name, "ok", ran.seconds, f"{len(rows)} rows ({len(students)} students), all ok, in "
                  f"{ran.seconds:.0f} s", details, ran.log)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def sweep_table(rows: list[dict[str, Any]]) -> list[str]:
    cols = ("kind", "method", "pair", "seed", "status", "train_time_s", "first_epoch_s", "epoch_time_s",
            "throughput_img_s", "peak_mem_mb", "compiled", "teacher_cache")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return lines


def _engine_vs_reference(ctx: Context, name: str, extra: Sequence[str]) -> dict[str, Any]:
    from kdbench.train import EngineOptions

    out = ctx.logs / "engine_vs_reference"
    precision = "fp32" if "fp32" in extra else EngineOptions.fast_for(ctx.plan.device).precision
    written = out / f"engine_vs_reference-{device_slug(ctx.plan.device)}-{precision}.json"
    written.unlink(missing_ok=True)
    argv = [sys.executable, str(REPO / "benchmarks" / "engine_vs_reference.py"), *ctx.plan.evr_args, *extra,
            "--out", str(out)]
    ran = run_logged(ctx, name, argv)
    if ran.rc != 0 or not written.exists():
        return failed_run(name, ran, "engine_vs_reference.py failed" if ran.rc != 0 else
                          f"engine_vs_reference.py did not write {written.name}")
    rep = json.loads(written.read_text())
    medians = {k: round(a["median_images_per_s"], 1) for k, a in rep["arms"].items()}
    details = {"command": "python " + shlex.join(["benchmarks/engine_vs_reference.py", *ctx.plan.evr_args, *extra]),
               "result": str(written.relative_to(ctx.out)), "precision": rep["precision"],
               "median_images_per_s": medians, "ratio_engine_over_reference": rep["ratio_engine_over_reference"],
               "ratio_cached_over_reference": rep["ratio_cached_over_reference"],
               "engine": rep["arms"]["engine"]["settings"]["label"]}
    settings = f" ({details['engine']})" if details["engine"] != rep["precision"] else ""
    summary = (f"{rep['precision']}{settings}: engine {rep['ratio_engine_over_reference']:.2f}x the "
               "reference" + (f", with the cache {rep['ratio_cached_over_reference']:.2f}x"
                              if rep["ratio_cached_over_reference"] is not None else ""))
    ok = all(v > 0 for v in medians.values())
    return result(name, "ok" if ok else "failed", ran.seconds, summary, details, ran.log)


def check_engine_vs_reference(ctx: Context) -> dict[str, Any]:
    return _engine_vs_reference(ctx, "engine_vs_reference", [])


def check_engine_vs_reference_fp32(ctx: Context) -> dict[str, Any]:
    name = "engine_vs_reference_fp32"
    if not ctx.plan.evr_fp32_separate:
        return result(name, "skipped", 0.0, "the default precision is fp32 here: engine_vs_reference ran it",
                      reason=f"on the {ctx.plan.device.upper()} the default precision is fp32; engine_vs_reference "
                             "ran it")
    return _engine_vs_reference(ctx, name, ["--precision", "fp32"])


def check_stream_loader(ctx: Context) -> dict[str, Any]:
    """kdbench's streaming loader against timm's create_loader (pinned memory, uint8 to the GPU, normalised there):
    at least 0.95x in a full run; a reduced run only checks that it works."""
    name = "stream_loader"
    out = ctx.logs / "stream_loader"
    written = out / f"stream_loader-{'cuda' if ctx.plan.device == 'cuda' else 'cpu'}.json"
    written.unlink(missing_ok=True)
    argv = [sys.executable, str(REPO / "benchmarks" / "stream_loader.py"), *ctx.plan.stream_args, "--out", str(out)]
    ran = run_logged(ctx, name, argv)
    if ran.rc != 0 or not written.exists():
        return failed_run(name, ran, "stream_loader.py failed" if ran.rc != 0 else
                          f"stream_loader.py did not write {written.name}")
    rep = json.loads(written.read_text())
    details = {"command": "python " + shlex.join(["benchmarks/stream_loader.py", *ctx.plan.stream_args]),
               "result": str(written.relative_to(ctx.out)), "median_images_per_s": rep["median_images_per_s"],
               "ratio": rep["ratio"]}
    ok = rep["ratio"] > 0 and (ctx.plan.reduced or rep["ratio"] >= rep["target"])
    summary = f"kdbench / timm = {rep['ratio']:.2f} (target {rep['target']}{', not judged: reduced' * ctx.plan.reduced})"
    return result(name, "ok" if ok else "failed", ran.seconds, summary, details, ran.log)


def check_log_grep(ctx: Context) -> dict[str, Any]:
    t0 = time.perf_counter()
    pattern = re.compile("|".join(re.escape(p) for p in LOG_PATTERNS), re.IGNORECASE)
    hits: list[dict[str, Any]] = []
    logs = sorted(ctx.logs.glob("*.log"))
    for log in logs:
        for i, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
            if not line.startswith(LOG_HEADER) and pattern.search(line):
                hits.append({"log": log.name, "line": i, "text": line.strip()[:300]})
    counts = {p: sum(p in h["text"].lower() for h in hits) for p in LOG_PATTERNS}
    details = {"patterns": list(LOG_PATTERNS), "logs": [p.name for p in logs], "counts": counts, "matches": hits[:50]}
    seconds = time.perf_counter() - t0
    if hits:
        return result("log_grep", "failed", seconds, f"{len(hits)} matching line(s): " + ", ".join(
            f"'{p}' x{n}" for p, n in counts.items() if n), details)
    return result("log_grep", "ok", seconds, f"none of the {len(LOG_PATTERNS)} patterns in {len(logs)} logs", details)


def check_time_budget(ctx: Context) -> dict[str, Any]:
    total = time.perf_counter() - ctx.started
    details = {"total_s": round(total, 1), "budget_s": BUDGET_S}
    if ctx.plan.device != "cuda" or ctx.plan.reduced or not ctx.only >= set(CHECKS) - set(META_CHECKS):
        return result("time_budget", "skipped", 0.0, f"{total:.0f} s in all", details,
                      reason=f"the {BUDGET_S // 60}-minute budget is for the full run of every check on one GPU")
    status = "ok" if total <= BUDGET_S else "failed"
    return result("time_budget", status, 0.0, f"{total:.0f} s of the {BUDGET_S} s budget", details)


CHECK_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "engine_probe": check_engine_probe, "compiled_vs_eager": check_compiled_vs_eager,
    "cuda_tests": check_cuda_tests, "worker_sweep": check_worker_sweep,
    "engine_vs_reference": check_engine_vs_reference, "engine_vs_reference_fp32": check_engine_vs_reference_fp32,
    "stream_loader": check_stream_loader,
    "log_grep": check_log_grep, "time_budget": check_time_budget,
}


def guarded(ctx: Context, name: str) -> dict[str, Any]:
    """A check's record; a check not selected is skipped, one that raises is failed."""
    if name not in ctx.only and name not in META_CHECKS:
        return result(name, "skipped", 0.0, "not selected", reason="not selected (--only)")
    t0 = time.perf_counter()
    try:
        r = CHECK_FUNCTIONS[name](ctx)
    except Exception as exc:  # a bug here must not hide the other checks' results
        r = result(name, "failed", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}",
                   {"traceback": traceback.format_exc()[-3000:]})
    mark = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}[r["status"]]
    print(f"[{mark}] {name} ({r['seconds']:.1f} s): {r['summary']}", flush=True)
    return r


# ----------------------------------------------------------------------------- checks run in a child


def _digits(device: torch.device):
    from kdbench.data import load_dataset

    return load_dataset("digits", limit=IMAGES).to(device)


def _recipe(epochs: int):
    from kdbench.recipe import Recipe

    return Recipe(name="acceptance", epochs=epochs, batch_size=BATCH, lr=0.05, milestones=(), crop_padding=1,
                  flip=True)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-8)


def _graph_count(plan: Plan) -> int | None:
    """Graphs dynamo has compiled in this process (None: nothing is compiled)."""
    if not plan.compile:
        return None
    from kdbench.train.step import compiled_graphs

    return compiled_graphs()


def _graph_growth(graphs0: int | None, counts: list[int | None], weights: Sequence[float]) -> str:
    """Why the compiled step's graph count grew where it must not ('' when it did not), given the count before
    the probe's first epoch and after each epoch so far (None: nothing compiled).

    Epoch 0 compiles the step (a full and a short last batch). An epoch whose ``ce_weight`` is the first 0 may
    add graphs (the cross-entropy term is dropped). Any other epoch (a new non-zero ``ce_weight``, or a later
    epoch) must add none: the engine weighs terms outside the graph, so a graph per epoch or per weight means
    Python scalars reach the graph again (issue 17, item 6), and on CUDA a CUDA graph is recorded per value."""
    epoch = len(counts) - 1
    if epoch < 1 or graphs0 is None or counts[-1] is None or counts[-2] is None:
        return ""
    if counts[-1] == counts[-2] or not any(bool(w) == bool(weights[epoch]) for w in weights[:epoch]):
        return ""
    return (f"dynamo graphs grew from {counts[-2] - graphs0} to {counts[-1] - graphs0} at epoch {epoch} "
            f"(ce_weight {weights[epoch]:g}): the step recompiles per epoch or per ce_weight")


def _reset_compiler(plan: Plan) -> None:
    """Forget compiled code and CUDA graphs: every comparison compiles its own."""
    if plan.compile:
        import torch._dynamo

        torch._dynamo.reset()


def _digits_setup(plan: Plan) -> tuple[torch.device, Any, dict[str, int], tuple[int, int, int]]:
    """The device, the digits data on it, the model kwargs and the image shape both engine checks use."""
    device = torch.device(plan.device)
    data = _digits(device)
    info = data.info
    kw = dict(num_classes=info.num_classes, in_chans=info.in_chans, img_size=info.img_size)
    return device, data, kw, (info.in_chans, info.img_size, info.img_size)


def engine_probe(plan: Plan) -> dict[str, Any]:
    """ce_weight changing between epochs, compiled against eager, step by step (see the module doc)."""
    import copy

    from kdbench import zoo
    from kdbench.data import Loader
    from kdbench.features import probe
    from kdbench.registry import load_methods
    from kdbench.train import EngineOptions, TrainStep, make_optimizer
    from kdbench.train.step import trainable_parameters

    device, data, kw, shape = _digits_setup(plan)
    recipe = _recipe(len(CE_WEIGHTS))

    class ScheduledKD(load_methods()["kd"]):  # kd whose ce_weight follows CE_WEIGHTS, epoch by epoch
        def ce_weight_at(self, epoch: int, epochs: int) -> float:
            return CE_WEIGHTS[epoch]

    torch.manual_seed(0)
    teacher = zoo.create(TEACHER, **kw)
    torch.manual_seed(1)
    student = zoo.create(STUDENT, **kw)
    method = ScheduledKD(kd_weight=PROBE_KD_WEIGHT)
    taps = method.taps()
    method.setup(probe(student, taps, shape, STUDENT), [probe(teacher, taps, shape, TEACHER)])

    runs: dict[str, Any] = {}
    ok = True
    for precision in plan.probe_options:
        options = EngineOptions(precision, channels_last=precision == "bf16")
        rtol = PROBE_RTOL[precision]
        _reset_compiler(plan)
        graphs0 = _graph_count(plan)
        arms = {}
        for arm, compiled in (("eager", False), ("compiled", plan.compile)):
            opts = replace(options, compile=compiled)
            s, t, m = copy.deepcopy(student), copy.deepcopy(teacher), copy.deepcopy(method)
            s, t, m = opts.prepare(s.to(device)), opts.prepare(t.to(device)), m.to(device)
            opt, _ = make_optimizer(trainable_parameters(s, m), recipe)
            step = TrainStep(s, m, [t], opt, recipe=recipe, device=device, options=opts, model_name=STUDENT,
                             teacher_names=[TEACHER])
            arms[arm] = (step.compile() if compiled else step, s, m)
        loader = Loader(data.train_images, data.train_labels, data.info, batch_size=BATCH, shuffle=True,
                        generator=torch.Generator(device=device).manual_seed(0), crop_padding=1, flip=True)
        epochs = []
        steps = 0
        counts = []  # dynamo's graph count after each epoch
        for epoch, weight in enumerate(CE_WEIGHTS):
            term_err = grad_err = 0.0
            problems: list[str] = []
            for batch in loader.batches():
                steps += 1
                seen = {}
                for arm, (step, s, m) in arms.items():
                    terms = {k: float(v) for k, v in step(batch, epoch).items()}
                    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float()
                                       .flatten() for p in trainable_parameters(s, m)]).clone()
                    seen[arm] = (terms, grads)
                (te, ge), (tc, gc) = seen["eager"], seen["compiled"]
                if set(te) != set(tc):
                    problems.append(f"terms {sorted(tc)} compiled, {sorted(te)} eager")
                if ("ce" in te) != bool(weight):
                    problems.append(f"ce term {'missing' if weight else 'present'} at ce_weight {weight}")
                term_err = max([term_err, *(_rel(tc[k], te[k]) for k in set(te) & set(tc))])
                grad_err = max(grad_err, float((gc - ge).norm() / ge.norm().clamp_min(1e-12)))
                # The next step of both arms starts from the eager arm's weights: each comparison is one step's.
                (_, s_e, m_e), (_, s_c, m_c) = arms["eager"], arms["compiled"]
                s_c.load_state_dict(s_e.state_dict())
                m_c.load_state_dict(m_e.state_dict())
            counts.append(_graph_count(plan))
            growth = _graph_growth(graphs0, counts, CE_WEIGHTS)
            if growth:
                problems.append(growth)
            problems = list(dict.fromkeys(problems))  # once each, not once per step
            epoch_ok = not problems and term_err <= rtol and grad_err <= rtol
            ok &= epoch_ok
            epochs.append({"epoch": epoch, "ce_weight": weight, "max_term_rel_err": term_err,
                           "max_grad_rel_err": grad_err, "ok": epoch_ok, "problems": problems})
            print(f"engine probe {options.label}: epoch {epoch}, ce_weight {weight}: loss terms within "
                  f"{term_err:.2e}, gradients within {grad_err:.2e} (tolerance {rtol:g})"
                  + (f"; {'; '.join(problems)}" if problems else ""), flush=True)
        label = replace(options, compile=plan.compile).label
        graphs = _graph_count(plan)
        runs[label] = {"rtol": rtol, "epochs": epochs, "steps": steps,
                       "dynamo_graphs": graphs - graphs0 if graphs is not None else None,
                       "dynamo_graphs_per_epoch": [c - graphs0 if c is not None else None for c in counts],
                       "ok": all(e["ok"] for e in epochs)}
    worst = max((e["max_grad_rel_err"] for r in runs.values() for e in r["epochs"]), default=0.0)
    what = "compiled vs eager" if plan.compile else "eager vs eager (compile not exercised on the CPU)"
    return {"ok": ok, "summary": f"{what}, ce_weight {'/'.join(f'{w:g}' for w in CE_WEIGHTS)} over "
                                 f"{len(CE_WEIGHTS)} epochs: {'respected' if ok else 'NOT respected'} "
                                 f"(worst gradient error {worst:.1e})",
            "details": {"compile_exercised": plan.compile, "teacher": TEACHER, "student": STUDENT,
                        "dataset": f"digits, first {IMAGES} images, batch {BATCH}", "kd_weight": PROBE_KD_WEIGHT,
                        "ce_weights": list(CE_WEIGHTS), "options": runs}}


def compiled_vs_eager(plan: Plan) -> dict[str, Any]:
    """Every method (or the reduced few), with and without the teacher cache: epoch losses, compiled vs eager."""
    from kdbench import zoo
    from kdbench.features import probe
    from kdbench.registry import build_method, load_methods
    from kdbench.train import EngineOptions, build_view_cache, cacheable, freeze, train

    device, data, kw, shape = _digits_setup(plan)
    recipe = _recipe(plan.cmp_epochs)
    methods = load_methods()
    names = list(plan.cmp_methods) or sorted(methods)
    rows = []
    for name in names:
        cls = methods[name]
        n_teachers = min(cls.max_teachers, 2)
        for cached in (False, True):
            if cached and not (n_teachers and cacheable(build_method(cls).taps())):
                continue  # a method with stage maps (or no teacher) cannot use the cache
            row: dict[str, Any] = {"method": name, "teachers": n_teachers, "teacher_cache": cached}
            try:
                losses = {}
                for arm, options in (("eager", EngineOptions()), ("compiled", EngineOptions(compile=plan.compile))):
                    _reset_compiler(plan)
                    teachers = []
                    for i in range(n_teachers):
                        torch.manual_seed(10 + i)
                        teachers.append(freeze(zoo.create(TEACHER, **kw)))
                    torch.manual_seed(1)
                    student = zoo.create(STUDENT, **kw)
                    method = build_method(cls)
                    taps = method.taps()
                    method.setup(probe(student, taps, shape, STUDENT),
                                 [probe(t, taps, shape, TEACHER) for t in teachers])
                    teachers = [t.to(device) for t in teachers]
                    caches = [build_view_cache(t, data, recipe, pooled=taps.pooled, options=options)
                              for t in teachers] if cached else ()
                    res = train(student.to(device), data, recipe, seed=3, method=method, teachers=teachers,
                                teacher_names=[TEACHER] * n_teachers, model_name=STUDENT, options=options,
                                teacher_caches=caches)
                    losses[arm] = [h.losses for h in res.history]
                    row[f"top1_{arm}"] = res.last.top1
                errs = [max((_rel(c[k], e[k]) for k in e), default=0.0) if set(c) == set(e) else math.inf
                        for e, c in zip(losses["eager"], losses["compiled"])]
                row.update(max_rel_err=max(errs), ok=max(errs) <= CMP_RTOL, losses_eager=losses["eager"],
                           losses_compiled=losses["compiled"])
            except Exception as exc:  # one method's failure is recorded; the others still run
                row.update(ok=False, error=_one_line(exc))
                traceback.print_exc()
            rows.append(row)
            print(f"compiled vs eager: {name}{' + teacher cache' if cached else ''}: "
                  + (f"max relative difference {row['max_rel_err']:.2e} (tolerance {CMP_RTOL:g})" if "error" not in row
                     else f"ERROR {row['error']}"), flush=True)
    bad = [f"{r['method']}{' (cache)' if r['teacher_cache'] else ''}" for r in rows if not r["ok"]]
    worst = max((r.get("max_rel_err", math.inf) for r in rows), default=0.0)
    what = "compiled vs eager" if plan.compile else "eager vs eager (compile not exercised on the CPU)"
    summary = (f"{what}: {len(rows)} runs ({len(names)} methods, {sum(r['teacher_cache'] for r in rows)} with the "
               f"cache), {plan.cmp_epochs} epoch(s); " + (f"worst relative difference {worst:.1e} (tolerance "
                                                          f"{CMP_RTOL:g})" if not bad else f"FAILED: {', '.join(bad)}"))
    return {"ok": not bad, "summary": summary,
            "details": {"compile_exercised": plan.compile, "rtol": CMP_RTOL, "epochs": plan.cmp_epochs,
                        "precision": "fp32", "teacher": TEACHER, "student": STUDENT,
                        "dataset": f"digits, first {IMAGES} images, batch {BATCH}", "runs": rows}}


def run_internal(name: str, plan: Plan, out: Path) -> int:
    try:
        r = {"engine_probe": engine_probe, "compiled_vs_eager": compiled_vs_eager}[name](plan)
    except Exception as exc:
        traceback.print_exc()
        r = {"ok": False, "summary": _one_line(exc),
             "details": {"traceback": traceback.format_exc()[-3000:]}}
    out.write_text(json.dumps(r, indent=1, default=str) + "\n")
    return 0 if r["ok"] else 1


# ----------------------------------------------------------------------------- results


def device_slug(device: str) -> str:
    if device != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(0).lower().removeprefix("nvidia ")
    return "cuda-" + "-".join("".join(c if c.isalnum() else " " for c in name).split())


def summary_table(checks: list[dict[str, Any]]) -> list[str]:
    lines = ["| check | status | seconds | result |", "|---|---|---|---|"]
    for c in checks:
        text = c["summary"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {c['name']} | {c['status']} | {c['seconds']:.1f} | {text} |")
    return lines


def write_outputs(report: dict[str, Any], stem: str, out: Path) -> tuple[Path, Path]:
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(report, indent=1, default=str) + "\n"))
    r = report
    verdict = ("**INCOMPLETE**" if not r["complete"] else "**all checks passed**" if r["ok"] else
               f"**FAILED: {', '.join(r['failed'])}**")
    md = [f"# GPU acceptance: {r['device']}{' (reduced)' if r['reduced'] else ''}", "",
          (f"{verdict}; {r['total_s']:.0f} s in all. Device `{r['device']}`, torch {r['versions']['torch']} (CUDA "
           f"{r['versions']['cuda']}), timm {r['versions']['timm']}, Python {r['versions']['python']}; commit "
           f"`{r['git_commit']}`; {r['time']}."), "", *summary_table(r["checks"]), ""]
    by_name = {c["name"]: c for c in r["checks"]}
    sweep = by_name.get("worker_sweep", {}).get("details", {})
    if sweep.get("rows"):
        md += ["## Worker sweep", "", f"`{sweep['command']}`: {len(sweep['rows'])} rows in {sweep['wall_s']:.0f} s.",
               "", *sweep_table(sweep["rows"]), ""]
    skipped = [c for c in r["checks"] if c["status"] == "skipped"]
    failed = [c for c in r["checks"] if c["status"] == "failed"]
    if skipped:
        md += ["## Skipped", "", *[f"- {c['name']}: {c['reason']}" for c in skipped], ""]
    if failed:
        md += ["## Failed", "", *[f"- {c['name']}: {c['summary']}" + (f" (log: `{r['logs']}/{c['log']}`)"
                                                                         if c.get("log") else "") for c in failed], ""]
    md += ["## Notes", "", *[f"- {n}" for n in r["notes"]], "",
           f"Logs: `{r['logs']}/`. Every check's details are in `{json_path.name}`.", "",
           "Produced by:", "", "```sh", r["command"], "```", ""]
    atomic_write(md_path, lambda tmp: tmp.write_text("\n".join(md)))
    return json_path, md_path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_acceptance.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (default when a GPU is visible) or cpu (always --reduced, eager)")
    p.add_argument("--reduced", action="store_true", help="tiny data, one epoch, a few methods, short benchmarks "
                                                          "(implied on the CPU, where nothing is compiled)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "perf",
                   help="folder for the JSON, the markdown and the logs (default results/perf)")
    p.add_argument("--only", help=f"comma-separated checks to run, the others are skipped: {', '.join(CHECKS)}")
    p.add_argument("--sweep-epochs", type=int, default=4, metavar="N",
                   help="epochs of the worker sweep's runs in the full run (default 4: the first compiles, the "
                        "others give the steady-state epoch time)")
    p.add_argument("--step-timeout", type=int, metavar="S",
                   help="time limit of every check's process in seconds (default: per check, 180-420 s on CUDA, "
                        "300 s on the CPU)")
    p.add_argument("--deadline", type=int, metavar="S",
                   help=f"the whole run's time limit in seconds: no check runs past it, and the report is written "
                        f"(default {DEADLINE_S['cuda']} on CUDA, {DEADLINE_S['cpu']} on the CPU)")
    p.add_argument("--serial", action="store_true", help="run the correctness checks one after another (on CUDA "
                                                         f"{', '.join(PARALLEL_GROUP)} run side by side by default)")
    p.add_argument("--no-launch-blocking", action="store_true",
                   help="run the CUDA tests without CUDA_LAUNCH_BLOCKING=1 (sync debug mode stays on)")
    p.add_argument("--internal", choices=("engine_probe", "compiled_vs_eager"), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch (use --device cpu for the reduced run)")
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(CHECKS))
        if unknown:
            p.error(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if args.sweep_epochs < 1 or any(v is not None and v < 1 for v in (args.step_timeout, args.deadline)):
        p.error("--sweep-epochs, --step-timeout and --deadline must be at least 1")
    args.reduced = args.reduced or args.device == "cpu"
    return args


def make_report(ctx: Context, checks: dict[str, dict[str, Any]], complete: bool) -> dict[str, Any]:
    """The JSON document: the checks so far (all of them once ``complete``), the device, command and versions."""
    plan = ctx.plan
    ordered = [checks[n] for n in CHECKS if n in checks]
    failed = [c["name"] for c in ordered if c["status"] == "failed"]
    notes = [
        f"Checks ran as subprocesses with time limits ({', '.join(f'{k} {v} s' for k, v in plan.timeouts.items())}) "
        f"within a deadline of {plan.deadline_s} s for the whole run"
        + (f"; {', '.join(PARALLEL_GROUP)} side by side" if plan.parallel else "") + ".",
        (f"engine_probe and compiled_vs_eager: {STUDENT} student, {TEACHER} teacher(s), digits (first {IMAGES} "
         f"images, batch {BATCH}: two full batches and a short one); tolerances: probe {PROBE_RTOL}, "
         f"compiled_vs_eager {CMP_RTOL:g} (relative, fp32)."),
    ]
    if not plan.compile:
        notes.append("torch.compile was NOT exercised: on the CPU the engine checks compare eager with eager (a "
                     "smoke test of the code path), and the CUDA tests are only collected.")
    if plan.device == "cuda":
        notes.append("cuda_tests: KDBENCH_TEST_DEVICE=auto, torch.cuda.set_sync_debug_mode('warn') before every "
                     "test" + (", CUDA_LAUNCH_BLOCKING=1." if ctx.launch_blocking else " (CUDA_LAUNCH_BLOCKING off)."))
    notes.append("engine_vs_reference's own results are in the logs folder, not in results/perf: these are short "
                 "runs, not the benchmark's defaults.")
    if not complete:
        notes.append(f"INCOMPLETE: written after {len(ordered)} of {len(CHECKS)} checks; the run did not finish.")
    dev = torch.device(plan.device)
    return {
        "benchmark": "gpu_acceptance", "complete": complete, "ok": complete and not failed, "failed": failed,
        "device": device_name(dev), "device_slug": device_slug(plan.device), "reduced": plan.reduced,
        "compile_exercised": plan.compile, "command": ctx.command, "git_commit": ctx.commit, "time": provenance.now(),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "timm": provenance.version("timm"),
                     "torchvision": provenance.version("torchvision"), "python": platform.python_version()},
        "total_s": round(time.perf_counter() - ctx.started, 1), "budget_s": BUDGET_S, "checks": ordered,
        "logs": str(ctx.logs.relative_to(ctx.out)), "notes": notes, "hostname": platform.node(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args.device, args.reduced, False if args.serial else None, args.step_timeout, args.sweep_epochs,
                     args.deadline)
    if args.internal:
        return run_internal(args.internal, plan, args.result)
    stem = f"gpu_acceptance-{device_slug(args.device)}" + ("-reduced" if args.reduced and args.device == "cuda" else "")
    logs = args.out / f"{stem}-logs"
    if logs.exists():  # this script's own folder: the logs of an earlier run would be searched again
        for f in [*logs.glob("*.log"), *logs.glob("*.result.json")]:
            f.unlink()
    logs.mkdir(parents=True, exist_ok=True)
    only = frozenset(args.only.split(",")) if args.only else frozenset(CHECKS)
    ctx = Context(plan, args.out, logs, only, launch_blocking=not args.no_launch_blocking,
                  command="python " + shlex.join(sys.argv), commit=provenance.git_commit())
    print(f"gpu acceptance on {device_name(torch.device(args.device))} ({'reduced' if plan.reduced else 'full'}"
          f"{', compiled' if plan.compile else ', eager only'}); logs in {logs}", flush=True)

    checks: dict[str, dict[str, Any]] = {}
    first = [c for c in CHECKS if c in PARALLEL_GROUP]
    if plan.parallel:
        with ThreadPoolExecutor(max_workers=len(first)) as pool:
            for name, r in zip(first, pool.map(lambda n: guarded(ctx, n), first)):
                checks[name] = r
        write_outputs(make_report(ctx, checks, complete=False), stem, args.out)
    for name in CHECKS:
        if name not in checks:
            checks[name] = guarded(ctx, name)
            # Written after every check: a run killed from outside still leaves what it found.
            write_outputs(make_report(ctx, checks, complete=len(checks) == len(CHECKS)), stem, args.out)
    report = make_report(ctx, checks, complete=True)
    json_path, md_path = write_outputs(report, stem, args.out)
    print()
    print("\n".join(summary_table(report["checks"])))
    failed = report["failed"]
    print(f"\n{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)} ({report['total_s']:.0f} s); "
          f"wrote {json_path} and {md_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
