"""Attention transfer: match spatial attention maps of several stages (Zagoruyko & Komodakis 2017)."""

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


def attention(f: Tensor, p: float) -> Tensor:
    """The attention map: channel mean of ``|f|^p``, flattened and L2-normalised per sample."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


class AT(Method):
    """Attention transfer: squared distance between normalised spatial attention maps, summed over stages.

    For each tapped stage, ``a(f) = normalize(mean_c |f_c|^p)`` over the flattened positions, and the
    term is ``mean over batch and positions of (a(f_s) - a(f_t))^2``; the stage terms are summed and
    multiplied by ``at_weight``. Parameter-free, so student and teacher may have any channel counts.
    Where the two maps of a stage differ in height or width, the larger is average-pooled to the
    smaller one's size first, as RepDistiller does.

    Defaults are the CRD benchmark's (Tian et al. 2020; HobbitLong/RepDistiller ``distiller_zoo/AT.py``,
    ``helper/loops.py``, ``scripts/run_cifar_distill.sh``: ``--distill attention -r 1 -a 0 -b 1000``):
    p = 2, weight 1000, CE weight 1, no KD term, on the stage outputs between the stem and the pooled
    vector (RepDistiller's ``feat[1:-1]``). ``stages=(-3, -2, -1)`` are exactly those for the
    three-stage CRD ResNets, WRNs and ShuffleNets; for vgg, ResNet50 and MobileNetV2 RepDistiller
    uses four (set ``stages=1,2,3,4``).
    """

    name = "at"
    paper = ("Zagoruyko, Komodakis: Paying More Attention to Attention: Improving the Performance of "
             "Convolutional Neural Networks via Attention Transfer, ICLR 2017")

    def __init__(self, *, ce_weight: float = 1.0, at_weight: float = 1000.0, p: float = 2.0,
                 stages: tuple[int, ...] = (-3, -2, -1)) -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(at_weight=at_weight)
        if not p > 0:
            raise ValueError(f"p must be > 0 (the attention map is mean_c |f|^p), got {p}")
        self.at_weight = at_weight
        self.p = p
        self.stages = check_stages(stages, self.name)

    def taps(self) -> Taps:
        return Taps(stages=self.stages)

    def setup(self, student: Probe, teachers: Sequence[Probe]) -> None:
        check_maps(self.stages, student, teachers, self.name)

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        total = 0.0
        for i in self.stages:
            f_s, f_t = pool_to_common_size(student.stages[i], teachers[0].stages[i])
            total = total + (attention(f_s, self.p) - attention(f_t, self.p)).pow(2).mean()
        return {"at": self.at_weight * total}
