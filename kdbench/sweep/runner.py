"""One process's share of a sweep: teachers trained once and cached, student runs trained and measured.

A :class:`Runner` holds what its runs share in this process (the data on the device, trained
teachers, teacher-output caches, measurements per architecture). :meth:`Runner.attempt` is the
task every executor runs: one spec, skipped when its row exists, else trained, measured and
written as one row.
"""

from __future__ import annotations

import gc
import math
import sys
import traceback
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed, input_norm, metrics, predictions, provenance, train, zoo
from ..data import DataSplits, holdout_indices, view_count
from ..errors import DiskFull, KdbenchError
from ..executors.base import BUSY, DONE, OK, Outcome
from ..files import atomic_torch_save, warn
from ..ids import digest
from ..method import Method, Taps, init_epochs_for
from ..registry import build_method
from ..train import EngineOptions, ViewCache, build_view_cache
from . import rows
from .measure import Measurer, evaluated
from .plan import Plan, cache_unusable, dataset_label, probed
from .request import Request
from .spec import RunSpec, Spec, TeacherSpec
from .store import Busy, ResultsStore
from .transfer import bias_columns, student_data, transfer_columns, validation_split

#: On the CPU, --teacher-cache auto builds a cache only up to this size (host memory is shared).
CPU_CACHE_BYTES = 1 << 30
#: On a GPU, a teacher cache may take at most this fraction of the free memory (the dataset is already in).
CUDA_CACHE_FRACTION = 0.5


