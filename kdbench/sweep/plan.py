"""From a request to run specs, checking everything a user can get wrong before any training.

Methods, hyperparameters, models, checkpoints, teacher counts and adapter shapes are all checked
here; the data has been loaded by then (its shape decides the models' shapes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .. import distributed, zoo
from ..data import DataSplits
from ..errors import KdbenchError, unknown
from ..features import NoPreact, NoSuchStage, probe
from ..method import Method, Probe, Taps
from ..recipe import Recipe
from ..registry import build_method, method_source
from ..suites import Pair, pair_label
from ..train.teacher_cache import cacheable
from .hparams import settings
from .request import Request
from .spec import RunSpec, TeacherSpec
from .transfer import check_pairs, load_sources, unlabelled_refusal


@dataclass
class Plan:
    """Every run of a sweep, and what planning learnt on the way."""

    specs: list[RunSpec]
    skipped: list[str]                # notes on method × pair combinations left out
    checkpoints: dict[str, str]       # teacher model -> checkpoint file
    probes: dict[tuple[str, Taps], Probe] = field(default_factory=dict)  # shapes, per (model, taps)
    #: Other datasets transfer sets take their images from, loaded and checked (sweep/transfer.py).
    sources: dict[str, DataSplits] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # other things the plan tells the user (printed with it)

    def run_ids(self) -> set[str]:
        """The ids of every planned run, the teachers' included."""
        return {s.run_id for s in self.specs} | {t.run_id for s in self.specs for t in s.teachers}


#: What ``--device auto`` means where it is set (cpu, cuda or cuda:N); unset or "auto": a GPU when torch
#: sees one. The test suite sets cpu, so that its tests mean the same on a machine with a GPU.
DEVICE_ENV = "KDBENCH_DEVICE"


def device_override() -> str | None:
    """The device ``$KDBENCH_DEVICE`` names for ``--device auto``; None when it is unset or "auto"."""
    value = os.environ.get(DEVICE_ENV, "").strip()
    if value in ("", "auto"):
        return None
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise KdbenchError(f"{DEVICE_ENV}={value!r} is not a device; set it to cpu, cuda or cuda:N (what --device "
                           "auto then means), or unset it")
    return value


def resolve_device(name: str) -> torch.device:
    """``auto`` (``$KDBENCH_DEVICE``, else a GPU when there is one), ``cpu`` or ``cuda[:N]`` as a torch
    device, or a clear error."""
    given = f"--device {name}"
    if name == "auto" and (forced := device_override()):
        name, given = forced, f"--device auto with {DEVICE_ENV}={forced}"
    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdbenchError(f"{given} asked for, but torch sees no CUDA GPU; use --device cpu")
    try:
        return distributed.local_device(torch.device(name))
    except RuntimeError:
        raise KdbenchError(f"--device '{name}' is not a torch device; use auto, cpu or cuda") from None


def dataset_label(name: str, limit: int, pad_to: int = 0, resolution: str = "", backend: str = "memory") -> str:
    """The dataset as rows name it: ``name``, ``[:N]`` for a limit, ``~Spx`` (with a crop fraction and
    interpolation where set) when resized to S×S (:attr:`Resolution.label`), ``@Spx`` when padded to S×S, and
    ``/stream`` when streamed from disk (its random resized crops come from the full image). Part of every run id:
    the same dataset at another resolution is other runs."""
    return name + (f"[:{limit}]" if limit else "") + resolution + (f"@{pad_to}px" if pad_to else "") + \
        ("/stream" if backend == "stream" else "")


def check_request(req: Request, methods: Mapping[str, type[Method]]) -> list[str]:
    """What can be checked without data: method and model names, every hyperparameter value.
    Returns the method names the request runs."""
    names = list(methods) if req.methods is None else list(req.methods)
    for name in names:
        if name not in methods:
            raise unknown("method", name, methods, fix="See `kdbench list methods`.")
    for name in sorted(req.hparams.methods() - set(names)):
        raise KdbenchError(f"--set names method '{name}', which this run does not include "
                           f"(methods: {', '.join(names)}); drop the --set, or add the method to --methods")
    for pair in req.member_pairs:
        for model in (*pair.teachers, pair.student):
            zoo.check_model_name(model)
    for model in req.recipe_by_model:
        zoo.check_model_name(model)
        req.recipe_for(model)
    for name in names:  # every value of every layer
        for pair in req.member_pairs:
            for hp in settings(req.hparams, name, pair.label):
                build_method(methods[name], hp)
    return names


