"""Factor transfer: a paraphraser's factors of the teacher's map, matched by a translator of the student's
(Kim et al. 2018)."""

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
    check_init_epochs,
    check_maps,
    check_weights,
)

LEAK = 0.1  # RepDistiller's LeakyReLU slope in the paraphraser and the translator


def _block(conv: nn.Module, channels: int, bn: bool) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(channels) if bn else nn.Identity(), nn.LeakyReLU(LEAK)]


def encoder(in_c: int, out_c: int, bn: bool) -> nn.Sequential:
    """Three 3x3 convs (in -> in -> out -> out), each followed by BatchNorm (optional) and LeakyReLU(0.1)."""
    return nn.Sequential(*_block(nn.Conv2d(in_c, in_c, 3, 1, 1), in_c, bn),
                         *_block(nn.Conv2d(in_c, out_c, 3, 1, 1), out_c, bn),
                         *_block(nn.Conv2d(out_c, out_c, 3, 1, 1), out_c, bn))


class Paraphraser(nn.Module):
    """RepDistiller's ``Paraphraser`` (``models/util.py``): an encoder of the teacher's map to
    ``int(rate · C)`` channels (the factor) and a decoder of three 3x3 transposed convs back to C."""

    def __init__(self, channels: int, factor_channels: int, bn: bool) -> None:
        super().__init__()
        c, f = channels, factor_channels
        self.encoder = encoder(c, f, bn)
        self.decoder = nn.Sequential(*_block(nn.ConvTranspose2d(f, f, 3, 1, 1), f, bn),
                                     *_block(nn.ConvTranspose2d(f, c, 3, 1, 1), c, bn),
                                     *_block(nn.ConvTranspose2d(c, c, 3, 1, 1), c, bn))

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of ``x`` (what the init stage trains)."""
        return self.decoder(self.encoder(x))

    def frozen_factor(self, x: Tensor) -> Tensor:
        """The factor as the frozen paraphraser gives it: BatchNorm (if any) on its running statistics,
        whatever the module's mode, so it neither depends on the batch nor updates its statistics."""
        for layer in self.encoder:
            if isinstance(layer, nn.BatchNorm2d):
                x = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                                 training=False, eps=layer.eps)
            else:
                x = layer(x)
        return x


