"""Distillation from an ensemble of teachers into one student."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.losses import kd_loss, soft_kl
from kdbench.method import Batch, Method, Outputs, Probe, check_temperature, check_weights

COMBINE = ("mean_probs", "mean_kl", "mean_logits")


class EnsembleKD(Method):
    """KD from one or more teachers, combined in a named way.

    ``combine``:
      - ``mean_probs``: KL to the (weighted) mean of the teachers' tempered probabilities
        (Hinton et al. 2015, section 4: the ensemble's soft targets);
      - ``mean_kl``: (weighted) mean of the per-teacher KD terms;
      - ``mean_logits``: KL to the tempered softmax of the (weighted) mean logits.
    ``teacher_weights`` (empty = equal) are normalised to sum to 1. With one teacher every
    combination equals plain KD.
    """

    name = "ensemble_kd"
    paper = "Hinton, Vinyals, Dean: Distilling the Knowledge in a Neural Network, NIPS DL Workshop 2015 (ensembles, section 4)"
    max_teachers = 64

    def __init__(self, *, ce_weight: float = 0.1, kd_weight: float = 0.9, temperature: float = 4.0,
                 combine: str = "mean_probs", teacher_weights: tuple[float, ...] = ()) -> None:
        super().__init__(ce_weight=ce_weight)
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {', '.join(COMBINE)}, got '{combine}'")
        check_temperature(temperature)
        check_weights(kd_weight=kd_weight)
        if any(w < 0 for w in teacher_weights) or (teacher_weights and sum(teacher_weights) <= 0):
            raise ValueError(f"teacher_weights must be non-negative with a positive sum, got {teacher_weights}")
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.combine = combine
        self.teacher_weights = tuple(float(w) for w in teacher_weights)

    def setup(self, student: Probe, teachers: Sequence[Probe]) -> None:
        if self.teacher_weights and len(self.teacher_weights) != len(teachers):
            raise ValueError(f"teacher_weights has {len(self.teacher_weights)} entries for "
                             f"{len(teachers)} teachers; give one weight per teacher")

    def _weights(self, n: int) -> list[float]:
        w = self.teacher_weights or (1.0,) * n
        return [x / sum(w) for x in w]

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        w = self._weights(len(teachers))
        T = self.temperature
        if self.combine == "mean_kl":
            loss = sum(wi * kd_loss(student.logits, t.logits, T) for wi, t in zip(w, teachers))
        elif self.combine == "mean_logits":
            loss = kd_loss(student.logits, sum(wi * t.logits for wi, t in zip(w, teachers)), T)
        else:
            probs = torch.stack([wi * F.softmax(t.logits / T, dim=1) for wi, t in zip(w, teachers)]).sum(0)
            loss = soft_kl(student.logits, probs, T)
        return {"kd": self.kd_weight * loss}