def check_models(req: Request, data: DataSplits) -> dict[str, str]:
    """Model arguments and teacher checkpoints fit the data; returns the checkpoint sha256 per teacher."""
    info = data.info
    shape = {"num_classes": info.num_classes, "in_chans": info.in_chans, "img_size": info.img_size}
    for model, kwargs in req.model_kwargs.items():
        try:
            zoo.create(model, **shape, weights=False, **kwargs)
        except TypeError as exc:
            raise KdbenchError(f"model '{model}' does not take the arguments {dict(kwargs)} given for it: {exc}") from None
    teachers = {t for p in req.member_pairs for t in p.teachers}
    for model, path in req.teacher_checkpoints.items():
        if model not in teachers:
            raise KdbenchError(f"--teacher-checkpoint names model '{model}', which is no teacher of this run "
                               f"(teachers: {', '.join(sorted(teachers)) or 'none'})")
        zoo.load_checkpoint(zoo.create(model, **shape, weights=False), path, model)
    return {m: zoo.checkpoint_identity(p) for m, p in req.teacher_checkpoints.items()}


def pretrained_weights(req: Request, data: DataSplits) -> dict[str, tuple[str, bool]]:
    """Each pretrained model of the pairs (a timm tag, an ``hf-hub:`` name, or one given --pretrained-file) loaded
    once, before anything trains: missing weights are refused now, with where kdbench looked. Returns, per model,
    the identity of its weights (``sha256:<hash of the loaded tensors>``), part of its runs' ids and rows, and
    whether its classifier fits the dataset (timm kept it: the pretrained config's class count is the dataset's)."""
    info = data.info
    shape = {"num_classes": info.num_classes, "in_chans": info.in_chans, "img_size": info.img_size}
    models = {m for p in req.member_pairs for m in (*p.teachers, p.student)} - set(req.teacher_checkpoints)
    for model in req.pretrained_files:
        if model not in models:
            raise KdbenchError(f"--pretrained-file names model '{model}', which is in no pair of this run (models: "
                               f"{', '.join(sorted(models)) or 'none'})")
    out = {}
    for model in sorted(models):
        if zoo.wants_pretrained(model) or model in req.pretrained_files:
            loaded = zoo.create(model, **shape, pretrained_file=req.pretrained_files.get(model),
                                **req.kwargs_dict(model))
            fits = loaded.pretrained_cfg.get("num_classes") == info.num_classes
            out[model] = ("sha256:" + zoo.weights_identity(loaded), fits)
    return out


def check_finetune(req: Request, weights: Mapping[str, tuple[str, bool]], data: DataSplits) -> None:
    """A pretrained teacher trained for other classes gets a new classifier, which must be fine-tuned before it
    can teach: that takes --teacher-finetune or a suite's [teacher_finetune], never a silent full training."""
    if req.teacher_finetune is not None:
        return
    for model in sorted({t for p in req.member_pairs for t in p.teachers}):
        if model in weights and not weights[model][1]:
            raise KdbenchError(
                f"teacher {model} is pretrained for other classes than the {data.info.num_classes} of "
                f"{data.info.name}: its classifier is replaced, so it must be fine-tuned before it can teach. Add "
                "--teacher-finetune (its run's recipe for 10 epochs, cosine, a tenth of the learning rate) or a "
                "[teacher_finetune] table to the suite file; or give weights that fit (--teacher-checkpoint)")


