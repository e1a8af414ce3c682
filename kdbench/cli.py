"""The `kdbench` command: run sweeps, derive reports, list what is available."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import KdbenchError, unknown
from .provenance import command_line
from .recipe import RECIPES, Recipe, get_recipe
from .registry import load_methods, parse_overrides
from .suites import Pair, Suite, all_suites, get_suite, read_published

EXAMPLES = """\
examples:
  kdbench run --methods all                      # embedded digits suite, every method (~5 min on 2 CPU cores)
  kdbench run --methods kd,fitnets --seeds 0,1,2 --set kd.temperature=8
  kdbench run --suite hinton-mnist --data-dir ~/data --epochs 10
  kdbench run --dataset cifar100 --download --pairs cifar_resnet32x4:cifar_resnet8x4 --recipe crd
  kdbench run --methods ensemble_kd --pairs cifar_resnet56+cifar_wrn_40_2:cifar_resnet20
  kdbench run --methods my_kd --plugin my_kd.py   # a method in one file, no install
  kdbench run --suite crd-table1 --gpus 0,1,2,3   # one worker process per GPU
  kdbench run --suite crd-table1 --executor ray --ray-address auto --gpus-per-run 0.25   # 4 runs per GPU
  kdbench run --suite crd-table1 --executor slurm --slurm-partition gpu --gpus-per-run 1 --slurm-max-concurrent 16
  torchrun --nproc_per_node=8 -m kdbench run --dataset /data/imagenet --pairs resnet50:resnet18   # one run, 8 GPUs
  kdbench report --metric top1_best
  kdbench list methods
"""

REPRODUCE_EXAMPLES = """\
examples:
  kdbench reproduce hinton-mnist --data-dir ~/data                     # Hinton et al. 2015, MNIST
  kdbench reproduce crd-table1 --data-dir ~/data --download           # CRD Table 1, 3 seeds, 240 epochs
  kdbench reproduce crd-table1 --pairs resnet32x4:resnet8x4 --methods ce,kd --seeds 0
  kdbench reproduce crd-table2 --epochs-scale 0.1 --dry-run           # plan and time estimate only
  kdbench reproduce crd-table1 --synthetic --epochs 1                 # smoke run without CIFAR (NOT REAL DATA)
  kdbench reproduce my-suite.toml                                     # a copy of a suite file, edited
