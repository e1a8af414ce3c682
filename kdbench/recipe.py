"""Training recipes: the schedule and optimisation settings, as data.

A recipe is part of a suite and of every run's spec. Asking for fewer epochs than a recipe's own
length scales its learning-rate milestones and marks the run *shortened* in every output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from .errors import KdbenchError, suggest, unknown
from .data.mixing import MixSpec
from .data.rrc import RRCSpec
from .ids import without_later_fields
from .values import like


@dataclass(frozen=True)
class Recipe:
    """SGD with momentum and a step learning-rate schedule, plus batch augmentation."""

    name: str
    epochs: int
    batch_size: int
    lr: float
    milestones: tuple[int, ...]  # at the recipe's full length; see lr_milestones
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_padding: int = 4      # random crop with this much zero padding (0 = off)
    flip: bool = True          # random horizontal flip
    full_epochs: int = 0       # the recipe's published length (0 = same as epochs)
    description: str = ""
    # Max-norm constraint (Srivastava et al. 2014): after every step, each unit's incoming
    # weight vector (a row of a Linear weight, a conv filter) is rescaled to at most this L2
    # norm. 0 = off. Hinton et al. 2015 trained their MNIST teacher with it.
    max_norm: float = 0.0
    # Linear learning-rate warm-up: epoch e < warmup_epochs trains at (e + 1) / warmup_epochs of the
    # rate. 0 = off. A student distilling a teacher with large logits at a high temperature takes
    # steps several times plain cross-entropy's at first (hinton-mnist.toml).
    warmup_epochs: int = 0
    # A stratified part of the training set (data.holdout, split seed 0) held out for validation:
    # 0 = off, else in (0, 0.5]. The best epoch can then be chosen on it rather than on the test set.
    val_fraction: float = 0.0
    # Early stopping: end training after this many epochs without a new best validation top-1
    # (0 = off; needs val_fraction > 0).
    early_stop: int = 0
    # Mixup and CutMix (kdbench.data.mixing, timm's Mixup in batch mode, no label smoothing): the Beta
    # distributions' alphas (0 = off), the probability that a batch is mixed at all, and with both alphas
    # > 0 the probability of CutMix rather than mixup. The teachers see the mixed images (no teacher cache).
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    # The optimiser: "sgd" (momentum, optionally Nesterov's) or "adamw" (decoupled weight decay; betas 0.9/0.999),
    # and the schedule after the warm-up: "step" (x gamma at each milestone) or "cosine" (from lr to 0 over the
    # remaining epochs; milestones unused). Label smoothing of the engine's cross-entropy (0 = off).
    optimizer: str = "sgd"
    nesterov: bool = False
    schedule: str = "step"
    label_smoothing: float = 0.0
    # The training crop: "pad_crop" (crop_padding's zero-padded random crop, the CIFAR protocol) or
    # "random_resized_crop" (the ImageNet protocol: an area fraction in rrc_scale and an aspect ratio in rrc_ratio,
    # resized back to the image size; kdbench.data.rrc). Either with flip when set.
    train_crop: str = "pad_crop"
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # Gradient clipping: before each step the gradients of everything the optimiser trains are scaled so
    # their global L2 norm is at most this (timm's --clip-grad, mode norm). 0 = off.
    clip_grad: float = 0.0

    def __post_init__(self) -> None:
        if self.full_epochs == 0:
            object.__setattr__(self, "full_epochs", self.epochs)
        for key in ("epochs", "batch_size", "full_epochs"):
            if getattr(self, key) < 1:
                raise KdbenchError(f"recipe '{self.name}': {key} must be at least 1, got {getattr(self, key)}")
        for key in ("lr", "gamma"):
            if not getattr(self, key) > 0:
                raise KdbenchError(f"recipe '{self.name}': {key} must be positive, got {getattr(self, key)}")
        for key in ("momentum", "weight_decay", "crop_padding", "max_norm", "early_stop", "warmup_epochs",
                    "clip_grad"):
            if getattr(self, key) < 0:
                raise KdbenchError(f"recipe '{self.name}': {key} must be >= 0, got {getattr(self, key)}")
        self._check_milestones()
        self._check_validation()
        self._check_mixing()
        self._check_optimiser()

    def _check_optimiser(self) -> None:
        for key, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, key) not in allowed:
                raise KdbenchError(f"recipe '{self.name}': {key} '{getattr(self, key)}' is not one of "
                                   f"{', '.join(allowed)}")
        if not 0 <= self.label_smoothing < 1:
            raise KdbenchError(f"recipe '{self.name}': label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise KdbenchError(f"recipe '{self.name}': nesterov needs optimizer 'sgd' with momentum > 0")
        if self.train_crop not in TRAIN_CROPS:
            raise KdbenchError(f"recipe '{self.name}': train_crop '{self.train_crop}' is not one of "
                               f"{', '.join(TRAIN_CROPS)}")
        for key, lo, hi in (("rrc_scale", 0.0, 1.0), ("rrc_ratio", 0.0, math.inf)):
            a, b = (tuple(getattr(self, key)) + (None, None))[:2]
            if len(tuple(getattr(self, key))) != 2 or not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                                           and lo < a <= b <= hi):
                raise KdbenchError(f"recipe '{self.name}': {key} must be two numbers, low <= high, in "
                                   f"({lo:g}, {hi:g}], got {getattr(self, key)!r}")

    def _check_milestones(self) -> None:
        """Increasing, each after epoch 0 and before the recipe's full length (else it never lowers the lr)."""
        ms = tuple(self.milestones)
        if list(ms) != sorted(set(ms)):
            raise KdbenchError(f"recipe '{self.name}': milestones must be increasing, got {list(ms)}; write "
                               f"them in order, once each, e.g. milestones = {sorted(set(ms))}")
        if late := [m for m in ms if not 0 < m < self.full_epochs]:
            raise KdbenchError(f"recipe '{self.name}': milestone {late[0]} is not within its {self.full_epochs} "
                               "epochs, so it would never lower the learning rate; give milestones from 1 to "
                               f"{self.full_epochs - 1}, or milestones = [] for a constant rate (changing epochs, "
                               "change milestones with it)")

    def _check_validation(self) -> None:
        """val_fraction and early_stop: refused before any training."""
        if self.val_fraction != 0 and not 0 < self.val_fraction <= 0.5:
            raise KdbenchError(f"recipe '{self.name}': val_fraction must be 0 (no validation split) or in "
                               f"(0, 0.5], got {self.val_fraction}; use e.g. val_fraction = 0.1")
        if self.early_stop > 0 and self.val_fraction == 0:
            raise KdbenchError(f"recipe '{self.name}': early_stop = {self.early_stop} needs a validation split "
                               "to watch; set val_fraction (e.g. 0.1) too, or early_stop = 0")

    def _check_mixing(self) -> None:
        for key in ("mixup_alpha", "cutmix_alpha"):
            if not getattr(self, key) >= 0:
                raise KdbenchError(f"recipe '{self.name}': {key} must be >= 0 (0 turns it off; timm's usual values "
                                   f"are 0.8 for mixup and 1.0 for CutMix), got {getattr(self, key)}")
        for key in ("mix_prob", "mix_switch_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise KdbenchError(f"recipe '{self.name}': {key} is a probability, in [0, 1]; got {getattr(self, key)}")

    @property
    def mixing(self) -> MixSpec:
        """The mixup/CutMix settings (disabled when both alphas are 0)."""
        return MixSpec(self.mixup_alpha, self.cutmix_alpha, self.mix_prob, self.mix_switch_prob)

    @property
    def rrc(self) -> RRCSpec | None:
        """The RandomResizedCrop settings, None for the pad-crop."""
        if self.train_crop != "random_resized_crop":
            return None
        return RRCSpec(tuple(map(float, self.rrc_scale)), tuple(map(float, self.rrc_ratio)))

    @property
    def shortened(self) -> bool:
        return self.epochs < self.full_epochs

    @property
    def label(self) -> str:
        """How the schedule is named in every table, plot and row."""
        label = (f"{self.name}, shortened: {self.epochs} of {self.full_epochs} epochs" if self.shortened
                 else f"{self.name}, {self.epochs} epochs")
        # A validation split changes what a run trains on: the report must not average it with runs without.
        if self.val_fraction:
            label += f", {100 * self.val_fraction:g}% held out for validation"
        if self.early_stop:
            label += f", early stopping (patience {self.early_stop})"
        if self.mixing.enabled:
            kinds = [f"mixup α {self.mixup_alpha:g}"] * (self.mixup_alpha > 0) + \
                    [f"CutMix α {self.cutmix_alpha:g}"] * (self.cutmix_alpha > 0)
            label += ", " + " / ".join(kinds)
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                label += f" (CutMix with p {self.mix_switch_prob:g})"
            if self.mix_prob < 1:
                label += f", mixing p {self.mix_prob:g}"
        if self.rrc is not None:
            label += f", random resized crop (scale {self.rrc_scale[0]:g}-{self.rrc_scale[1]:g})"
        if self.clip_grad:
            label += f", gradients clipped at norm {self.clip_grad:g}"
        if self.optimizer != "sgd" or self.schedule != "step" or self.label_smoothing:
            label += ", " + " ".join([self.optimizer] + [f"{self.schedule} schedule"] +
                                     [f"label smoothing {self.label_smoothing:g}"] * bool(self.label_smoothing))
        return label

    @property
    def lr_milestones(self) -> tuple[int, ...]:
        """Epochs at which the learning rate is multiplied by ``gamma``, scaled to ``epochs``."""
        scaled = {round(m * self.epochs / self.full_epochs) for m in self.milestones}
        return tuple(sorted(m for m in scaled if 0 < m < self.epochs))

    def with_epochs(self, epochs: int) -> Recipe:
        """The same recipe over ``epochs`` epochs (milestones scale with it)."""
        if epochs < 1:
            raise KdbenchError(f"--epochs must be at least 1, got {epochs}")
        return replace(self, epochs=epochs)

    def with_overrides(self, overrides: dict[str, Any], where: str) -> Recipe:
        """The recipe with some fields replaced (a suite's per-model settings), type-checked."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        out: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in fields:
                raise KdbenchError(f"{where}: unknown recipe field '{key}';{suggest(key, fields)} "
                                   f"recipe fields: {', '.join(fields)}")
            try:
                out[key] = like(value, getattr(self, key), f"recipe field '{key}'")
            except ValueError as exc:
                raise KdbenchError(f"{where}: {exc}") from None
        if "epochs" in out and "full_epochs" not in out:
            out["full_epochs"] = out["epochs"]  # a new length, not a shortened run of the old one
        try:
            return replace(self, **out)
        except KdbenchError as exc:  # a value out of range
            raise KdbenchError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("description")
        return without_later_fields(d, _LATER_FIELDS)  # run ids hash this dict


_LATER_FIELDS: dict[str, Any] = {"max_norm": 0.0, "warmup_epochs": 0, "val_fraction": 0.0, "early_stop": 0,
                                 "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mix_prob": 1.0, "mix_switch_prob": 0.5,
                                 "optimizer": "sgd", "nesterov": False, "schedule": "step", "label_smoothing": 0.0,
                                 "train_crop": "pad_crop", "rrc_scale": (0.08, 1.0), "rrc_ratio": (3 / 4, 4 / 3),
                                 "clip_grad": 0.0}
TRAIN_CROPS = ("pad_crop", "random_resized_crop")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            name="crd", epochs=240, batch_size=64, lr=0.05, milestones=(150, 180, 210),
            description="CRD benchmark (Tian et al. 2020): SGD 0.9, wd 5e-4, batch 64, lr 0.05 "
                        "x0.1 at 150/180/210 of 240; crop 32 pad 4 + flip",
        ),
        Recipe(
            name="digits", epochs=30, batch_size=64, lr=0.05, milestones=(20, 25), crop_padding=1,
            flip=False,
            description="kdbench's recipe for the embedded 8x8 digits: the CRD optimiser over 30 "
                        "epochs (lr x0.1 at 20 and 25); 1-pixel jitter, no flip (digits are not "
                        "mirror-symmetric)",
        ),
        Recipe(
            name="imagenet", epochs=100, batch_size=256, lr=0.1, milestones=(30, 60, 90), weight_decay=1e-4,
            crop_padding=0, flip=True, train_crop="random_resized_crop",
            description="The ImageNet KD protocol (CRD, DKD, mdistiller's r34_r18 configs): SGD 0.9, wd 1e-4, "
                        "batch 256, lr 0.1 x0.1 at 30/60/90 of 100 epochs; RandomResizedCrop (scale 0.08-1) + flip "
                        "on the decoded images (a suite sets image_size 224, crop_pct 0.875: resize 256, "
                        "centre-crop 224)",
        ),
        Recipe(
            name="mnist_mlp", epochs=30, batch_size=128, lr=0.05, milestones=(20, 25),
            weight_decay=0.0, crop_padding=2, flip=False,
            description="kdbench's recipe for Hinton's MNIST MLPs (the paper states none): SGD 0.9, "
                        "lr 0.05 x0.1 at 20 and 25 of 30, no weight decay, inputs jittered by up "
                        "to 2 pixels",
        ),
    ]
}


#: How a pretrained teacher whose classifier is replaced (it was trained for other classes) is fine-tuned: its run's
#: recipe (augmentation, batch, optimiser) with these fields, and a tenth of the learning rate. A suite's
#: ``[teacher_finetune]`` table replaces any of them (and may set ``lr``).
FINETUNE_FIELDS: dict[str, Any] = {"epochs": 10, "schedule": "cosine", "milestones": [], "warmup_epochs": 1}
FINETUNE_LR_FACTOR = 0.1


def finetune_recipe(base: Recipe, overrides: Mapping[str, Any], where: str) -> Recipe:
    """The ``teacher_finetune`` recipe: ``base`` with :data:`FINETUNE_FIELDS`, lr × :data:`FINETUNE_LR_FACTOR`,
    then ``overrides`` (a suite's ``[teacher_finetune]``); named so in every row and table."""
    fields = {**FINETUNE_FIELDS, "lr": base.lr * FINETUNE_LR_FACTOR, **overrides}
    recipe = base.with_overrides(fields, where)
    return replace(recipe, name="teacher_finetune", description=f"fine-tuning a pretrained teacher: {base.name}'s "
                   f"recipe with {', '.join(f'{k} {v}' for k, v in fields.items())}")


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise unknown("recipe", name, RECIPES, fix="See `kdbench list recipes`.")
    return RECIPES[name]