def build_plan(req: Request, methods: Mapping[str, type[Method]], data: DataSplits) -> Plan:
    """Turn a request into run specs, checking everything before any training."""
    names = check_request(req, methods)
    sha = check_models(req, data)
    weights = pretrained_weights(req, data)
    check_finetune(req, weights, data)
    sources = load_sources(req, data)
    check_pairs(req, data, sources)
    device = req.device.split(":")[0] if req.remote else resolve_device(req.device).type
    world = distributed.world_size()  # a DDP run (torchrun) is another run than a single-process one
    label = dataset_label(data.info.name, req.limit, req.pad_to, req.resolution.label, data.info.backend)
    precision = req.engine_options(device).precision

    def teacher_spec(model: str, seed: int) -> TeacherSpec:
        finetune = model in weights and not weights[model][1]  # pretrained for other classes: its head is new
        return TeacherSpec(model, label, req.teacher_recipe_for(model, finetune=finetune), seed, device, sha.get(model, ""), req.limit,
                           req.kwargs_for(model), world_size=world, precision=precision,
                           weights=weights.get(model, ("", False))[0], as_is=weights.get(model, ("", False))[1])

    probes: dict[tuple[str, Taps], Probe] = {}
    fits, skipped = fitting(req, names, methods, data, probes)
    specs: dict[str, RunSpec] = {}
    uncached: dict[str, str] = {}  # method -> why its runs cannot distil from cached teacher outputs
    cached: set[str] = set()       # methods with a run that can
    for seed in req.seeds:
        for pair in req.member_pairs:
            for name in names:
                if (name, pair) not in fits:
                    continue
                uses = methods[name].max_teachers > 0  # ce ignores teachers: one run serves every pair
                teachers = pair.teachers if uses else ()
                t_seeds = pair.teacher_seeds if uses else ()
                for hp in settings(req.hparams, name, pair.label):
                    method = build_method(methods[name], hp)
                    labels = [t if s is None else f"{t}@{s}" for t, s in zip(teachers, t_seeds)]
                    spec = RunSpec(
                        method=name, hparams=tuple(sorted(method.config().items())),
                        teachers=tuple(teacher_spec(t, seed if s is None else s) for t, s in zip(teachers, t_seeds)),
                        student=pair.student, dataset=label, recipe=req.recipe_for(pair.student), seed=seed,
                        device=device, data_limit=req.limit, student_kwargs=req.kwargs_for(pair.student),
                        world_size=world, precision=precision, method_source=method_source(methods[name]),
                        pair=pair_label(labels, pair.student_text), transfer=pair.transfer, bias=pair.bias,
                        student_weights=weights.get(pair.student, ("", False))[0], ensemble=pair.members,
                        member=pair.member)
                    specs.setdefault(spec.run_id, spec)
                    if teachers:
                        if why := cache_unusable(method.taps(), spec.recipe):
                            uncached.setdefault(name, why)
                        else:
                            cached.add(name)
    notes = check_teacher_cache(req.teacher_cache, uncached, cached)
    return Plan(list(specs.values()), skipped, dict(req.teacher_checkpoints), probes, sources, notes)


def cache_unusable(taps: Taps, recipe: Recipe) -> str:
    """Why a run with these taps and this recipe cannot distil from cached teacher outputs ('' when it can)."""
    if not cacheable(taps):
        return "the method taps stage maps, which the cache does not hold"
    if recipe.mixing.enabled:
        return "mixup/CutMix: the teachers see each mixed batch, which no cached view holds"
    if recipe.rrc is not None:
        return "random resized crops: every crop is new, so no cached view holds it"
    return ""


def check_teacher_cache(mode: str, uncached: Mapping[str, str], cached: set[str]) -> list[str]:
    """``--teacher-cache on`` that no run can follow is an error, naming each method and why; beside runs
    that do use the cache, the others are notes (``on`` is then "wherever it can be used")."""
    if mode != "on" or not uncached:
        return []
    whys = [f"method '{m}' ({why})" for m, why in sorted(uncached.items())]
    if not cached:
        raise KdbenchError("--teacher-cache on, but no run of this sweep can use the teacher cache: "
                           f"{'; '.join(whys)}. Use --teacher-cache auto or off (the teachers then run online), "
                           "or add a method that taps no stage maps (e.g. kd)")
    return [f"--teacher-cache on: {m} runs its teachers online" for m in whys]


class CannotDistil(KdbenchError):
    """A method's setup refuses a pair (e.g. FitNets between a feature map and a vector)."""


def takes(cls: type[Method], pair: Pair) -> bool:
    """Whether ``cls`` can distil from the pair's number of teachers (a method of none takes any pair)."""
    n = len(pair.teachers)
    return cls.max_teachers == 0 or cls.min_teachers <= n <= cls.max_teachers


