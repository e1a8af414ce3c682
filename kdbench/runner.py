"""From a request to finished rows: plan every run, fail fast, then train and measure.

``plan`` checks everything a user can get wrong (methods, hyperparameters, models, data,
checkpoints, teacher counts, adapter shapes) before any training starts; ``execute`` skips runs
already in the results store, trains the rest (teachers once, cached), and writes one row each.
"""

from __future__ import annotations

import gc
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed, engine, metrics, provenance, zoo
from .data import DataSplits, load_dataset, view_count
from .errors import DiskFull, KdbenchError, unknown
from .executors.base import (
    BUSY,
    DIVERGED,
    DONE,
    FAILED,
    OK,
    Executor,
    Outcome,
    spec_id,
    spec_label,
    tasks_for,
)
from .features import probe
from .method import Method, Probe, Taps
from .recipe import Recipe
from .registry import build_method, parse_overrides
from .spec import RunSpec, TeacherSpec
from .store import Busy, ResultsStore, atomic_torch_save, warn
from .viewcache import ViewCache, build_view_cache, cacheable
from .suites import Pair


@dataclass
class Request:
    """What the user asked for, after the CLI has parsed it."""

    methods: dict[str, type[Method]]          # the registry (all loadable methods)
    selected: Sequence[str] | None            # method names, or None for all
    pairs: Sequence[Pair]
    dataset: str
    recipe: Recipe
    seeds: Sequence[int]
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    teacher_checkpoints: dict[str, str] = field(default_factory=dict)  # teacher model -> file
    results_dir: Path = Path("kdbench-results")
    data_dir: str | None = None
    download: bool = False
    limit: int = 0
    device: str = "auto"
    throughput_batch: int = 256
    quiet: bool = False
    #: True when the user named the methods (--methods): then a method that cannot take a pair is
    #: an error; otherwise (all, or a suite's own list) it is left out of that pair with a note.
    strict: bool = True
    #: Per method, several hyperparameter settings to run (a suite's sweep); each adds to ``overrides``.
    variants: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    recipe_by_model: dict[str, dict[str, Any]] = field(default_factory=dict)  # recipe fields per model
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)     # create_model kwargs per model
    pad_to: int = 0
    #: Hyperparameters the user set (--set): they win over the suite's, its pairs' and its sweeps'.
    pinned: dict[str, dict[str, Any]] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()  # --plugin files (absolute): workers of other executors load them again
    #: Runs happen on other machines (Ray, Slurm): ``device`` names theirs (e.g. cuda on a GPU
    #: partition), while this process, maybe a login node without a GPU, plans on its CPU.
    remote: bool = False
    command: str = ""              # the command line, recorded in every row (workers have other argv)
    # How the engine computes (EngineOptions): "auto" picks by device (fast on CUDA, plain fp32 on
    # the CPU). Only the precision is part of a run's id; the others change float rounding only.
    precision: str = "auto"        # auto, fp32 or bf16
    compile: str = "auto"          # auto, on or off
    channels_last: str = "auto"    # auto, on or off
    teacher_cache: str = "auto"    # auto (when it saves teacher compute, on CUDA), on or off

    def engine_options(self, device_type: str) -> engine.EngineOptions:
        fast = engine.EngineOptions.fast_for(device_type)
        return engine.EngineOptions(
            precision=fast.precision if self.precision == "auto" else self.precision,
            channels_last=fast.channels_last if self.channels_last == "auto" else self.channels_last == "on",
            compile=fast.compile if self.compile == "auto" else self.compile == "on")

    def portable(self) -> Request:
        """This request as a task carries it to another process: method classes are re-loaded there
        (from entry points and ``plugins``), paths are absolute."""
        return replace(self, methods={}, remote=False, results_dir=Path(self.results_dir).resolve(),
                       data_dir=str(Path(self.data_dir).expanduser().resolve()) if self.data_dir else None,
                       teacher_checkpoints={k: str(Path(v).resolve()) for k, v in self.teacher_checkpoints.items()},
                       command=self.command or provenance.command_line())

    def recipe_for(self, model: str) -> Recipe:
        extra = self.recipe_by_model.get(model)
        return self.recipe.with_overrides(extra, f"recipe for {model}") if extra else self.recipe

    def kwargs_for(self, model: str) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted(self.model_kwargs.get(model, {}).items()))