"""


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers like 0,1,2, got '{text}'") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed")
    return seeds


def _number(cast: type, *, low: float, high: float = float("inf"), low_open: bool = False,
            what: str) -> Any:
    """An argparse type: ``cast(text)`` within [low, high] (or (low, high]), else a message saying what it takes."""
    def parse(text: str) -> Any:
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not ((v > low if low_open else v >= low) and v <= high):  # NaN fails too
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v
    return parse


_positive = _number(int, low=1, what="a positive integer")
_nonnegative_int = _number(int, low=0, what="a whole number >= 0")
_nonnegative_float = _number(float, low=0, what="a number >= 0 like 0.25")
_fraction = _number(float, low=0, low_open=True, high=1, what="a number in (0, 1] like 0.1 (--epochs-scale must be "
                    "in (0, 1])")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdbench",
        description="Benchmark knowledge-distillation methods over the timm model zoo: accuracy, size "
                    "and speed, with provenance for every number.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kdbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="train and evaluate methods over teacher→student pairs, then write the report",
        description=textwrap.fill(
            "Train every (method × pair × seed) of a suite, one results row per finished run. Runs already in the "
            "results folder are skipped, so re-running a command resumes it. Teachers without a checkpoint are "
            "trained once per (model, dataset, recipe, seed) and cached.", 88),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_options(run, reproduce=False)

    repro = sub.add_parser(
        "reproduce", help="run a suite with published numbers and compare them with kdbench's, cell by cell",
        description=textwrap.fill(
            "Run a suite that has published numbers (crd-table1, crd-table2, hinton-mnist; `kdbench list suites`), "
            "then write a table per published cell: the paper's value, kdbench's mean ± std over seeds at the same "
            "selection rule (last or best epoch) with the other rule beside it, the gap Δ and a verdict within "
            "tolerance, plus a published-vs-kdbench plot. Finished runs are reused, so re-running resumes; a "
            "shortened schedule or synthetic data is marked in every output.", 88),
        epilog=REPRODUCE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    repro.add_argument("suite", metavar="SUITE", help="a built-in suite name or a suite .toml file")
    _run_options(repro, reproduce=True)

    rep = sub.add_parser("report", help="derive tables and plots from a results folder",
                         description="Derive markdown/CSV tables and PNG plots from the rows in a results folder.")
    rep.add_argument("--results-dir", type=Path, default=None, help="results folder (default: $KDBENCH_RESULTS, "
                     "else ./kdbench-results)")
    rep.add_argument("--out", type=Path, default=None, help="where to write (default: RESULTS_DIR/report)")
    rep.add_argument("--metric", default="top1_last", choices=["top1_last", "top1_best", "top5_last", "top5_best"],
                     help="accuracy shown (default top1_last: the CRD tables report the last epoch; "
                          "the DKD tables the best)")

    ls = sub.add_parser("list", help="list methods, models, suites, recipes or datasets")
    ls.add_argument("what", choices=["methods", "models", "suites", "recipes", "datasets"])
    ls.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE.py",
                    help="also load method classes from this file")
    return parser


def _run_options(parser: argparse.ArgumentParser, *, reproduce: bool) -> None:
    """The options `run` and `reproduce` share (reproduce takes its suite as an argument)."""
    what = parser.add_argument_group("what to run")
    if not reproduce:
        what.add_argument("--suite", default="digits", help="built-in suite name or a suite .toml file (default: "
                          "digits, the embedded data; see `kdbench list suites`)")
    what.add_argument("--methods", default=None, help="comma-separated method names, or 'all' (default: the "
                      "suite's methods, else all). A method is left out of a pair with more teachers than it takes, "
                      "unless you named it here")
    what.add_argument("--pairs", help="comma-separated TEACHER[+TEACHER...]:STUDENT pairs of timm model names"
                      + (" (CRD names like resnet56:resnet20 work too), a subset of the suite's" if reproduce else
                         ", replacing the suite's (e.g. cifar_resnet56:cifar_resnet20); MODEL@N fixes a teacher's "
                         "seed"))
    what.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default: the suite's, e.g. 0); tables "
                      "show mean ± std over them")
    what.add_argument("--set", dest="sets", action="append", default=[], metavar="METHOD.HP=VALUE",
                      help="override a method hyperparameter, e.g. --set kd.temperature=8 (repeatable)")
    what.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE.py",
                      help="load method classes from a Python file (repeatable)")
    what.add_argument("--teacher-checkpoint", dest="teacher_ckpts", action="append", default=[],
                      metavar="[MODEL=]FILE", help="use these weights for a teacher instead of training it "
                      "(a state dict, or a dict with it under 'model' as RepDistiller publishes)")
    data = parser.add_argument_group("data")
    if reproduce:
        data.add_argument("--synthetic", action="store_true", help="train on random images shaped like the "
                          "suite's dataset (torchvision FakeData, 512 train / 256 test) instead of the real data: "
                          "checks that the whole suite runs; every output is marked NOT REAL DATA")
    else:
        data.add_argument("--dataset", help="digits, mnist, fashion_mnist, cifar10, cifar100, synthetic:NAME, or an "
                          "ImageFolder path with train/ and val/ (default: the suite's)")
    data.add_argument("--data-dir", help="where torchvision datasets live (default: $KDBENCH_DATA, else "
                      "~/.cache/kdbench/data)")
    data.add_argument("--download", action="store_true", help="let torchvision download a missing dataset")
    data.add_argument("--limit", type=_positive, default=0, metavar="N",
                      help="use only the first N train and N test images (smoke tests; labelled in every output)")
    data.add_argument("--pad-to", type=_positive, default=None, metavar="S", help="zero-pad images to S×S, e.g. "
                      "28×28 Fashion-MNIST to 32 for CIFAR models (default: the suite's, else none)")
    train = parser.add_argument_group("training")
    if not reproduce:
        train.add_argument("--recipe", help="named recipe (default: the suite's; see `kdbench list recipes`)")
    train.add_argument("--epochs", type=_positive, help="train for N epochs; fewer than the recipe's own length "
                       "scales its milestones and labels the run 'shortened' everywhere")
    if reproduce:
        train.add_argument("--epochs-scale", type=_fraction, metavar="F", help="train for F × the recipe's epochs "
                           "(e.g. 0.1: 24 of CRD's 240), at least 1; labelled 'shortened' everywhere")
    train.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu or cuda[:N]")
    train.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                       help="auto: bf16 on a GPU, fp32 on the CPU. bf16 runs the forward passes under autocast; "
                            "weights, optimizer, BatchNorm statistics and losses stay fp32. Part of each run's id")
    train.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                       help="torch.compile the training step (CUDA graphs on a GPU); auto: on on a GPU")
    train.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                       help="NHWC memory format for models and batches; auto: on on a GPU")
    train.add_argument("--teacher-cache", default="auto", choices=["auto", "on", "off"],
                       help="compute each teacher's outputs once for every augmented view (162 per CIFAR image) "
                            "and reuse them in every run of that teacher; only for methods that need no feature "
                            "maps. auto: on a GPU, when it saves teacher compute. Kept in RESULTS_DIR/cache")
    ex = parser.add_argument_group(
        "where runs happen", "Every executor writes into the same results folder (shared by all machines), skips "
        "finished runs and resumes interrupted ones from their last epoch checkpoint.")
    ex.add_argument("--executor", default="local", metavar="NAME", help="local (default: here, one run after another, "
                    "or one worker per GPU with --gpus), ray (a Ray cluster), slurm (a job array through submitit)")
    ex.add_argument("--gpus", metavar="LIST", help="local: one worker process per GPU, e.g. 0,1,2,3 or 'all'")
    ex.add_argument("--runs-per-gpu", type=_positive, default=1, metavar="K",
                    help="local with --gpus: K worker processes per GPU, each training its own run (default 1)")
    ex.add_argument("--workers", type=_positive, default=0, metavar="N",
                    help="local: N worker processes on this machine (CPU runs in parallel)")
    ex.add_argument("--gpus-per-run", type=_nonnegative_float, default=None, metavar="F", help="ray/slurm: GPUs each "
                    "run asks for; a fraction packs small runs onto one GPU (ray, e.g. 0.25). Default 1 with a GPU "
                    "device, else 0")
    ex.add_argument("--cpus-per-run", type=_nonnegative_float, default=1.0, metavar="N",
                    help="ray/slurm: CPU cores each run asks for (default 1)")
    ex.add_argument("--max-retries", type=_nonnegative_int, default=2, metavar="N",
                    help="ray: tries after the first before a failing run is reported (default 2)")
    ex.add_argument("--ray-address", metavar="ADDR", help="ray: an existing cluster ('auto', or HOST:PORT); "
                    "default: start a local one")
    ex.add_argument("--env", dest="env", action="append", default=[], metavar="NAME[=VALUE]",
                    help="ray/slurm: an environment variable the runs need (KDBENCH_* ones always travel)")
    ex.add_argument("--slurm-partition", metavar="NAME", help="slurm: partition to submit to")
    ex.add_argument("--slurm-max-concurrent", type=_positive, default=None, metavar="N",
                    help="slurm: at most N jobs of the array run at once")
    ex.add_argument("--slurm-time", type=_positive, default=240, metavar="MIN",
                    help="slurm: time limit per job in minutes (default 240); a job that hits it is requeued and "
                    "resumes")
    ex.add_argument("--slurm-mem", type=_positive, default=None, metavar="GB", help="slurm: memory per job in GB")
    ex.add_argument("--slurm-account", metavar="NAME", help="slurm: account to charge")
    ex.add_argument("--slurm-qos", metavar="NAME", help="slurm: quality of service")
    ex.add_argument("--slurm-folder", type=Path, metavar="DIR",
                    help="slurm: where submitit keeps job scripts and logs (default RESULTS_DIR/slurm)")
    ex.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                    help="slurm: any other sbatch option, e.g. --slurm-extra constraint=h100 (repeatable)")
    out = parser.add_argument_group("output")
    out.add_argument("--results-dir", type=Path, default=None, help="results folder (default: $KDBENCH_RESULTS, "
                     "else ./kdbench-results)")
    if reproduce:
        out.add_argument("--out", type=Path, default=None, help="where the comparison goes (default: "
                         "RESULTS_DIR/reproduce/SUITE)")
    out.add_argument("--throughput-batch", type=_positive, default=256, help="batch size of the inference "
                     "throughput measurement (default 256)")
    if not reproduce:
        out.add_argument("--no-report", action="store_true", help="don't derive the report at the end")
    out.add_argument("--dry-run", action="store_true", help="check everything and list the runs with an estimate "
                     "of their time on this device (from a few timed training steps); train nothing")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def results_dir(arg: Path | None) -> Path:
    return arg or Path(os.environ.get("KDBENCH_RESULTS", "kdbench-results"))


def parse_checkpoints(items: Sequence[str], pairs: Sequence[Pair]) -> dict[str, str]:
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


def model_name(name: str) -> str:
    """A timm name for a CRD benchmark name (resnet56, wrn-40-2, ShuffleNetV1) or a timm name as is."""
    from .models.crd_names import UnknownModelName, timm_name

    try:
        return timm_name(name)
    except UnknownModelName:
        return name  # any other timm model name; the planner checks it exists


def build_request(args: argparse.Namespace, suite: Suite, *, dataset: str, recipe: Recipe,
                  pairs: list[Pair]) -> Any:
    """A runner Request from the shared run/reproduce options and a suite's defaults."""
    from .runner import Request

    methods = load_methods(args.plugins)
    if args.methods is None or args.methods.strip() == "all":
        selected = list(suite.methods) if args.methods is None and suite.methods else None
        strict = False
    else:
        selected, strict = _csv(args.methods), True
    chosen = set(methods) if selected is None else set(selected)
    where = f"suite file {suite.path or suite.name}"
    for key, _ in (*suite.overrides, *suite.sweeps):
        if key.split(".")[0] not in methods:
            raise KdbenchError(f"{where}: " + str(unknown("method", key.split(".")[0], methods,
                                                         fix="Fix the name in its [hparams.X] or [sweep.X] table")))
    suite_sets = [f"{k}={v}" for k, v in suite.overrides if k.split(".")[0] in chosen]
    try:
        suite_overrides = parse_overrides(suite_sets, methods)
    except KdbenchError as exc:
        raise KdbenchError(f"{where} [hparams]: {exc}") from None
    variants: dict[str, list[dict[str, Any]]] = {}
    for key, values in suite.sweeps:
        if key.split(".")[0] not in chosen:
            continue
        try:
            parsed = [parse_overrides([f"{key}={v}"], methods) for v in values]
        except KdbenchError as exc:
            raise KdbenchError(f"{where} [sweep]: {exc}") from None
        m = key.split(".")[0]
        old = variants.get(m) or [{}]
        variants[m] = [{**o, **p[m]} for o in old for p in parsed]  # every combination
    return Request(
        methods=methods, selected=selected, pairs=pairs, dataset=dataset, recipe=recipe,
        seeds=args.seeds or suite.seeds, overrides=suite_overrides,
        pinned=parse_overrides(args.sets, methods),
        teacher_checkpoints=parse_checkpoints(args.teacher_ckpts, pairs), results_dir=results_dir(args.results_dir),
        data_dir=args.data_dir, download=args.download, limit=args.limit, device=args.device,
        throughput_batch=args.throughput_batch, quiet=args.quiet, strict=strict, variants=variants,
        recipe_by_model={k: dict(v) for k, v in suite.recipe_by_model.items()},
        model_kwargs={k: dict(v) for k, v in suite.model_kwargs.items()},
        pad_to=suite.pad_to if args.pad_to is None else args.pad_to,
        plugins=tuple(str(Path(f).resolve()) for f in args.plugins), command=command_line(),
        precision=args.precision, compile=args.compile, channels_last=args.channels_last,
        teacher_cache=args.teacher_cache,
    )


