"""Mimic learning: L2 regression of the student's logits onto the teacher's (Ba & Caruana, NeurIPS 2014)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from kdbench.losses import logit_regression
from kdbench.method import Batch, Method, Outputs, check_weights


class LogitL2(Method):
    """Regress the student's logits onto the teacher's with a squared error, no softmax, no temperature.

    The paper's objective (section 2.2, "mimic learning via regressing logits with L2 loss"):
    ``L = 1/(2N) Σ_i ‖g(x_i) − z_i‖²``, with ``g(x_i)`` the student's logits, ``z_i`` the teacher's,
    the squared error summed over the classes and averaged over the N samples of the batch (not the
    mean over classes: that would divide by the class count as well). Defaults follow the paper,
    whose shallow mimic nets learn from the teacher's logits alone, never from the true labels:
    weight 1, CE weight 0 (so it trains on unlabelled transfer sets too).
    """

    name = "logit_l2"
    paper = "Ba, Caruana: Do Deep Nets Really Need to be Deep?, NeurIPS 2014"

    def __init__(self, *, ce_weight: float = 0.0, weight: float = 1.0) -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(weight=weight)
        self.weight = weight

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        return {"logit_l2": self.weight * logit_regression(student.logits.float(), teachers[0].logits.detach().float())}