@dataclass
class Plan:
    specs: list[RunSpec]
    data: DataSplits
    device: torch.device
    skipped: list[str]                # human-readable notes of method×pair combinations left out
    checkpoints: dict[str, str]       # teacher model -> checkpoint file
    probes: dict[tuple[str, Taps], Probe] = field(default_factory=dict)  # shapes, per (model, taps)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdbenchError(f"--device {name} asked for, but torch sees no CUDA GPU; use --device cpu")
    try:
        return distributed.local_device(torch.device(name))
    except RuntimeError:
        raise KdbenchError(f"--device '{name}' is not a torch device; use auto, cpu or cuda") from None


def load_data(req: Request, device: torch.device) -> DataSplits:
    # Held on the training device for the whole sweep: batches and augmentation never leave it.
    return load_dataset(req.dataset, data_dir=req.data_dir, download=req.download, limit=req.limit or None,
                        pad_to=req.pad_to).to(device)


def dataset_label(name: str, limit: int, pad_to: int = 0) -> str:
    """The dataset as rows name it: ``name``, ``[:N]`` for a limit, ``@Spx`` when padded to S×S."""
    return name + (f"[:{limit}]" if limit else "") + (f"@{pad_to}px" if pad_to else "")


def plan(req: Request) -> Plan:
    """Turn a request into run specs, checking everything before any training."""
    names = list(req.methods) if req.selected is None else list(req.selected)
    for name in names:
        if name not in req.methods:
            raise unknown("method", name, req.methods, fix="See `kdbench list methods`.")
    for name in {**req.overrides, **req.pinned}:
        if name not in names:
            raise KdbenchError(f"--set names method '{name}', which this run does not include "
                               f"(methods: {', '.join(names)})")
    for name in req.variants:
        if name not in names:
            raise KdbenchError(f"a sweep names method '{name}', which this run does not include "
                               f"(methods: {', '.join(names)})")

    def instances(name: str, pair_hp: dict[str, dict[str, Any]]) -> list[Method]:
        """One method object per sweep value; suite, then pair, then sweep, then --set values."""
        return [build_method(req.methods[name], {**req.overrides.get(name, {}), **pair_hp.get(name, {}), **v,
                                                 **req.pinned.get(name, {})})
                for v in req.variants.get(name) or [{}]]

    plain = {n: instances(n, {}) for n in names}  # checks every value before any data is loaded
    for pair in req.pairs:
        for model in (*pair.teachers, pair.student):
            zoo.check_model_name(model)
    device = torch.device("cpu") if req.remote else resolve_device(req.device)
    data = load_data(req, device)
    info = data.info
    all_teachers = {t for p in req.pairs for t in p.teachers}
    checkpoints = dict(req.teacher_checkpoints)
    for model, path in checkpoints.items():
        if model not in all_teachers:
            raise KdbenchError(f"--teacher-checkpoint names model '{model}', which is no teacher of this run "
                               f"(teachers: {', '.join(sorted(all_teachers)) or 'none'})")
        m = zoo.create(model, num_classes=info.num_classes, in_chans=info.in_chans, img_size=info.img_size)
        zoo.load_checkpoint(m, path, model)
    sha = {m: zoo.file_sha256(p) for m, p in checkpoints.items()}
    dev = req.device.split(":")[0] if req.remote else device.type
    world = distributed.world_size()  # a DDP run (torchrun) is another run than a single-process one
    label = dataset_label(info.name, req.limit, req.pad_to)
    for model in req.recipe_by_model:
        zoo.check_model_name(model)
        req.recipe_for(model)
    for model, kwargs in req.model_kwargs.items():
        try:
            zoo.create(model, num_classes=info.num_classes, in_chans=info.in_chans, img_size=info.img_size, **kwargs)
        except TypeError as exc:
            raise KdbenchError(f"model '{model}' does not take the arguments {kwargs} given for it: {exc}") from None

    precision = req.engine_options(dev).precision

    def teacher_spec(model: str, seed: int) -> TeacherSpec:
        return TeacherSpec(model, label, req.recipe_for(model), seed, dev, sha.get(model, ""), req.limit,
                           req.kwargs_for(model), world_size=world, precision=precision)

    specs: dict[str, RunSpec] = {}
    skipped: list[str] = []
    probes: dict[tuple[str, Taps], Probe] = {}
    checked: set[tuple] = set()
    pair_hps = {p: parse_overrides([f"{k}={v}" for k, v in p.hparams], req.methods) for p in req.pairs if p.hparams}
    for seed in req.seeds:
        for pair in req.pairs:
            pair_hp = pair_hps.get(pair, {})
            for name in names:
                if pair.methods and name not in pair.methods:
                    continue  # the suite runs this method on its other pairs only
                cls = req.methods[name]
                n = len(pair.teachers)
                if cls.max_teachers == 0:
                    teachers: tuple[str, ...] = ()
                    t_seeds: tuple[int | None, ...] = ()
                elif n > cls.max_teachers or n < cls.min_teachers:
                    why = f"method '{name}' takes {cls.teachers_taken()}; pair {pair.label} has {n}"
                    if req.strict:
                        raise KdbenchError(why + ". Drop the pair or the method, or use a method that takes "
                                                 "several teachers (`kdbench list methods` shows how many each takes)")
                    skipped.append(why)
                    continue
                else:
                    teachers, t_seeds = pair.teachers, pair.teacher_seeds
                for method in (instances(name, pair_hp) if name in pair_hp else plain[name]):
                    key = (name, teachers, pair.student)
                    if key not in checked:
                        check_setup(method, teachers, pair.student, data, probes)
                        checked.add(key)
                    labels = [t if s is None else f"{t}@{s}" for t, s in zip(teachers, t_seeds)]
                    spec = RunSpec(
                        method=name, hparams=tuple(sorted(method.config().items())),
                        teachers=tuple(teacher_spec(t, seed if s is None else s) for t, s in zip(teachers, t_seeds)),
                        student=pair.student, dataset=label, recipe=req.recipe_for(pair.student), seed=seed,
                        device=dev, data_limit=req.limit, student_kwargs=req.kwargs_for(pair.student),
                        world_size=world, precision=precision, pair=f"{'+'.join(labels)}→{pair.student}",
                    )
                    specs.setdefault(spec.run_id, spec)
    return Plan(list(specs.values()), data, device, sorted(set(skipped)), checkpoints, probes)


