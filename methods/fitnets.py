"""FitNets: a regressor maps a student stage onto the teacher's (Romero et al. 2015)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.losses import kd_loss
from kdbench.method import Batch, Method, Outputs, Probe, Taps, check_temperature, check_weights

SCHEDULES = ("joint", "two_stage")


def regressor(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Module:
    """A trainable map from a student feature shape to a teacher feature shape (no batch dim).

    Conv maps follow the CRD benchmark's ConvReg: a conv (1×1 at equal size, 3×3 stride 2 when
    the student map is twice as large, a transposed conv when it is half as large), then
    BatchNorm and ReLU. Flat features get a linear map.
    """
    if len(student) == 1 and len(teacher) == 1:
        return nn.Linear(student[0], teacher[0])
    if len(student) != 3 or len(teacher) != 3:
        raise ValueError(f"cannot build a FitNets regressor from shape {student} to {teacher}")
    (s_c, s_h, s_w), (t_c, t_h, t_w) = student, teacher
    if s_h == 2 * t_h and s_w == 2 * t_w:
        conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    elif 2 * s_h == t_h and 2 * s_w == t_w:
        conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    elif s_h >= t_h and s_w >= t_w:
        # A valid conv whose kernel shrinks the map to the teacher's size (1×1 when equal).
        conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    else:
        raise ValueError(f"student map {student} is smaller than the teacher's {teacher} by more "
                         "than 2×; choose another stage")
    return nn.Sequential(conv, nn.BatchNorm2d(t_c), nn.ReLU(inplace=False))


class FitNets(Method):
    """Hint learning: MSE between a regressed student stage and the teacher's stage.

    Default (``schedule="joint"``) is the CRD benchmark's single-stage variant: CE·1 + 100·MSE on
    the 2nd stage throughout training. ``schedule="two_stage"`` is the paper's: for the first
    ``hint_fraction`` of the epochs only the hint trains (so only the student's layers up to the
    hinted stage, and the regressor, move), then the whole student trains with CE·ce_weight +
    KD·kd_weight at ``temperature``.
    """

    name = "fitnets"
    paper = "Romero et al.: FitNets: Hints for Thin Deep Nets, ICLR 2015"

    def __init__(self, *, ce_weight: float = 1.0, hint_weight: float = 100.0, stage: int = 2,
                 schedule: str = "joint", hint_fraction: float = 0.5, kd_weight: float = 0.9,
                 temperature: float = 4.0) -> None:
        super().__init__(ce_weight=ce_weight)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got '{schedule}'")
        if not 0.0 <= hint_fraction <= 1.0:
            raise ValueError(f"hint_fraction must be in [0, 1], got {hint_fraction}")
        check_temperature(temperature)
        check_weights(hint_weight=hint_weight, kd_weight=kd_weight)
        self.hint_weight = hint_weight
        self.stage = stage
        self.schedule = schedule
        self.hint_fraction = hint_fraction
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.regressor: nn.Module = nn.Identity()

    def taps(self) -> Taps:
        return Taps(stages=(self.stage,))

    def setup(self, student: Probe, teachers: Sequence[Probe]) -> None:
        self.regressor = regressor(student.stages[self.stage], teachers[0].stages[self.stage])

    def _hint_phase(self, epoch: int, epochs: int) -> bool:
        return self.schedule == "two_stage" and epoch < round(self.hint_fraction * epochs)

    def ce_weight_at(self, epoch: int, epochs: int) -> float:
        return 0.0 if self._hint_phase(epoch, epochs) else self.ce_weight

    def stage_at(self, epoch: int, epochs: int) -> str:
        return "hint" if self._hint_phase(epoch, epochs) else "train"

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        # The phase comes as batch.stage (decided outside the compiled step), not from batch.epoch.
        if self.schedule == "two_stage" and batch.stage != "hint":
            return {"kd": self.kd_weight * kd_loss(student.logits, teachers[0].logits, self.temperature)}
        hint = F.mse_loss(self.regressor(student.stages[self.stage]), teachers[0].stages[self.stage])
        return {"hint": self.hint_weight * hint}
