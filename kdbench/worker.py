"""Run one task in this process: what every executor's worker calls.

The loaded data, teachers and measurements are kept per process, so a worker that gets many
tasks of one sweep loads the dataset once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .executors.base import Outcome, Task

if TYPE_CHECKING:
    from .runner import Request, Runner

_RUNNERS: dict[str, Runner] = {}


def _key(request: Request) -> str:
    # Tasks of one sweep share their request; its repr is deterministic (dataclasses, tuples, dicts).
    return repr(request)


def runner_for(request: Request) -> Runner:
    """This process's Runner for ``request``, created (data loaded, plugins imported) once."""
    from .runner import Runner

    key = _key(request)
    if key not in _RUNNERS:
        _RUNNERS.clear()  # one sweep per worker at a time: free the previous sweep's data
        _RUNNERS[key] = Runner.for_request(request)
    return _RUNNERS[key]


def run_task(task: Task) -> Outcome:
    """Run ``task`` here and write its row; idempotent. Raises when the run fails (after writing
    ``state/<run_id>/error.txt``), so the executor can retry it."""
    return runner_for(task.request).execute_one(task.spec, wait=task.wait)
