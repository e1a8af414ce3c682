"""FSP: match the flow of the solution procedure between consecutive stages (Yim et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdbench.losses import pool_to_common_size
from kdbench.method import (
    Batch,
    Method,
    Outputs,
    Probe,
    Taps,
    check_init_epochs,
    check_maps,
    check_stages,
    check_weights,
)


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """The FSP matrix of two maps of one model: ``G[b, j, i] = mean over positions of top[b, j] · bottom[b, i]``.

    Shape (batch, C_top, C_bottom). Where the two maps differ in height or width, the larger is
    average-pooled to the smaller one's size first, as RepDistiller's ``FSP.compute_fsp`` does.
    """
    bottom, top = pool_to_common_size(bottom, top)
    positions = bottom.shape[2] * bottom.shape[3]
    return torch.bmm(top.flatten(2), bottom.flatten(2).transpose(1, 2)) / positions


def fsp_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Sum over consecutive pairs of maps of the mean squared difference of the FSP matrices."""
    total = 0.0
    for k in range(len(student) - 1):
        g_s = fsp_matrix(student[k], student[k + 1])
        g_t = fsp_matrix(teacher[k], teacher[k + 1])
        total = total + (g_s - g_t).pow(2).mean()
    return total


class FSP(Method):
    """Match the FSP (Gram) matrices between consecutive stages, in an init stage before the schedule.

    For consecutive tapped maps ``F1`` (C1 x H x W) and ``F2`` (C2 x H x W) of one model,
    ``G = F2 · F1ᵀ / (H·W)`` (C2 x C1; the larger map is first average-pooled to the smaller one's
    size); the loss is the mean squared difference of the student's and teacher's ``G``, summed over
    the consecutive pairs. Student and teacher need equal channel counts at every tapped stage
    (RepDistiller raises "num of channels not equal" otherwise): a pair without them is refused in
    :meth:`setup`, i.e. when the run is planned.

    As the CRD benchmark runs it (HobbitLong/RepDistiller ``distiller_zoo/FSP.py``,
    ``helper/pretrain.py``, ``train_student.py``, ``helper/loops.py``; ``--distill fsp -a 0 -b 50``
    in ``scripts/run_cifar_distill.sh``):

    - an init stage of ``init_epochs`` = 30 epochs trains the student's feature layers on the FSP loss
      alone (``init_weight`` 1: RepDistiller sums the pair losses unweighted; no cross-entropy; the
      student's classifier gets no gradient), at the recipe's base rate (RepDistiller: its
      ``--learning_rate``, constant over the init stage);
    - after it, the schedule trains on cross-entropy alone: RepDistiller's ``train_distill`` sets
      ``loss_kd = 0`` for fsp ("can also add loss to this stage"), so its ``-b 50`` multiplies zero
      and ``-a 0`` drops the KL term. Hence ``fsp_weight`` = 0 (no FSP term during the schedule;
      ``forward`` returns no terms then) and ``ce_weight`` = 1. A positive ``fsp_weight`` adds
      ``fsp_weight · FSP`` during the schedule, which the paper allows but the benchmark does not use.
    - the maps are RepDistiller's ``feat[:-1]``: the stem and every stage, i.e. ``stages`` =
      (0, 1, 2, 3) for the CRD ResNets, WRNs and ShuffleNets (stem + three stages). Its VGG,
      MobileNetV2 and ResNet50 have five such maps: set ``stages=0,1,2,3,4`` for them.

    Differences from RepDistiller: its init stage has an optimizer of its own over the feature
    layers (momentum starts afresh for the schedule); kdbench's one optimizer keeps the features'
    momentum from the init stage into the schedule's first steps. RepDistiller pools by height only
    (square maps); here height and width are pooled, the same for square maps.
    """

    name = "fsp"
    paper = ("Yim, Joo, Bae, Kim: A Gift from Knowledge Distillation: Fast Optimization, Network Minimization "
             "and Transfer Learning, CVPR 2017")

    def __init__(self, *, ce_weight: float = 1.0, fsp_weight: float = 0.0, init_weight: float = 1.0,
                 init_epochs: int = 30, stages: tuple[int, ...] = (0, 1, 2, 3)) -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(fsp_weight=fsp_weight, init_weight=init_weight)
        self.init_epochs = check_init_epochs(init_epochs)
        if self.init_epochs and not init_weight:
            raise ValueError("init_weight must be > 0 while init_epochs > 0: an init stage with a zero loss "
                             "only decays the student's weights; set init_epochs=0 to skip the init stage")
        if not fsp_weight and not self.init_epochs:
            raise ValueError("with init_epochs=0 and fsp_weight=0 fsp transfers nothing (it would train on "
                             "cross-entropy alone); give it an init stage (init_epochs > 0) or fsp_weight > 0")
        if not fsp_weight and not ce_weight:
            raise ValueError("with fsp_weight=0 and ce_weight=0 nothing trains after the init stage; "
                             "set ce_weight > 0 (the benchmark's is 1)")
        self.fsp_weight = fsp_weight
        self.init_weight = init_weight
        self.stages = check_stages(stages, self.name)
        if len(self.stages) < 2:
            raise ValueError(f"fsp relates consecutive stages, so it needs two or more stages (e.g. "
                             f"fsp.stages=0,1,2,3); got {self.stages}")

    def taps(self) -> Taps:
        return Taps(stages=self.stages)

    def setup(self, student: Probe, teachers: Sequence[Probe]) -> None:
        check_maps(self.stages, student, teachers, self.name)
        s_c = tuple(student.stages[i][0] for i in self.stages)
        for teacher in teachers:
            t_c = tuple(teacher.stages[i][0] for i in self.stages)
            if s_c != t_c:
                raise ValueError(
                    f"fsp compares FSP matrices of equal shape, so student and teacher need equal channel counts "
                    f"at every tapped stage (RepDistiller's FSP refuses others too); at stages {self.stages} "
                    f"{student.model} has {s_c} channels and {teacher.model} has {t_c}. Choose a pair of one "
                    f"family and width (e.g. resnet56 -> resnet20) or other stages (--set fsp.stages=...)")

    def _loss(self, student: Outputs, teacher: Outputs) -> Tensor:
        return fsp_loss([student.stages[i] for i in self.stages], [teacher.stages[i] for i in self.stages])

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        if batch.stage == "init":
            return {"fsp": self.init_weight * self._loss(student, teachers[0])}
        if not self.fsp_weight:  # RepDistiller's schedule: loss_kd = 0, cross-entropy alone
            return {}
        return {"fsp": self.fsp_weight * self._loss(student, teachers[0])}