def _plan_and_print(req: Any, args: argparse.Namespace) -> Any:
    from .runner import plan

    p = plan(req)
    info = p.data.info
    print(f"kdbench: {len(p.specs)} runs on {info.name} ({info.train_size} train / {info.test_size} test images"
          f"{', first ' + str(req.limit) if req.limit else ''}"
          f"{', padded to ' + str(req.pad_to) + 'x' + str(req.pad_to) if req.pad_to else ''}), "
          f"schedule {req.recipe.label}, device {p.device}")
    if not info.real_data:
        print("  NOT REAL DATA: synthetic stand-in images; accuracies mean nothing, the run only proves the suite works")
    for note in p.skipped:
        print(f"  left out: {note}")
    if args.dry_run:
        from .estimate import estimate
        from .store import ResultsStore

        lines, total = estimate(req, p, ResultsStore(req.results_dir))
        for line in lines:
            print(line)
        print(f"kdbench: estimated {_duration(total)} on {p.device} for what is not yet in {req.results_dir} "
              "(from timed training steps of each model; evaluation and method overhead are approximate)")
    return p


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


EXECUTORS = ("local", "ray", "slurm")


def build_executor(args: argparse.Namespace, req: Any) -> Any:
    """The executor the options ask for (a name already checked); None means here, in this process."""
    name = args.executor
    env = _env_vars(args.env)
    if name == "local":
        if args.runs_per_gpu > 1 and not args.gpus:
            raise KdbenchError("--runs-per-gpu needs --gpus (which GPUs to pack the runs onto), e.g. --gpus all")
        if args.gpus and args.workers:
            raise KdbenchError("give --gpus or --workers, not both (--gpus starts one worker per GPU)")
        if args.gpus:
            import torch

            gpus = ([str(i) for i in range(torch.cuda.device_count())] if args.gpus.strip() == "all"
                    else _csv(args.gpus))
            if not gpus:
                raise KdbenchError("--gpus all: torch sees no CUDA GPU on this machine; drop --gpus")
            from .executors.local import LocalExecutor
            # Several processes per GPU: small CIFAR models leave an H100 mostly idle at batch 64,
            # and separate processes keep each run's data order, augmentation and BN statistics.
            return LocalExecutor(gpus=[g for g in gpus for _ in range(args.runs_per_gpu)])
        if args.workers > 1:
            from .executors.local import LocalExecutor
            return LocalExecutor(workers=args.workers)
        return None
    if name == "ray":
        from .executors.ray_executor import RayExecutor

        return RayExecutor(address=args.ray_address, gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run,
                           max_retries=args.max_retries, env=env)
    from .executors.slurm_executor import SlurmExecutor

    extra = {}
    for item in args.slurm_extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KdbenchError(f"--slurm-extra '{item}': write KEY=VALUE, e.g. constraint=h100")
        extra[key] = value
    return SlurmExecutor(folder=args.slurm_folder or Path(req.results_dir).resolve() / "slurm", cluster="slurm",
                         partition=args.slurm_partition, max_concurrent=args.slurm_max_concurrent,
                         time_min=args.slurm_time, gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run,
                         mem_gb=args.slurm_mem, account=args.slurm_account, qos=args.slurm_qos, extra=extra, env=env)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _env_vars(items: Sequence[str]) -> dict[str, str]:
    from .executors.base import worker_env

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