class Runner:
    """Trains and measures the runs of one request in this process, sharing teachers between them."""

    def __init__(self, req: Request, methods: Mapping[str, type[Method]], plan: Plan, data: DataSplits,
                 device: torch.device, store: ResultsStore) -> None:
        self.req, self.methods, self.plan, self.data, self.device, self.store = req, methods, plan, data, device, store
        self.info = data.info
        self.options: EngineOptions = req.engine_options(device.type)
        prov = provenance.collect(device)
        self.context = rows.Context(
            dataset=dataset_label(self.info.name, req.limit, req.pad_to, req.resolution.label, self.info.backend),
            dataset_source=self.info.source,
            real_data=self.info.real_data, train_size=len(data.train_labels), test_size=len(data.test_labels),
            device_type=device.type, world_size=distributed.world_size(), options=self.options,
            image_size=self.info.img_size, crop_pct=req.resolution.crop_pct,
            interpolation=req.resolution.interpolation if req.resolution.size else "", data_backend=self.info.backend,
            provenance={**prov, "command": req.command} if req.command else prov)
        self.measurer = Measurer(data, req.throughput_batch, req.runs_per_gpu, self.options)
        self.test_set = predictions.test_set_id(self.context.dataset, data.test_labels)
        self._teachers: dict[str, nn.Module] = {}
        self._trained_here: set[str] = set()               # teachers this process trained
        self._caches: dict[tuple, ViewCache] = {}          # the last teachers' view caches (large: one set kept)
        self._cache_reasons: dict[str, str] = {}           # cache_off_reason, per run id
        self._student_data: dict[tuple, DataSplits] = {}   # per (transfer set, val_fraction)

    # -- one task -------------------------------------------------------------------------
    def attempt(self, spec: Spec, *, wait: bool = False) -> Outcome:
        """Run one spec (a student run, or a teacher to train) unless its row exists; write its row.

        Raises when the run fails, after writing ``state/<run_id>/error.txt``; a run whose loss
        diverged is a finished row with status "diverged" instead. A run another process holds is
        "busy", or with ``wait``, waited for (then it is done, or run here if that process died).
        Under DDP (torchrun) every rank calls this for the same spec; rank 0 decides and writes, and
        every rank returns rank 0's outcome (which also keeps the ranks in step).
        """
        return distributed.broadcast_object(self._attempt(spec, wait))

    def _attempt(self, spec: Spec, wait: bool) -> Outcome:
        main = distributed.is_main()
        try:
            row = self._do(spec, wait)
        except Busy:
            return Outcome(spec.run_id, BUSY, spec.label, error="another process is running it")
        except (KeyboardInterrupt, SystemExit, DiskFull):
            raise
        except BaseException as exc:
            self._record_failure(spec, exc)
            raise
        if not main or row is None:
            return Outcome(spec.run_id, DONE, spec.label)
        return Outcome(spec.run_id, row.get(rows.Col.STATUS, OK), spec.label, summary=rows.summary_line(row, spec.label))

    def _do(self, spec: Spec, wait: bool) -> dict[str, Any] | None:
        """The row of a run trained here now, or None when it was done already."""
        if isinstance(spec, TeacherSpec):
            self.teacher(spec)  # takes the teacher's lock itself, waiting for another trainer
            # Reported as trained only by the process that trained it (not one that waited).
            main = distributed.is_main() and spec.run_id in self._trained_here
            return self.store.read(spec.run_id) if main else None
        with self.store.main_lock(spec.run_id, wait=wait):
            if distributed.on_main(lambda: self.store.has(spec.run_id)):
                if distributed.is_main():  # done by another process meanwhile: no lock left behind either
                    self.store.finish(spec.run_id)
                return None
            row = self.train_student(spec)
            if distributed.is_main():
                self.store.finish(spec.run_id)
            return row

    def _record_failure(self, spec: Spec, exc: BaseException) -> None:
        """Keep the traceback in the run's state folder; under DDP, stop every rank with a message."""
        text = "".join(traceback.format_exception(exc))
        where = self.store.error_path(spec.run_id)
        rank = distributed.rank()
        if rank:  # DDP: each rank keeps its own traceback (the others' only say a peer died)
            where = where.with_name(f"error.rank{rank}.txt")
        try:
            if rank:
                where.parent.mkdir(parents=True, exist_ok=True)
                where.write_text(f"rank {rank}: {spec.label}\n{self.req.command}\n\n{text}")
            else:
                self.store.record_error(spec.run_id, f"{spec.label}\n{self.req.command}\n\n{text}")
        except OSError:
            pass
        self._free_memory()
        if distributed.world_size() > 1:
            # The other ranks wait in this run's collectives: the sweep cannot go on without this rank.
            last = "".join(traceback.format_exception_only(exc)).strip().splitlines()[-1]
            raise distributed.RankFailed(
                f"{spec.label} failed on DDP rank {rank}: {last}. The ranks cannot go on without it, so "
                f"the sweep stops; the traceback is in {where}. Re-run the same command to resume (finished "
                "runs are kept)") from exc

    def _free_memory(self) -> None:  # after an out-of-memory error the other runs of this worker still need it
        self._teachers.clear()
        self._caches.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- progress -------------------------------------------------------------------------
    def bar(self, total: int, desc: str) -> Any:
        """A run's progress bar (epochs), under the sweep's."""
        return tqdm(total=total, desc=desc, position=1, leave=False, unit="epoch", dynamic_ncols=True,
                    disable=self.req.quiet or not distributed.is_main(), file=sys.stderr)

    # -- models ---------------------------------------------------------------------------
    def create(self, name: str, kwargs: tuple[tuple[str, Any], ...] = (), *, weights: bool = True) -> nn.Module:
        """A model sized for the data: with its pretrained weights (a tag, hf-hub:, --pretrained-file) unless
        ``weights`` is False (weights about to be loaded from a checkpoint or the store)."""
        model = zoo.create(name, num_classes=self.info.num_classes, in_chans=self.info.in_chans,
                           img_size=self.info.img_size, pretrained_file=self.req.pretrained_files.get(name),
                           weights=weights, **dict(kwargs))
        if zoo.wants_pretrained(name) or name in self.req.pretrained_files:  # by name: weights may come from the store
            input_norm.use_model_norm(model, self.info.mean, self.info.std, self.info.in_chans)
        return model.to(self.device)

    def teacher(self, ts: TeacherSpec) -> nn.Module:
        """A teacher's weights: from its checkpoint, from the store, or trained now and stored.

        Training holds the teacher's lock, so workers that need the same teacher wait for it
        instead of training it twice; an interrupted teacher resumes from its epoch checkpoint.
        """
        if ts.run_id in self._teachers:
            return self._teachers[ts.run_id]
        torch.manual_seed(ts.seed)
        stored = distributed.on_main(lambda: self.store.teacher_path(ts.run_id).is_file())
        # Pretrained weights only where training starts from them (not under a checkpoint's or the store's).
        model = self.create(ts.model, ts.model_kwargs, weights=not (ts.checkpoint_sha256 or stored) or ts.as_is)
        if ts.trained_elsewhere:  # a checkpoint, or pretrained weights that fit the dataset: evaluated as they are
            if ts.checkpoint_sha256:
                zoo.load_checkpoint(model, self.plan.checkpoints[ts.model], ts.model)
            if distributed.is_main() and not self.store.has(ts.run_id):
                self._write_teacher_row(ts, model, train.TrainResult.untrained(model, self.data), trained=False)
        else:
            with self.store.main_lock(ts.run_id, wait=True):
                if self._load_stored_teacher(ts, model):
                    if distributed.is_main():  # finished: the lock (made by taking it) goes, as a trained one's does
                        self.store.finish(ts.run_id)
                else:
                    self._train_teacher(ts, model)
        self._teachers[ts.run_id] = model
        return model

    def _load_stored_teacher(self, ts: TeacherSpec, model: nn.Module) -> bool:
        path = self.store.teacher_path(ts.run_id)
        if not distributed.on_main(lambda: path.is_file() and self.store.has(ts.run_id)):
            return False
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # a truncated file left by a crash: train the teacher again
            warn(f"stored teacher weights {path} are damaged ({type(exc).__name__}); training {ts.model} again")
            return False
        zoo.load_fitting(model, state, f"stored teacher weights '{path}'", ts.model)
        return True

    def _train_teacher(self, ts: TeacherSpec, model: nn.Module) -> None:
        self._trained_here.add(ts.run_id)
        bar = self.bar(ts.recipe.epochs, ts.label)
        with metrics.PeakMemory(self.device) as peak:
            result = train.train(model, self.data, ts.recipe, seed=ts.seed, model_name=ts.model, progress=bar,
                                 state_path=self.store.checkpoint_path(ts.run_id), state_key=ts.run_id,
                                 options=self.options)
        bar.close()
        if distributed.is_main():  # under DDP every rank holds these same weights; rank 0 writes them
            atomic_torch_save(self.store.teacher_path(ts.run_id), model.state_dict())
            self._write_teacher_row(ts, model, result, trained=True, peak=peak)
            self.store.finish(ts.run_id)

    def _write_teacher_row(self, ts: TeacherSpec, model: nn.Module, result: train.TrainResult, *, trained: bool,
                           peak: metrics.PeakMemory | None = None) -> None:
        measured = self.measurer.measure(ts.model, model, result)
        row = rows.teacher_row(self.context, ts, result=result, measured=measured, trained=trained, peak=peak)
        row[rows.Col.INPUT_NORM] = input_norm.describe(model)
        self.store.write({**row, **self._keep_predictions(ts.run_id, result)})

    # -- student runs ---------------------------------------------------------------------
    def train_student(self, spec: RunSpec) -> dict[str, Any]:
        """Train, measure and store one student run; returns its row (empty on DDP ranks other than 0)."""
        teachers = [self.teacher(ts) for ts in spec.teachers]
        torch.manual_seed(spec.train_seed)
        student = self.create(spec.student, spec.student_kwargs)
        method = build_method(self.methods[spec.method], dict(spec.hparams)).to(self.device)
        taps = method.taps()
        method.setup(probed(spec.student, taps, self.data, self.plan.probes),
                     [probed(n, taps, self.data, self.plan.probes) for n in spec.teacher_names])
        method.to(self.device)
        data = self.student_data(spec)
        caches = self.view_caches(spec, taps)
        bar = self.bar(init_epochs_for(method, spec.recipe.epochs, spec.recipe.full_epochs) + spec.recipe.epochs,
                       spec.label)
        error = ""
        with metrics.PeakMemory(self.device) as peak:
            try:
                result = train.train(student, data, spec.recipe, seed=spec.train_seed, method=method,
                                     teachers=teachers, teacher_names=spec.teacher_names, model_name=spec.student,
                                     progress=bar, state_path=self.store.checkpoint_path(spec.run_id),
                                     state_key=spec.run_id, options=self.options, teacher_caches=caches,
                                     labelled=not spec.transfer.unlabelled)
            except train.Diverged as exc:
                result, error = exc.result, str(exc)
        bar.close()
        if not distributed.is_main():
            return {}  # rank 0 measures the model and writes the row
        probs = [] if error else [self.measurer.teacher_probs(ts.run_id, lambda ts=ts: self.teacher(ts))
                                  for ts in spec.teachers]
        measured = self.measurer.measure(spec.student, student, result, probs)
        row = rows.student_row(self.context, spec, paper=method.paper, extra_params=method.extra_parameters(),
                               result=result, measured=measured, peak=peak,
                               cache_build_s=[c.build_time_s for c in caches], error=error)
        row.update({rows.Col.TEACHER_CACHE_OFF: self.cache_off_reason(spec, taps), rows.Col.METHOD_VARIANT:
                    method.variant(), rows.Col.INPUT_NORM: input_norm.describe(student)})
        if spec.ensemble and spec.member == 0:  # the first member times the whole ensemble, as deployed
            row.update(self.measurer.ensemble_costs(spec.ensemble, self.req.kwargs_for, self.create))
        row.update(self._transfer_columns(spec, student, data, None if error else result.test_logits))
        row.update(self._keep_predictions(spec.run_id, result))
        self.store.write(row)
        return row

    def _keep_predictions(self, run_id: str, result: train.TrainResult) -> dict[str, Any]:
        """Write the run's test predictions before its row (a row never names a missing file); none unevaluated."""
        cols = {rows.Col.TEST_SET: self.test_set, rows.Col.PREDICTIONS: ""}
        if evaluated(result):
            path = predictions.save(self.store.predictions_path(run_id), run_id=run_id, test_set=self.test_set,
                                    logits=result.test_logits, labels=self.data.test_labels)
            cols[rows.Col.PREDICTIONS] = path.relative_to(self.store.root).as_posix()
        return cols

    # -- transfer sets and bias adjustment (sweep/transfer.py) --------------------------------
    def student_data(self, spec: RunSpec) -> DataSplits:
        """The data ``spec``'s student trains on: the suite's, or its transfer set (made once per sweep)."""
        key = (spec.transfer, spec.recipe.val_fraction)
        if key not in self._student_data:
            self._student_data[key] = student_data(self.data, spec.transfer, self.plan.sources,
                                                   val_fraction=spec.recipe.val_fraction)
        return self._student_data[key]

    def _transfer_columns(self, spec: RunSpec, student: nn.Module, data: DataSplits,
                          logits: torch.Tensor | None) -> dict[str, Any]:
        """The row's transfer and bias columns; ``logits`` None for a diverged run (no errors then)."""
        f = spec.recipe.val_fraction
        trained_on = len(holdout_indices(data.train_labels, f)[0]) if f else len(data.train_labels)
        cols = transfer_columns(spec.transfer, train_size=trained_on, num_classes=self.info.num_classes)
        val = None
        if logits is not None and spec.bias.search:
            images, labels = validation_split(self.data, f)
            val = (train.predict(student, images, self.data, options=self.options), labels)
        cols.update(bias_columns(spec.transfer, spec.bias, logits, self.data.test_labels, val))
        if spec.transfer.unlabelled and f:  # its held-out images have no labels to score: no validation numbers
            cols.update(dict.fromkeys((rows.Col.VAL_BEST_EPOCH, rows.Col.VAL_TOP1_BEST, rows.Col.TOP1_VAL_BEST,
                                       rows.Col.TOP5_VAL_BEST), float("nan")), **{rows.Col.HISTORY_VAL_TOP1: ""})
        return cols if logits is not None else {**cols, rows.Col.TEST_ERRORS: float("nan")}

    # -- the teacher-output cache ---------------------------------------------------------
    def wants_cache(self, spec: RunSpec, taps: Taps) -> bool:
        """Whether ``spec`` distils from cached teacher outputs (``--teacher-cache``). auto: when the method's taps
        allow it and building the cache costs fewer teacher passes (one per view per image) than running them online
        (one per epoch per image, for every planned run sharing them); on the CPU also only while the cache is small
        (:data:`CPU_CACHE_BYTES`). The numbers are the same either way (tests/test_fast_engine.py)."""
        return not self.cache_off_reason(spec, taps)

    def cache_off_reason(self, spec: RunSpec, taps: Taps) -> str:
        """Why ``spec``'s teachers run online rather than from the cache ('' when it is used); the row records it.
        Decided once per run: on a GPU the answer depends on free memory, which the cache itself then takes."""
        if spec.run_id not in self._cache_reasons:
            self._cache_reasons[spec.run_id] = self._cache_off_reason(spec, taps)
        return self._cache_reasons[spec.run_id]

    def _cache_off_reason(self, spec: RunSpec, taps: Taps) -> str:
        mode = self.req.teacher_cache
        if not spec.teachers:
            return "no teachers"
        if mode == "off":
            return "--teacher-cache off"
        if self.info.backend == "stream":
            return "streamed data: the teachers run on each batch as it is read"
        if why := cache_unusable(taps, spec.recipe):
            return why
        views = view_count(spec.recipe.crop_padding, spec.recipe.flip)
        if self.device.type == "cuda":  # each run (each of --runs-per-gpu K workers) holds its own copy
            fits, figures = metrics.fits_on_device(self._cache_bytes(spec, taps, views), self.device,
                                                   CUDA_CACHE_FRACTION)
            if not fits and mode == "on":
                raise KdbenchError(f"--teacher-cache on: the teacher cache of {spec.label} would take {figures} "
                                   f"(at most {CUDA_CACHE_FRACTION:.0%} of it is for the cache); use --teacher-cache "
                                   "auto or off, or fewer --runs-per-gpu (each run holds its own copy)")
            if not fits:
                return f"auto: the cache would not fit in the GPU's free memory ({figures})"
        if mode == "on":
            return ""
        sharing = sum(1 for s in self.plan.specs if s.teachers == spec.teachers) or 1
        if spec.recipe.epochs * sharing < views:
            return (f"auto: {views} views per image to cache cost more teacher passes than {spec.recipe.epochs} "
                    f"epochs x {sharing} runs online")
        if self.device.type == "cpu" and self._cache_bytes(spec, taps, views) > CPU_CACHE_BYTES:
            return "auto: the cache would be too large for CPU memory"
        return ""

    def _cache_bytes(self, spec: RunSpec, taps: Taps, views: int) -> int:
        """The fp32 size of the caches ``spec`` would build: logits (and pooled vectors) per view."""
        def pooled(model: str) -> int:
            shape = probed(model, taps, self.data, self.plan.probes).pooled if taps.pooled else None
            return math.prod(shape) if shape else 0

        per_view = sum(self.info.num_classes + pooled(ts.model) for ts in spec.teachers)
        return len(self.student_data(spec).train_labels) * views * per_view * 4

    def view_caches(self, spec: RunSpec, taps: Taps) -> list[ViewCache]:
        """One view cache per teacher of ``spec``, or [] to run the teachers online.

        Built once and kept in the results folder (``cache/``), so every run of these teachers,
        in this process or any worker, reuses it; in memory only the last set is kept. It is built on
        the images the student trains on and indexed by them: a transfer set's own images, with the
        transfer set (and the validation split it was drawn beside) in its file name.
        """
        if not self.wants_cache(spec, taps):
            return []
        on = "" if spec.transfer.empty else \
            f"-t{digest({'transfer': spec.transfer.items(), 'val': spec.recipe.val_fraction})[:8]}"
        keys = [(ts.run_id, spec.recipe.crop_padding, spec.recipe.flip, taps.pooled, self.options, on)
                for ts in spec.teachers]
        if any(k not in self._caches for k in keys):
            self._caches = {k: v for k, v in self._caches.items() if k in keys}  # free the others first
            data = self.student_data(spec)
            self._caches.update({k: self._view_cache(ts, k, data) for ts, k in zip(spec.teachers, keys)
                                 if k not in self._caches})
        return [self._caches[k] for k in keys]

    def _view_cache(self, ts: TeacherSpec, key: tuple, data: DataSplits) -> ViewCache:
        _, pad, flip, pooled, opts, on = key
        name = f"{ts.run_id}-p{pad}{'f' if flip else ''}-{opts.precision}{'-cl' if opts.channels_last else ''}" \
               f"{'-pooled' if pooled else ''}{on}"
        path = self.store.cache_path(name)
        teacher = self.teacher(ts)
        try:
            with self.store.main_lock(f"cache-{name}", wait=True):
                if path.is_file():
                    try:
                        return ViewCache.from_state_dict(torch.load(path, map_location="cpu", weights_only=True),
                                                         self.device)
                    except Exception as exc:  # damaged (a crash while writing it elsewhere): build it again
                        warn(f"teacher cache {path} is damaged ({type(exc).__name__}); building it again")
                views = view_count(pad, flip)
                bar = tqdm(total=views, desc=f"teacher cache {ts.model} ({views} views)", position=1, leave=False,
                           unit="view", disable=self.req.quiet or not distributed.is_main(), file=sys.stderr)
                recipe = replace(ts.recipe, crop_padding=pad, flip=flip)
                cache = build_view_cache(teacher, data, recipe, pooled=pooled, options=opts, progress=bar)
                bar.close()
                if distributed.is_main():
                    atomic_torch_save(path, cache.state_dict())
                return cache
        finally:
            self.store.finish(f"cache-{name}")  # its lock folder
