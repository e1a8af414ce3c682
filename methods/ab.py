"""Activation-boundary distillation: an init stage teaches the student where the teacher's neurons switch on
(Heo et al. 2019).

Followed from HobbitLong/RepDistiller: ``distiller_zoo/AB.py`` (the loss, its stage weights and scale),
``models/util.py`` (``Connector``: identity or ``ConvReg(use_relu=False)``, the connector
``train_student.py`` builds for ``--distill abound``; not ``ConnectorV2``), ``helper/pretrain.py`` (the
init stage: ``--init_epochs`` 30, the connectors and the student's feature modules trained on the AB loss
alone at the base rate), ``train_student.py`` / ``helper/loops.py`` (afterwards ``loss_kd = 0``) and
``scripts/run_cifar_distill.sh`` (``-a 0 -b 1``, CE weight 1).

Where a kdbench run differs from RepDistiller's (the engine's choices, not this file's):

* RepDistiller's init stage has its own SGD and the schedule starts a new one; kdbench's engine keeps one
  optimizer, so the momentum the init stage built carries into the schedule's first steps.
* RepDistiller's init stage leaves the student modules outside ``get_feat_modules()`` in eval mode and
  untrained. Only for WRN students is one of them on the AB path: the final ``bn1`` that gives the last
  stage's pre-activation, which RepDistiller therefore applies with its initial running statistics (nearly
  the identity) and frozen affine; kdbench trains the whole student in training mode (batch statistics, and
  that BatchNorm's affine trains with the rest).
* RepDistiller gets WRN pre-activations by calling BatchNorms a second time, which updates their running
  statistics twice per training step; kdbench's models compute the same values without the second update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdbench.method import Batch, Method, Outputs, Probe, Taps, check_maps, check_stages, check_weights

#: RepDistiller's ABLoss scale after the division by the batch size: ``l / 1000 * 3``.
SCALE = 3 / 1000


def connector(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Module:
    """Map a student stage (C, H, W) onto the teacher's, as RepDistiller's ``Connector`` does for AB.

    The identity (no parameters) when the shapes are equal; otherwise its ``ConvReg`` without the
    ReLU: a conv (3x3 stride 2 when the student map is twice as high, a 4x4 stride-2 transposed conv
    when it is half as high, else a valid conv that shrinks it to the teacher's size, 1x1 at equal
    size), then BatchNorm. The output is compared with the teacher's pre-activation, so it has no
    activation either.
    """
    if student == teacher:
        return nn.Identity()
    (s_c, s_h, s_w), (t_c, t_h, t_w) = student, teacher
    if s_h == 2 * t_h:
        conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    elif 2 * s_h == t_h:
        conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    elif s_h >= t_h and s_w >= t_w:
        conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    else:
        raise ValueError(f"AB's connector cannot map a student map {student} onto a teacher map {teacher}: the "
                         "student's is smaller by more than 2x; choose other stages or another pair")
    return nn.Sequential(conv, nn.BatchNorm2d(t_c))


def alternative_l2(source: Tensor, target: Tensor, margin: float) -> Tensor:
    """The paper's margin-based alternative of the L2 loss, summed over every element.

    Where the teacher's neuron is off (``target <= 0``) the student's pre-activation is pushed below
    ``-margin``, where it is on (``target > 0``) above ``margin``; inside the margin on the right
    side costs nothing more.
    """
    off = (source > -margin) & (target <= 0)
    on = (source <= margin) & (target > 0)
    zero = source.new_zeros(())
    return (torch.where(off, (source + margin) ** 2, zero) + torch.where(on, (source - margin) ** 2, zero)).sum()


class AB(Method):
    """Transfer the teacher's activation boundaries in an init stage, then train on labels alone.

    As the CRD benchmark runs it (RepDistiller ``--distill abound``, ``-a 0 -b 1`` in
    ``scripts/run_cifar_distill.sh``): for ``init_epochs`` (30) epochs before the schedule, a
    connector per stage maps the student's pre-activation map onto the teacher's
    (``Taps(preact=True)``: RepDistiller's ``is_feat=True, preact=True``), and the student's layers
    and the connectors train on the margin loss (``distiller_zoo/AB.py``, ``helper/pretrain.py``):
    sum over stages i of 2^(i-n+1) · L_i / batch · 3/1000, the deepest of the n stages weighted 1,
    where L_i sums over all elements (m = ``margin``, s the connector's output, t the teacher's map)
    (s + m)² where t <= 0 and s > -m, plus (s - m)² where t > 0 and s <= m. After it the term is 0
    (``train_student.py``: ``loss_kd = 0`` for abound): the student trains on cross-entropy alone
    (``ce_weight`` 1), from the weights the init stage left. Stages: RepDistiller's ``feat[1:-1]``,
    every stage between stem and pooling: (-3, -2, -1) for the 4-stage models (ResNets, WRNs,
    ShuffleNets), (-4, -3, -2, -1) for the 5-stage ones (VGG, MobileNetV2, ResNet50); the weights go
    by the order given (list them shallow to deep). Needs models whose ``supports_preact`` is true.
    """

    name = "ab"
    paper = ("Heo, Lee, Yun, Choi: Knowledge Transfer via Distillation of Activation Boundaries Formed by "
             "Hidden Neurons, AAAI 2019")

    def __init__(self, *, ce_weight: float = 1.0, ab_weight: float = 1.0, margin: float = 1.0,
                 stages: tuple[int, ...] = (-3, -2, -1), init_epochs: int = 30) -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(ab_weight=ab_weight)
        if not (margin >= 0 and math.isfinite(margin)):
            raise ValueError(f"margin must be finite and >= 0, got {margin}")
        if not (float(init_epochs).is_integer() and init_epochs >= 1):
            raise ValueError(f"init_epochs must be a whole number >= 1 (AB transfers only in its init stage, and "
                             f"trains on labels alone after it), got {init_epochs}")
        self.ab_weight = ab_weight
        self.margin = margin
        self.stages = check_stages(stages, self.name)
        if len({i < 0 for i in self.stages}) == 1 and list(self.stages) != sorted(self.stages):
            raise ValueError(f"list stages shallow to deep (the deepest gets weight 1, each shallower one half the "
                             f"next's), e.g. ab.stages=-3,-2,-1; got {self.stages}")
        self.init_epochs = int(init_epochs)
        self.connectors = nn.ModuleList()

    def taps(self) -> Taps:
        return Taps(stages=self.stages, preact=True)

    def setup(self, student: Probe, teachers: Sequence[Probe]) -> None:
        check_maps(self.stages, student, teachers, self.name)
        self.connectors = nn.ModuleList(connector(student.stages[i], teachers[0].stages[i]) for i in self.stages)

    def stage_weights(self) -> list[float]:
        """2^(i-n+1) for the i-th of the n stages: RepDistiller's ``ABLoss.w``."""
        n = len(self.stages)
        return [2.0 ** (i - n + 1) for i in range(n)]

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        if batch.stage != "init":  # RepDistiller's train_student.py: loss_kd = 0 for abound
            return {}
        t = teachers[0]
        batch_size = student.stages[self.stages[0]].shape[0]
        loss = sum(w * alternative_l2(conn(student.stages[i]), t.stages[i], self.margin)
                   for w, i, conn in zip(self.stage_weights(), self.stages, self.connectors))
        return {"ab": self.ab_weight * loss / batch_size * SCALE}
