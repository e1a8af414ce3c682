"""Bias adjustment: an offset added to some classes' logits at evaluation, and the errors it leaves.

A student distilled on a transfer set without 3s rarely predicts a 3, although the soft targets taught
it what a 3 looks like; Hinton et al. 2015 (section 3) raise the 3's bias by 3.5 and the test errors on 3s
drop from 133 to 14. kdbench applies such offsets to a run's last-epoch test logits, either given (the
paper's 3.5 and 7.6, which the paper tuned on the test set) or searched on held-out training images the
student never trained on (:func:`search_offset`), and reports both under their own names.

Syntax (a suite's pairs entry, or ``--bias``): ``bias = { 3 = 3.5 }`` (given offsets, by class index),
``bias = "val"`` (one offset shared by the classes absent from the transfer set, searched on the held-out
validation split), or both in one table: ``bias = { 3 = 3.5, search = "val" }``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import KdbenchError

#: The only search there is: on the held-out validation split (never on the test set).
SEARCH_VAL = "val"
#: The offsets the search tries: -15 to 15 in steps of 0.1 (the paper's 3.5 and 7.6 lie inside).
SEARCH_GRID: tuple[float, ...] = tuple(round(i / 10, 1) for i in range(-150, 151))
_SYNTAX = 'bias = { 3 = 3.5 } (given offsets by class), bias = "val" (searched on held-out images), or both: ' \
          'bias = { 3 = 3.5, search = "val" }'


@dataclass(frozen=True)
class Bias:
    """Which bias adjustments a run reports (the default: none)."""

    given: tuple[tuple[int, float], ...] = ()  # (class, offset), by class
    search: str = ""                           # "val": search one offset for the absent classes

    @property
    def empty(self) -> bool:
        return not self.given and not self.search

    def items(self) -> tuple[tuple[str, Any], ...]:
        """The non-default fields: what run ids hash (() for none)."""
        return tuple((k, v) for k, v in (("given", self.given), ("search", self.search)) if v)

    @classmethod
    def from_items(cls, items: Sequence[tuple[str, Any]]) -> Bias:
        d = dict(items)
        return cls(tuple((int(c), float(o)) for c, o in d.get("given", ())), str(d.get("search", "")))

    @property
    def offsets(self) -> dict[int, float]:
        return dict(self.given)

    @classmethod
    def parse(cls, value: Any, where: str) -> Bias:
        """A suite's ``bias`` value, or ``--bias`` items joined into one table; anything else is an error."""
        if isinstance(value, str):
            value = {"search": value}
        if not isinstance(value, Mapping):
            raise KdbenchError(f"{where}: bias must be written {_SYNTAX}; got {value!r}")
        given, search = [], ""
        for key, offset in value.items():
            if key == "search":
                if offset != SEARCH_VAL:
                    raise KdbenchError(f"{where}: bias search '{offset}' is not known: the only search is \"val\" "
                                       "(on held-out training images); write bias = \"val\"")
                search = SEARCH_VAL
                continue
            if not str(key).isdigit():
                raise KdbenchError(f"{where}: bias key '{key}' is neither a class index nor 'search'; write {_SYNTAX}")
            if isinstance(offset, bool) or not isinstance(offset, (int, float)) or offset != offset:
                raise KdbenchError(f"{where}: bias offset for class {key} must be a number (e.g. 3.5), got {offset!r}")
            given.append((int(key), float(offset)))
        return cls(tuple(sorted(given)), search)

    @classmethod
    def from_cli(cls, items: Iterable[str]) -> Bias:
        """``--bias`` values: ``CLASS=OFFSET`` (repeatable) and ``val``."""
        table: dict[str, Any] = {}
        for item in items:
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep:
                table["search"] = key
                continue
            try:
                table[key] = float(value)
            except ValueError:
                raise KdbenchError(f"--bias '{item}': write CLASS=OFFSET (e.g. --bias 3=3.5) or val") from None
        return cls.parse(table, "--bias")

    def check(self, num_classes: int, dataset: str, where: str) -> None:
        if bad := [c for c, _ in self.given if c >= num_classes]:
            raise KdbenchError(f"{where}: bias offset for class {', '.join(map(str, bad))}, which {dataset} lacks "
                               f"(its classes are 0-{num_classes - 1}); give offsets for its classes only")

    @property
    def label(self) -> str:
        """'3+3.5, searched on val' (for messages and progress lines)."""
        parts = [f"{c}{o:+g}" for c, o in self.given] + (["searched on val"] if self.search else [])
        return ", ".join(parts)


def shifted(logits: Tensor, offsets: Mapping[int, float]) -> Tensor:
    """``logits`` with ``offsets[c]`` added to class c's logit (a copy; the others unchanged)."""
    out = logits.clone()
    for c, offset in offsets.items():
        out[:, c] += offset
    return out


def error_counts(logits: Tensor, labels: Tensor, num_classes: int) -> tuple[int, list[int]]:
    """(top-1 errors, errors on the images of each class) of ``logits`` against ``labels``."""
    wrong = logits.argmax(1) != labels
    per_class = torch.bincount(labels[wrong].to(torch.int64), minlength=num_classes)
    return int(wrong.sum()), [int(n) for n in per_class.tolist()]


def search_offset(logits: Tensor, labels: Tensor, classes: Sequence[int],
                  grid: Sequence[float] = SEARCH_GRID) -> tuple[float, int]:
    """The one offset for ``classes`` with the fewest errors on (``logits``, ``labels``), and those errors.

    Ties go to the smallest |offset| (no adjustment is preferred to an equally good one), then the
    lower offset. Pass validation images here, never the test set.
    """
    if not grid:
        raise ValueError("search_offset needs at least one offset to try")
    best: tuple[int, float, float] | None = None
    for offset in grid:
        errors, _ = error_counts(shifted(logits, dict.fromkeys(classes, offset)), labels, logits.shape[1])
        key = (errors, abs(offset), offset)
        if best is None or key < best:
            best = key
    return best[2], best[0]  # type: ignore[index]
