"""Transfer sets: the images a student distils on, when they are not the teacher's training set.

Hinton et al. 2015 (section 3) distil an MNIST student on a transfer set without any 3s, on 7s and 8s
only, and Section 2 on unlabelled data. A :class:`TransferSet` says which images: a class-filtered part
of the suite's training set (``exclude_classes`` or ``only_classes``), the training images of another
dataset with the same classes (``dataset``), and whether the student sees their labels
(``unlabelled``). :meth:`TransferSet.apply` turns the suite's data into the student's; the test set is
always the suite dataset's whole test set, and teachers always train on the suite's training set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from ..errors import KdbenchError, suggest
from .splits import DatasetInfo, DataSplits

#: The label an unlabelled transfer set's images carry: no class, so nothing can learn from it.
UNLABELLED = -1
#: ``--transfer`` words and the field each sets.
_CLI_WORDS = {"exclude": "exclude_classes", "only": "only_classes", "dataset": "dataset", "unlabelled": "unlabelled"}


def _classes(value: Any, what: str) -> tuple[int, ...]:
    """Class indices as a sorted tuple: whole numbers >= 0, each once."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in items):
        raise KdbenchError(f"transfer {what} must be a list of class indices (whole numbers >= 0, e.g. [3] or "
                           f"[7, 8]), got {value!r}")
    if len(set(items)) != len(items):
        raise KdbenchError(f"transfer {what} names a class twice: {value!r}; list each class once")
    return tuple(sorted(items))


def _list(items: Sequence[Any]) -> str:
    return ", ".join(map(str, items))


