"""From parsed options to the frozen request and the executor: every decision made once, here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import zoo
from ..bias import Bias
from ..data.datasets import is_imagefolder
from ..data.resolution import Resolution, pretrained_resolution
from ..data.transfer import TransferSet
from ..errors import KdbenchError, unknown
from ..executors.base import Executor, worker_env
from ..files import output_folder
from ..provenance import command_line
from ..recipe import Recipe
from ..registry import load_methods
from ..suites import Pair, Suite, check_seed
from ..sweep.hparams import HParams, parse_cli, parse_sweeps, parse_table
from ..sweep.plan import device_override, resolve_device
from ..sweep.request import Request
from ..sweep.worker import do_task
from .args import _csv, results_dir

EXECUTORS = ("local", "ray", "slurm")


def parse_checkpoints(items: Sequence[str], pairs: Sequence[Pair]) -> dict[str, str]:
    """``--teacher-checkpoint [MODEL=]FILE`` items by teacher model (a bare FILE when there is one teacher)."""
    teachers = sorted({t for p in pairs for t in p.teachers})
    out: dict[str, str] = {}
    for item in items:
        model, sep, path = item.rpartition("=")
        if not sep:
            if len(teachers) != 1:
                raise KdbenchError(f"--teacher-checkpoint '{item}': this run has teachers "
                                   f"{', '.join(teachers) or '(none)'}; write MODEL=FILE to say which one it is for")
            model, path = teachers[0], item
        out[model] = path
    return out


def _pretrained_files(items: Sequence[str]) -> dict[str, str]:
    """``--pretrained-file MODEL=FILE`` items by model."""
    out = {}
    for item in items:
        model, sep, path = item.partition("=")
        if not sep or not model or not path:
            raise KdbenchError(f"--pretrained-file '{item}': write MODEL=FILE, e.g. resnet18=resnet18_weights.pth")
        out[model] = path
    return out


def model_name(name: str) -> str:
    """A timm name for a CRD benchmark name (resnet56, wrn-40-2, ShuffleNetV1) or a timm name as is."""
    from ..models.crd_names import UnknownModelName, timm_name

    try:
        return timm_name(name)
    except UnknownModelName:
        return name  # any other timm model name; the planner checks it exists


def _hparams(args: argparse.Namespace, suite: Suite, pairs: Sequence[Pair], chosen: set[str],
             methods: dict) -> HParams:
    """The suite's, its pairs' and its sweeps' hyperparameters (typed TOML) and --set's, checked."""
    where = f"suite file {suite.path or suite.name}"

    def runs(table: dict) -> dict:  # a suite may set hyperparameters of methods this run leaves out
        return {m: v for m, v in table.items() if m in chosen}

    suite_hp = parse_table(suite.hparams, methods, f"{where} [hparams]")
    sweeps = parse_sweeps(suite.sweeps, methods, f"{where} [sweep]")
    pair_hp = {p.label: runs(parse_table(p.hparams, methods, f"{where} pair {p.label}")) for p in pairs if p.hparams}
    return HParams(suite=runs(suite_hp), pairs={k: v for k, v in pair_hp.items() if v},
                   sweeps=runs(sweeps), cli=parse_cli(args.sets, methods))


def _where_runs(args: argparse.Namespace) -> tuple[str, bool, float | None]:
    """(device, remote, GPUs per run): Ray and Slurm runs use the workers' device, not this machine's
    (a login node may have no GPU); --gpus-per-run defaults to 1 for CUDA runs there."""
    if args.executor not in EXECUTORS:
        raise unknown("executor", args.executor, EXECUTORS, fix="See `kdbench run --help`, section 'where runs happen'.")
    if args.executor != "slurm" and (given := _slurm_options(args)):
        raise KdbenchError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --executor slurm, and this "
                           f"run uses the {args.executor} executor, which would ignore "
                           f"{'it' if len(given) == 1 else 'them'}; drop {'it' if len(given) == 1 else 'them'}, "
                           "or add --executor slurm")
    device, gpus = args.device, args.gpus_per_run
    if args.executor == "local":
        if not (getattr(args, "gpus", None) or getattr(args, "workers", 0) > 1):
            return device, False, gpus
        # A local worker pool: the workers train, each on its own device, and this process only plans. It plans
        # on its CPU, as for Ray and Slurm: on a GPU it would hold a copy of the dataset on GPU 0 while the
        # workers train (issue 17, item 9). The device is made concrete here (the workers' device type).
        if device == "auto":
            device = "cuda" if args.gpus else (device_override() or resolve_device("auto").type)
        return device, True, gpus
    if device == "auto":  # $KDBENCH_DEVICE, when set, is what auto means, on the workers too
        device = device_override() or device
    if gpus is None:
        gpus = 1.0 if device.startswith("cuda") or (device == "auto" and _has_cuda()) else 0.0
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device.startswith("cuda") and gpus == 0:
        raise KdbenchError(f"--device {device} with --gpus-per-run 0: the runs would get no GPU; "
                           "give --gpus-per-run (e.g. 1, or 0.25 to pack runs) or --device cpu")
    return device, True, gpus


def _resolution(args: argparse.Namespace, suite: Suite, dataset: str, pairs: Sequence[Pair]) -> Resolution:
    """--image-size, --crop-pct and --interpolation over the suite's (each given one wins on its own). Where none
    is set and an ImageFolder feeds a pretrained teacher, the teacher's own (its timm pretrained config)."""
    given = suite.resolution
    if not given.size and args.image_size is None and is_imagefolder(dataset):
        pretrained = [t for p in pairs for t in p.teachers
                      if zoo.wants_pretrained(t) or t in _pretrained_files(getattr(args, "pretrained_files", []))]
        found = next(((t, r) for t in dict.fromkeys(pretrained) if (r := pretrained_resolution(t))), None)
        if found is not None:
            teacher, given = found
            print(f"kdbench: {given.size} px (crop {given.crop_pct:g}, {given.interpolation}) from the pretrained "
                  f"config of teacher {teacher}; --image-size N sets another", file=sys.stderr)
    return Resolution(given.size if args.image_size is None else args.image_size,
                      given.crop_pct if args.crop_pct is None else args.crop_pct,
                      given.interpolation if args.interpolation is None else args.interpolation)


