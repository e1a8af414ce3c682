"""Logit distillation with a temperature (Hinton, Vinyals, Dean 2015)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from kdbench.losses import kd_loss, zscore
from kdbench.method import Batch, Method, Outputs, check_temperature, check_weights


class KD(Method):
    """Match the teacher's temperature-softened class probabilities.

    Defaults are the CRD benchmark's (Tian et al. 2020): T = 4, CE weight 0.1, KD weight 0.9.

    ``standardize`` (off by default) z-scores each sample's logits, the student's and the teacher's
    apart, before the tempered softmax: Sun, Ren, Li, Wang, Cao, Logit Standardization in Knowledge
    Distillation, CVPR 2024, as their code does it (``(z - mean) / (std + 1e-7)``, unbiased std;
    ``mdistiller/distillers/KD.py`` of sunshangquan/logit-standardization-KD). The temperature is
    then their "base temperature". Their CIFAR-100 and ImageNet commands pair it with T = 2 and a KD
    weight of 9 (CE weight 0.1; ``tools/train.py --logit-stand --base-temp 2 --kd-weight 9``), set
    with ``--set kd.standardize=true --set kd.temperature=2 --set kd.kd_weight=9``; some pairs in
    their logs use T = 3 or 4 and weights up to 18. Switching it on alone keeps T = 4 and weight 0.9.
    """

    name = "kd"
    paper = "Hinton, Vinyals, Dean: Distilling the Knowledge in a Neural Network, NIPS DL Workshop 2015"

    def __init__(self, *, ce_weight: float = 0.1, kd_weight: float = 0.9, temperature: float = 4.0,
                 standardize: bool = False) -> None:
        super().__init__(ce_weight=ce_weight)
        check_temperature(temperature)
        check_weights(kd_weight=kd_weight)
        if not isinstance(standardize, bool):
            raise ValueError(f"standardize must be true or false, got {standardize!r}")
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.standardize = standardize

    def variant(self) -> str:
        return "ls" if self.standardize else ""  # logit standardization is its own row: kd+ls

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        s, t = student.logits, teachers[0].logits
        if self.standardize:
            s, t = zscore(s), zscore(t)
        return {"kd": self.kd_weight * kd_loss(s, t, self.temperature)}