def fitting(req: Request, names: Sequence[str], methods: Mapping[str, type[Method]], data: DataSplits,
            probes: dict[tuple[str, Taps], Probe]) -> tuple[set[tuple[str, Pair]], list[str]]:
    """Which (method, pair) combinations can run, and a note on each that cannot.

    A method cannot run on a pair with a teacher count it does not take, or whose models its setup
    refuses (probed shapes, every hyperparameter setting). It is left out of that pair with a note;
    a method the user named that fits no pair at all is an error.
    """
    fits: set[tuple[str, Pair]] = set()
    notes: list[str] = []
    for name in names:
        cls = methods[name]
        pairs = [p for p in req.member_pairs if not p.methods or name in p.methods]
        why_not: list[str] = []
        for pair in pairs:
            why = "" if takes(cls, pair) else \
                f"method '{name}' takes {cls.teachers_taken()}; pair {pair.label} has {len(pair.teachers)}"
            teachers = pair.teachers if cls.max_teachers > 0 else ()
            try:
                for hp in ([] if why else settings(req.hparams, name, pair.label)):
                    check_setup(build_method(cls, hp), teachers, pair.student, data, probes,
                                unlabelled=pair.transfer.unlabelled)
            except CannotDistil as exc:
                why = str(exc)
            if why:
                why_not.append(why)
            else:
                fits.add((name, pair))
        notes += why_not
        if req.named and pairs and len(why_not) == len(pairs):  # named, and it fits no pair
            if all(not takes(cls, p) for p in pairs):
                raise KdbenchError(f"method '{name}' takes {cls.teachers_taken()}, and no pair of this run has that "
                                   f"many ({', '.join(p.label for p in pairs)}). Add such a pair (--pairs), or drop "
                                   "the method (`kdbench list methods` shows how many teachers each takes)")
            raise KdbenchError(f"method '{name}' fits none of this run's pairs: {'; '.join(why_not)}")
    return fits, sorted(set(notes))


def probe_model(name: str, taps: Taps, data: DataSplits) -> Probe:
    """Build ``name`` for the dataset and probe it; a model that cannot take its images is a user error."""
    info = data.info
    shape = (info.in_chans, info.img_size, info.img_size)
    model = zoo.create(name, num_classes=info.num_classes, in_chans=info.in_chans, img_size=info.img_size,
                       weights=False)  # shapes only: no pretrained weights needed
    try:
        return probe(model, taps, shape, name)
    except RuntimeError as exc:
        raise KdbenchError(f"model '{name}' cannot run on {info.name}'s {'x'.join(map(str, shape))} images: "
                           f"{str(exc).splitlines()[0]}. Choose a model for small inputs (e.g. kdbench's "
                           "cifar_* zoo), a dataset with larger images, or a larger --image-size (e.g. the model's own: "
                           "timm.data.resolve_data_config)") from None


def probed(name: str, taps: Taps, data: DataSplits, probes: dict[tuple[str, Taps], Probe]) -> Probe:
    """``probe_model``, once per (model, taps): shapes depend on the architecture and data, not weights."""
    if (name, taps) not in probes:
        probes[(name, taps)] = probe_model(name, taps, data)
    return probes[(name, taps)]


def check_setup(method: Method, teachers: Sequence[str], student: str, data: DataSplits,
                probes: dict[tuple[str, Taps], Probe], *, unlabelled: bool = False) -> None:
    """Run the method's setup on a copy with probed shapes: shape problems surface before training.
    With ``unlabelled`` (an unlabelled transfer set), also its forward without labels."""
    taps = method.taps()
    try:
        s = probed(student, taps, data, probes)
        ts = [probed(t, taps, data, probes) for t in teachers]
    except (NoSuchStage, NoPreact) as exc:  # the method taps what one of these models lacks: not this pair
        raise CannotDistil(f"method '{method.name}': {exc}") from None
    except KdbenchError as exc:
        raise KdbenchError(f"method '{method.name}': {exc}") from None
    copy = type(method)(**method.config())
    try:
        copy.setup(s, ts)
    except (ValueError, KeyError) as exc:
        raise CannotDistil(f"method '{method.name}' cannot distil {'+'.join(teachers)} into {student}: {exc}") from None
    for t in ts:
        if t.num_classes != s.num_classes:
            raise KdbenchError(f"teacher {t.model} outputs {t.num_classes} classes but student {student} "
                               f"outputs {s.num_classes}; both must predict the dataset's {data.info.num_classes}")
    if unlabelled and (why := unlabelled_refusal(copy, s, ts, (data.info.in_chans, data.info.img_size,
                                                               data.info.img_size))):
        raise CannotDistil(why)
