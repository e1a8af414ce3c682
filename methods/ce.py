"""The label-only baseline: the student trained with cross-entropy and no teacher."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from kdbench.method import Batch, Method, Outputs


class CE(Method):
    """Student trained on the labels alone: the baseline every table compares against."""

    name = "ce"
    paper = "No distillation: cross-entropy on the labels (the 'student' row of the CRD tables)"
    min_teachers = 0
    max_teachers = 0

    def __init__(self, *, ce_weight: float = 1.0) -> None:
        super().__init__(ce_weight=ce_weight)

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        # The engine adds the cross-entropy term; the baseline adds nothing.
        return {}
