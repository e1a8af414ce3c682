"""The local executors: runs one after another in this process, or one worker process per GPU."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from ..distributed import RankFailed
from ..errors import DiskFull, KdbenchError
from .base import FAILED, Executor, Outcome, Task, TaskFunction


def _failed(task: Task, exc: BaseException, attempts: int = 1) -> Outcome:
    last = "".join(traceback.format_exception_only(exc)).strip()
    hint = ""
    if "out of memory" in last.lower():
        hint = " (lower the batch size, or run fewer runs per GPU)"
    return Outcome(task.run_id, FAILED, task.label, error=last + hint, attempts=attempts)


class InlineExecutor(Executor):
    """Every run in this process, one after another, sharing the driver's data and teachers."""

    name = "local"

    def __init__(self, do_task: TaskFunction) -> None:
        self.do_task = do_task

    def execute(self, tasks: Sequence[Task], on_outcome: Callable[[Outcome], None]) -> list[Outcome]:
        outcomes = []
        for task in tasks:
            try:
                o = self.do_task(task)
            except (KeyboardInterrupt, DiskFull, RankFailed):  # RankFailed: DDP's ranks cannot go on apart
                raise
            except Exception as exc:  # one broken run (OOM, a bug in a plugin) does not end the sweep
                o = _failed(task, exc)
            on_outcome(o)
            outcomes.append(o)
        return outcomes


def physical_gpus(requested: Sequence[str], parent_mask: str | None) -> list[str]:
    """What each worker's ``CUDA_VISIBLE_DEVICES`` must be for the GPUs ``--gpus`` names.

    ``--gpus`` indices count the GPUs this process sees, as torch does. Under a mask
    (``CUDA_VISIBLE_DEVICES=4,5,6,7``) GPU 0 is physical GPU 4, and a worker's own mask replaces the
    parent's, so the index is mapped through the parent's entries (ids or ``GPU-``/``MIG-`` UUIDs,
    passed on as written). A UUID given to ``--gpus`` is passed on as is. Pure: ``parent_mask`` is
    the parent's ``CUDA_VISIBLE_DEVICES`` (None when unset).
    """
    visible = _mask_entries(parent_mask) if parent_mask is not None else None
    out = []
    for gpu in (g.strip() for g in requested):
        if not (gpu.isascii() and gpu.isdigit()):
            if not gpu.startswith(("GPU-", "MIG-")):
                raise KdbenchError(f"--gpus '{gpu}': give GPU indices (e.g. 0,1), 'all', or GPU-/MIG- UUIDs "
                                   "(see nvidia-smi -L)")
            out.append(gpu)
        elif visible is None:
            out.append(gpu)
        elif int(gpu) < len(visible):
            out.append(visible[int(gpu)])
        else:
            raise KdbenchError(f"--gpus {gpu}: CUDA_VISIBLE_DEVICES={parent_mask} leaves {len(visible)} GPU(s) "
                               f"visible, numbered 0 to {len(visible) - 1} (--gpus counts those); give one of them, "
                               "or change CUDA_VISIBLE_DEVICES")
    return out


def _mask_entries(mask: str) -> list[str]:
    # CUDA reads the list up to its first invalid entry; -1 (or an empty entry) is the usual way to hide the rest.
    entries = []
    for entry in (e.strip() for e in mask.split(",")):
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


#: Inductor's compile processes per process; torch's default is the machine's CPUs (up to 32) for each.
COMPILE_THREADS_ENV = "TORCHINDUCTOR_COMPILE_THREADS"


def compile_threads(workers: int, cpus: int | None = None) -> int:
    """Compile processes each of ``workers`` worker processes gets: the CPUs shared among them (torch's own
    default gives every worker a pool as large as the machine), at least 1, at most torch's cap of 32."""
    return min(32, core_share(workers, cpus))


