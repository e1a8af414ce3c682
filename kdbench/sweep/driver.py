"""The sweep: plan a request, skip what the store has, hand the rest to an executor, report outcomes.

``Sweep.prepare(request)`` loads the methods and the data and builds the plan (every check before
any training); ``sweep.execute(executor)`` trains teachers first, then the student runs, and
returns what became of each.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .. import distributed, metrics
from ..data import DataSplits, load_dataset
from ..data.datasets import imagefolder_path, is_imagefolder
from ..data.imagefolder import MEMORY_FRACTION, available_memory, decoded_bytes, scan_folder
from ..data.stream import stream_imagefolder, tar_splits
from ..errors import KdbenchError
from ..executors.base import DIVERGED, FAILED, OK, Executor, Outcome, Task
from ..executors.local import InlineExecutor
from ..method import Method
from ..registry import load_methods
from .plan import Plan, build_plan, check_request, resolve_device
from .request import Request
from .runner import Runner
from .spec import RunSpec, Spec, TeacherSpec
from .store import ResultsStore


def load_data(req: Request, device: torch.device) -> DataSplits:
    """The request's dataset, held on the training device for the whole sweep; refused, with what to do, when it
    would not fit in the device's free memory (issue 17, item 9) rather than failing later with an OOM. An
    ImageFolder may stream from disk instead (:func:`data_backend`)."""
    if data_backend(req, device) == "stream":
        path = imagefolder_path(req.dataset, req.data_dir)
        return stream_imagefolder(path, req.resolution, req.limit or None, workers=req.loader_workers).to(device)
    data = load_dataset(req.dataset, data_dir=req.data_dir, download=req.download, limit=req.limit or None,
                        pad_to=req.pad_to, **req.resolution.kwargs())
    fits, figures = metrics.fits_on_device(data.nbytes, device)
    if not fits:
        raise KdbenchError(
            f"dataset {data.info.name} would take {figures} (kdbench holds it on the training device, at most "
            f"{metrics.RESIDENT_FRACTION:.0%} of the free memory); use --limit N or a smaller --pad-to, fewer "
            "--runs-per-gpu (each run holds its own copy), free the GPU, or --device cpu")
    return data.to(device)


def data_backend(req: Request, device: torch.device) -> str:
    """memory or stream: --data-backend, or with auto, memory when the decoded ImageFolder fits in 80% of the
    memory available and of the device's free memory."""
    folder = is_imagefolder(req.dataset)
    if folder and tar_splits(imagefolder_path(req.dataset, req.data_dir)) is not None:
        if req.data_backend == "memory":
            raise KdbenchError(f"{req.dataset} holds its images in tar files, which kdbench streams: use "
                               "--data-backend stream (or auto)")
        return "stream"
    if req.data_backend == "stream":
        if not folder or req.pad_to:
            raise KdbenchError(f"--data-backend stream reads ImageFolder datasets as they are; {req.dataset}"
                               f"{' with --pad-to' if folder else ' is a built-in set, held in memory'}: use "
                               "--data-backend memory (or auto)")
        return "stream"
    if req.data_backend == "memory" or not folder:
        return "memory"
    scanned = scan_folder(imagefolder_path(req.dataset, req.data_dir), req.limit or None)
    need = decoded_bytes(scanned, req.resolution.imagefolder_size())
    fits, _ = metrics.fits_on_device(need, device)
    if fits and need <= MEMORY_FRACTION * (available_memory() or need):
        return "memory"
    print(f"kdbench: {req.dataset}: {len(scanned.train) + len(scanned.test):,} images decode to "
          f"{need / 2**30:.1f} GiB, more than fits in memory here: streaming them from disk (--data-backend auto)",
          file=sys.stderr)
    return "stream"


@dataclass
class SweepResult:
    outcomes: list[Outcome]
    skipped: int  # student runs already in the store before this invocation
    teacher_ids: set[str] = field(default_factory=set)  # teachers this invocation had to train

    @property
    def unfinished(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.finished]

    @property
    def ran(self) -> int:
        """Student runs finished by this invocation (diverged ones included: they have their row)."""
        return sum(o.status in (OK, DIVERGED) and o.run_id not in self.teacher_ids for o in self.outcomes)


