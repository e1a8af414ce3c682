"""DIST: distillation from a stronger teacher by correlation, not exact match (Huang et al., NeurIPS 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdbench.method import Batch, Method, Outputs, check_temperature, check_weights

#: Added to the product of norms in the Pearson correlation, as the official code does (``eps=1e-8`` in
#: ``cosine_similarity`` of ``lib/models/losses/dist_kd.py``): a constant row or column gives 0, not NaN.
EPS = 1e-8


def pearson_rows(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: the cosine of the centred rows,
    ``Σ (a - ā)(b - b̄) / (‖a - ā‖ ‖b - b̄‖ + eps)``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_class(p_s: Tensor, p_t: Tensor) -> Tensor:
    """1 - Pearson correlation across the classes of each sample, averaged over the batch."""
    return 1 - pearson_rows(p_s, p_t).mean()


def intra_class(p_s: Tensor, p_t: Tensor) -> Tensor:
    """1 - Pearson correlation across the batch for each class, averaged over the classes."""
    return inter_class(p_s.t(), p_t.t())


class DIST(Method):
    """Inter- and intra-class relations: 1 - Pearson correlation of the tempered softmaxes, times T².

    With ``Y_s = softmax(z_s / T)`` and ``Y_t = softmax(z_t / T)`` (batch × classes), the inter-class
    term correlates each row (a sample's class probabilities), the intra-class term each column (one
    class's probabilities over the batch): ``loss = β·T²·(1 - mean_i ρ(Y_s[i], Y_t[i])) +
    γ·T²·(1 - mean_j ρ(Y_s[:, j], Y_t[:, j]))``, with CE weight 1 on the labels. Only correlation
    (invariant to a shift and a positive scale of the probabilities) is matched, not the exact
    values: a weaker student need not reproduce a much stronger teacher's confidence.

    Defaults are the official CIFAR-100 setting: ``configs/strategies/distill/dist_cifar.yaml`` of
    hunto/image_classification_sota (DIST_KD's ``classification`` submodule): ``kd: dist_t4`` (T = 4,
    ``DIST(beta=1, gamma=1, tau=4)`` in ``lib/models/losses/kd_loss.py``), ``kd_loss_weight: 2`` and
    ``ori_loss_weight: 1``. The KD weight multiplies both terms, so β = γ = 2 here, CE weight 1.
    (Their ImageNet setting, ``resnet_dist.yaml``, is the same with T = 1.)
    """

    name = "dist"
    paper = "Huang, You, Wang, Qian, Xu: Knowledge Distillation from A Stronger Teacher, NeurIPS 2022"

    def __init__(self, *, ce_weight: float = 1.0, beta: float = 2.0, gamma: float = 2.0,
                 temperature: float = 4.0) -> None:
        super().__init__(ce_weight=ce_weight)
        check_temperature(temperature)
        check_weights(beta=beta, gamma=gamma)
        self.beta, self.gamma, self.temperature = beta, gamma, temperature

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        T = self.temperature
        p_s = F.softmax(student.logits.float() / T, dim=1)
        p_t = F.softmax(teachers[0].logits.detach().float() / T, dim=1)
        return {"dist_inter": self.beta * T**2 * inter_class(p_s, p_t),
                "dist_intra": self.gamma * T**2 * intra_class(p_s, p_t)}
