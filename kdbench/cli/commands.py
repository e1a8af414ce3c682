"""`kdbench run`, `kdbench reproduce` and `kdbench report`: from parsed options to rows and reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from .. import distributed
from ..errors import KdbenchError
from ..recipe import Recipe, get_recipe
from ..suites import (
    Pair,
    Suite,
    all_suites,
    builtin_dir,
    get_suite,
    pair_label,
)
from ..published_csv import read_published
from ..sweep.driver import Sweep
from ..sweep.plan import resolve_device
from ..sweep.request import Request
from .args import _csv, results_dir
from .build import build_executor, build_request, local_gpus, model_name


def _print_plan(sweep: Sweep) -> None:
    req, info = sweep.req, sweep.data.info
    print(f"kdbench: {len(sweep.plan.specs)} runs on {info.name} ({info.train_size} train / {info.test_size} test "
          f"images{', first ' + str(req.limit) if req.limit else ''}"
          f"{', padded to ' + str(req.pad_to) + 'x' + str(req.pad_to) if req.pad_to else ''}), "
          f"schedule {req.recipe.label}, device {sweep.device}")
    if not info.real_data:
        print("  NOT REAL DATA: synthetic stand-in images; accuracies mean nothing, the run only proves the suite works")
    for note in sweep.plan.skipped:
        print(f"  left out: {note}")
    for note in sweep.plan.notes:
        print(f"  note: {note}")


def _print_estimate(sweep: Sweep) -> None:
    from ..sweep.estimate import estimate

    lines, total = estimate(sweep)
    for line in lines:
        print(line)
    print(f"kdbench: estimated {_duration(total)} on {sweep.device} for what is not yet in {sweep.req.results_dir} "
          "(from timed training steps of each model; evaluation and method overhead are approximate)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_and_execute(req: Request, args: argparse.Namespace) -> tuple[Sweep | None, int]:
    """Plan (printing it), then run what is not in the store yet; (sweep, exit code), sweep None for --dry-run."""
    # Under torchrun: join the process group first, so the plan's runs carry the world size.
    distributed.check_options(executor=args.executor, gpus=args.gpus, workers=args.workers)
    local_gpus(args)  # a GPU this machine lacks: refused before planning (and before the results folder is made)
    if distributed.launched():
        distributed.init(resolve_device(req.device))
    sweep = Sweep.prepare(req)
    _print_plan(sweep)
    if args.dry_run:
        _print_estimate(sweep)
        return None, 0
    sweep.store.check_writable()  # after the checks of the plan, before anything trains
    executor = build_executor(args, req)
    try:
        result = sweep.execute(executor)
    finally:
        if executor is not None:
            executor.close()
    bad = result.unfinished
    store = sweep.store
    print(f"kdbench: {result.ran} runs finished, {result.skipped} already done"
          + (f", {len(bad)} not finished" if bad else "") + f"; rows in {store.runs}")
    for o in bad:
        where = store.error_path(o.run_id)
        print(f"  not finished: {o.label}: {o.status}" + (f": {o.error.strip().splitlines()[-1]}" if o.error else "")
              + (f" (traceback: {where})" if where.is_file() else ""), file=sys.stderr)
    if bad:
        print("kdbench: re-run the same command to retry the runs that did not finish; finished ones are kept",
              file=sys.stderr)
    return sweep, 1 if bad else 0


def cmd_run(args: argparse.Namespace) -> int:
    suite = get_suite(args.suite)
    recipe = get_recipe(args.recipe) if args.recipe else suite.recipe
    if args.epochs:
        recipe = recipe.with_epochs(args.epochs)
    recipe = with_recipe_flags(recipe, args)
    pairs = [Pair.parse(p) for p in _csv(args.pairs)] if args.pairs else list(suite.pairs)
    req = build_request(args, suite, dataset=args.dataset or suite.dataset, recipe=recipe, pairs=pairs)
    sweep, rc = plan_and_execute(req, args)
    if sweep is None:
        return rc
    if not args.no_report and distributed.is_main():  # rank 0 alone writes the report
        return report(req.results_dir, None, "top1_last") or rc
    return rc


#: Recipe fields the training flags set (--val-fraction, --early-stop, --mixup, --cutmix, --mix-prob, ...).
RECIPE_FLAGS = ("val_fraction", "early_stop", "mixup_alpha", "cutmix_alpha", "mix_prob", "mix_switch_prob")


def with_recipe_flags(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    """The recipe with --val-fraction, --early-stop and the mixing flags, checked now, before anything trains.

    Like --epochs they set the sweep's recipe; a suite's [recipe.by_model.X] that sets them itself wins.
    """
    given = {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k, None) is not None}
    flags = "/".join("--" + k.replace("_alpha", "").replace("_", "-") for k in given)
    return recipe.with_overrides(given, flags) if given else recipe


def _suite_pairs(suite: Suite, wanted: str | None) -> list[Pair]:
    """A subset of the suite's own pairs, which keep their teacher seeds, methods and hyperparameters."""
    if not wanted:
        return list(suite.pairs)
    pairs = []
    for w in (Pair.parse(p) for p in _csv(wanted)):
        key = (tuple(model_name(t) for t in w.teachers), model_name(w.student))
        # Every entry of these models: a suite may list one pair once per transfer set.
        found = [p for p in suite.pairs if (p.teachers, p.student) == key and p.members == tuple(model_name(m) for m in w.members)]
        if not found:
            raise KdbenchError(f"pair {pair_label(*key)} is not in suite '{suite.name}'; its pairs: "
                               f"{', '.join(p.label for p in suite.pairs)}")
        pairs += [p for p in found if p not in pairs]
    return pairs