def core_share(workers: int, cpus: int | None = None) -> int:
    """The CPUs (this process's affinity) shared among ``workers`` processes, at least 1 each."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(1, workers))


def _share_compile_pool(threads: int) -> None:
    """Give this process's torch.compile ``threads`` compile processes, unless the user set
    ``$TORCHINDUCTOR_COMPILE_THREADS`` (which the worker inherits)."""
    if COMPILE_THREADS_ENV in os.environ:
        return
    os.environ[COMPILE_THREADS_ENV] = str(threads)
    import torch._inductor.config  # it reads the variable when imported, which importing kdbench has done

    torch._inductor.config.compile_threads = threads


def _share_cores(threads: int) -> None:
    """Train with ``threads`` intra-op threads, unless the user set ``$OMP_NUM_THREADS`` (which the worker
    inherits). torch's default is every core for each process: N workers on N cores then run N² threads, and
    OpenMP's spinning threads make each run several times slower than one run alone (measured: a 60-epoch MNIST
    MLP run took 31 min beside another instead of 9)."""
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return
    import torch

    torch.set_num_threads(threads)


def _worker(do_task: TaskFunction, gpu: str | None, inbox: Any, outbox: Any, threads: int | None = None,
            cores: int | None = None) -> None:
    """A worker process: pins itself to one GPU, to its share of compile processes (``threads``) and of the
    cores (``cores`` intra-op threads), then runs tasks until it gets None."""
    if gpu is not None:
        # Before torch touches CUDA in this process: it then sees only its own GPU, as cuda:0.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None:
        _share_compile_pool(threads)
    if cores is not None:
        _share_cores(cores)
    try:
        while (item := inbox.get()) is not None:
            index, task = item
            try:
                outbox.put((index, do_task(task), None))
            except Exception as exc:  # reported by the driver; the worker takes the next task
                outbox.put((index, None, (type(exc).__name__, "".join(traceback.format_exception_only(exc)).strip(),
                                          isinstance(exc, DiskFull))))
    except KeyboardInterrupt:
        # Ctrl-C reaches every process of the terminal: the driver reports it, the worker just stops
        # (the run it was training keeps its last epoch checkpoint).
        return


class LocalExecutor(Executor):
    """One worker process per GPU (``--gpus 0,1``) or ``workers`` CPU processes, fed from one queue.

    ``gpus`` are numbered as this process sees them (under its ``CUDA_VISIBLE_DEVICES``, if set);
    :func:`physical_gpus` gives each worker the matching mask.

    Each process loads the data once and keeps its teachers; a failed run is reported and its
    worker goes on with the next. A full disk stops the sweep.
    """

    name = "local"

    def __init__(self, do_task: TaskFunction, *, workers: int = 0, gpus: Sequence[str] = ()) -> None:
        self.do_task = do_task
        # Each worker's CUDA_VISIBLE_DEVICES: the GPUs as this process numbers them, mapped through its own mask.
        self.slots: list[str | None] = (physical_gpus(gpus, os.environ.get("CUDA_VISIBLE_DEVICES")) if gpus
                                        else [None] * max(1, workers))

    def execute(self, tasks: Sequence[Task], on_outcome: Callable[[Outcome], None]) -> list[Outcome]:
        if not tasks:
            return []
        ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
        inbox, outbox = ctx.Queue(), ctx.Queue()
        for i, task in enumerate(tasks):
            inbox.put((i, task))
        slots = self.slots[: len(tasks)]
        threads = compile_threads(len(slots))  # one pool of compile processes in all, not one per worker
        cores = core_share(len(slots))  # and the cores: torch would give every worker all of them
        # Not daemonic: a streamed run's DataLoader starts worker processes of its own, which a daemonic process may
        # not. The finally below joins or terminates every worker on any exit, which is what daemon would add.
        procs = [ctx.Process(target=_worker, args=(self.do_task, gpu, inbox, outbox, threads, cores),
                             daemon=False)
                 for gpu in slots]
        for proc in procs:
            inbox.put(None)
            proc.start()
        outcomes: list[Outcome] = []
        pending = set(range(len(tasks)))
        try:
            while pending:
                try:
                    index, o, err = outbox.get(timeout=2)
                except queue.Empty:
                    if not any(p.is_alive() for p in procs):
                        # A worker killed from outside (the OOM killer, a crash in native code)
                        # takes its task with it: report it, a re-run retries it.
                        for index in sorted(pending):
                            o = Outcome(tasks[index].run_id, FAILED, tasks[index].label,
                                        error="its worker process died (killed, or crashed in native code)")
                            on_outcome(o)
                            outcomes.append(o)
                        break
                    continue
                pending.discard(index)
                task = tasks[index]
                if err is not None:
                    name, text, disk_full = err
                    if disk_full:
                        raise DiskFull(text.split(": ", 1)[-1])
                    o = Outcome(task.run_id, FAILED, task.label, error=text)
                on_outcome(o)
                outcomes.append(o)
        finally:
            for proc in procs:
                proc.join(timeout=0.5 if pending else 5)
                if proc.is_alive():
                    proc.terminate()
                    proc.join(timeout=5)
        return outcomes
