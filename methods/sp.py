"""Similarity-preserving distillation: match the batch's pairwise similarities (Tung & Mori 2019)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdbench.method import Batch, Method, Outputs, Taps, check_stages, check_weights


def similarity(features: Tensor) -> Tensor:
    """The batch's similarity matrix: the Gram matrix of the flattened features, each row L2-normalised."""
    f = features.flatten(1)
    return F.normalize(f @ f.t(), p=2, dim=1)


def similarity_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Squared Frobenius distance between the two similarity matrices, divided by B².

    Only the batch dimension has to agree: each model's features may have any shape (a map, a vector).
    """
    b = student.shape[0]
    return (similarity(teacher) - similarity(student)).pow(2).sum() / (b * b)


class SP(Method):
    """Make the student's batch similarity matrix (Gram of flattened stage features) match the teacher's.

    Defaults are the CRD benchmark's (RepDistiller ``distiller_zoo/SP.py``, ``-a 0 -b 3000`` in
    ``scripts/run_cifar_distill.sh``): CE weight 1, SP weight 3000, no KD term, on the last stage
    map before pooling (RepDistiller's ``feat[-2]``, kdbench's stage -1). With several ``stages``,
    the per-stage losses are summed, as RepDistiller sums its ``loss_group``. Features are only
    flattened, so vector stages (an MLP's hidden layers) work too.
    """

    name = "sp"
    paper = "Tung, Mori: Similarity-Preserving Knowledge Distillation, ICCV 2019"

    def __init__(self, *, ce_weight: float = 1.0, sp_weight: float = 3000.0,
                 stages: tuple[int, ...] = (-1,)) -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(sp_weight=sp_weight)
        self.sp_weight = sp_weight
        self.stages = check_stages(stages, self.name)

    def taps(self) -> Taps:
        return Taps(stages=self.stages)

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        loss = sum(similarity_loss(student.stages[i], teachers[0].stages[i]) for i in self.stages)
        return {"sp": self.sp_weight * loss}
