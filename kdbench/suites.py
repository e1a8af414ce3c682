"""Suites: a dataset, a recipe, and the teacher→student pairs to distil over, as data."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import KdbenchError, unknown
from .recipe import Recipe, get_recipe


@dataclass(frozen=True)
class Pair:
    """One or more teachers and a student; written ``T[+T...]:S`` on the command line."""

    teachers: tuple[str, ...]
    student: str

    @property
    def label(self) -> str:
        return f"{'+'.join(self.teachers)}→{self.student}"

    @classmethod
    def parse(cls, text: str) -> Pair:
        left, sep, student = text.strip().rpartition(":")
        teachers = tuple(t for t in left.split("+") if t)
        if not sep or not student or not teachers:
            raise KdbenchError(f"pair '{text}' is not of the form TEACHER[+TEACHER...]:STUDENT "
                               "(e.g. cifar_resnet56:cifar_resnet20 or "
                               "cifar_resnet56+cifar_wrn_40_2:cifar_resnet20)")
        return cls(teachers, student)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    dataset: str
    recipe: Recipe
    pairs: tuple[Pair, ...]
    seeds: tuple[int, ...] = (0,)
    #: Method hyperparameters this suite needs (e.g. a hint stage its models have); --set wins.
    overrides: tuple[tuple[str, str], ...] = ()


SUITES: dict[str, Suite] = {
    s.name: s
    for s in [
        Suite(
            name="digits",
            description="The embedded default: scikit-learn's 1,797 real 8x8 handwritten digits "
                        "(no download). CIFAR ResNets distilled at 8x8; the second pair is a "
                        "two-teacher ensemble.",
            dataset="digits",
            recipe=get_recipe("digits"),
            pairs=(
                Pair(("cifar_resnet56",), "cifar_resnet20"),
                Pair(("cifar_resnet56", "cifar_wrn_40_2"), "cifar_resnet20"),
            ),
        ),
        Suite(
            name="crd_cifar100",
            description="CRD benchmark (Tian et al. 2020) CIFAR-100 pairs available in kdbench's "
                        "zoo, on the CRD protocol (needs CIFAR-100: --data-dir or --download).",
            dataset="cifar100",
            recipe=get_recipe("crd"),
            pairs=(
                Pair(("cifar_wrn_40_2",), "cifar_wrn_16_2"),
                Pair(("cifar_resnet56",), "cifar_resnet20"),
                Pair(("cifar_resnet32x4",), "cifar_resnet8x4"),
            ),
        ),
        Suite(
            name="hinton_mnist",
            description="Hinton et al. 2015, section 3: 784-1200-1200-10 teacher into a "
                        "784-800-800-10 student on MNIST (needs MNIST: --data-dir or --download).",
            dataset="mnist",
            recipe=get_recipe("mnist_mlp"),
            pairs=(Pair(("hinton_mlp_1200",), "hinton_mlp_800"),),
            # The MLPs have two stages (the hidden layers): hint the second.
            overrides=(("fitnets.stage", "1"),),
        ),
    ]
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise unknown("suite", name, SUITES, fix="See `kdbench list suites`.")
    return SUITES[name]
