"""Probabilistic knowledge transfer on the pooled vectors (Passalis & Tefas 2018), as the CRD benchmark runs it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdbench.method import Batch, Method, Outputs, Taps, check_weights

#: RepDistiller's (and the authors' code's) eps, in the norms and in the KL.
EPS = 1e-7


def _cosine_conditionals(x: Tensor) -> Tensor:
    """Row-normalised cosine similarities mapped to [0, 1]: the conditional distributions p(j | i)."""
    x = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + EPS)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)  # the reference's x[x != x] = 0, without indexing
    sim = (x @ x.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """RepDistiller's ``PKT.cosine_similarity_loss`` on two batches of vectors (N × D_s, N × D_t).

    P (teacher) and Q (student) are the N × N matrices of :func:`_cosine_conditionals`; the loss is
    mean_ij P_ij · log((P_ij + eps) / (Q_ij + eps)), a mean over all N² entries (not a per-row sum).
    """
    t = _cosine_conditionals(f_t)
    s = _cosine_conditionals(f_s)
    return (t * torch.log((t + EPS) / (s + EPS))).mean()


class PKT(Method):
    """KL between the cosine-similarity conditional distributions of the teacher's and the student's pooled vectors.

    Defaults are the CRD benchmark's (Tian et al. 2020, ``scripts/run_cifar_distill.sh``:
    ``--distill pkt -a 0 -b 30000``): CE weight 1, PKT weight 30000, no KD term, on the pooled
    pre-logit vectors (RepDistiller's ``feat[-1]``). The loss is RepDistiller's
    ``distiller_zoo/PKT.py`` ``PKT.cosine_similarity_loss`` (the authors' code, eps 1e-7; see
    :func:`pkt_loss`). No trainable parameters.
    """

    name = "pkt"
    paper = "Passalis, Tefas: Learning Deep Representations with Probabilistic Knowledge Transfer, ECCV 2018"

    def __init__(self, *, ce_weight: float = 1.0, pkt_weight: float = 30000.0) -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(pkt_weight=pkt_weight)
        self.pkt_weight = pkt_weight

    def taps(self) -> Taps:
        return Taps(pooled=True)

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        f_s = student.pooled.flatten(1)
        f_t = teachers[0].pooled.flatten(1).detach()  # the teacher's vector is data, as RepDistiller's feat_t
        return {"pkt": self.pkt_weight * pkt_loss(f_s, f_t)}