def _slurm_options(args: argparse.Namespace) -> list[str]:
    """The Slurm-only options given on the command line (those whose default is "not given")."""
    names = ("extra", "partition", "account", "qos", "mem", "max_concurrent", "folder")
    return [f"--slurm-{n.replace('_', '-')}" for n in names if getattr(args, f"slurm_{n}", None) not in (None, [])]


def build_request(args: argparse.Namespace, suite: Suite, *, dataset: str, recipe: Recipe,
                  pairs: list[Pair]) -> Request:
    """The frozen request from the shared run/reproduce options and a suite's defaults."""
    methods = load_methods(args.plugins)
    pairs = with_transfer(args, pairs)
    if args.methods is None or args.methods.strip() == "all":
        selected = tuple(suite.methods) if args.methods is None and suite.methods else None
        named = False
    else:
        selected, named = tuple(_csv(args.methods)), True
        if not selected:
            raise KdbenchError(f"--methods '{args.methods}' names no method, so nothing would run; give method "
                               "names (e.g. --methods kd,dkd), 'all', or leave it out for the suite's methods")
    if getattr(args, "out", None) is not None:  # kdbench reproduce --out: refused now, not after training
        output_folder(args.out, "--out")
    chosen = set(methods) if selected is None else set(selected)
    device, remote, _ = _where_runs(args)
    return Request(
        methods=selected, pairs=tuple(pairs), dataset=dataset, recipe=recipe,
        seeds=tuple(check_seed(s, "--seeds") for s in args.seeds) if args.seeds else suite.seeds,
        named=named, hparams=_hparams(args, suite, pairs, chosen, methods),
        plugins=tuple(str(Path(f).resolve()) for f in args.plugins),
        teacher_checkpoints=parse_checkpoints(args.teacher_ckpts, pairs),
        pretrained_files=_pretrained_files(getattr(args, "pretrained_files", [])),
        recipe_by_model={k: dict(v) for k, v in suite.recipe_by_model.items()},
        epochs=args.epochs or 0, epochs_scale=getattr(args, "epochs_scale", None) or 0.0,
        model_kwargs={k: dict(v) for k, v in suite.model_kwargs.items()},
        teacher_finetune=dict(suite.teacher_finetune) if suite.teacher_finetune is not None else
        {} if getattr(args, "teacher_finetune", False) else None,
        results_dir=results_dir(args.results_dir), data_dir=args.data_dir, download=args.download,
        limit=args.limit, pad_to=suite.pad_to if args.pad_to is None else args.pad_to,
        resolution=_resolution(args, suite, dataset, pairs),
        data_backend=getattr(args, "data_backend", "auto"), loader_workers=getattr(args, "loader_workers", None) or 0,
        device=device, remote=remote, throughput_batch=args.throughput_batch, quiet=args.quiet,
        runs_per_gpu=getattr(args, "runs_per_gpu", 1) if getattr(args, "gpus", None) else 1,
        command=command_line(), precision=args.precision, compile=args.compile,
        channels_last=args.channels_last, teacher_cache=args.teacher_cache,
    )


