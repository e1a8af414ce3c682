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
