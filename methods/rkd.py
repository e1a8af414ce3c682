"""Relational knowledge distillation: match distances and angles (Park et al. 2019)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.method import Batch, Method, Outputs, Taps, check_weights


def pairwise_distances(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between the rows of ``x``; the diagonal is exactly 0.

    Computed from the Gram matrix with a clamp, so the zero diagonal never takes a sqrt(0)
    gradient (which would be NaN).
    """
    sq = x.pow(2).sum(dim=1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * x @ x.t()).clamp(min=eps)
    d = d2.sqrt().clone()
    d.fill_diagonal_(0)
    return d


def normalized_distances(x: Tensor) -> Tensor:
    """Pairwise distances divided by their mean over distinct pairs (the paper's μ)."""
    d = pairwise_distances(x)
    # The mean over positive entries, written without boolean indexing (whose data-dependent shape
    # makes a GPU wait for the host every step); distances are >= 0, so the sum is theirs.
    return d / (d.sum() / (d > 0).sum())


def angles(x: Tensor) -> Tensor:
    """Cosines of the angles ∠(x_i, x_j, x_k) for all triplets, flattened."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
    return torch.bmm(e, e.transpose(1, 2)).reshape(-1)


class RKD(Method):
    """Distance- and angle-wise relations between the pooled pre-logit vectors, smooth-L1.

    Defaults are the CRD benchmark's: CE weight 1, distance weight 25, angle weight 50.
    """

    name = "rkd"
    paper = "Park, Kim, Lu, Cho: Relational Knowledge Distillation, CVPR 2019"

    def __init__(self, *, ce_weight: float = 1.0, distance_weight: float = 25.0,
                 angle_weight: float = 50.0) -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(distance_weight=distance_weight, angle_weight=angle_weight)
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def taps(self) -> Taps:
        return Taps(pooled=True)

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        s = student.pooled.flatten(1)
        t = teachers[0].pooled.flatten(1)
        return {
            "rkd_distance": self.distance_weight
            * F.smooth_l1_loss(normalized_distances(s), normalized_distances(t)),
            "rkd_angle": self.angle_weight * F.smooth_l1_loss(angles(s), angles(t)),
        }
