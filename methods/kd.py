"""Logit distillation with a temperature (Hinton, Vinyals, Dean 2015)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from kdbench.losses import kd_loss
from kdbench.method import Batch, Method, Outputs, check_temperature, check_weights


class KD(Method):
    """Match the teacher's temperature-softened class probabilities.

    Defaults are the CRD benchmark's (Tian et al. 2020): T = 4, CE weight 0.1, KD weight 0.9.
    """

    name = "kd"
    paper = "Hinton, Vinyals, Dean: Distilling the Knowledge in a Neural Network, NIPS DL Workshop 2015"

    def __init__(self, *, ce_weight: float = 0.1, kd_weight: float = 0.9, temperature: float = 4.0) -> None:
        super().__init__(ce_weight=ce_weight)
        check_temperature(temperature)
        check_weights(kd_weight=kd_weight)
        self.kd_weight = kd_weight
        self.temperature = temperature

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        return {"kd": self.kd_weight * kd_loss(student.logits, teachers[0].logits, self.temperature)}