def _plan_and_execute(req: Any, args: argparse.Namespace) -> tuple[Any, int]:
    """Plan (printing it), then run what is not in the store yet; (plan, exit code), plan None for --dry-run."""
    from . import distributed
    from .runner import Runner, resolve_device
    from .store import ResultsStore

    store = ResultsStore(req.results_dir)
    if args.executor not in EXECUTORS:
        raise unknown("executor", args.executor, EXECUTORS, fix="See `kdbench run --help`, section 'where runs happen'.")
    # Under torchrun: join the process group first, so the plan's runs carry the world size.
    distributed.check_options(executor=args.executor, gpus=args.gpus, workers=args.workers)
    if distributed.launched():
        distributed.init(resolve_device(req.device))
    if args.executor in ("ray", "slurm"):
        # The runs' device is the workers', not this machine's (a login node may have no GPU).
        # --gpus-per-run defaults to 1 for CUDA runs: --device cuda, or auto on a machine with a GPU.
        if args.gpus_per_run is None:
            args.gpus_per_run = 1.0 if req.device.startswith("cuda") or (req.device == "auto" and _has_cuda()) else 0.0
        gpus = args.gpus_per_run
        if req.device == "auto":
            req.device = "cuda" if gpus > 0 else "cpu"
        if req.device.startswith("cuda") and gpus == 0:
            raise KdbenchError(f"--device {req.device} with --gpus-per-run 0: the runs would get no GPU; "
                               "give --gpus-per-run (e.g. 1, or 0.25 to pack runs) or --device cpu")
        req.remote = True
    p = _plan_and_print(req, args)
    if args.dry_run:
        return None, 0
    store.check_writable()  # after the checks of the plan, before anything trains
    executor = build_executor(args, req)
    try:
        sweep = Runner(req, p, store).execute(executor)
    finally:
        if executor is not None:
            executor.close()
    bad = sweep.unfinished
    print(f"kdbench: {sweep.ran} runs finished, {sweep.skipped} already done"
          + (f", {len(bad)} not finished" if bad else "") + f"; rows in {store.runs}")
    for o in bad:
        where = store.error_path(o.run_id)
        print(f"  not finished: {o.label}: {o.status}" + (f": {o.error.strip().splitlines()[-1]}" if o.error else "")
              + (f" (traceback: {where})" if where.is_file() else ""), file=sys.stderr)
    if bad:
        print("kdbench: re-run the same command to retry the runs that did not finish; finished ones are kept",
              file=sys.stderr)
    return p, 1 if bad else 0


