"""Mixup and CutMix of a training batch, as timm's ``Mixup`` does them in its default ``mode="batch"``.

One mixing coefficient per batch: with probability ``prob`` the batch is mixed with itself reversed
(image i with image n - 1 - i), by a convex combination of the images (mixup, λ ~ Beta(α, α)) or by
pasting a box of the reversed batch into every image (CutMix, λ ~ Beta(α, α), then corrected to the
box's true share of the image). With both α > 0, CutMix is chosen with probability ``switch_prob``.
The labels mix with the same λ: λ·onehot(y) + (1 − λ)·onehot(reversed y). kdbench adds no label
smoothing (timm's default 0.1): a distillation method brings its own soft targets.

The draws are made on the CPU from a NumPy ``RandomState`` seeded once per epoch from the run's
seeded generator (:class:`~kdbench.data.loader.Loader`), in the order timm draws them from NumPy's
global state, so runs repeat and resume bit for bit, nothing waits for the device within an epoch,
and the same seed gives timm's own draws (tests/test_mixing.py). The mixing of the images happens on
their device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class MixSpec:
    """The recipe's mixing settings (``Recipe.mixup_alpha`` and the rest)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


@dataclass(frozen=True)
class MixDraw:
    """One batch's draw: λ (1.0: not mixed) and, for CutMix, the box (rows yl:yh, columns xl:xh)."""

    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None


def draw(spec: MixSpec, rng: np.random.RandomState, height: int, width: int) -> MixDraw:
    """One batch's mixing parameters, drawn from ``rng`` in timm's order (``Mixup._params_per_batch``,
    then ``cutmix_bbox_and_lam`` with ``correct_lam=True``)."""
    if not (spec.enabled and rng.rand() < spec.prob):
        return MixDraw()
    if spec.mixup_alpha > 0 and spec.cutmix_alpha > 0:
        cutmix = bool(rng.rand() < spec.switch_prob)
    else:
        cutmix = spec.cutmix_alpha > 0
    alpha = spec.cutmix_alpha if cutmix else spec.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if not cutmix:
        return MixDraw(lam)
    # A box of side sqrt(1 - λ) of the image's, centred anywhere in it and clipped at its borders.
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.randint(0, height), rng.randint(0, width)
    # An odd side puts its extra row or column after the centre (timm >= 1.0's rand_bbox).
    yl, yh = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + (cut_h + 1) // 2, 0, height))
    xl, xh = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + (cut_w + 1) // 2, 0, width))
    # λ is the share of each image that stays its own once the clipped box is pasted in.
    lam = 1.0 - (yh - yl) * (xh - xl) / float(height * width)
    return MixDraw(lam, (yl, yh, xl, xh))


def mix(images: Tensor, labels: Tensor, num_classes: int, d: MixDraw) -> tuple[Tensor, Tensor]:
    """The mixed images and the mixed label distributions (N × classes, float32) of one batch."""
    onehot = torch.nn.functional.one_hot(labels, num_classes).float()
    if d.lam == 1.0:
        return images, onehot
    other = images.flip(0)
    if d.box is not None:
        yl, yh, xl, xh = d.box
        images = images.clone()
        images[:, :, yl:yh, xl:xh] = other[:, :, yl:yh, xl:xh]
    else:
        images = images * d.lam + other * (1.0 - d.lam)
    return images, onehot * d.lam + onehot.flip(0) * (1.0 - d.lam)


def epoch_rng(generator: torch.Generator) -> np.random.RandomState:
    """A NumPy stream for one epoch's draws, seeded from the run's generator (one read per epoch)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())
    return np.random.RandomState(seed)


__all__ = ["MixDraw", "MixSpec", "draw", "epoch_rng", "mix"]
