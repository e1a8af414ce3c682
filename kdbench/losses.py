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


def zscore(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Each row standardised: ``(z - mean(z)) / (std(z) + eps)`` over the last dimension.

    Sun et al.'s logit standardisation (CVPR 2024) as their code writes it (``normalize`` in
    ``mdistiller/distillers/KD.py`` of sunshangquan/logit-standardization-KD): the standard
    deviation is the unbiased one (divided by C - 1, torch's default), and ``eps`` is added to it,
    not under the square root.
    """
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


def logit_regression(student_logits: Tensor, target_logits: Tensor) -> Tensor:
    """Ba & Caruana's mimic loss: ``1/(2N) Σ_i ‖g(x_i) − z_i‖²`` (squared error summed over the
    classes, halved, averaged over the batch), NIPS 2014, section 2.2."""
    return 0.5 * (student_logits - target_logits).pow(2).sum(dim=1).mean()
