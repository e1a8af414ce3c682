"""Correlation congruence between embedded pooled vectors (Peng et al. 2019), as the CRD benchmark runs it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from kdbench.method import Batch, Method, Outputs, Probe, Taps, check_weights


def correlation_congruence(f_s: Tensor, f_t: Tensor) -> Tensor:
    """RepDistiller's ``Correlation`` loss on two batches of embeddings (N × D each).

    With δ_i = |f_s,i − f_t,i| (element-wise), the loss is the mean over the N − 1 neighbouring
    pairs of the batch of Σ_d δ_i,d · δ_i+1,d. This is the code the paper's authors gave CRD, not
    the paper's Gaussian-RBF Taylor expansion. Written as a sum divided by max(N − 1, 1), so a
    batch of one (no pair) gives 0 instead of the NaN of a mean over nothing; for N ≥ 2 it is the
    same mean.
    """
    delta = (f_s - f_t).abs()
    pairs = max(f_s.shape[0] - 1, 1)  # a shape, static under torch.compile
    return (delta[:-1] * delta[1:]).sum() / pairs


def _pooled_dim(probe: Probe, role: str) -> int:
    if probe.pooled is None:
        raise ValueError(f"cc needs the {role}'s pooled pre-logit vector, and {probe.model} has none")
    return math.prod(probe.pooled)


class CC(Method):
    """Correlation congruence of linear 128-d embeddings of the student's and the teacher's pooled vectors.

    Defaults are the CRD benchmark's (Tian et al. 2020, ``scripts/run_cifar_distill.sh``:
    ``--distill correlation -a 0 -b 0.02``): CE weight 1, CC weight 0.02, no KD term, embedding
    dimension 128 (``--feat_dim``). As in RepDistiller's ``train_student.py``, the pooled vector
    of each model goes through its own trainable ``LinearEmbed`` (a ``nn.Linear`` to
    ``embed_dim``, without normalisation), and both embeddings train with the student; the teacher
    network stays frozen. The loss is RepDistiller's ``distiller_zoo/CC.py`` ``Correlation``
    (see :func:`correlation_congruence`).
    """

    name = "cc"
    paper = "Peng et al.: Correlation Congruence for Knowledge Distillation, ICCV 2019"

    def __init__(self, *, ce_weight: float = 1.0, cc_weight: float = 0.02, embed_dim: int = 128) -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(cc_weight=cc_weight)
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be an integer >= 1, got {embed_dim!r}")
        self.cc_weight = cc_weight
        self.embed_dim = embed_dim
        # Built in setup() from the probed pooled sizes.
        self.embed_s: nn.Linear | None = None
        self.embed_t: nn.Linear | None = None

    def taps(self) -> Taps:
        return Taps(pooled=True)

    def setup(self, student: Probe, teachers: Sequence[Probe]) -> None:
        self.embed_s = nn.Linear(_pooled_dim(student, "student"), self.embed_dim)
        self.embed_t = nn.Linear(_pooled_dim(teachers[0], "teacher"), self.embed_dim)

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        if self.embed_s is None or self.embed_t is None:
            raise RuntimeError("cc: call setup() before the first forward (it builds the embeddings)")
        f_s = self.embed_s(student.pooled.flatten(1))
        # The teacher's vector is data (as RepDistiller's detached feat_t); its embedding trains.
        f_t = self.embed_t(teachers[0].pooled.flatten(1).detach())
        return {"cc": self.cc_weight * correlation_congruence(f_s, f_t)}