def factor(f: Tensor, p: float) -> Tensor:
    """RepDistiller's ``FactorTransfer.factor``: the channel mean of ``|f|^p``, flattened and L2-normalised
    per sample (``f.pow(2)`` there; ``|f|^p`` is the same for p = 2 and defined for any p > 0)."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


def factor_loss(f_s: Tensor, f_t: Tensor, factor_p: float, distance_p: float) -> Tensor:
    """Mean over batch and positions of ``|factor(f_s) - factor(f_t)|^distance_p`` after pooling the larger
    map to the smaller one's size (RepDistiller's ``FactorTransfer.factor_loss``)."""
    f_s, f_t = pool_to_common_size(f_s, f_t)
    diff = (factor(f_s, factor_p) - factor(f_t, factor_p)).abs()
    return (diff if distance_p == 1 else diff.pow(distance_p)).mean()


class FT(Method):
    """Factor transfer: a translator of the student's last stage matches a paraphraser's factor of the teacher's.

    An init stage trains a paraphraser (an encoder to ``rate · C`` channels and a decoder back) to
    reconstruct the teacher's stage map (MSE); the encoder's output is the teacher's factor. During
    the schedule a translator (an encoder of the same form, on the student's map, to the same
    factor width) is trained with the student on ``CE·ce_weight + ft_weight · FT``, where FT is the
    mean over batch and positions of ``|factor(T(s)) - factor(P(t))|^distance_p`` with
    ``factor(f) = normalize(mean_c |f|^factor_p)`` per sample (the larger map is pooled to the
    smaller one's size first).

    As the CRD benchmark runs it (HobbitLong/RepDistiller ``distiller_zoo/FT.py``,
    ``models/util.py`` ``Paraphraser`` and ``Translator``, ``helper/pretrain.py``,
    ``train_student.py``, ``helper/loops.py``; ``--distill factor -a 0 -b 200`` in
    ``scripts/run_cifar_distill.sh``): the teacher's and student's last stage maps (RepDistiller's
    ``feat[-2]``: ``stage`` = -1); ``rate`` k = 0.5; the paraphraser without BatchNorm
    (``use_bn=False``), the translator with it; LeakyReLU(0.1) after every conv; an init stage of
    ``init_epochs`` = 30 epochs training the paraphraser alone on ``nn.MSELoss`` of its
    reconstruction (``rec_weight`` 1; no cross-entropy, neither the student nor the teacher
    trains); then ``ft_weight`` = 200 (``-b 200``), ``ce_weight`` = 1 (``-r 1``), no KD term
    (``-a 0``), ``factor_p`` = 2 and ``distance_p`` = 1 (``FactorTransfer(p1=2, p2=1)``).

    After the init stage the paraphraser is frozen: RepDistiller leaves it out of the optimizer and
    puts it in eval mode (``module_list[2].eval()`` in ``train_distill``). kdbench optimises every
    parameter of a method, so the teacher's factor is computed under ``no_grad``: the paraphraser
    gets no gradient, and SGD (which skips parameters without one) neither moves nor decays it.
    Its BatchNorm, if it has one (``paraphraser_bn=True``), is applied on its running statistics
    (:meth:`Paraphraser.frozen_factor`): in train mode it would normalise with each batch's
    statistics, making the target of one image depend on the others in its batch, and keep updating
    its running statistics. With the default (no BatchNorm) the mode changes nothing.

    The init stage's rate: RepDistiller trains it at lr 0.01 for ResNet and WRN students
    (``helper/pretrain.py``) and at ``--learning_rate`` otherwise (0.05 for VGG; 0.01 for MobileNetV2 and
    ShuffleNet students, whose schedule starts at 0.01). ``init_lr_scale`` = 0.2 (× the recipe's 0.05)
    gives the ResNet and WRN students' 0.01; the CRD suites set 1.0 for the other students.

    Differences from RepDistiller: the optimizer is the schedule's (its momentum is reset when the
    schedule starts, as RepDistiller's new optimizer starts without any). RepDistiller
    keeps the student in eval mode during the init stage; kdbench's engine runs it in train mode, so
    its BatchNorm running statistics move (its weights do not). The paper's factor is the whole
    normalised map with an L1 norm per sample; RepDistiller's (followed here) is the normalised
    channel mean of squares, with the mean over positions.
    """

    name = "ft"
    paper = "Kim, Park, Kwak: Paraphrasing Complex Network: Network Compression via Factor Transfer, NeurIPS 2018"

    def __init__(self, *, ce_weight: float = 1.0, ft_weight: float = 200.0, rec_weight: float = 1.0,
                 init_epochs: int = 30, stage: int = -1, rate: float = 0.5, factor_p: float = 2.0,
                 distance_p: float = 1.0, paraphraser_bn: bool = False, init_lr_scale: float = 0.2) -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(ft_weight=ft_weight, rec_weight=rec_weight)
        self.init_epochs = check_init_epochs(init_epochs)
        if not (init_lr_scale > 0 and math.isfinite(init_lr_scale)):
            raise ValueError(f"init_lr_scale (the init stage's rate over the recipe's) must be > 0, got {init_lr_scale}")
        self.init_lr_scale = init_lr_scale
        if self.init_epochs and not rec_weight:
            raise ValueError("rec_weight must be > 0 while init_epochs > 0: an init stage with a zero loss "
                             "trains nothing; set init_epochs=0 to skip the init stage")
        if not ft_weight and not ce_weight:
            raise ValueError("with ft_weight=0 and ce_weight=0 nothing trains after the init stage")
        if isinstance(stage, bool) or not float(stage).is_integer():
            raise ValueError(f"stage must be a stage index (negative counts from the end), got {stage!r}")
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate (the factor's share of the teacher's channels, k) must be > 0, got {rate}")
        for hp, p in (("factor_p", factor_p), ("distance_p", distance_p)):
            if not (p > 0 and math.isfinite(p)):
                raise ValueError(f"{hp} must be > 0, got {p}")
        self.ft_weight = ft_weight
        self.rec_weight = rec_weight
        self.stage = int(stage)
        self.rate = rate
        self.factor_p = factor_p
        self.distance_p = distance_p
        self.paraphraser_bn = paraphraser_bn
        self.paraphraser: nn.Module = nn.Identity()
        self.translator: nn.Module = nn.Identity()

    def taps(self) -> Taps:
        return Taps(stages=(self.stage,))

    def setup(self, student: Probe, teachers: Sequence[Probe]) -> None:
        check_maps((self.stage,), student, teachers, self.name)
        s_c, t_c = student.stages[self.stage][0], teachers[0].stages[self.stage][0]
        f_c = int(t_c * self.rate)  # RepDistiller's int(t_shape[1] * k)
        if f_c < 1:
            raise ValueError(f"rate {self.rate} of the teacher's {t_c} channels leaves a factor of no channels; "
                             "raise ft.rate")
        self.paraphraser = Paraphraser(t_c, f_c, self.paraphraser_bn)
        self.translator = encoder(s_c, f_c, bn=True)  # RepDistiller's Translator(use_bn=True)

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        f_t = teachers[0].stages[self.stage]
        if batch.stage == "init":  # the paraphraser learns to reconstruct the teacher's map
            return {"rec": self.rec_weight * F.mse_loss(self.paraphraser(f_t), f_t)}
        if not self.ft_weight:
            return {}
        with torch.no_grad():  # frozen after the init stage
            factor_t = self.paraphraser.frozen_factor(f_t)
        factor_s = self.translator(student.stages[self.stage])
        return {"ft": self.ft_weight * factor_loss(factor_s, factor_t, self.factor_p, self.distance_p)}
