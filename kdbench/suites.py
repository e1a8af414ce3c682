"""Suites: a dataset, a recipe, the teacher→student pairs and the paper's numbers, as data files.

A suite is a TOML file. The built-in ones live in the repository's ``benchmarks/suites/`` folder
(installed as the ``kdbench_suites`` package); ``--suite path/to/file.toml`` runs a user's own,
typically a copy of a built-in one with a few lines changed. Every key is documented in
``benchmarks/suites/README.md``; a key kdbench does not know is an error, never ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from .bias import Bias
from .pairs import MAX_SEED, PAIR_ARROW, Pair, check_seed, pair_label  # noqa: F401  (re-exported)
from .data.resolution import Resolution
from .data.transfer import TransferSet
from .errors import KdbenchError, suggest, unknown
from .recipe import Recipe, finetune_recipe, get_recipe

@dataclass(frozen=True)
class Tolerance:
    """When a kdbench number counts as reproducing a published one (see kdbench.report.reproduce)."""

    points: float = 0.5             # accuracy cells: |Δ| <= max(sigmas·σ, points)
    sigmas: float = 2.0
    relative: float = 0.15          # test-error cells: |Δ| <= relative × published
    ordering: tuple[str, ...] = ()  # per pair, methods from best to worst (e.g. teacher, kd, ce)

    def allowed(self, metric: str, published: float, std: float) -> float:
        """The largest |Δ| still within for one cell (``std``: kdbench's σ over seeds, or NaN)."""
        if metric in ("test_errors", "test_error_pct"):
            return self.relative * abs(published)
        # One seed has no σ: the floor alone applies (max() with NaN would return NaN).
        return self.points if math.isnan(std) else max(self.sigmas * std, self.points)

    def rule(self) -> str:
        """The tolerance rule in words, for the legend."""
        return (f"top-1: |Δ| ≤ max({self.sigmas:g}σ, {self.points:g} points), σ being kdbench's "
                f"standard deviation over seeds (the floor alone for one seed); test errors: "
                f"|Δ| ≤ {self.relative:.0%} of the published count")


@dataclass(frozen=True)
class Reproduction:
    """The published numbers a suite is checked against."""

    published: tuple[Path, ...]     # CSV files of published cells
    tables: tuple[str, ...] = ()    # keep only rows of these paper tables ('' = all)
    method_names: tuple[tuple[str, str], ...] = ()  # paper's method name -> kdbench's
    tolerance: Tolerance = Tolerance()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    dataset: str
    recipe: Recipe
    pairs: tuple[Pair, ...]
    seeds: tuple[int, ...] = (0,)
    #: Method hyperparameters this suite sets, as typed ``("method.name", value)``.
    hparams: tuple[tuple[str, Any], ...] = ()
    #: Hyperparameters run at several values (``"method.name"``, typed values): one run per value.
    sweeps: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    methods: tuple[str, ...] = ()   # the methods it runs by default ('' = all)
    #: Recipe fields that differ for one model (e.g. lr 0.01 for ShuffleNet students).
    recipe_by_model: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Extra ``timm.create_model`` arguments for one model wherever it is trained (dropout, ...).
    model_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    pad_to: int = 0                 # zero-pad images to this square size (e.g. 28 -> 32)
    #: The resolution its runs train and evaluate at (keys image_size, crop_pct, interpolation); default: as stored.
    resolution: Resolution = Resolution()
    reproduce: Reproduction | None = None
    path: Path | None = None        # the file it was read from
    #: How a pretrained teacher trained for other classes is fine-tuned (kdbench.recipe.finetune_recipe); None: not.
    teacher_finetune: Mapping[str, Any] | None = None


# -- reading suite files ----------------------------------------------------------------------------

_TOP_KEYS = {"name", "description", "dataset", "seeds", "methods", "pairs", "pad_to", "recipe", "hparams",
             "sweep", "models", "reproduce", "image_size", "crop_pct", "interpolation", "teacher_finetune"}
_REPRO_KEYS = {"published", "tables", "method_names", "tolerance", "notes"}
_TOL_KEYS = {"points", "sigmas", "relative", "ordering"}
#: ``create_model`` arguments kdbench passes itself; a suite's [models.X] may not set them.
_KDBENCH_KWARGS = {"num_classes", "in_chans", "img_size", "pretrained"}


def builtin_dir() -> Path:
    """The folder of the built-in suite files (``benchmarks/suites`` in the repository)."""
    return Path(str(resources.files("kdbench_suites")))


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.toml"))


def _check_keys(table: Mapping[str, Any], known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            raise KdbenchError(f"{where}: unknown key '{key}';{suggest(key, known)} known keys: "
                               f"{', '.join(sorted(known))}")


def _expect(value: Any, kind: type | tuple[type, ...], what: str, where: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise KdbenchError(f"{where}: '{what}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _pair_item(item: Any, where: str) -> Pair:
    """A pairs entry: "T:S", or a table { pair = "T:S", methods = [...], hparams = {...}, transfer = {...},
    bias = ..., tag = "..." } with this pair's own methods, hyperparameters, transfer set, bias adjustment
    and a tag naming the entry apart from another entry of the same pair."""
    try:
        if isinstance(item, str):
            return Pair.parse(item)
        _expect(item, dict, "pairs item", where)
        _check_keys(item, {"pair", "methods", "hparams", "transfer", "bias", "tag"}, f"{where} pairs item")
        pair = Pair.parse(_expect(item.get("pair", ""), str, "pair", where))
    except KdbenchError as exc:
        raise KdbenchError(f"{where}: {exc}" if where not in str(exc) else str(exc)) from None
    methods = tuple(_expect(m, str, "methods item", where) for m in _expect(item.get("methods", []), list, "methods", where))
    hparams = tuple((f"{m}.{k}", _frozen(v)) for m, hp in _expect(item.get("hparams", {}), dict, "hparams", where).items()
                    for k, v in _expect(hp, dict, f"hparams.{m}", where).items())
    at = f"{where} pair {pair.label}"
    transfer = TransferSet.from_table(item["transfer"], at) if "transfer" in item else TransferSet()
    bias = Bias.parse(item["bias"], at) if "bias" in item else Bias()
    tag = _expect(item.get("tag", ""), str, "tag", at).strip()
    if "tag" in item and (not tag or any(c in tag for c in "[]") or not tag.isprintable()):
        raise KdbenchError(f"{at}: tag {item['tag']!r} must be a short printable name without brackets, "
                           "e.g. tag = \"ls\"")
    return Pair(pair.teachers, pair.student, pair.teacher_seeds, methods, hparams, transfer, bias, tag, pair.members)


def _check_repeated_pairs(pairs: Sequence[Pair], where: str) -> None:
    """Entries of one pair (same label) must not differ in hyperparameters: runs look them up by the
    label, so one entry's would silently apply to the other's runs. A ``tag`` tells them apart."""
    seen: dict[str, Pair] = {}
    for pair in pairs:
        first = seen.setdefault(pair.label, pair)
        if first is not pair and dict(first.hparams) != dict(pair.hparams):
            raise KdbenchError(f"{where}: pair {pair.label} is listed twice with different hparams; give each "
                               "entry its own tag (e.g. tag = \"ls\") so that each keeps its own, or merge them")


def _published_file(name: str, suite_path: Path, where: str) -> Path:
    """A published-numbers CSV: beside the suite file, else among the built-in ones.

    So a copy of a built-in suite file, edited anywhere, still finds the paper's numbers.
    """
    for base in (suite_path.parent, builtin_dir()):
        if (base / name).is_file():
            return base / name
    raise KdbenchError(f"{where}: published-numbers file '{name}' was found neither beside the suite file nor "
                       f"among the built-in ones ({builtin_dir()}); give a path relative to the suite file")


def _frozen(value: Any) -> Any:
    """A TOML value kept typed, lists as tuples (suites and pairs are frozen and hashable)."""
    return tuple(map(_frozen, value)) if isinstance(value, list) else value


def _reproduction(table: Any, path: Path, where: str) -> Reproduction:
    """A suite's ``[reproduce]`` table: published-number files, tolerance, notes."""
    rep = _expect(table, dict, "reproduce", where)
    _check_keys(rep, _REPRO_KEYS, f"{where} [reproduce]")
    tol = _expect(rep.get("tolerance", {}), dict, "reproduce.tolerance", where)
    _check_keys(tol, _TOL_KEYS, f"{where} [reproduce.tolerance]")
    files = tuple(_published_file(_expect(f, str, "reproduce.published item", where), path, where)
                  for f in _expect(rep.get("published", []), list, "reproduce.published", where))
    return Reproduction(
        published=files,
        tables=tuple(str(t) for t in rep.get("tables", [])),
        method_names=tuple(sorted(_expect(rep.get("method_names", {}), dict, "reproduce.method_names",
                                          where).items())),
        tolerance=Tolerance(
            points=float(tol.get("points", 0.5)), sigmas=float(tol.get("sigmas", 2.0)),
            relative=float(tol.get("relative", 0.15)), ordering=tuple(tol.get("ordering", ())),
        ),
        notes=tuple(rep.get("notes", ())),
    )


def _suite_name(value: Any, where: str) -> str:
    """A suite's ``name``, also a folder name (RESULTS_DIR/reproduce/NAME): no path parts, not empty."""
    name = _expect(value, str, "name", where)
    if name.strip() in ("", ".", "..") or any(c in name for c in "/\\") or not name.isprintable():
        raise KdbenchError(f"{where}: name {name!r} cannot name a folder (kdbench reproduce writes into "
                           "RESULTS_DIR/reproduce/NAME); use letters, digits, '-', '_' and '.', e.g. "
                           "name = \"my-suite\"")
    return name


def _teacher_finetune(data: Mapping[str, Any], recipe: Recipe, where: str) -> dict[str, Any] | None:
    """The [teacher_finetune] table, checked now (applied per teacher); None without one."""
    if "teacher_finetune" not in data:
        return None
    table = dict(_expect(data["teacher_finetune"], dict, "teacher_finetune", where))
    finetune_recipe(recipe, table, f"{where} [teacher_finetune]")
    return table


def parse_suite(data: Mapping[str, Any], path: Path) -> Suite:
    """Build a Suite from a parsed TOML document; every mistake is reported with the file's name."""
    where = f"suite file {path}"
    _check_keys(data, _TOP_KEYS, where)
    for key in ("name", "dataset", "pairs", "recipe"):
        if key not in data:
            raise KdbenchError(f"{where}: missing required key '{key}'")
    name = _suite_name(data["name"], where)
    recipe_table = dict(_expect(data["recipe"], dict, "recipe", where))
    try:
        base = get_recipe(_expect(recipe_table.pop("base", ""), str, "recipe.base", where) or "crd")
    except KdbenchError as exc:
        raise KdbenchError(f"{where} [recipe] base: {exc}") from None
    by_model = _expect(recipe_table.pop("by_model", {}), dict, "recipe.by_model", where)
    recipe = base.with_overrides(recipe_table, f"{where} [recipe]") if recipe_table else base
    for model, extra in by_model.items():
        _expect(extra, dict, f"recipe.by_model.{model}", where)
        recipe.with_overrides(extra, f"{where} [recipe.by_model.{model}]")  # checked now, applied per run
    pairs = tuple(_pair_item(p, where) for p in _expect(data["pairs"], list, "pairs", where))
    if not pairs:
        raise KdbenchError(f"{where}: 'pairs' is empty; list at least one \"TEACHER:STUDENT\"")
    _check_repeated_pairs(pairs, where)
    seeds = tuple(check_seed(_expect(s, int, "seeds item", where), f"{where} seeds")
                  for s in _expect(data.get("seeds", [0]), list, "seeds", where))
    hparams = _expect(data.get("hparams", {}), dict, "hparams", where)
    overrides = tuple((f"{m}.{k}", _frozen(v)) for m, hp in hparams.items()
                      for k, v in _expect(hp, dict, f"hparams.{m}", where).items())
    sweeps = []
    for m, hp in _expect(data.get("sweep", {}), dict, "sweep", where).items():
        for k, values in _expect(hp, dict, f"sweep.{m}", where).items():
            values = _expect(values, list, f"sweep.{m}.{k}", where)
            if not values:
                raise KdbenchError(f"{where}: sweep.{m}.{k} is an empty list; give the values to run")
            sweeps.append((f"{m}.{k}", tuple(_frozen(v) for v in values)))
    models = _expect(data.get("models", {}), dict, "models", where)
    for model, kwargs in models.items():
        _expect(kwargs, dict, f"models.{model}", where)
        if taken := sorted(_KDBENCH_KWARGS & set(kwargs)):
            raise KdbenchError(f"{where}: [models.{model}] sets {', '.join(taken)}, which kdbench sets itself "
                               "(num_classes, in_chans and img_size from the dataset, so teachers and students "
                               "predict the same classes; pretrained=False, since weights come from training or "
                               "--teacher-checkpoint); remove it")
    reproduce = _reproduction(data["reproduce"], path, where) if "reproduce" in data else None
    finetune = _teacher_finetune(data, recipe, where)
    pad_to = _expect(data.get("pad_to", 0), int, "pad_to", where)
    try:
        resolution = Resolution(_expect(data.get("image_size", 0), int, "image_size", where),
                                float(_expect(data.get("crop_pct", 1.0), (int, float), "crop_pct", where)),
                                _expect(data.get("interpolation", "bilinear"), str, "interpolation", where))
    except KdbenchError as exc:
        raise KdbenchError(f"{where}: {exc}") from None
    return Suite(
        name=name, description=str(data.get("description", "")).strip(),
        dataset=_expect(data["dataset"], str, "dataset", where), recipe=recipe, pairs=pairs, seeds=seeds,
        hparams=overrides, sweeps=tuple(sweeps), methods=tuple(_expect(data.get("methods", []), list, "methods", where)),
        recipe_by_model={m: dict(v) for m, v in by_model.items()},
        model_kwargs={m: dict(v) for m, v in models.items()}, pad_to=pad_to, resolution=resolution,
        reproduce=reproduce, path=path, teacher_finetune=finetune,
    )


def load_suite_file(path: Path) -> Suite:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KdbenchError(f"cannot read suite file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise KdbenchError(f"suite file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                           f"{exc.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise KdbenchError(f"suite file {path} is not valid TOML: {exc}; see benchmarks/suites/README.md "
                           "for the format") from None
    return parse_suite(data, path)


def get_suite(name: str) -> Suite:
    """A built-in suite by name (``-`` and ``_`` alike), or a suite file by path."""
    path = Path(name).expanduser()
    if name.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise KdbenchError(f"suite file {path} does not exist")
        return load_suite_file(path)
    names = builtin_names()
    key = name.strip().lower().replace("_", "-")
    if key not in names:
        raise unknown("suite", name, names, fix="See `kdbench list suites`, or pass a path to a suite .toml file.")
    return load_suite_file(builtin_dir() / f"{key}.toml")


def all_suites() -> list[Suite]:
    return [get_suite(n) for n in builtin_names()]
