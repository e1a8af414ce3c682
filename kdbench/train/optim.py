"""A recipe's optimiser and learning-rate schedule, stepped once per epoch."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..recipe import Recipe


def make_optimizer(params: list[nn.Parameter], recipe: Recipe, *, init_epochs: int = 0, init_lr_scale: float = 1.0
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The recipe's optimiser (SGD with momentum, or AdamW) with its weight decay, and its schedule (stepped once
    per epoch): the step decay or a cosine, after a linear warm-up over ``recipe.warmup_epochs`` when it has
    one. A method's ``init_epochs`` come first, at ``init_lr_scale`` × the base rate (RepDistiller's init stage); the
    schedule follows them."""
    if recipe.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                              nesterov=recipe.nesterov)
    if not recipe.warmup_epochs and not init_epochs and recipe.schedule == "step":
        # MultiStepLR as before: earlier checkpoints still resume
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(recipe.lr_milestones),
                                                         gamma=recipe.gamma)
    warmup, milestones, gamma = max(recipe.warmup_epochs, 1), recipe.lr_milestones, recipe.gamma
    # cosine: from the full rate after the warm-up down towards 0 at the last epoch (timm's CosineLRScheduler
    # per epoch, without restarts or a floor)
    decay = max(recipe.epochs - recipe.warmup_epochs, 1)

    def factor(epoch: int) -> float:  # epoch e of the warm-up trains at (e + 1) / warmup of the rate
        if epoch < init_epochs:
            return init_lr_scale
        epoch -= init_epochs
        ramp = min(1.0, (epoch + 1) / warmup)
        if recipe.schedule == "cosine":
            done = max(epoch - recipe.warmup_epochs, 0) / decay
            return ramp * 0.5 * (1 + math.cos(math.pi * done))
        return ramp * gamma ** sum(1 for m in milestones if m <= epoch)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


__all__ = ["make_optimizer"]
