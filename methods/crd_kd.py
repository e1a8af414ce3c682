"""CRD plus Hinton's KD (Tian, Krishnan, Isola 2020, the CRD+KD row), as the CRD benchmark runs it."""

from __future__ import annotations

from kdbench_methods.crd import CRD


class CRDKD(CRD):
    """CRD with Hinton's KD term added: the paper's CRD+KD.

    Defaults are the CRD benchmark's (Tian et al. 2020, RepDistiller ``scripts/run_cifar_distill.sh``:
    ``--distill crd -a 1 -b 0.8``, i.e. CE weight 1 (``-r``'s default), KD weight 1 at ``--kd_T`` 4,
    CRD weight 0.8); everything else is :class:`CRD`'s (``feat_dim`` 128, ``nce_k`` 16384,
    ``nce_t`` 0.07, ``nce_m`` 0.5, negatives from other classes).
    """

    name = "crd_kd"
    paper = CRD.paper

    def __init__(self, *, ce_weight: float = 1.0, crd_weight: float = 0.8, kd_weight: float = 1.0,
                 temperature: float = 4.0, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07,
                 nce_m: float = 0.5, negatives: str = "other_classes") -> None:
        super().__init__(ce_weight=ce_weight, crd_weight=crd_weight, kd_weight=kd_weight, temperature=temperature,
                         feat_dim=feat_dim, nce_k=nce_k, nce_t=nce_t, nce_m=nce_m, negatives=negatives)
