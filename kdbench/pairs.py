"""Teacher→student pairs as kdbench writes them: ``T[@SEED][+T...]:S``, with a student ensemble ``S*K`` or ``A+B``.

:class:`Pair` is one entry of a suite's ``pairs`` or of ``--pairs``; :func:`pair_label` is how rows, tables and
messages name it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .bias import Bias
from .data.transfer import TransferSet
from .ensemble import ensemble_text, parse_members
from .errors import KdbenchError
from .zoo import HF_HUB_PREFIX

PAIR_ARROW = "→"
MAX_SEED = 2**63 - 1  # seeds are whole numbers in 0..2**63-1: what torch takes as distinct seeds


def check_seed(seed: int, where: str) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise KdbenchError(f"{where}: seed {seed} is out of range; a seed is a whole number from 0 to 2**63-1 "
                           f"({MAX_SEED}), e.g. 0,1,2")
    return seed


def pair_label(teachers: Sequence[str], student: str) -> str:
    """How kdbench writes a teacher→student pair everywhere (rows, tables, messages): ``a+b→s``."""
    return f"{'+'.join(teachers)}{PAIR_ARROW}{student}"


@dataclass(frozen=True)
class Pair:
    """One or more teachers and a student; written ``T[@SEED][+T[@SEED]...]:S``.

    A teacher written ``model@N`` is trained with seed N whatever the run's seed (so three
    students of different seeds share it, or three seeds of one model form an ensemble);
    without ``@N`` a teacher is trained with the run's seed.
    """

    teachers: tuple[str, ...]
    student: str
    teacher_seeds: tuple[int | None, ...] = ()
    methods: tuple[str, ...] = ()  # only these methods run on this pair (a suite's choice; () = all)
    #: Hyperparameters for this pair only, as typed ``(method.name, value)`` (e.g. DKD's β per pair).
    hparams: tuple[tuple[str, Any], ...] = ()
    #: The images the student distils on (default: the suite's training set; kdbench.data.transfer).
    transfer: TransferSet = TransferSet()
    #: Bias adjustments its student runs report (kdbench.bias); an evaluation option.
    bias: Bias = Bias()
    #: Names this entry apart when a suite lists one pair more than once with other hyperparameters
    #: (e.g. "ls": the same methods with logit standardization); part of ``label``, not of any run id.
    tag: str = ""
    #: A student ensemble (``T:S*3``, ``T:A+B``): its members' models in order, each a student run of its own
    #: distilled from the same teachers; () for one student. ``student`` is member ``member``'s model.
    members: tuple[str, ...] = ()
    member: int = 0

    def __post_init__(self) -> None:
        if not self.teacher_seeds:
            object.__setattr__(self, "teacher_seeds", (None,) * len(self.teachers))

    @property
    def teacher_labels(self) -> tuple[str, ...]:
        return tuple(t if s is None else f"{t}@{s}" for t, s in zip(self.teachers, self.teacher_seeds))

    @property
    def label(self) -> str:
        """'a+b→s', with its transfer set named: 'a→s (transfer: without 3)', and its tag: 'a→s [ls]'.

        Hyperparameters are looked up by this label, so two entries of one pair with different
        hyperparameters need different labels (:func:`_check_repeated_pairs`).
        """
        label = pair_label(self.teacher_labels, self.student_text)
        label += f" (transfer: {self.transfer.label})" if not self.transfer.empty else ""
        return label + (f" [{self.tag}]" if self.tag else "")

    @property
    def student_text(self) -> str:
        """The student side as tables name it: 's', or an ensemble's 's×3' / 'a+b' (the same for every member)."""
        return ensemble_text(self.members) if self.members else self.student

    @property
    def occurrence(self) -> int:
        """How many earlier members of its ensemble share this member's model (0 for a single student)."""
        return self.members[:self.member].count(self.student)

    def expand(self) -> tuple[Pair, ...]:
        """One pair per student run: the members of an ensemble, else this pair itself."""
        return tuple(replace(self, student=m, member=j) for j, m in enumerate(self.members)) or (self,)

    @classmethod
    def parse(cls, text: str) -> Pair:
        # The colon of an 'hf-hub:' model name is part of the name, not the separator (either side may have one).
        hidden = text.strip().replace(HF_HUB_PREFIX, "\0")
        left, sep, student = (part.replace("\0", HF_HUB_PREFIX) for part in hidden.rpartition(":"))
        items = [t.strip() for t in left.split("+")]
        empty = " has an empty teacher name" if sep and left.strip() and not all(
            t.partition("@")[0].strip() for t in items) else ""
        if not sep or not student.strip() or not left.strip() or empty:
            raise KdbenchError(f"pair '{text}'{empty or ' is not of the form TEACHER[+TEACHER...]:STUDENT'} "
                               "(write e.g. cifar_resnet56:cifar_resnet20 or "
                               "cifar_resnet56+cifar_wrn_40_2:cifar_resnet20; model@N fixes a teacher's seed)")
        teachers, seeds = [], []
        for item in items:
            model, at, seed = item.partition("@")
            if at and not (seed.strip().isascii() and seed.strip().isdigit()):
                raise KdbenchError(f"pair '{text}': teacher '{item}' must be MODEL or MODEL@SEED with an "
                                   "integer seed (e.g. cifar_resnet56@1)")
            teachers.append(model.strip())
            seeds.append(check_seed(int(seed), f"pair '{text}'") if at else None)
        members = parse_members(student.strip(), text)
        return cls(tuple(teachers), members[0], tuple(seeds), members=members if len(members) > 1 else ())
