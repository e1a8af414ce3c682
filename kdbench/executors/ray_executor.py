"""Runs on a Ray cluster: each run is one Ray task asking for ``gpus_per_run`` GPUs and ``cpus_per_run`` cores.

A fraction of a GPU (``0.25``) packs several small runs onto one GPU. Each task runs
the task function it is given (:func:`kdbench.sweep.worker.do_task`), which writes the run's row into the results folder itself, so
that folder must be one the Ray nodes share with this machine. A run that raises, or whose worker
process or node dies, is submitted again (it resumes from its last epoch checkpoint) up to
``max_retries`` times, then reported as failed with its error; the other runs go on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import DiskFull, KdbenchError
from .base import FAILED, Executor, Outcome, Task, TaskFunction

#: The object store holds only tasks and outcomes (a few kB each): a local cluster needs little.
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise KdbenchError('--executor ray needs Ray, which is not installed: pip install "kdbench[ray]"') from exc
    return ray


def _perform(do_task: TaskFunction, task: Task, threads: int, hide_gpus: bool) -> Outcome | DiskFull:
    """The body of every Ray task: one run, here, in a Ray worker process."""
    if hide_gpus:
        # Ray leaves CUDA_VISIBLE_DEVICES alone for a task that asked for no GPU; without this, a
        # device "auto" run would use a GPU that Ray may have given to another run.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    # Ray sets OMP_NUM_THREADS once per worker process; set it per task, since float results
    # depend on the thread count (and the row records it).
    torch.set_num_threads(threads)
    try:
        return do_task(task)
    except DiskFull as exc:
        # Returned, not raised: a full disk stops the sweep in the driver, and is not retried.
        return exc


def _threads(cpus_per_run: float, env: Mapping[str, str]) -> int:
    """Threads per run: OMP_NUM_THREADS when the user passes it on, else the cores the run asked for."""
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    return max(1, math.floor(cpus_per_run))


def _error_text(ray: Any, exc: BaseException) -> str:
    """What failed, in a line or two: the run's own exception, or why Ray lost its worker."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        text = "".join(traceback.format_exception_only(cause)).strip()
        if isinstance(cause, ImportError) and "kdbench" in text:
            text += " (install the same kdbench on every Ray node)"
        if "out of memory" in text.lower():
            text += " (lower the batch size, or give each run more of a GPU: a larger --gpus-per-run)"
        return text
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, ray.exceptions.NodeDiedError):
        return f"the Ray node running it died: {first}"
    if isinstance(exc, ray.exceptions.WorkerCrashedError):
        return "its Ray worker process died (killed, or crashed in native code)"
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return f"Ray killed its worker for lack of memory on its node: {first}"
    return f"{type(exc).__name__}: {first}"


