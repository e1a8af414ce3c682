"""Method hyperparameters, typed end to end, and the one rule that decides which value a run gets.

Values come from four places, each a ``{method: {name: value}}`` table: the suite file's
``[hparams.M]`` (typed TOML), a pair's own ``hparams`` (typed TOML), a suite sweep's values (typed
TOML, one run per value) and ``--set M.NAME=VALUE`` (text, parsed once by the type of the
method's default). :func:`settings` applies the precedence

    method default < suite < pair < sweep < --set

and nothing else in kdbench merges hyperparameters.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import KdbenchError, suggest, unknown
from ..method import Method
from ..values import like

#: {method: {hyperparameter: value}}
Table = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class HParams:
    """Every hyperparameter the user set, by where it was set (see :func:`settings`)."""

    suite: Table = field(default_factory=dict)
    pairs: Mapping[str, Table] = field(default_factory=dict)            # by pair label
    sweeps: Mapping[str, tuple[Mapping[str, Any], ...]] = field(default_factory=dict)  # method -> values
    cli: Table = field(default_factory=dict)                             # --set

    def methods(self) -> set[str]:
        """The methods any layer names."""
        return {*self.suite, *self.sweeps, *self.cli, *(m for t in self.pairs.values() for m in t)}


def settings(hp: HParams, method: str, pair: str) -> list[dict[str, Any]]:
    """The hyperparameters of each run of ``method`` on ``pair``: one dict per sweep value.

    The one precedence rule: method default < suite < pair < sweep < ``--set``. The method's
    defaults are not copied in: its constructor fills what is not given.
    """
    pair_values = hp.pairs.get(pair, {}).get(method, {})
    return [{**hp.suite.get(method, {}), **pair_values, **value, **hp.cli.get(method, {})}
            for value in hp.sweeps.get(method) or ({},)]


def _hyperparameter(methods: Mapping[str, type[Method]], method: str, name: str, fix: str) -> Any:
    """The default of ``method.name``, or an error naming what is unknown, what exists, and ``fix``."""
    if method not in methods:
        raise unknown("method", method, methods, fix=fix)
    defaults = methods[method].hyperparameters()
    if name not in defaults:
        listed = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
        raise KdbenchError(f"unknown hyperparameter '{name}' for method '{method}';{suggest(name, defaults)} "
                           f"it takes: {listed}")
    return defaults[name]


def from_text(text: str, default: Any, where: str) -> Any:
    """Parse ``--set`` text as the type of ``default`` (bool, int, float, str, tuple, or a literal)."""
    def bad(expected: str) -> KdbenchError:
        example = str(default).lower() if isinstance(default, bool) else default
        return KdbenchError(f"bad value for {where}: '{text}' is not {expected}; give one like the default, "
                            f"{where}={example}")

    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise bad("a boolean (true/false)")
    if isinstance(default, (int, float)):
        kind, what = (int, "an integer") if isinstance(default, int) else (float, "a number")
        try:
            return kind(text)
        except ValueError:
            raise bad(what) from None
    if isinstance(default, tuple):
        items = [t for t in text.replace(" ", "").split(",") if t]
        proto = default[0] if default else 1.0
        try:
            return tuple(from_text(t, proto, where) for t in items)
        except KdbenchError:
            raise KdbenchError(f"bad value for {where}: '{text}' is not a comma-separated list of "
                               f"numbers; write e.g. {where}=1,3") from None
    if isinstance(default, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_cli(items: Iterable[str], methods: Mapping[str, type[Method]]) -> dict[str, dict[str, Any]]:
    """``--set METHOD.NAME=VALUE`` strings as a typed table, every name and value checked."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise KdbenchError(f"--set '{item}' is not of the form METHOD.HYPERPARAMETER=VALUE "
                               "(e.g. --set kd.temperature=8)")
        default = _hyperparameter(methods, method, name, f"(in --set '{item}')")
        out.setdefault(method, {})[name] = from_text(value, default, f"{method}.{name}")
    return out


def parse_table(entries: Iterable[tuple[str, Any]], methods: Mapping[str, type[Method]],
                where: str) -> dict[str, dict[str, Any]]:
    """A suite's ``("method.name", value)`` entries (typed TOML) as a typed table, names checked."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in entries:
        method, _, name = key.partition(".")
        try:
            default = _hyperparameter(methods, method, name, "Fix the name in its [hparams.X] or [sweep.X] table.")
        except KdbenchError as exc:
            raise KdbenchError(f"{where}: {exc}") from None
        try:
            out.setdefault(method, {})[name] = like(value, default, "it")
        except ValueError as exc:
            raise KdbenchError(f"{where}: bad value for {method}.{name}: {exc}; change it there") from None
    return out


def parse_sweeps(sweeps: Sequence[tuple[str, Sequence[Any]]], methods: Mapping[str, type[Method]],
                 where: str) -> dict[str, tuple[dict[str, Any], ...]]:
    """A suite's ``[sweep.M]`` lists as, per method, every combination of their values."""
    out: dict[str, tuple[dict[str, Any], ...]] = {}
    for key, values in sweeps:
        one = [parse_table([(key, v)], methods, where) for v in values]
        method = key.partition(".")[0]
        old = out.get(method) or ({},)
        out[method] = tuple({**o, **v[method]} for o in old for v in one)
    return out