def cmd_run(args: argparse.Namespace) -> int:
    suite = get_suite(args.suite)
    recipe = get_recipe(args.recipe) if args.recipe else suite.recipe
    if args.epochs:
        recipe = recipe.with_epochs(args.epochs)
    pairs = [Pair.parse(p) for p in _csv(args.pairs)] if args.pairs else list(suite.pairs)
    req = build_request(args, suite, dataset=args.dataset or suite.dataset, recipe=recipe, pairs=pairs)
    p, rc = _plan_and_execute(req, args)
    if p is None:
        return rc
    if not args.no_report and _is_main():
        return report(req.results_dir, None, "top1_last") or rc
    return rc


def _is_main() -> bool:
    """Not one of torchrun's other ranks: rank 0 alone writes the report."""
    from . import distributed

    return distributed.is_main()


def cmd_reproduce(args: argparse.Namespace) -> int:
    suite = get_suite(args.suite)
    if suite.reproduce is None:
        raise KdbenchError(f"suite '{suite.name}' has no published numbers to compare with; run it with "
                           f"`kdbench run --suite {args.suite}` (suites with numbers: "
                           f"{', '.join(s.name for s in all_suites() if s.reproduce)})")
    pairs = list(suite.pairs)
    if args.pairs:
        # A subset of the suite's own pairs, which keep their teacher seeds, methods and hyperparameters.
        by_models = {(p.teachers, p.student): p for p in suite.pairs}
        pairs = []
        for w in (Pair.parse(p) for p in _csv(args.pairs)):
            key = (tuple(model_name(t) for t in w.teachers), model_name(w.student))
            if key not in by_models:
                raise KdbenchError(f"pair {'+'.join(key[0])}→{key[1]} is not in suite '{suite.name}'; its pairs: "
                                   f"{', '.join(p.label for p in suite.pairs)}")
            pairs.append(by_models[key])
    if args.epochs and args.epochs_scale:
        raise KdbenchError("give --epochs or --epochs-scale, not both")
    recipe = suite.recipe
    if args.epochs_scale:
        recipe = recipe.with_epochs(max(1, round(recipe.epochs * args.epochs_scale)))
    elif args.epochs:
        recipe = recipe.with_epochs(args.epochs)
    dataset = f"synthetic:{suite.dataset}" if args.synthetic else suite.dataset
    req = build_request(args, suite, dataset=dataset, recipe=recipe, pairs=pairs)
    p, rc = _plan_and_execute(req, args)
    if p is None or not _is_main():
        return rc
    return write_comparison(suite, req, p, args.out or req.results_dir / "reproduce" / suite.name) or rc