@dataclass(frozen=True)
class TransferSet:
    """Which images a student distils on (all defaults: the suite's training set, labelled)."""

    exclude_classes: tuple[int, ...] = ()  # the suite's training set without these classes
    only_classes: tuple[int, ...] = ()     # the suite's training set with these classes only
    dataset: str = ""                      # another dataset's training images instead (same classes)
    unlabelled: bool = False               # the student gets no labels: soft targets only

    def __post_init__(self) -> None:
        for name in ("exclude_classes", "only_classes"):
            value = getattr(self, name)
            if value != ():  # the default; anything else (an empty list too) must name classes
                object.__setattr__(self, name, _classes(value, name))
        if self.exclude_classes and self.only_classes:
            raise KdbenchError(f"transfer set gives both exclude_classes {list(self.exclude_classes)} and "
                               f"only_classes {list(self.only_classes)}; give one of them (only_classes = the "
                               "classes to keep, exclude_classes = the classes to leave out)")
        if not isinstance(self.dataset, str) or not isinstance(self.unlabelled, bool):
            raise KdbenchError(f"transfer dataset must be a dataset name and unlabelled true or false, got "
                               f"{self.dataset!r} and {self.unlabelled!r}")

    # -- reading it -----------------------------------------------------------------------------
    @classmethod
    def from_table(cls, table: Any, where: str) -> TransferSet:
        """A suite's ``transfer = { exclude_classes = [3] }`` (keys: the field names)."""
        if not isinstance(table, Mapping):
            raise KdbenchError(f"{where}: 'transfer' must be a table like {{ exclude_classes = [3] }}, got {table!r}")
        known = [f.name for f in fields(cls)]
        for key in table:
            if key not in known:
                raise KdbenchError(f"{where}: unknown transfer key '{key}';{suggest(key, known)} known keys: "
                                   f"{', '.join(known)}")
        try:
            return cls(**table)
        except KdbenchError as exc:
            raise KdbenchError(f"{where}: {exc}") from None

    @classmethod
    def from_cli(cls, items: Sequence[str]) -> TransferSet:
        """``--transfer`` values: ``exclude=3[,5]``, ``only=7,8``, ``dataset=NAME``, ``unlabelled``."""
        table: dict[str, Any] = {}
        for item in items:
            word, sep, value = (part.strip() for part in item.partition("="))
            key = _CLI_WORDS.get(word)
            if key is None or (key == "unlabelled") == bool(sep) or (sep and not value):
                raise KdbenchError(f"--transfer '{item}': write exclude=CLASSES, only=CLASSES, dataset=NAME or "
                                   "unlabelled (e.g. --transfer exclude=3, --transfer only=7,8)")
            if key.endswith("_classes"):
                try:
                    table[key] = [int(c) for c in value.split(",") if c.strip()]
                except ValueError:
                    raise KdbenchError(f"--transfer '{item}': classes are comma-separated indices, e.g. "
                                       f"{word}=7,8") from None
            else:
                table[key] = value if key == "dataset" else True
        try:
            return cls(**table)
        except KdbenchError as exc:
            raise KdbenchError(f"--transfer: {exc}") from None

    def items(self) -> tuple[tuple[str, Any], ...]:
        """The fields that differ from the default, sorted: what run ids hash (() for none)."""
        return tuple((f.name, getattr(self, f.name)) for f in fields(self)
                     if getattr(self, f.name) != f.default)

    @classmethod
    def from_items(cls, items: Sequence[tuple[str, Any]]) -> TransferSet:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in items})

    @property
    def empty(self) -> bool:
        """The suite's own training set, labelled: no transfer set at all."""
        return not self.items()

    @property
    def label(self) -> str:
        """How rows and tables name it: 'without 3', 'only 7, 8', 'fashion_mnist images, unlabelled'."""
        parts = [f"{self.dataset} images"] if self.dataset else []
        parts += [f"without {_list(self.exclude_classes)}"] if self.exclude_classes else []
        parts += [f"only {_list(self.only_classes)}"] if self.only_classes else []
        return ", ".join(parts + (["unlabelled"] if self.unlabelled else []))

    # -- against a dataset ----------------------------------------------------------------------
    def absent_classes(self, num_classes: int) -> tuple[int, ...]:
        """The classes the student never sees an image of (what bias adjustment is for)."""
        if self.only_classes:
            return tuple(c for c in range(num_classes) if c not in self.only_classes)
        return self.exclude_classes

    def check(self, info: DatasetInfo, where: str) -> None:
        """Class indices within the dataset's, and at least one class left."""
        n = info.num_classes
        for name in ("exclude_classes", "only_classes"):
            if bad := [c for c in getattr(self, name) if c >= n]:
                raise KdbenchError(f"{where}: transfer {name} {_list(bad)} out of range: {info.name} has classes "
                                   f"0-{n - 1}; use indices below {n}")
        if len(self.absent_classes(n)) == n:
            raise KdbenchError(f"{where}: transfer set '{self.label}' excludes every class of {info.name}, so the "
                               "student would have no image to train on; exclude fewer classes (or use "
                               "only_classes to name the ones to keep)")

    def check_source(self, suite: DatasetInfo, other: DatasetInfo, where: str) -> None:
        """Another dataset must have the suite's classes and image shape (the student is tested on the suite's)."""
        if other.num_classes != suite.num_classes:
            raise KdbenchError(f"{where}: transfer dataset {other.name} has {other.num_classes} classes but "
                               f"{suite.name} has {suite.num_classes}; a transfer dataset must have the suite's "
                               "classes: choose one with the same classes")
        if (other.in_chans, other.img_size) != (suite.in_chans, suite.img_size):
            raise KdbenchError(f"{where}: transfer dataset {other.name} has {other.in_chans}x{other.img_size}x"
                               f"{other.img_size} images but {suite.name} {suite.in_chans}x{suite.img_size}x"
                               f"{suite.img_size}; choose a dataset of the same image shape (or the suite's pad_to)")
        if other.classes != suite.classes and not self.unlabelled:
            raise KdbenchError(f"{where}: transfer dataset {other.name}'s classes ({_list(other.classes[:4])}, ...) "
                               f"are not {suite.name}'s ({_list(suite.classes[:4])}, ...), so its labels would "
                               "teach the student wrong classes; add unlabelled = true to distil on its images "
                               "with soft targets only")

    def apply(self, splits: DataSplits, *, other: DataSplits | None = None) -> DataSplits:
        """The student's data: the transfer set's training images, the suite's whole test set.

        ``splits`` is the suite's data (its training split as the student may use it); ``other`` the
        loaded ``dataset`` when one is named. Images and labels keep their order; an unlabelled set's
        labels are all :data:`UNLABELLED`. The info (normalisation included) stays the suite's: the
        student is tested on the suite's images.
        """
        if self.dataset and other is None:
            raise KdbenchError(f"transfer set '{self.label}' needs the images of {self.dataset}; load it and pass "
                               "it as other=")
        source = other if self.dataset else splits
        images, labels = source.train_images, source.train_labels
        classes = self.only_classes or self.exclude_classes
        if classes:
            keep = torch.isin(labels, torch.tensor(classes, device=labels.device))
            keep = keep if self.only_classes else ~keep
            images, labels = images[keep], labels[keep]
        if len(labels) == 0:
            raise KdbenchError(f"transfer set '{self.label}' holds no training image of {source.info.name}; "
                               "choose classes the training set has")
        if self.unlabelled:
            labels = torch.full_like(labels, UNLABELLED)
        info = replace(splits.info, train_size=len(labels))
        return DataSplits(info, images, labels, splits.test_images, splits.test_labels)

