"""The Slurm executor, run through submitit's local executor (one process per job, no cluster).

What a real cluster adds (sbatch, the array cap, the preemption signal) is covered by a fake
``sbatch``, by the local executor's cap kept by kdbench, and by sending USR2 to a job the way Slurm
does when it preempts one (submitit then calls the job's checkpoint() and requeues it).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

pytest.importorskip("submitit", reason="the Slurm executor needs submitit: pip install 'kdbench[slurm]'")

from executors_common import store_rows
from tiny import TINY_STUDENT

from kdbench.errors import KdbenchError
from kdbench.executors.base import FAILED, OK, Outcome
from kdbench.executors.slurm_executor import SlurmExecutor
from kdbench.sweep import Sweep
from kdbench.sweep.worker import do_task

EPOCHS = 3
SLEEP_VAR = "KDBENCH_TEST_STEP_SLEEP"  # slow_kd sleeps this long per step: time to interrupt it

PLUGIN = f'''
"""Test methods: one that can be slowed down (the row does not change), one that always fails."""
import os
import time

from kdbench_methods.kd import KD


class SlowKD(KD):
    name = "slow_kd"
    paper = "kdbench test plugin"

    def forward(self, student, teachers, batch):
        time.sleep(float(os.environ.get("{SLEEP_VAR}", "0")))
        return super().forward(student, teachers, batch)


class BrokenKD(KD):
    name = "broken_kd"
    paper = "kdbench test plugin"

    def forward(self, student, teachers, batch):
        raise RuntimeError("broken_kd fails on purpose")
'''


def make_request(results: Path, plugin: Path, methods: list[str]):
    from kdbench.recipe import get_recipe
    from kdbench.suites import Pair
    from kdbench.sweep import Request

    return Request(methods=tuple(methods), named=True, pairs=(Pair((TINY_STUDENT,), TINY_STUDENT),),
                   dataset="digits", recipe=get_recipe("digits").with_epochs(EPOCHS), seeds=(0,),
                   results_dir=results, limit=64, quiet=True, plugins=(str(plugin),),
                   throughput_batch=8)


def inline(req) -> None:
    """The same runs with the default executor (here, in this process): the reference rows."""
    Sweep.prepare(req).execute()


def execute(req, executor: SlurmExecutor) -> list[Outcome]:
    """Teachers first, then the students, as the driver does."""
    teachers, students = Sweep.prepare(req).tasks()
    seen: list[Outcome] = []
    outcomes = executor.execute(teachers, seen.append) + executor.execute(students, seen.append)
    assert seen == outcomes  # on_outcome saw each one
    return outcomes


def log_span(log: Path) -> tuple[float, float]:
    """First and last timestamp submitit wrote in a job's log."""
    stamps = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp()
              for s in re.findall(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\)", log.read_text())]
    return min(stamps), max(stamps)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    plugin = root / "test_methods.py"
    plugin.write_text(PLUGIN)
    return root, plugin


@pytest.fixture(scope="module")
def sweep(world):
    """One sweep through the executor (a teacher job, then ce, kd and broken_kd, at most two at
    once), and the same sweep here in this process."""
    root, plugin = world
    methods = ["ce", "kd", "broken_kd"]
    inline(make_request(root / "reference", plugin, methods))
    executor = SlurmExecutor(do_task, cluster="local", max_concurrent=2, folder=root / "logs", time_min=60)
    req = make_request(root / "results", plugin, methods)
    outcomes = execute(req, executor)
    return req, outcomes, root


@pytest.mark.slow
def test_rows_equal_the_local_executors(sweep):
    _, outcomes, root = sweep
    reference, rows = store_rows(root / "reference"), store_rows(root / "results")
    assert len(rows) == 3  # the teacher, ce and kd (broken_kd has no row)
    assert rows == reference
    assert {o.run_id for o in outcomes if o.status == OK} == set(rows)
    assert all(o.summary for o in outcomes if o.status == OK)


@pytest.mark.slow
def test_at_most_max_concurrent_jobs_run_at_once(sweep):
    _, _, root = sweep
    logs = sorted((root / "logs").glob("*/*_log.out"))
    assert len(logs) == 4  # one job per run: the teacher, then three students
    events = sorted(ev for log in logs for ev in zip(log_span(log), (1, -1)))
    running, most = 0, 0
    for _, step in events:
        running += step
        most = max(most, running)
    assert most == 2  # the students ran two at a time, never three


@pytest.mark.slow
def test_a_failing_run_is_reported_and_the_others_finish(sweep):
    _, outcomes, _ = sweep
    failed = [o for o in outcomes if o.status == FAILED]
    assert len(failed) == 1 and "broken_kd" in failed[0].label
    assert failed[0].error.startswith("RuntimeError: broken_kd fails on purpose")
    assert "job log:" in failed[0].error  # where its whole traceback is
    assert sum(o.status == OK for o in outcomes) == 3