def suite_file(suite: Suite) -> str:
    """A suite's file as users find it: benchmarks/suites/NAME.toml for the built-in ones."""
    from .suites import builtin_dir

    path = suite.path or Path(suite.name)
    if path.parent.resolve() == builtin_dir().resolve():
        return f"benchmarks/suites/{path.name}"
    return str(path)


def write_comparison(suite: Suite, req: Any, p: Any, out: Path) -> int:
    """Compare the plan's finished rows with the suite's published cells and write the outputs."""
    from .compare import Cell, check_ordering, compare, write_reproduction
    from .report import load_rows

    ids = {s.run_id for s in p.specs} | {t.teacher_id for s in p.specs for t in s.teachers}
    rows = load_rows(req.results_dir)
    rows = rows[rows["run_id"].isin(ids)]
    pairs = {(pr.teachers, pr.student) for pr in req.pairs}
    cells = [Cell(**c) for c in read_published(suite, model_name) if (c["teachers"], c["student"]) in pairs]
    tol = suite.reproduce.tolerance
    table = compare(rows, cells, tol)
    ordering = check_ordering(table, tol.ordering) if tol.ordering else []
    data = rows["dataset"].iloc[0] if len(rows) else req.dataset
    title = f"{suite.name}: published vs kdbench, {data}, schedule {req.recipe.label}"
    notes = [*suite.reproduce.notes, f"Suite file: {suite_file(suite)}."]
    paths = write_reproduction(table, out, suite=suite.name, title=title, ordering_lines=ordering,
                               extra_notes=notes)
    judged = table[table["verdict"].isin(["within", "outside"])]
    print(f"kdbench reproduce: {int((judged['verdict'] == 'within').sum())} of {len(judged)} cells within tolerance"
          + ("; NOT REAL DATA" if (table["verdict"] == "not real data").any() else ""))
    for line in ordering:
        print(f"  {line}")
    for path in paths:
        print(f"  {path}")
    return 0


