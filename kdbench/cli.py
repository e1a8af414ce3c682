"""The `kdbench` command: run sweeps, derive reports, list what is available."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import KdbenchError
from .recipe import RECIPES, get_recipe
from .registry import load_methods, parse_overrides
from .suites import SUITES, Pair, get_suite

EXAMPLES = """\
examples:
  kdbench run --methods all                      # embedded digits suite, every method (~5 min on 2 CPU cores)
  kdbench run --methods kd,fitnets --seeds 0,1,2 --set kd.temperature=8
  kdbench run --suite hinton_mnist --data-dir ~/data --epochs 10
  kdbench run --dataset cifar100 --download --pairs cifar_resnet32x4:cifar_resnet8x4 --recipe crd
  kdbench run --methods ensemble_kd --pairs cifar_resnet56+cifar_wrn_40_2:cifar_resnet20
  kdbench run --methods my_kd --plugin my_kd.py   # a method in one file, no install
  kdbench report --metric top1_best
  kdbench list methods
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


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


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
        description="Train every (method × pair × seed) of a suite, one results row per finished run. Runs "
                    "already in the results folder are skipped, so re-running a command resumes it. Teachers "
                    "without a checkpoint are trained once per (model, dataset, recipe, seed) and cached.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = run.add_argument_group("what to run")
    what.add_argument("--suite", default="digits", help="suite of dataset, recipe and pairs (default: digits, "
                      "the embedded data; see `kdbench list suites`)")
    what.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (default). "
                      "With 'all', a method is left out of a pair with more teachers than it takes")
    what.add_argument("--pairs", help="comma-separated TEACHER[+TEACHER...]:STUDENT pairs of timm model "
                      "names, replacing the suite's (e.g. cifar_resnet56:cifar_resnet20)")
    what.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default: the suite's, e.g. 0); tables "
                      "show mean ± std over them")
    what.add_argument("--set", dest="sets", action="append", default=[], metavar="METHOD.HP=VALUE",
                      help="override a method hyperparameter, e.g. --set kd.temperature=8 (repeatable)")
    what.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE.py",
                      help="load method classes from a Python file (repeatable)")
    what.add_argument("--teacher-checkpoint", dest="teacher_ckpts", action="append", default=[],
                      metavar="[MODEL=]FILE", help="use these weights for a teacher instead of training it "
                      "(a state dict, or a dict with it under 'model' as RepDistiller publishes)")
    data = run.add_argument_group("data")
    data.add_argument("--dataset", help="digits, mnist, fashion_mnist, cifar10, cifar100, or an ImageFolder path "
                      "with train/ and val/ (default: the suite's)")
    data.add_argument("--data-dir", help="where torchvision datasets live (default: $KDBENCH_DATA, else "
                      "~/.cache/kdbench/data)")
    data.add_argument("--download", action="store_true", help="let torchvision download a missing dataset")
    data.add_argument("--limit", type=_positive, default=0, metavar="N",
                      help="use only the first N train and N test images (smoke tests; labelled in every output)")
    train = run.add_argument_group("training")
    train.add_argument("--recipe", help="named recipe (default: the suite's; see `kdbench list recipes`)")
    train.add_argument("--epochs", type=_positive, help="train for N epochs; fewer than the recipe's own length "
                       "scales its milestones and labels the run 'shortened' everywhere")
    train.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu or cuda[:N]")
    out = run.add_argument_group("output")
    out.add_argument("--results-dir", type=Path, default=None, help="results folder (default: $KDBENCH_RESULTS, "
                     "else ./kdbench-results)")
    out.add_argument("--throughput-batch", type=_positive, default=256, help="batch size of the inference "
                     "throughput measurement (default 256)")
    out.add_argument("--no-report", action="store_true", help="don't derive the report at the end")
    out.add_argument("--dry-run", action="store_true", help="check everything and list the runs, train nothing")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

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


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import Plan, Request, Runner, plan  # noqa: F401 (torch import is slow; only when needed)
    from .store import ResultsStore

    methods = load_methods(args.plugins)
    suite = get_suite(args.suite)
    pairs = [Pair.parse(p) for p in _csv(args.pairs)] if args.pairs else list(suite.pairs)
    recipe = get_recipe(args.recipe) if args.recipe else suite.recipe
    if args.epochs:
        recipe = recipe.with_epochs(args.epochs)
    selected = None if args.methods.strip() == "all" else _csv(args.methods)
    chosen = set(methods) if selected is None else set(selected)
    suite_sets = [f"{k}={v}" for k, v in suite.overrides if k.split(".")[0] in chosen]
    req = Request(
        methods=methods, selected=selected, pairs=pairs, dataset=args.dataset or suite.dataset, recipe=recipe,
        seeds=args.seeds or suite.seeds, overrides=parse_overrides([*suite_sets, *args.sets], methods),
        teacher_checkpoints=parse_checkpoints(args.teacher_ckpts, pairs), results_dir=results_dir(args.results_dir),
        data_dir=args.data_dir, download=args.download, limit=args.limit, device=args.device,
        throughput_batch=args.throughput_batch, quiet=args.quiet,
    )
    p = plan(req)
    info = p.data.info
    print(f"kdbench: {len(p.specs)} runs on {info.name} ({info.train_size} train / {info.test_size} test images"
          f"{', first ' + str(req.limit) if req.limit else ''}), schedule {recipe.label}, device {p.device}")
    for note in p.skipped:
        print(f"  left out: {note}")
    if args.dry_run:
        for s in p.specs:
            print(f"  {s.run_id}  {s.method:<12} {s.pair:<45} seed {s.seed}")
        return 0
    store = ResultsStore(req.results_dir)
    ran, skipped = Runner(req, p, store).execute()
    print(f"kdbench: {ran} runs finished, {skipped} already done; rows in {store.runs}")
    if not args.no_report:
        return report(req.results_dir, None, "top1_last")
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
        for s in SUITES.values():
            print(f"{s.name}: dataset {s.dataset}, recipe {s.recipe.label}, seeds {','.join(map(str, s.seeds))}")
            print(textwrap.indent(textwrap.fill(s.description, 96), "  "))
            for p in s.pairs:
                print(f"    {'+'.join(p.teachers)}:{p.student}")
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
        from .zoo import CRD_TO_TIMM
        print("kdbench's CIFAR zoo (CRD benchmark name -> timm name), plus any timm model:")
        for crd, name in CRD_TO_TIMM.items():
            print(f"  {crd:<12} -> {name}")
        print("  Hinton et al. 2015 MNIST MLPs: hinton_mlp_1200 (784-1200-1200-10), hinton_mlp_800 (784-800-800-10)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "report":
            return report(results_dir(args.results_dir), args.out, args.metric)
        return cmd_list(args)
    except KdbenchError as exc:
        print(f"kdbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdbench: interrupted; finished runs are kept, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
