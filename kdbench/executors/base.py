"""What every executor shares: a task is one run of a sweep, an outcome is what became of it.

A run is a pure function of its spec, and its row in the results store marks it done, so an
executor only decides *where* a run happens: retries, requeues and re-invocations are idempotent.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..spec import RunSpec, TeacherSpec

if TYPE_CHECKING:
    from ..runner import Plan, Request
    from ..store import ResultsStore

#: Outcome statuses. "done": its row was already there; "busy": another live process holds its lock.
OK, DIVERGED, FAILED, BUSY, DONE = "ok", "diverged", "failed", "busy", "done"


def spec_id(spec: RunSpec | TeacherSpec) -> str:
    return spec.teacher_id if isinstance(spec, TeacherSpec) else spec.run_id


def spec_label(spec: RunSpec | TeacherSpec) -> str:
    if isinstance(spec, TeacherSpec):
        return f"teacher {spec.model} seed {spec.seed}"
    return f"{spec.method} {spec.pair} seed {spec.seed}"


@dataclass(frozen=True)
class Task:
    """One run, as it travels to a worker (pickled): the portable request and the run's spec."""

    request: Request
    spec: RunSpec | TeacherSpec
    wait: bool = False  # when another process holds the run: wait for it instead of answering "busy"

    @property
    def run_id(self) -> str:
        return spec_id(self.spec)

    @property
    def label(self) -> str:
        return spec_label(self.spec)


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


class Executor(ABC):
    """Decides where runs happen; never what they compute."""

    name: str = ""

    @abstractmethod
    def run(self, tasks: Sequence[Task], on_outcome: Callable[[Outcome], None]) -> list[Outcome]:
        """Run every task, calling ``on_outcome`` in this process as each one ends; return all outcomes.

        A run that still raises after the executor's retries becomes ``Outcome(status=FAILED)``;
        only Ctrl-C and a full disk stop ``run`` itself.
        """

    def close(self) -> None:
        """Release what the executor started (worker processes, a local cluster)."""

    def run_waiting(self, tasks: Sequence[Task], on_outcome: Callable[[Outcome], None]) -> list[Outcome]:
        """:meth:`run`, then once more, waiting, for the runs another sweep was training ("busy"):
        two sweeps sharing a results folder both end with every row, each run trained once."""
        outcomes = self.run(tasks, lambda o: None if o.status == BUSY else on_outcome(o))
        busy = {o.run_id for o in outcomes if o.status == BUSY}
        if not busy:
            return outcomes
        again = self.run([replace(t, wait=True) for t in tasks if t.run_id in busy], on_outcome)
        return [o for o in outcomes if o.status != BUSY] + again


def teachers_to_train(specs: Sequence[RunSpec], store: ResultsStore) -> list[TeacherSpec]:
    """The distinct teachers the given runs need that kdbench must still train, in first-use order."""
    out: dict[str, TeacherSpec] = {}
    for spec in specs:
        for ts in spec.teachers:
            if not ts.checkpoint_sha256 and ts.teacher_id not in out and not store.has(ts.teacher_id):
                out[ts.teacher_id] = ts
    return list(out.values())


def tasks_for(req: Request, plan_: Plan | None = None) -> tuple[list[Task], list[Task]]:
    """(teacher tasks, student tasks) for every run of ``req`` not yet in its store.

    Workers get a portable request (quiet: their progress bars would interleave in the driver's
    output; the driver prints one line per finished run instead).
    """
    from ..runner import plan as make_plan
    from ..store import ResultsStore

    p = plan_ or make_plan(req)
    store = ResultsStore(req.results_dir)
    todo = [s for s in p.specs if not store.has(s.run_id)]
    portable = replace(req.portable(), quiet=True)
    return ([Task(portable, ts) for ts in teachers_to_train(todo, store)],
            [Task(portable, s) for s in todo])


def worker_env(names: Sequence[str] = ()) -> dict[str, str]:
    """Environment variables a run needs on another machine: every ``KDBENCH_*`` variable, the
    thread and determinism settings torch reads, and the ones the user names (``--env``)."""
    keep = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "TORCH_HOME", "HF_HOME"}
    env = {k: v for k, v in os.environ.items() if k.startswith("KDBENCH_") or k in keep}
    for name in names:
        if name in os.environ:
            env[name] = os.environ[name]
    return env