def probe_model(name: str, taps: Taps, data: DataSplits) -> Probe:
    """Build ``name`` for the dataset and probe it; a model that cannot take its images is a user error."""
    info = data.info
    shape = (info.in_chans, info.img_size, info.img_size)
    model = zoo.create(name, num_classes=info.num_classes, in_chans=info.in_chans, img_size=info.img_size)
    try:
        return probe(model, taps, shape, name)
    except RuntimeError as exc:
        raise KdbenchError(f"model '{name}' cannot run on {info.name}'s {'x'.join(map(str, shape))} images: "
                           f"{str(exc).splitlines()[0]}. Choose a model for small inputs (e.g. kdbench's "
                           "cifar_* zoo) or a dataset with larger images") from None


def check_setup(method: Method, teachers: Sequence[str], student: str, data: DataSplits,
                probes: dict[tuple[str, Taps], Probe]) -> None:
    """Run the method's setup on a copy with probed shapes: shape problems surface before training.

    Each (model, taps) is probed once and kept in ``probes``; the runs reuse them, since shapes
    depend on the architecture and the data, not on the weights.
    """
    taps = method.taps()

    def shapes(name: str) -> Probe:
        if (name, taps) not in probes:
            probes[(name, taps)] = probe_model(name, taps, data)
        return probes[(name, taps)]

    try:
        s = shapes(student)
        ts = [shapes(t) for t in teachers]
    except KdbenchError as exc:
        raise KdbenchError(f"method '{method.name}': {exc}") from None
    try:
        type(method)(**method.config()).setup(s, ts)
    except (ValueError, KeyError) as exc:
        raise KdbenchError(f"method '{method.name}' cannot distil {'+'.join(teachers)} into {student}: {exc}") from None
    for t in ts:
        if t.num_classes != s.num_classes:
            raise KdbenchError(f"teacher {t.model} outputs {t.num_classes} classes but student {student} "
                               f"outputs {s.num_classes}; both must predict the dataset's {data.info.num_classes}")


