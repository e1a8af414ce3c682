"""Loss functions shared by several methods (each method file still owns its defaults)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def soft_kl(student_logits: Tensor, target_probs: Tensor, temperature: float) -> Tensor:
    """KL(target ‖ softmax(student/T)) · T², averaged over the batch.

    The T² factor keeps the gradient scale independent of T (Hinton et al. 2015, section 2).
    """
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_q, target_probs, reduction="batchmean") * temperature**2


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's distillation loss: KL(softmax(t/T) ‖ softmax(s/T)) · T², batch mean."""
    return soft_kl(student_logits, F.softmax(teacher_logits / temperature, dim=1), temperature)


def pool_to_common_size(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two maps down to the smaller one's height and width.

    RepDistiller's ``at_loss``, ``nst_loss`` and VID do this (with ``adaptive_avg_pool2d``) whenever
    the heights differ, which every cross-family pair of CRD's Table 2 needs. Shapes are static, so the
    branch is on Python ints and traces without a graph break.
    """
    h, w = min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3])
    if f_s.shape[2:] != (h, w):
        f_s = F.adaptive_avg_pool2d(f_s, (h, w))
    if f_t.shape[2:] != (h, w):
        f_t = F.adaptive_avg_pool2d(f_t, (h, w))
    return f_s, f_t
