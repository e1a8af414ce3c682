"""Variational information distillation: a Gaussian model of the teacher's features (Ahn et al. 2019)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.losses import pool_to_common_size
from kdbench.method import (
    Batch,
    Method,
    Outputs,
    Probe,
    Taps,
    check_stages,
    check_weights,
)


class GaussianRegressor(nn.Module):
    """Predicts the mean of a Gaussian over a teacher stage from a student stage; learns its variance.

    The mean comes from three bias-free 1×1 convs with ReLUs between them; the teacher's channel
    count is the middle width, as in RepDistiller's ``VIDLoss(s, t, t)``. The variance is one value
    per teacher channel, ``softplus(log_scale) + eps``, starting at ``init_pred_var``. A vector
    stage (an MLP's hidden layer) is treated as a 1×1 map, so the convs act as linear layers.
    """

    def __init__(self, student: tuple[int, ...], teacher: tuple[int, ...], init_pred_var: float,
                 eps: float) -> None:
        super().__init__()
        if len(student) != len(teacher) or len(student) not in (1, 3):
            raise ValueError(f"VID needs a student and teacher stage that are both maps (C, H, W) or both "
                             f"vectors (C,); got {student} and {teacher}")
        s_c, t_c = student[0], teacher[0]
        self.regressor = nn.Sequential(
            nn.Conv2d(s_c, t_c, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(t_c, t_c, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(t_c, t_c, kernel_size=1, bias=False),
        )
        # softplus(log_scale) + eps == init_pred_var at the start: RepDistiller's
        # log(exp(init_pred_var - eps) - 1), written as x + log(1 - exp(-x)) so no value overflows
        x = init_pred_var - eps
        self.log_scale = nn.Parameter(torch.full((t_c,), x + math.log(-math.expm1(-x))))
        self.eps = eps

    def variance(self) -> Tensor:
        """The predicted variance per teacher channel."""
        return F.softplus(self.log_scale) + self.eps

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Mean negative Gaussian log-likelihood (without the constant) of the teacher's features."""
        if student.dim() == 2:  # vectors as 1x1 maps
            student, teacher = student[:, :, None, None], teacher[:, :, None, None]
        # RepDistiller pools whichever map is larger down to the other's size before regressing.
        student, teacher = pool_to_common_size(student, teacher)
        mean = self.regressor(student)
        var = self.variance().view(1, -1, 1, 1)
        return (0.5 * ((mean - teacher).pow(2) / var + var.log())).mean()


class VID(Method):
    """Maximise a variational lower bound on the mutual information between student and teacher stages.

    Per stage, a regressor predicts the teacher's map from the student's and a learned per-channel
    variance scores it as a Gaussian: 0.5 · ((μ(s) − t)² / σ² + log σ²), averaged over batch,
    channels and positions, summed over the stages. Defaults are the CRD benchmark's
    (RepDistiller ``distiller_zoo/VID.py``, ``-a 0 -b 1`` in ``scripts/run_cifar_distill.sh``):
    CE weight 1, VID weight 1, no KD term, on every stage between stem and pooling (RepDistiller's
    ``feat[1:-1]``): stages 1, 2, 3 = (-3, -2, -1) for the 4-stage models (ResNets, WRNs,
    ShuffleNets); RepDistiller's 5-stage models (VGG, MobileNetV2, ResNet50) have four such
    stages, (-4, -3, -2, -1). The initial variance is 5, its floor ``eps`` 1e-5.
    """

    name = "vid"
    paper = "Ahn, Hu, Damianou, Lawrence, Dai: Variational Information Distillation for Knowledge Transfer, CVPR 2019"

    def __init__(self, *, ce_weight: float = 1.0, vid_weight: float = 1.0,
                 stages: tuple[int, ...] = (-3, -2, -1), init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(vid_weight=vid_weight)
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps (the variance floor) must be > 0, got {eps}")
        if not (init_pred_var > eps and math.isfinite(init_pred_var)):
            raise ValueError(f"init_pred_var must be finite and above eps ({eps}), got {init_pred_var}")
        self.vid_weight = vid_weight
        self.stages = check_stages(stages, self.name)
        self.init_pred_var = init_pred_var
        self.eps = eps
        self.regressors = nn.ModuleList()

    def taps(self) -> Taps:
        return Taps(stages=self.stages)

    def setup(self, student: Probe, teachers: Sequence[Probe]) -> None:
        self.regressors = nn.ModuleList(
            GaussianRegressor(student.stages[i], teachers[0].stages[i], self.init_pred_var, self.eps)
            for i in self.stages
        )

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        loss = sum(reg(student.stages[i], teachers[0].stages[i]) for i, reg in zip(self.stages, self.regressors))
        return {"vid": self.vid_weight * loss}