def job_processes(folder: Path) -> list[int]:
    """The python processes of running jobs whose submitit folder is ``folder``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and any(str(folder.resolve()).encode() in part for part in cmd):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the job's process in /proc")
def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(sweep, world):
    import torch

    _, _, root = sweep
    _, plugin = world
    inline(make_request(root / "reference", plugin, ["slow_kd"]))  # uninterrupted, not slowed down
    req = make_request(root / "results", plugin, ["slow_kd"])  # its teacher is trained there already
    teachers, (task,) = Sweep.prepare(req).tasks()
    assert not teachers
    folder = root / "preempt-logs"
    executor = SlurmExecutor(do_task, cluster="local", folder=folder, time_min=60, env={SLEEP_VAR: "1.0"})
    outcomes: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.extend(executor.execute([task], lambda o: None)))
    thread.start()
    try:
        checkpoint = Path(req.results_dir) / "state" / task.run_id / "checkpoint.pt"
        deadline = time.time() + 60
        while not checkpoint.is_file() and time.time() < deadline:
            time.sleep(0.02)
        assert checkpoint.is_file(), "the run wrote no epoch checkpoint"
        saved = torch.load(checkpoint, weights_only=False)["next_epoch"]
        # Still mid-run: a job preempted after its last epoch would prove nothing about resuming.
        assert saved < EPOCHS, "the run finished before it could be preempted; slow it down (SLEEP_VAR)"
        (pid,) = job_processes(folder)
        os.kill(pid, signal.SIGUSR2)  # what Slurm sends a job it preempts (submitit's signal)
    finally:
        thread.join(timeout=120)
    assert not thread.is_alive()
    (outcome,) = outcomes
    assert outcome.status == OK and outcome.attempts == 2, outcome
    log = next(folder.glob("*/*_log.out")).read_text()
    assert "this job is preempted" in log and "Requeued job" in log
    assert f"({task.run_id}), attempt 2" in log
    row = store_rows(root / "results")[task.run_id]
    assert row == store_rows(root / "reference")[task.run_id]  # as if it had never been interrupted
    import json

    full = json.loads((Path(req.results_dir) / "runs" / f"{task.run_id}.json").read_text())
    assert saved <= full["resumed_from_epoch"] < EPOCHS  # it went on from the checkpoint, not from scratch
    assert not checkpoint.parent.exists()  # a finished run drops its working state


# -- without running jobs -----------------------------------------------------------------------
def test_the_job_array_script_carries_the_options(world, tmp_path, monkeypatch):
    """Submitted to a fake sbatch: the script Slurm would run, with the cap on the array."""
    _, plugin = world
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/script.sh\necho "Submitted batch job 4242"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    req = make_request(tmp_path / "results", plugin, ["ce", "kd", "slow_kd"])
    _, students = Sweep.prepare(req).tasks()
    executor = SlurmExecutor(do_task, folder=tmp_path / "results" / "slurm", partition="gpu", max_concurrent=2,
                             time_min=30, gpus_per_run=1.0, cpus_per_run=4,
                             mem_gb=16, account="lab", qos="high", extra={"constraint": "h100", "exclusive": ""},
                             env={"KDBENCH_X": "a b"})
    jobs = executor.submit(students)
    assert [j.job_id for j in jobs] == ["4242_0", "4242_1", "4242_2"]
    script = (tmp_path / "script.sh").read_text()
    for line in ["--array=0-2%2", "--partition=gpu", "--time=30", "--gpus-per-node=1", "--cpus-per-task=4",
                 "--mem=16GB", "--account=lab", "--qos=high", "--constraint=h100", "--requeue",
                 "--signal=USR2@90"]:
        assert f"#SBATCH {line}\n" in script
    assert "#SBATCH --exclusive\n" in script
    assert "export KDBENCH_X='a b'\n" in script
    # Logs and pickles go under the folder given (the CLI's default: RESULTS_DIR/slurm), one per array element.
    slurm_dir = (tmp_path / "results").resolve() / "slurm"
    assert f"--output={slurm_dir}/%A_%a/%A_%a_0_log.out" in script
    # Each element's pickled job is the task itself, resubmitted unchanged when interrupted.
    for job, task in zip(jobs, students):
        sub = job.submission()
        assert sub.args == (task,)
        again = sub.function.checkpoint(*sub.args)
        assert again.args == (task,) and again.function.attempt == 2


def test_without_srun_the_error_says_where_to_run(world, tmp_path, monkeypatch):
    _, plugin = world
    monkeypatch.setenv("PATH", str(tmp_path))
    req = make_request(tmp_path / "results", plugin, ["ce"])
    with pytest.raises(KdbenchError, match="srun"):
        SlurmExecutor(do_task, folder=tmp_path / "slurm").submit(Sweep.prepare(req).tasks()[1])


def test_without_submitit_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now raises ImportError
    with pytest.raises(KdbenchError, match=r'pip install "kdbench\[slurm\]"'):
        SlurmExecutor(do_task, folder=tmp_path, cluster="local").submitit_executor(tmp_path)


def test_fractional_gpus_are_refused():
    with pytest.raises(KdbenchError, match="whole"):
        SlurmExecutor(do_task, folder=Path("slurm"), gpus_per_run=0.5)