def cmd_reproduce(args: argparse.Namespace) -> int:
    suite = get_suite(args.suite)
    if suite.reproduce is None:
        raise KdbenchError(f"suite '{suite.name}' has no published numbers to compare with; run it with "
                           f"`kdbench run --suite {args.suite}` (suites with numbers: "
                           f"{', '.join(s.name for s in all_suites() if s.reproduce)})")
    pairs = _suite_pairs(suite, args.pairs)
    if args.epochs and args.epochs_scale:
        raise KdbenchError("give --epochs or --epochs-scale, not both")
    recipe = suite.recipe
    if args.epochs_scale:
        recipe = recipe.with_epochs(max(1, round(recipe.epochs * args.epochs_scale)))
    elif args.epochs:
        recipe = recipe.with_epochs(args.epochs)
    recipe = with_recipe_flags(recipe, args)
    dataset = f"synthetic:{suite.dataset}" if args.synthetic else suite.dataset
    req = build_request(args, suite, dataset=dataset, recipe=recipe, pairs=pairs)
    sweep, rc = plan_and_execute(req, args)
    if sweep is None or not distributed.is_main():
        return rc
    return write_comparison(suite, sweep, args.out or req.results_dir / "reproduce" / suite.name) or rc


def suite_file(suite: Suite) -> str:
    """A suite's file as users find it: benchmarks/suites/NAME.toml for the built-in ones."""
    path = suite.path or Path(suite.name)
    if path.parent.resolve() == builtin_dir().resolve():
        return f"benchmarks/suites/{path.name}"
    return str(path)


def write_comparison(suite: Suite, sweep: Sweep, out: Path) -> int:
    """Compare the sweep's finished rows with the suite's published cells and write the outputs."""
    from ..report import Cell, check_ordering, compare, load_rows, write_reproduction

    req = sweep.req
    rows = load_rows(req.results_dir)
    rows = rows[rows["run_id"].isin(sweep.plan.run_ids())]
    pairs = {(pr.teachers, pr.student) for pr in req.pairs}
    cells = [Cell(**c) for c in read_published(suite, model_name) if (c["teachers"], c["student"]) in pairs]
    tol = suite.reproduce.tolerance
    table = compare(rows, cells, tol)
    ordering = check_ordering(table, tol.ordering) if tol.ordering else []
    data = rows["dataset"].iloc[0] if len(rows) else req.dataset
    title = f"{suite.name}: published vs kdbench, {data}, schedule {req.recipe.label}"
    notes = [*suite.reproduce.notes, f"Suite file: {suite_file(suite)}."]
    paths = write_reproduction(table, out, suite=suite.name, title=title, ordering_lines=ordering,
                               extra_notes=notes, sections=transfer_sections(rows))
    judged = table[table["verdict"].isin(["within", "outside"])]
    print(f"kdbench reproduce: {int((judged['verdict'] == 'within').sum())} of {len(judged)} cells within tolerance"
          + ("; NOT REAL DATA" if (table["verdict"] == "not real data").any() else ""))
    for line in ordering:
        print(f"  {line}")
    for path in paths:
        print(f"  {path}")
    return 0


def transfer_sections(rows: pd.DataFrame) -> list[str]:
    """Markdown per transfer set: errors overall and on the absent classes, as trained, with the given
    bias offsets and with kdbench's own offsets searched on held-out images (which no paper reports)."""
    from ..report.markdown import md_table
    from ..report.transfer import errors_table

    if "transfer" not in rows:
        return []
    parts = []
    for label, group in rows[rows["transfer"].fillna("") != ""].groupby("transfer", sort=False):
        if errors := errors_table(group):
            header, lines, notes = errors
            parts += ["", f"## Transfer set {label}: test errors per class, all bias adjustments", "",
                      md_table(header, lines), ""] + [f"- {n}" for n in notes]
    return parts


def report(root: Path, out: Path | None, metric: str, ensemble_seeds: bool = False) -> int:
    from ..report import build_report

    out = out or root / "report"
    paths = build_report(root, out, metric=metric, ensemble_seeds=ensemble_seeds)
    print(f"kdbench report: {len(paths)} files in {out}")
    for path in paths:
        print(f"  {path}")
    return 0


__all__ = ["cmd_reproduce", "cmd_run", "plan_and_execute", "report", "results_dir", "write_comparison"]