def report(root: Path, out: Path | None, metric: str) -> int:
    from .report import build_report

    out = out or root / "report"
    paths = build_report(root, out, metric=metric)
    print(f"kdbench report: {len(paths)} files in {out}")
    for path in paths:
        print(f"  {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        for name, cls in load_methods(args.plugins).items():
            print(f"{name}  ({cls.teachers_taken()})\n  {cls.summary()}\n  paper: {cls.paper}")
            for hp, default in cls.hyperparameters().items():
                print(f"    {name}.{hp} = {default!r}")
            print()
    elif args.what == "suites":
        for su in all_suites():
            r = su.recipe
            extra = "; compare with `kdbench reproduce`" if su.reproduce else ""
            print(f"{su.name}: dataset {su.dataset}{f' padded to {su.pad_to}' if su.pad_to else ''}, recipe {r.label}, "
                  f"seeds {','.join(map(str, su.seeds))}, methods {','.join(su.methods) or 'all'}{extra}")
            print(textwrap.indent(textwrap.fill(su.description, 96), "  "))
            for pr in su.pairs:
                print(f"    {'+'.join(pr.teacher_labels)}:{pr.student}"
                      + (f"  ({', '.join(pr.methods)})" if pr.methods else ""))
            for model, extra_fields in su.recipe_by_model.items():
                print(f"    recipe for {model}: {', '.join(f'{k}={v}' for k, v in extra_fields.items())}")
            print(f"    file: {su.path}")
            print()
    elif args.what == "recipes":
        for r in RECIPES.values():
            print(f"{r.name}: {r.epochs} epochs, batch {r.batch_size}, lr {r.lr} x{r.gamma} at "
                  f"{'/'.join(map(str, r.milestones))}, momentum {r.momentum}, wd {r.weight_decay}, "
                  f"crop pad {r.crop_padding}, flip {r.flip}")
            print(textwrap.indent(textwrap.fill(r.description, 96), "  "))
    elif args.what == "datasets":
        from .data import DATASETS
        for name in DATASETS:
            print(name)
        print("an ImageFolder path (a folder with train/ and val/ class folders)")
    elif args.what == "models":
        list_models()
    return 0


def list_models() -> None:
    """kdbench's zoo with parameters and MACs, counted on the models themselves."""
    from .metrics import count_params, flops_per_image
    from .models.crd_names import CRD_TO_TIMM
    from .zoo import create

    print("kdbench's CIFAR zoo, registered in timm (CRD benchmark name -> timm name); 100 classes, 32x32 input.")
    print("Any other timm model name works too (timm.list_models()).\n")
    print(f"  {'CRD name':<12} {'timm name':<22} {'params':>11} {'MACs/image':>14}")
    groups = [("", [(crd, name) for crd, name in CRD_TO_TIMM.items()], 100, 3, 32),
              ("\n  Hinton et al. 2015 MNIST MLPs; 10 classes, 1x28x28 input.",
               [("", "hinton_mlp_1200"), ("", "hinton_mlp_800")], 10, 1, 28)]
    for heading, models, classes, chans, size in groups:
        if heading:
            print(heading)
        for crd, name in models:
            model = create(name, num_classes=classes, in_chans=chans, img_size=size)
            macs = flops_per_image(model, (chans, size, size)) // 2
            print(f"  {crd:<12} {name:<22} {count_params(model):>11,} {macs:>14,}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from . import distributed

    distributed.silence_other_ranks()  # under torchrun, rank 0 prints the plan and the runs
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "reproduce":
            return cmd_reproduce(args)
        if args.command == "report":
            return report(results_dir(args.results_dir), args.out, args.metric)
        return cmd_list(args)
    except KdbenchError as exc:
        print(f"kdbench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kdbench: interrupted; finished runs are kept, re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