def teachers_to_train(specs: Sequence[RunSpec], store: ResultsStore) -> list[TeacherSpec]:
    """The distinct teachers the given runs need that kdbench must still train, in first-use order."""
    out: dict[str, TeacherSpec] = {}
    for spec in specs:
        for ts in spec.teachers:
            if not ts.trained_elsewhere and ts.run_id not in out and not store.has(ts.run_id):
                out[ts.run_id] = ts
    return list(out.values())


class Sweep:
    """One request, planned: its methods, data, device, plan and results store."""

    def __init__(self, req: Request, methods: Mapping[str, type[Method]], data: DataSplits, device: torch.device,
                 plan: Plan, log: Callable[[str], None] = print) -> None:
        self.req, self.methods, self.data, self.device, self.plan, self.log = req, methods, data, device, plan, log
        self.store = ResultsStore(req.results_dir)
        self._runner: Runner | None = None

    @classmethod
    def prepare(cls, req: Request, log: Callable[[str], None] = print) -> Sweep:
        """Load the methods, check the request, load the data and plan every run."""
        methods = load_methods(req.plugins)
        check_request(req, methods)  # names and values, before the data is loaded
        # Remote runs (Ray, Slurm) happen on the workers' device: this process plans on its CPU.
        device = torch.device("cpu") if req.remote else resolve_device(req.device)
        data = load_data(req, device)
        return cls(req, methods, data, device, build_plan(req, methods, data), log)

    @property
    def runner(self) -> Runner:
        """This process's runner (inline execution, and DDP where every rank runs every task)."""
        if self._runner is None:
            self._runner = Runner(self.req, self.methods, self.plan, self.data, self.device, self.store)
        return self._runner

    def tasks(self) -> tuple[list[Task], list[Task]]:
        """(teacher tasks, student tasks) for every planned run not yet in the store."""
        todo = [s for s in self.plan.specs if not self.store.has(s.run_id)]
        portable = self.req.for_workers()

        def task(spec: Spec) -> Task:
            return Task(spec.run_id, spec.label, (portable, spec))

        return [task(ts) for ts in teachers_to_train(todo, self.store)], [task(s) for s in todo]

    def execute(self, executor: Executor | None = None) -> SweepResult:
        """Run every spec not yet in the store (teachers first) with ``executor`` (default: here,
        one after another); a failed run is reported and the sweep goes on."""
        if distributed.world_size() > 1 and executor is not None:
            raise KdbenchError("under torchrun (DDP) the runs happen in the torchrun processes themselves; "
                               "drop --executor/--gpus/--workers")
        # Under DDP rank 0 reads the store once and every rank runs its list, in the same order.
        teacher_tasks, tasks = distributed.on_main(self.tasks)
        done = len(self.plan.specs) - len(tasks)
        if done:
            self.log(f"{done} of {len(self.plan.specs)} runs already in {self.store.root}; skipping them")
        executor = executor or InlineExecutor(lambda t: self.runner.attempt(t.payload[1], wait=t.wait))
        bar = tqdm(total=len(teacher_tasks) + len(tasks), desc="sweep", position=0, leave=True, unit="run",
                   dynamic_ncols=True, disable=self.req.quiet or not distributed.is_main(), file=sys.stderr)

        def report(o: Outcome) -> None:
            bar.update(1)
            # One line per run, printed above the bars (kept with --quiet: it is output).
            line = o.summary or f"{o.label}: {o.status}" + (f": {o.error.strip().splitlines()[-1]}" if o.error else "")
            tqdm.write(f"  {line}", file=sys.stdout)

        outcomes = executor.execute_all(teacher_tasks, report)
        lost = {o.run_id: o for o in outcomes if not o.finished}
        ready = []
        for task in tasks:
            spec: RunSpec = task.payload[1]
            bad = [lost[t.run_id] for t in spec.teachers if t.run_id in lost]
            if bad:
                o = Outcome(task.run_id, FAILED, task.label,
                            error=f"its teacher did not finish ({bad[0].label}: {bad[0].status})")
                report(o)
                outcomes.append(o)
            else:
                ready.append(task)
        outcomes += executor.execute_all(ready, report)
        bar.close()
        return SweepResult(outcomes, done, {t.run_id for t in teacher_tasks})
