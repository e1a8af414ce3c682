"""Runs on a Slurm cluster through submitit: one job array per batch of runs, requeued on preemption.

Each array element performs one task with the task function it is given (:func:`kdbench.sweep.worker.do_task`). A run resumes from its own
epoch checkpoint (``state/<run_id>/checkpoint.pt``), so a job that is preempted or reaches its time
limit is requeued with the same task and continues at its last finished epoch. The results folder
and the submitit folder must be on a filesystem that the compute nodes share with this machine.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import DiskFull, KdbenchError
from .base import FAILED, Executor, Outcome, Task, TaskFunction

CLUSTERS = ("slurm", "local")


def _submitit() -> Any:
    try:
        import submitit
    except ImportError as exc:
        raise KdbenchError('--executor slurm needs submitit, which is not installed: pip install "kdbench[slurm]"'
                           ) from exc
    return submitit


class SlurmTask:
    """The body of every array element: ``do_task(task)``, resubmitted unchanged when interrupted.

    submitit calls :meth:`checkpoint` when the job gets Slurm's preemption or time-limit signal
    (USR2) and requeues the submission it returns. This callable holds no training state: the run's
    epoch checkpoint file is the state, and the requeued job resumes from it.
    """

    def __init__(self, do_task: TaskFunction, env: Mapping[str, str] | None = None) -> None:
        self.do_task, self.env = do_task, dict(env or {})
        self.attempt = 1  # counted up by checkpoint(), which pickles this object into the requeued job

    def __call__(self, task: Task) -> Outcome:
        # The job script exports these too (before Python starts); this covers any other launcher.
        os.environ.update(self.env)
        print(f"kdbench: {task.label} ({task.run_id}), attempt {self.attempt}", flush=True)
        outcome = self.do_task(task)
        outcome.attempts = self.attempt
        print(f"kdbench: {task.run_id}: {outcome.status}", flush=True)
        return outcome

    def checkpoint(self, task: Task) -> Any:
        from submitit.helpers import DelayedSubmission

        print(f"kdbench: {task.run_id} interrupted (preempted, or at its time limit): requeued; it resumes "
              "from its last epoch checkpoint", flush=True)
        self.attempt += 1
        return DelayedSubmission(self, task)


def _error_text(exc: BaseException) -> str:
    """The exception lines of a failed job's traceback (submitit wraps it in a banner)."""
    text = str(exc)
    parts = text.split("----------------------\n")
    if len(parts) >= 3:
        lines = parts[1].rstrip().splitlines()
        # The exception itself: the lines after the last indented one (frames and source lines).
        last = max((i for i, line in enumerate(lines) if line.startswith(" ")), default=-1)
        return "\n".join(lines[last + 1:]).strip() or parts[1].strip()
    return text.strip()  # no result at all: submitit's message says what state the job ended in


def _whole(value: float | None, what: str) -> int | None:
    """Slurm allocates whole GPUs and cores; 0 or None asks for nothing."""
    if not value:
        return None
    if value != int(value):
        raise KdbenchError(f"--{what} {value}: Slurm allocates whole {what.split('-')[0]}; give a whole number")
    return int(value)


