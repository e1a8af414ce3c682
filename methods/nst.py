"""Neuron selectivity transfer: MMD between channel activation patterns (Huang & Wang 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdbench.losses import pool_to_common_size
from kdbench.method import (
    Batch,
    Method,
    Outputs,
    Probe,
    Taps,
    check_maps,
    check_stages,
    check_weights,
)


def poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over samples and channel pairs of the kernel ``k(x, y) = (x . y)^2``.

    ``a`` is B x C_a x N and ``b`` is B x C_b x N (one unit-norm spatial pattern per channel).
    """
    return (a @ b.transpose(1, 2)).pow(2).mean()


def nst_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Squared MMD, with the degree-2 polynomial kernel, between the two sets of channel patterns."""
    f_s, f_t = pool_to_common_size(f_s, f_t)
    s = F.normalize(f_s.flatten(2), dim=2)
    t = F.normalize(f_t.flatten(2), dim=2)
    # The teacher-teacher term is a constant; detached, as in RepDistiller (its value is kept so the
    # logged term is the MMD itself, >= 0).
    return poly_kernel_mean(t, t).detach() + poly_kernel_mean(s, s) - 2 * poly_kernel_mean(s, t)


class NST(Method):
    """Neuron selectivity transfer: polynomial-kernel MMD between student and teacher channel patterns.

    For each tapped stage, every channel's H x W map is flattened and L2-normalised, giving a set of
    C_s student and C_t teacher points per sample; the term is the squared MMD between the two sets
    under ``k(x, y) = (x . y)^2``: ``mean k(t, t') + mean k(s, s') - 2 mean k(s, t)``, the means over
    the batch and all channel pairs. The stage terms are summed and multiplied by ``nst_weight``.
    Parameter-free, so the channel counts may differ. Where the two maps of a stage differ in height
    or width, the larger is average-pooled to the smaller one's size first, as RepDistiller does.

    Defaults are the CRD benchmark's (Tian et al. 2020; HobbitLong/RepDistiller ``distiller_zoo/NST.py``,
    ``helper/loops.py``, ``scripts/run_cifar_distill.sh``: ``--distill nst -r 1 -a 0 -b 50``): weight 50,
    CE weight 1, no KD term, on the stage outputs between the stem and the pooled vector
    (RepDistiller's ``feat[1:-1]``). ``stages=(-3, -2, -1)`` are exactly those for the three-stage CRD
    ResNets, WRNs and ShuffleNets; for vgg, ResNet50 and MobileNetV2 RepDistiller uses four (set
    ``stages=1,2,3,4``).
    """

    name = "nst"
    paper = ("Huang, Wang: Like What You Like: Knowledge Distill via Neuron Selectivity Transfer, "
             "arXiv:1707.01219, 2017")

    def __init__(self, *, ce_weight: float = 1.0, nst_weight: float = 50.0,
                 stages: tuple[int, ...] = (-3, -2, -1)) -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(nst_weight=nst_weight)
        self.nst_weight = nst_weight
        self.stages = check_stages(stages, self.name)

    def taps(self) -> Taps:
        return Taps(stages=self.stages)

    def setup(self, student: Probe, teachers: Sequence[Probe]) -> None:
        check_maps(self.stages, student, teachers, self.name)

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        total = 0.0
        for i in self.stages:
            total = total + nst_loss(student.stages[i], teachers[0].stages[i])
        return {"nst": self.nst_weight * total}