class Runner:
    """Executes a plan: teachers cached in the store, one row per finished run."""

    def __init__(self, req: Request, plan_: Plan, store: ResultsStore,
                 log: Callable[[str], None] = print) -> None:
        self.req, self.plan, self.store, self.log = req, plan_, store, log
        self.info = plan_.data.info
        self.shape = (self.info.in_chans, self.info.img_size, self.info.img_size)
        self.provenance = provenance.collect(plan_.device)
        if req.command:
            self.provenance["command"] = req.command
        self._teachers: dict[str, nn.Module] = {}
        self._teacher_probs: dict[str, torch.Tensor] = {}  # test-set probabilities, per teacher id
        self._costs: dict[str, dict[str, Any]] = {}        # FLOPs and throughput, per architecture
        self._trained_here: set[str] = set()               # teachers this process trained
        self.options = req.engine_options(plan_.device.type)
        self._caches: dict[tuple, ViewCache] = {}          # the last teachers' view caches (large: one set kept)

    @classmethod
    def for_request(cls, req: Request) -> Runner:
        """A Runner in a worker process: methods re-loaded, data loaded; shapes probed when needed."""
        from .registry import load_methods

        if not req.methods:
            req = replace(req, methods=load_methods(list(req.plugins)))
        device = resolve_device(req.device)
        p = Plan([], load_data(req, device), device, [], dict(req.teacher_checkpoints))
        return cls(req, p, ResultsStore(req.results_dir))

    def _probe(self, name: str, taps: Taps) -> Probe:
        if (name, taps) not in self.plan.probes:
            self.plan.probes[(name, taps)] = probe_model(name, taps, self.plan.data)
        return self.plan.probes[(name, taps)]

    # -- bars -----------------------------------------------------------------------------
    def _bar(self, total: int, desc: str, position: int, leave: bool) -> Any:
        return tqdm(total=total, desc=desc, position=position, leave=leave,
                    disable=self.req.quiet or not distributed.is_main(),
                    unit="epoch" if position else "run", dynamic_ncols=True, file=sys.stderr)

    # -- models ---------------------------------------------------------------------------
    def _create(self, name: str, kwargs: tuple[tuple[str, Any], ...] = ()) -> nn.Module:
        return zoo.create(name, num_classes=self.info.num_classes, in_chans=self.info.in_chans,
                          img_size=self.info.img_size, **dict(kwargs)).to(self.plan.device)

    def teacher(self, ts: TeacherSpec) -> nn.Module:
        """A teacher's weights: from its checkpoint, from the cache, or trained now and cached.

        Training holds the teacher's lock, so workers that need the same teacher wait for it
        instead of training it twice; an interrupted teacher resumes from its epoch checkpoint.
        """
        if ts.teacher_id in self._teachers:
            return self._teachers[ts.teacher_id]
        torch.manual_seed(ts.seed)
        model = self._create(ts.model, ts.model_kwargs)
        if ts.checkpoint_sha256:
            zoo.load_checkpoint(model, self.plan.checkpoints[ts.model], ts.model)
            if distributed.is_main() and not self.store.has(ts.teacher_id):
                self._write_teacher_row(ts, model, engine.TrainResult.untrained(model, self.plan.data), trained=False)
        else:
            with distributed.main_lock(self.store, ts.teacher_id, wait=True):
                if not self._load_cached_teacher(ts, model):
                    self._train_teacher(ts, model)
        self._teachers[ts.teacher_id] = model
        return model

    def _load_cached_teacher(self, ts: TeacherSpec, model: nn.Module) -> bool:
        path = self.store.teacher_path(ts.teacher_id)
        if not distributed.on_main(lambda: path.is_file() and self.store.has(ts.teacher_id)):
            return False
        try:
            state = torch.load(path, map_location=self.plan.device, weights_only=True)
        except Exception as exc:  # a truncated file left by a crash: train the teacher again
            warn(f"cached teacher weights {path} are damaged ({type(exc).__name__}); training {ts.model} again")
            return False
        zoo.load_fitting(model, state, f"cached teacher weights '{path}'", ts.model)
        return True

    def _train_teacher(self, ts: TeacherSpec, model: nn.Module) -> None:
        self._trained_here.add(ts.teacher_id)
        bar = self._bar(ts.recipe.epochs, f"teacher {ts.model} seed {ts.seed}", 1, False)
        with metrics.PeakMemory(self.plan.device) as mem:
            result = engine.train(model, self.plan.data, ts.recipe, seed=ts.seed, model_name=ts.model,
                                  progress=bar, state_path=self.store.checkpoint_path(ts.teacher_id),
                                  state_key=ts.teacher_id, options=self.options)
        bar.close()
        if distributed.is_main():  # under DDP every rank holds these same weights; rank 0 writes them
            atomic_torch_save(self.store.teacher_path(ts.teacher_id), model.state_dict())
            self._write_teacher_row(ts, model, result, trained=True, peak=mem)
            self.store.finish(ts.teacher_id)

    def teacher_probs(self, ts: TeacherSpec) -> torch.Tensor:
        """A teacher's test-set class probabilities, computed once per sweep."""
        if ts.teacher_id not in self._teacher_probs:
            logits = engine.predict(self.teacher(ts), self.plan.data.test_images, self.plan.data)
            self._teacher_probs[ts.teacher_id] = F.softmax(logits, 1)
        return self._teacher_probs[ts.teacher_id]

    def costs(self, name: str, model: nn.Module) -> dict[str, Any]:
        """FLOPs per image and inference throughput of an architecture, measured once per sweep.

        Neither depends on the method or the trained weights, so every run of the same model
        reports the same measurement instead of re-timing it (and adding timing noise).
        """
        if name not in self._costs:
            tp = metrics.measure_throughput(model, self.shape, batch_size=self.req.throughput_batch)
            self._costs[name] = {
                "flops_per_image": metrics.flops_per_image(model, self.shape),
                "throughput_img_s": tp.images_per_s, "throughput_batch": tp.batch_size,
                "throughput_device": tp.device, "throughput_dtype": tp.dtype,
                "throughput_repeats": tp.repeats, "throughput_iters": tp.iters_per_repeat,
            }
        return self._costs[name]

    # -- the teacher-output cache ---------------------------------------------------------
    def wants_cache(self, spec: RunSpec, taps: Taps) -> bool:
        """Whether ``spec`` distils from cached teacher outputs (``--teacher-cache``).

        auto: on CUDA, when the method's taps allow it and building the cache costs fewer teacher
        forward passes (one per view per image) than running the teachers online (one per epoch
        per image, for every planned run sharing them).
        """
        mode = self.req.teacher_cache
        if mode == "off" or not spec.teachers or not cacheable(taps):
            return False
        if mode == "on":
            return True
        if self.plan.device.type != "cuda":
            return False
        sharing = sum(1 for s in self.plan.specs if s.teachers == spec.teachers) or 1
        return spec.recipe.epochs * sharing >= view_count(spec.recipe.crop_padding, spec.recipe.flip)

    def view_caches(self, spec: RunSpec, taps: Taps) -> list[ViewCache]:
        """One view cache per teacher of ``spec``, or [] to run the teachers online.

        Built once and kept in the results folder (``cache/``), so every run of these teachers,
        in this process or any worker, reuses it; in memory only the last set is kept.
        """
        if not self.wants_cache(spec, taps):
            return []
        keys = [(ts.teacher_id, spec.recipe.crop_padding, spec.recipe.flip, taps.pooled, self.options)
                for ts in spec.teachers]
        if any(k not in self._caches for k in keys):
            self._caches = {k: v for k, v in self._caches.items() if k in keys}  # free the others first
            self._caches.update({k: self._view_cache(ts, k) for ts, k in zip(spec.teachers, keys)
                                 if k not in self._caches})
        return [self._caches[k] for k in keys]

    def _view_cache(self, ts: TeacherSpec, key: tuple) -> ViewCache:
        _, pad, flip, pooled, opts = key
        name = f"{ts.teacher_id}-p{pad}{'f' if flip else ''}-{opts.precision}{'-cl' if opts.channels_last else ''}" \
               f"{'-pooled' if pooled else ''}"
        path = self.store.cache_path(name)
        teacher = self.teacher(ts)
        try:
            with distributed.main_lock(self.store, f"cache-{name}", wait=True):
                if path.is_file():
                    try:
                        return ViewCache.from_state_dict(torch.load(path, map_location="cpu", weights_only=True),
                                                         self.plan.device)
                    except Exception as exc:  # damaged (a crash while writing it elsewhere): build it again
                        warn(f"teacher cache {path} is damaged ({type(exc).__name__}); building it again")
                views = view_count(pad, flip)
                bar = self._bar(views, f"teacher cache {ts.model} ({views} views)", 1, False)
                recipe = replace(ts.recipe, crop_padding=pad, flip=flip)
                cache = build_view_cache(teacher, self.plan.data, recipe, pooled=pooled, options=opts, progress=bar)
                bar.close()
                if distributed.is_main():
                    atomic_torch_save(path, cache.state_dict())
                return cache
        finally:
            self.store.finish(f"cache-{name}")  # its lock folder

    # -- runs -----------------------------------------------------------------------------
    def execute_one(self, spec: RunSpec | TeacherSpec, *, wait: bool = False) -> Outcome:
        """Run one spec (a student run, or a teacher to train) unless its row exists; write its row.

        Raises when the run fails, after writing ``state/<run_id>/error.txt``; a run whose loss
        diverged is a finished row with status "diverged" instead. A run another process holds is
        "busy", or with ``wait``, waited for (then it is done, or run here if that process died).
        Under DDP (torchrun) every rank calls this for the same spec; rank 0 decides and writes, and
        every rank returns its outcome.
        """
        # The broadcast also keeps the ranks together: none starts the next run before rank 0 wrote this one's row.
        return distributed.broadcast_object(self._execute_one(spec, wait))

    def _execute_one(self, spec: RunSpec | TeacherSpec, wait: bool) -> Outcome:
        run_id, label = spec_id(spec), spec_label(spec)
        main = distributed.is_main()
        try:
            if isinstance(spec, TeacherSpec):
                self.teacher(spec)  # takes the teacher's lock itself, waiting for another trainer
                # Reported as trained only by the process that trained it (not one that waited).
                row = self.store.read(run_id) if main and run_id in self._trained_here else None
            else:
                with distributed.main_lock(self.store, run_id, wait=wait):
                    if distributed.on_main(lambda: self.store.has(run_id)):
                        return Outcome(run_id, DONE, label)
                    row = self.run(spec)
                    if main:
                        self.store.finish(run_id)
        except Busy:
            return Outcome(run_id, BUSY, label, error="another process is running it")
        except (KeyboardInterrupt, SystemExit, DiskFull):
            raise
        except BaseException as exc:
            text = "".join(traceback.format_exception(exc))
            where = self.store.error_path(run_id)
            if distributed.rank():  # DDP: each rank keeps its own traceback (the others' only say a peer died)
                where = where.with_name(f"error.rank{distributed.rank()}.txt")
            try:
                if distributed.rank():
                    where.parent.mkdir(parents=True, exist_ok=True)
                    where.write_text(f"rank {distributed.rank()}: {label}\n{self.req.command}\n\n{text}")
                else:
                    self.store.record_error(run_id, f"{label}\n{self.req.command}\n\n{text}")
            except OSError:
                pass
            self._free_memory()
            if distributed.world_size() > 1:
                # The other ranks wait in this run's collectives: the sweep cannot go on without this rank.
                last = "".join(traceback.format_exception_only(exc)).strip().splitlines()[-1]
                raise distributed.RankFailed(
                    f"{label} failed on DDP rank {distributed.rank()}: {last}. The ranks cannot go on without it, so "
                    f"the sweep stops; the traceback is in {where}. Re-run the same command to resume (finished "
                    "runs are kept)") from exc
            raise
        if not main:
            return Outcome(run_id, DONE, label)  # replaced by rank 0's outcome in execute_one
        if row is None:
            return Outcome(run_id, DONE, label)
        return Outcome(run_id, row.get("status", OK), label, summary=summary_line(row, label))

    def _free_memory(self) -> None:
        # After an out-of-memory error the other runs of this worker still need the device.
        self._teachers.clear()
        self._caches.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(self, spec: RunSpec) -> dict[str, Any]:
        teachers = [self.teacher(ts) for ts in spec.teachers]
        torch.manual_seed(spec.seed)
        student = self._create(spec.student, spec.student_kwargs)
        method = build_method(self.req.methods[spec.method], dict(spec.hparams)).to(self.plan.device)
        taps = method.taps()
        method.setup(self._probe(spec.student, taps), [self._probe(n, taps) for n in spec.teacher_names])
        method.to(self.plan.device)
        caches = self.view_caches(spec, taps)
        bar = self._bar(spec.recipe.epochs, f"{spec.method} {spec.pair} seed {spec.seed}", 1, False)
        error = ""
        with metrics.PeakMemory(self.plan.device) as mem:
            try:
                result = engine.train(student, self.plan.data, spec.recipe, seed=spec.seed, method=method,
                                      teachers=teachers, teacher_names=spec.teacher_names, model_name=spec.student,
                                      progress=bar, state_path=self.store.checkpoint_path(spec.run_id),
                                      state_key=spec.run_id, options=self.options, teacher_caches=caches)
            except engine.Diverged as exc:
                result, error = exc.result, str(exc)
        bar.close()
        if not distributed.is_main():
            return {}  # rank 0 measures the model and writes the row
        row = self._row(spec.run_id, "student", spec.method, spec.student, spec.pair, spec.recipe, spec.seed,
                        student, result, mem)
        row.update({
            "method_paper": method.paper,
            "teachers": "+".join(spec.teacher_names),
            "hparams": json.dumps(dict(spec.hparams), sort_keys=True, default=str),
            **{f"hp.{k}": (json.dumps(v) if isinstance(v, tuple) else v) for k, v in spec.hparams},
            "extra_params": method.extra_parameters(),
            "teacher_ids": "+".join(t.teacher_id for t in spec.teachers),
            "teacher_seeds": "+".join(str(t.seed) for t in spec.teachers),
            "model_kwargs": json.dumps(dict(spec.student_kwargs), sort_keys=True),
            "teacher_cache": bool(caches),
            "teacher_cache_build_s": sum(c.build_time_s for c in caches),
        })
        if teachers and not error:
            probs = torch.stack([self.teacher_probs(ts) for ts in spec.teachers]).mean(0)
            row["agreement"] = metrics.agreement(result.test_logits.argmax(1), probs.argmax(1))
        if len(teachers) > 1 and not error:
            # The ensemble itself (mean of the teachers' probabilities), next to its student.
            row["teacher_ensemble_top1"] = metrics.topk_accuracy(probs, self.plan.data.test_labels, 1)
        if error:
            nan = float("nan")
            row.update({"status": DIVERGED, "error": error, "diverged_at_epoch": len(result.history),
                        "top1_last": nan, "top5_last": nan, "top1_best": nan, "top5_best": nan})
        elif result.history:
            for k, v in result.last.losses.items():
                row[f"loss.{k}"] = v
        self.store.write(row)
        return row

    def _write_teacher_row(self, ts: TeacherSpec, model: nn.Module, result: engine.TrainResult,
                           trained: bool, peak: metrics.PeakMemory | None = None) -> None:
        row = self._row(ts.teacher_id, "teacher", "teacher", ts.model, f"{ts.model}→", ts.recipe, ts.seed,
                        model, result, peak)
        row.update({"method_paper": "", "teachers": "", "trained_by_kdbench": trained,
                    "checkpoint_sha256": ts.checkpoint_sha256,
                    "model_kwargs": json.dumps(dict(ts.model_kwargs), sort_keys=True)})
        self.store.write(row)

    def _row(self, run_id: str, kind: str, method: str, model_name: str, pair: str, recipe: Recipe, seed: int,
             model: nn.Module, result: engine.TrainResult, mem: metrics.PeakMemory | None) -> dict[str, Any]:
        data = self.plan.data
        # No accuracy without an evaluated epoch (a run that diverged in its first epoch).
        ok = result.test_logits is not None and result.history and result.best_top1 >= 0
        nan = float("nan")
        prf = metrics.per_class_prf(result.test_logits.argmax(1), data.test_labels, self.info.num_classes) if ok \
            else {}
        row: dict[str, Any] = {
            "run_id": run_id, "kind": kind, "method": method, "student": model_name, "pair": pair,
            "dataset": dataset_label(self.info.name, self.req.limit, self.req.pad_to),
            "dataset_source": self.info.source, "real_data": self.info.real_data,
            "train_size": len(data.train_labels), "test_size": len(data.test_labels),
            "recipe": recipe.name, "epochs": recipe.epochs, "recipe_epochs": recipe.full_epochs,
            "shortened": recipe.shortened, "schedule": recipe.label, "recipe_config": json.dumps(recipe.to_dict()),
            "seed": seed,
            "status": OK,
            "top1_last": result.last.top1 if ok else nan, "top5_last": result.last.top5 if ok else nan,
            "top1_best": result.best_top1 if ok else nan, "top5_best": result.best_top5 if ok else nan,
            "best_epoch": result.best_epoch,
            "agreement": float("nan"),
            "params": metrics.count_params(model), "extra_params": 0,
            **self.costs(model_name, model),
            "train_time_s": result.train_time_s, "eval_time_s": result.eval_time_s,
            "checkpoint_time_s": result.checkpoint_time_s, "resumed_from_epoch": result.resumed_from,
            "world_size": distributed.world_size(),
            "peak_mem_mb": mem.mb if mem else float("nan"), "peak_mem_kind": mem.kind if mem else "",
            "flush_denormal": self.plan.device.type == "cpu",
            "precision": self.options.precision, "channels_last": self.options.channels_last,
            "compiled": self.options.compile,
            "history_top1": json.dumps([round(h.top1, 4) for h in result.history]),
            "history_loss": json.dumps([{k: round(v, 6) for k, v in h.losses.items()} for h in result.history]),
            **{f"class_{k}.{i}": v for k, vals in prf.items() for i, v in enumerate(vals)},
            **self.provenance,
            "finished_at": provenance.now(),
        }
        return row

    def execute(self, executor: Executor | None = None) -> SweepResult:
        """Run every spec not yet in the store (teachers first), with ``executor`` (default: here,
        one after another); a failed run is reported and the sweep goes on."""
        from .executors.local import InlineExecutor

        if distributed.world_size() > 1 and executor is not None:
            raise KdbenchError("under torchrun (DDP) the runs happen in the torchrun processes themselves; "
                               "drop --executor/--gpus/--workers")
        # Under DDP rank 0 reads the store once and every rank runs its list, in the same order.
        teacher_tasks, tasks = distributed.on_main(lambda: tasks_for(self.req, self.plan))
        done = len(self.plan.specs) - len(tasks)
        if done:
            self.log(f"{done} of {len(self.plan.specs)} runs already in {self.store.root}; skipping them")
        executor = executor or InlineExecutor(self)
        sweep = self._bar(len(teacher_tasks) + len(tasks), "sweep", 0, True)

        def report(o: Outcome) -> None:
            sweep.update(1)
            # One line per run, printed above the bars (kept with --quiet: it is output).
            line = o.summary or f"{o.label}: {o.status}" + (f": {o.error.strip().splitlines()[-1]}" if o.error else "")
            tqdm.write(f"  {line}", file=sys.stdout)

        outcomes = executor.run_waiting(teacher_tasks, report)
        lost = {o.run_id: o for o in outcomes if not o.finished}
        ready = []
        for task in tasks:
            bad = [lost[t.teacher_id] for t in task.spec.teachers if t.teacher_id in lost]
            if bad:
                o = Outcome(task.run_id, FAILED, task.label, error=f"its teacher did not finish ({bad[0].label}: "
                            f"{bad[0].status})")
                report(o)
                outcomes.append(o)
            else:
                ready.append(task)
        outcomes += executor.run_waiting(ready, report)
        sweep.close()
        return SweepResult(outcomes, done, {t.run_id for t in teacher_tasks})


def summary_line(row: dict[str, Any], label: str) -> str:
    """The line printed when a run finishes."""
    if row.get("status") == DIVERGED:
        return f"{label}: DIVERGED: {row.get('error', '')}"
    return (f"{label}: top-1 {row['top1_last']:.2f} (best {row['top1_best']:.2f} at epoch {row['best_epoch']}), "
            f"{row['train_time_s']:.1f} s" + (f", resumed at epoch {row['resumed_from_epoch']}"
                                               if row.get("resumed_from_epoch") else ""))


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
