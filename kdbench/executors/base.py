"""What every executor shares: a task is one run of a sweep, an outcome is what became of it.

A run is a pure function of its spec, and its row in the results store marks it done, so an
executor only decides *where* a run happens: retries, requeues and re-invocations are idempotent.
Executors know nothing of sweeps: they are given the function that performs a task
(:func:`kdbench.sweep.worker.do_task` for worker processes) and call it where they run.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

#: Outcome statuses. "done": its row was already there; "busy": another live process holds its lock.
OK, DIVERGED, FAILED, BUSY, DONE = "ok", "diverged", "failed", "busy", "done"


@dataclass(frozen=True)
class Task:
    """One run, as it travels to a worker (pickled): its id and label, and what the task function needs."""

    run_id: str
    label: str
    payload: Any                # opaque here: the sweep's (request, spec)
    wait: bool = False          # when another process holds the run: wait for it instead of answering "busy"


@dataclass
class Outcome:
    run_id: str
    status: str            # OK, DIVERGED, FAILED, BUSY or DONE
    label: str = ""
    summary: str = ""      # one printable line for a finished run
    error: str = ""        # why a run failed (the exception's last lines)
    attempts: int = 1

    @property
    def finished(self) -> bool:
        return self.status in (OK, DIVERGED, DONE)


#: Performs one task where it is called and returns its outcome; raises when the run fails.
TaskFunction = Callable[[Task], Outcome]


class Executor(ABC):
    """Decides where runs happen; never what they compute."""

    name: str = ""

    @abstractmethod
    def execute(self, tasks: Sequence[Task], on_outcome: Callable[[Outcome], None]) -> list[Outcome]:
        """Perform every task, calling ``on_outcome`` in this process as each one ends; return all outcomes.

        A run that still raises after the executor's retries becomes ``Outcome(status=FAILED)``;
        only Ctrl-C and a full disk stop ``execute`` itself.
        """

    def close(self) -> None:
        """Release what the executor started (worker processes, a local cluster)."""

    def execute_all(self, tasks: Sequence[Task], on_outcome: Callable[[Outcome], None]) -> list[Outcome]:
        """:meth:`execute`, then once more, waiting, for the runs another sweep was training ("busy"):
        two sweeps sharing a results folder both end with every row, each run trained once."""
        outcomes = self.execute(tasks, lambda o: None if o.status == BUSY else on_outcome(o))
        busy = {o.run_id for o in outcomes if o.status == BUSY}
        if not busy:
            return outcomes
        again = self.execute([replace(t, wait=True) for t in tasks if t.run_id in busy], on_outcome)
        return [o for o in outcomes if o.status != BUSY] + again


def worker_env(names: Sequence[str] = ()) -> dict[str, str]:
    """Environment variables a run needs on another machine: every ``KDBENCH_*`` variable, the
    thread and determinism settings torch reads, and the ones the user names (``--env``)."""
    keep = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "TORCH_HOME", "HF_HOME"}
    env = {k: v for k, v in os.environ.items() if k.startswith("KDBENCH_") or k in keep}
    for name in names:
        if name in os.environ:
            env[name] = os.environ[name]
    return env
