"""The task function of worker processes: one run, in this process, for any executor.

Executors take it as a parameter (they import nothing from the sweep). The prepared sweep (data
loaded, plugins imported, shapes probed) is kept per process, so a worker that gets many tasks
of one sweep loads the dataset once.
"""

from __future__ import annotations

from ..executors.base import Outcome, Task
from .driver import Sweep

_SWEEPS: dict[str, Sweep] = {}


def do_task(task: Task) -> Outcome:
    """Run ``task`` (payload: the portable request and the spec) here and write its row; idempotent.
    Raises when the run fails (after writing ``state/<run_id>/error.txt``), so the executor can retry it."""
    request, spec = task.payload
    key = repr(request)  # tasks of one sweep share their request; its repr is deterministic
    if key not in _SWEEPS:
        _SWEEPS.clear()  # one sweep per worker at a time: free the previous sweep's data
        _SWEEPS[key] = Sweep.prepare(request, log=lambda _: None)
    return _SWEEPS[key].runner.attempt(spec, wait=task.wait)
