"""Distillation from a noisy teacher: Gaussian logit perturbation (Sau & Balasubramanian 2016)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kdbench.losses import kd_loss, logit_regression
from kdbench.method import Batch, Method, Outputs, check_temperature, check_weights

LOSSES = ("l2", "kl")


class NoisyKD(Method):
    """Learn from the teacher's logits perturbed by multiplicative Gaussian noise, a regulariser.

    Each sample's teacher logits are perturbed with probability ``alpha`` (the fraction of the
    samples that are perturbed; the others keep their clean logits) as ``z' = (1 + σ·ξ) ⊙ z`` with
    ``ξ ~ N(0, I)`` drawn per logit: the paper's logit perturbation, which simulates learning from
    several teachers. The student then regresses onto ``z'`` as in Ba & Caruana's mimic learning,
    which the paper builds on: ``loss = weight · 1/(2N) Σ_i ‖g(x_i) − z'_i‖²`` (``loss = "l2"``,
    the default), trained on the teacher's outputs alone (CE weight 0). ``loss = "kl"`` uses
    Hinton's tempered KL to softmax(z'/T) instead (``temperature`` is read only then).

    The noise comes from a generator of the method's own, seeded from ``noise_seed`` (-1: the run's
    seed, which the runner sets with ``torch.manual_seed`` before building the method), drawn on the
    CPU in a fixed order (a uniform per sample, then a normal per logit) whatever the device, so that
    runs repeat; its state is part of the method's ``state_dict`` (``get_extra_state``), so a run
    resumed from a checkpoint continues the same stream. Under DDP every rank draws the same stream
    for its own slice of the batch.

    Sources: the paper's abstract and secondary summaries of it (Gaussian perturbation of the teacher's
    logits with standard deviation σ, applied per sample with probability α, the student trained by
    SGD on the perturbed targets); the paper's text itself could not be read here. The multiplicative
    form and α = 0.5 follow two public reimplementations (KD_Lib, chengshengchan/model_compression);
    **σ = 0.1 is kdbench's choice, not a value checked against the paper**: set ``noisy_kd.sigma``.
    """

    name = "noisy_kd"
    paper = ("Sau, Balasubramanian: Deep Model Compression: Distilling Knowledge from Noisy Teachers, "
             "arXiv:1610.09650, 2016")

    def __init__(self, *, ce_weight: float = 0.0, weight: float = 1.0, sigma: float = 0.1, alpha: float = 0.5,
                 loss: str = "l2", temperature: float = 4.0, noise_seed: int = -1) -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(weight=weight)
        check_temperature(temperature)
        if not sigma >= 0:
            raise ValueError(f"sigma (the noise's standard deviation, relative to each logit) must be >= 0, "
                             f"got {sigma}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha (the fraction of samples whose teacher logits are perturbed) must be in "
                             f"[0, 1], got {alpha}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got '{loss}'")
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, int) or noise_seed < -1:
            raise ValueError(f"noise_seed must be an integer >= 0, or -1 for the run's seed; got {noise_seed!r}")
        self.weight, self.sigma, self.alpha, self.loss = weight, sigma, alpha, loss
        self.temperature, self.noise_seed = temperature, noise_seed
        self.generator = torch.Generator()  # on the CPU: the same stream on every device
        self.generator.manual_seed(noise_seed if noise_seed >= 0 else torch.initial_seed())

    # -- the noise stream, saved with the method ----------------------------------------------
    def get_extra_state(self) -> Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Tensor) or state.dtype != torch.uint8:
            raise ValueError(f"noisy_kd's saved state must be a generator state (a uint8 tensor), got "
                             f"{type(state).__name__}")
        self.generator.set_state(state.cpu())

    @torch.compiler.disable  # a CPU generator: drawn eagerly, outside any compiled graph
    def multipliers(self, n: int, classes: int) -> Tensor:
        """``1 + σ·ξ`` for the perturbed samples, 1 for the others: an (n, classes) float32 CPU tensor."""
        chosen = torch.rand(n, 1, generator=self.generator) < self.alpha
        xi = torch.randn(n, classes, generator=self.generator)
        return 1 + self.sigma * xi * chosen

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        s, t = student.logits.float(), teachers[0].logits.detach().float()
        m = self.multipliers(*t.shape)
        if t.is_cuda:
            m = m.pin_memory().to(t.device, non_blocking=True)
        noisy = t * m.to(t.device)
        if self.loss == "l2":
            term = logit_regression(s, noisy)
        else:
            term = kd_loss(s, noisy, self.temperature)
        return {"noisy_kd": self.weight * term}
