"""Distillation on the teacher's hard predictions: its argmax as the label (Hinton, Vinyals, Dean 2015)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdbench.method import Batch, Method, Outputs, check_weights


class HardKD(Method):
    """Cross-entropy against the teacher's argmax class, optionally mixed with the true label.

    The "hard target" reading of Hinton et al. 2015: the transfer set is labelled with the class the
    teacher predicts, and the student is trained on those hard labels instead of the teacher's soft
    targets (section 2). It is what their tempered softmax ``softmax(z_t / T)`` tends to as T → 0: a
    one-hot at the teacher's argmax, with the relative probabilities of the wrong classes (the
    information soft targets carry, sections 1-2) thrown away. It is the baseline that shows what
    soft targets add, and on unlabelled data plain pseudo-labelling.

    ``loss = hard_weight · CE(student, argmax teacher) + ce_weight · CE(student, true label)`` (the
    second term is the engine's). Defaults: the teacher's labels alone (hard weight 1, CE weight 0),
    so it trains without true labels too; ``--set hard_kd.ce_weight=...`` mixes them in.
    """

    name = "hard_kd"
    paper = "Hinton, Vinyals, Dean: Distilling the Knowledge in a Neural Network, NIPS DL Workshop 2015"

    def __init__(self, *, ce_weight: float = 0.0, hard_weight: float = 1.0) -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(hard_weight=hard_weight)
        self.hard_weight = hard_weight

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        pseudo = teachers[0].logits.detach().argmax(dim=1)
        return {"hard_kd": self.hard_weight * F.cross_entropy(student.logits.float(), pseudo)}