class SlurmExecutor(Executor):
    """Each run is one Slurm job; each :meth:`run` call submits one job array through submitit.

    ``cluster="local"`` runs the jobs as processes on this machine with submitit's local executor
    (tests, or a single machine). That executor has no arrays, so there the cap on concurrent jobs
    is kept here: the next job is submitted when one ends.
    """

    name = "slurm"

    def __init__(self, do_task: TaskFunction, *, folder: Path, cluster: str = "slurm", partition: str | None = None,
                 max_concurrent: int | None = None, time_min: int = 240, gpus_per_run: float | None = None,
                 cpus_per_run: float | None = None, mem_gb: float | None = None, account: str | None = None,
                 qos: str | None = None, extra: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, max_timeouts: int = 10, poll_s: float | None = None
                 ) -> None:
        if cluster not in CLUSTERS:
            raise KdbenchError(f"unknown submitit cluster '{cluster}'; use one of: {', '.join(CLUSTERS)}")
        if max_concurrent is not None and max_concurrent < 1:
            raise KdbenchError(f"--slurm-max-concurrent {max_concurrent}: give at least 1")
        if time_min < 1:
            raise KdbenchError(f"--slurm-time {time_min}: give at least 1 (minutes)")
        self.do_task = do_task
        self.folder = Path(folder).expanduser().resolve()
        self.cluster = cluster
        self.partition, self.account, self.qos = partition, account, qos
        self.max_concurrent = max_concurrent
        self.time_min = int(time_min)
        self.gpus_per_run = _whole(gpus_per_run, "gpus-per-run")
        self.cpus_per_run = _whole(cpus_per_run, "cpus-per-run")
        self.mem_gb = mem_gb
        self.extra = dict(extra or {})
        self.env = dict(env or {})
        self.max_timeouts = max_timeouts  # requeues at the time limit; preemptions do not count
        # Each poll looks for one result file per running job: often on a local disk, gently on NFS.
        self.poll_s = poll_s if poll_s is not None else (0.2 if cluster == "local" else 10.0)
        self.jobs: list[Any] = []  # submitit jobs of the current (or last) execute() call, in submission order

    def submitit_executor(self, folder: Path) -> Any:
        """A submitit executor with this executor's settings; job ``J`` logs to ``folder/J/``."""
        submitit = _submitit()
        try:
            ex = submitit.AutoExecutor(folder=folder / "%j", cluster=self.cluster,
                                       slurm_max_num_timeout=self.max_timeouts,
                                       local_max_num_timeout=self.max_timeouts)
        except RuntimeError as exc:  # submitit's Slurm executor needs srun on PATH
            raise KdbenchError(f"--executor slurm: {exc} (no 'srun' on PATH): run kdbench on a login node of "
                               "the cluster, or use --executor local") from exc
        # --requeue: Slurm may requeue the job itself (preemption, node failure); the run resumes.
        extra: dict[str, Any] = {"requeue": True}
        for key, value in self.extra.items():
            extra[key.lstrip("-")] = True if value in ("", None) else value  # KEY= is a flag without value
        setup = [f"export {k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        params: dict[str, Any] = {"name": "kdbench", "timeout_min": self.time_min, "stderr_to_stdout": True,
                                  "gpus_per_node": self.gpus_per_run, "cpus_per_task": self.cpus_per_run,
                                  "mem_gb": self.mem_gb}
        if self.cluster == "slurm":
            params.update(slurm_partition=self.partition, slurm_account=self.account, slurm_qos=self.qos,
                          slurm_array_parallelism=self.max_concurrent, slurm_additional_parameters=extra,
                          slurm_setup=setup or None)
        else:
            params.update(local_setup=setup or None)
        ex.update_parameters(**params)
        return ex

    def submit(self, tasks: Sequence[Task]) -> list[Any]:
        """Submit all ``tasks`` as one job array (Slurm applies the cap: ``--array=0-N%cap``); its jobs."""
        ex = self.submitit_executor(self.folder)
        return list(ex.map_array(SlurmTask(self.do_task, self.env), list(tasks)))

    def _local_cap(self) -> int:
        return self.max_concurrent or max(1, (os.cpu_count() or 1) // (self.cpus_per_run or 1))

    def _outcome(self, job: Any, task: Task) -> Outcome:
        exc = job.exception()
        if exc is None:
            outcome: Outcome = job.result()
            return outcome
        log = job.paths.stdout
        if type(exc).__name__ == "UncompletedJobError":  # no result at all: killed, cancelled, out of memory
            error = f"job {job.job_id} ended without a result (state {job.state})"
        else:
            error = _error_text(exc)
            if error.startswith(("kdbench.errors.DiskFull", "DiskFull")):
                raise DiskFull(error.split(": ", 1)[-1])
            if "timed-out too many times" in error:
                error += f" (raise --slurm-time above {self.time_min} minutes; a re-run resumes from its checkpoint)"
        return Outcome(task.run_id, FAILED, task.label, error=f"{error}\n(job log: {log})")

    def _cancel(self, jobs: Sequence[Any]) -> None:
        if self.cluster == "slurm":
            for array_id in sorted({str(job.job_id).split("_")[0] for job in jobs}):
                subprocess.call(["scancel", array_id])
        else:
            for job in jobs:
                job.cancel(check=False)

    def execute(self, tasks: Sequence[Task], on_outcome: Callable[[Outcome], None]) -> list[Outcome]:
        self.jobs = []
        if not tasks:
            return []
        waiting = list(tasks)
        running: list[tuple[Any, Task]] = []
        outcomes: list[Outcome] = []
        fn = SlurmTask(self.do_task, self.env)
        ex: Any = None  # the submitit executor, for cluster="local"

        def start() -> None:  # cluster="local" only: submit the next waiting task as a job of its own
            task = waiting.pop(0)
            self.jobs.append(ex.submit(fn, task))
            running.append((self.jobs[-1], task))

        try:
            folder = self.folder
            if self.cluster == "slurm":
                self.jobs = self.submit(waiting)  # one array: Slurm keeps the cap (--array=0-N%cap)
                running, waiting = list(zip(self.jobs, waiting)), []
                array = str(self.jobs[0].job_id).split("_")[0]
                where = f"Slurm job array {array}" if len(self.jobs) > 1 else f"Slurm job {array}"
                cap = f", at most {self.max_concurrent} at once" if self.max_concurrent and len(self.jobs) > 1 else ""
            else:  # no arrays: keep the cap here, submitting the next job when one ends
                ex = self.submitit_executor(folder)
                for _ in range(min(self._local_cap(), len(waiting))):
                    start()
                where, cap = "local submitit jobs", f", at most {self._local_cap()} at once"
            # Jobs may wait in the queue for long: say where they are before the first one ends.
            runs = f"{len(tasks)} run" + ("s" if len(tasks) > 1 else "")
            tqdm.write(f"kdbench: {runs} submitted as {where}{cap}; job logs in {folder}/<job id>/", file=sys.stdout)
            while running:
                done = [(job, task) for job, task in running if job.done()]
                for job, task in done:
                    running.remove((job, task))
                    outcome = self._outcome(job, task)
                    on_outcome(outcome)
                    outcomes.append(outcome)
                    if waiting:
                        start()
                if not done:
                    time.sleep(self.poll_s)
        except BaseException:
            # Ctrl-C, or a full disk: cancel the jobs still running; re-running the command resumes.
            self._cancel([job for job, _ in running])
            raise
        return outcomes