def with_transfer(args: argparse.Namespace, pairs: Sequence[Pair]) -> list[Pair]:
    """``--transfer`` and ``--bias`` (kdbench run): every pair's transfer set and bias adjustment,
    replacing what a suite's pairs entry sets."""
    changes: dict[str, Any] = {}
    if getattr(args, "transfer", None):
        changes["transfer"] = TransferSet.from_cli(args.transfer)
    if getattr(args, "bias", None):
        changes["bias"] = Bias.from_cli(args.bias)
    return [replace(p, **changes) for p in pairs] if changes else list(pairs)


def build_executor(args: argparse.Namespace, req: Request) -> Executor | None:
    """The executor the options ask for; None means here, in this process."""
    name = args.executor
    env = _env_vars(args.env)
    _, _, gpus_per_run = _where_runs(args)
    if name == "local":
        if args.runs_per_gpu > 1 and not args.gpus:
            raise KdbenchError("--runs-per-gpu needs --gpus (which GPUs to pack the runs onto), e.g. --gpus all")
        if args.gpus and args.workers:
            raise KdbenchError("give --gpus or --workers, not both (--gpus starts one worker per GPU)")
        from ..executors.local import LocalExecutor

        if args.gpus:
            gpus = local_gpus(args)
            # Several processes per GPU: small CIFAR models leave an H100 mostly idle at batch 64,
            # and separate processes keep each run's data order, augmentation and BN statistics.
            return LocalExecutor(do_task, gpus=[g for g in gpus for _ in range(args.runs_per_gpu)])
        if args.workers > 1:
            return LocalExecutor(do_task, workers=args.workers)
        return None
    if name == "ray":
        from ..executors.ray_executor import RayExecutor

        return RayExecutor(do_task, address=args.ray_address, gpus_per_run=gpus_per_run,
                           cpus_per_run=args.cpus_per_run, max_retries=args.max_retries, env=env)
    from ..executors.slurm_executor import SlurmExecutor

    extra = {}
    for item in args.slurm_extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KdbenchError(f"--slurm-extra '{item}': write KEY=VALUE, e.g. constraint=h100")
        extra[key] = value
    return SlurmExecutor(do_task, folder=args.slurm_folder or Path(req.results_dir).resolve() / "slurm",
                         cluster="slurm", partition=args.slurm_partition, max_concurrent=args.slurm_max_concurrent,
                         time_min=args.slurm_time, gpus_per_run=gpus_per_run, cpus_per_run=args.cpus_per_run,
                         mem_gb=args.slurm_mem, account=args.slurm_account, qos=args.slurm_qos, extra=extra, env=env)


def local_gpus(args: argparse.Namespace) -> list[str]:
    """The GPUs ``--gpus`` names for the local executor, as this process numbers them ([] without --gpus).

    Checked before anything is planned or written: a GPU torch does not see would leave its worker
    on the CPU (``--device auto``) while the command asked for a GPU.
    """
    if args.executor != "local" or not args.gpus:
        return []
    import torch

    count = torch.cuda.device_count()
    if args.gpus.strip() == "all":
        if not count:
            raise KdbenchError("--gpus all: torch sees no CUDA GPU on this machine; drop --gpus")
        return [str(i) for i in range(count)]
    gpus = _csv(args.gpus)
    if not gpus:
        raise KdbenchError(f"--gpus '{args.gpus}' names no GPU; give GPU indices (e.g. --gpus 0,1) or 'all'")
    if not count:
        raise KdbenchError(f"--gpus {args.gpus}: torch sees no CUDA GPU on this machine, so the runs would train on "
                           "the CPU; drop --gpus (--workers N runs N CPU processes)")
    if beyond := [g for g in gpus if g.isascii() and g.isdigit() and int(g) >= count]:
        raise KdbenchError(f"--gpus {args.gpus}: torch sees {count} GPU(s) here, numbered 0 to {count - 1}, so "
                           f"GPU {beyond[0]} is not among them; give indices from 0 to {count - 1}, or 'all'")
    return gpus


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _env_vars(items: Sequence[str]) -> dict[str, str]:
    env = worker_env()
    for item in items:
        name, sep, value = item.partition("=")
        if sep:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
        else:
            raise KdbenchError(f"--env {name}: no such variable in this shell; export it or write --env {name}=VALUE")
    return env