class RayExecutor(Executor):
    """Each run is a Ray task on an existing cluster (``address``, e.g. "auto") or on a local
    Ray instance started here with this machine's resources (and stopped by :meth:`close`)."""

    name = "ray"

    def __init__(self, do_task: TaskFunction, *, address: str | None = None, gpus_per_run: float = 0.0, cpus_per_run: float = 1.0,
                 max_retries: int = 2, env: Mapping[str, str] | None = None) -> None:
        if not gpus_per_run >= 0 or (gpus_per_run > 1 and gpus_per_run != int(gpus_per_run)):
            raise KdbenchError(f"--gpus-per-run {gpus_per_run}: give 0, a fraction up to 1 (0.25 packs four runs "
                               "onto a GPU), or a whole number")
        if not cpus_per_run >= 0:
            raise KdbenchError(f"--cpus-per-run {cpus_per_run}: give a number >= 0")
        if max_retries < 0:
            raise KdbenchError(f"--max-retries {max_retries}: give 0 (no retries) or more")
        self.ray = _ray()
        self.do_task = do_task
        self.address = address
        self.gpus_per_run, self.cpus_per_run = float(gpus_per_run), float(cpus_per_run)
        self.max_retries = int(max_retries)
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self._connected = False
        self._owned = False   # whether this executor called ray.init (and so calls ray.shutdown)
        self._remote: Any = None

    # -- connection ----------------------------------------------------------------------
    def _connect(self) -> None:
        if self._connected:
            return
        ray = self.ray
        if not ray.is_initialized():  # else: this process is connected already; use that, leave it be
            if self.address:
                try:
                    ray.init(address=self.address, logging_level=logging.WARNING)
                except (ConnectionError, ValueError, RuntimeError) as exc:
                    raise KdbenchError(f"--ray-address {self.address}: cannot connect to a Ray cluster ({exc}). "
                                       "Start one with `ray start --head` on its head node, or drop "
                                       "--ray-address to start a local one. If the cluster uses token "
                                       "authentication, set RAY_AUTH_MODE=token here too") from None
            else:
                # "local": start one even when RAY_ADDRESS names another (--ray-address is for that).
                ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                         object_store_memory=LOCAL_OBJECT_STORE_BYTES)
            self._owned = True
        self._connected = True
        try:
            self._check_resources()
        except KdbenchError:
            self.close()
            raise

    def _check_resources(self) -> None:
        """Refuse runs that no node can ever take (Ray would keep them waiting, silently)."""
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        gpus = max((r.get("GPU", 0) for r in nodes), default=0)
        cpus = max((r.get("CPU", 0) for r in nodes), default=0)
        problems = []
        if self.gpus_per_run > gpus:
            problems.append(f"{self.gpus_per_run:g} GPU per run, but the largest node has {gpus:g} "
                            "(--gpus-per-run 0 trains on CPU)")
        if self.cpus_per_run > cpus:
            problems.append(f"{self.cpus_per_run:g} CPU cores per run, but the largest node has {cpus:g} "
                            "(lower --cpus-per-run)")
        if not problems:
            return
        where = "this machine" if not self.address else f"the Ray cluster at {self.address}"
        if not self.address:
            raise KdbenchError(f"--executor ray on {where}: runs ask for " + "; and ".join(problems))
        # An autoscaling cluster may still add such a node: warn, then wait like Ray does.
        print(f"kdbench: warning: runs ask for {'; and '.join(problems)}: they wait until such a node joins "
              f"{where}", flush=True)

    def _remote_fn(self) -> Any:
        if self._remote is None:
            self._remote = self.ray.remote(
                num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
                # Retries are counted here (see run), not by Ray: exact attempt counts, and no retry
                # of a full disk. Ray retries nothing itself.
                max_retries=0, retry_exceptions=False,
                # A GPU task gets a fresh process (Ray's own default for num_gpus > 0): CUDA reads
                # CUDA_VISIBLE_DEVICES once per process, so a reused one would keep its old GPU.
                max_calls=1 if self.gpus_per_run > 0 else 0,
                runtime_env={"env_vars": self.env} if self.env else None,
            )(_perform)
        return self._remote

    # -- running -------------------------------------------------------------------------
    def execute(self, tasks: Sequence[Task], on_outcome: Callable[[Outcome], None]) -> list[Outcome]:
        if not tasks:
            return []
        self._connect()
        ray, remote = self.ray, self._remote_fn()
        threads, hide_gpus = _threads(self.cpus_per_run, self.env), self.gpus_per_run == 0

        def submit(index: int) -> Any:
            return remote.options(name=f"kdbench {tasks[index].label}").remote(self.do_task, tasks[index], threads, hide_gpus)

        pending: dict[Any, tuple[int, int]] = {submit(i): (i, 1) for i in range(len(tasks))}  # ref: (task, try)
        outcomes: list[Outcome] = []
        try:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                index, attempt = pending.pop(ref)
                task = tasks[index]
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the run raised, or its worker or node died
                    if attempt <= self.max_retries:
                        pending[submit(index)] = (index, attempt + 1)
                        continue
                    result = Outcome(task.run_id, FAILED, task.label, error=_error_text(ray, exc))
                if isinstance(result, DiskFull):
                    raise result
                result.attempts = attempt
                on_outcome(result)
                outcomes.append(result)
        finally:
            for ref in pending:  # Ctrl-C or a full disk: stop the runs still queued or running
                with contextlib.suppress(Exception):  # best effort on the way out
                    ray.cancel(ref, force=True)
        return outcomes

    def close(self) -> None:
        """Disconnect; this also stops the local Ray instance if this executor started it."""
        if self._owned and self.ray.is_initialized():
            self.ray.shutdown()
        self._owned = self._connected = False
        self._remote = None
