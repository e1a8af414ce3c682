"""The method plugin contract.

A method is an ``nn.Module`` that never touches a model. The engine runs the student and the
(frozen) teachers, hands the method their *outputs*, and the method returns *named, already
weighted* loss terms. The engine adds cross-entropy (weighted by the method's ``ce_weight``), sums
the terms, and logs each one by name.

What changes over the schedule stays out of ``forward``: ``forward`` runs inside ``torch.compile``'s
graph, where a Python number that changes per epoch is a new graph (and on a GPU a new CUDA graph)
per value. The engine asks the method outside the graph instead: :meth:`Method.ce_weight_at` (the
cross-entropy's weight), :meth:`Method.term_weights_at` (a warm-up ramp on the method's terms) and
:meth:`Method.stage_at` (a named phase such as FitNets' hint stage, in ``batch.stage``).

A plugin is one file with one class::

    class MyKD(Method):
        name = "my_kd"
        paper = "Author et al., Title, Venue Year"

        def __init__(self, *, ce_weight: float = 1.0, weight: float = 1.0) -> None:
            super().__init__(ce_weight=ce_weight)
            self.weight = weight

        def forward(self, student, teachers, batch):
            return {"my_term": self.weight * some_loss(student.logits, teachers[0].logits)}
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from .errors import KdbenchError


@dataclass(frozen=True)
class Taps:
    """What a method needs from one model's forward pass (logits always come).

    Attributes:
        stages: stage indices into the model's ``feature_info`` (negative counts from the end).
        pooled: whether the pooled pre-logit vector is needed.
    """

    stages: tuple[int, ...] = ()
    pooled: bool = False
    #: Stage maps before their final activation (AB's decision boundaries need the sign). Only models
    #: whose ``supports_preact`` is true give them; others are refused when the run is planned.
    preact: bool = False


@dataclass
class Outputs:
    """One model's outputs for one batch: logits, the tapped stage maps, the pooled vector."""

    logits: Tensor
    stages: dict[int, Tensor] = field(default_factory=dict)
    pooled: Tensor | None = None


@dataclass(frozen=True)
class Probe:
    """Shapes of one model's outputs (without the batch dimension), from a dummy forward pass.

    Methods build their adapters from these, so no channel count is ever written by hand.
    """

    model: str
    num_classes: int
    stages: dict[int, tuple[int, ...]]
    pooled: tuple[int, ...] | None


@dataclass
class Batch:
    """The batch being trained on, and where in the schedule it is.

    ``labels`` is None on an unlabelled transfer set (kdbench.data.transfer): the engine adds no
    cross-entropy then, and a method that reads the labels is left out of such pairs with a note.
    ``index`` holds each image's position in the training set (0 .. ``train_size`` - 1, as
    :meth:`Method.setup_data` was told): what a memory bank of every training image (CRD) is
    indexed by. ``stage`` is ``"init"`` during a method's init stage (``Method.init_epochs``),
    when ``epoch`` and ``epochs`` count the init stage's epochs, and after it what
    :meth:`Method.stage_at` names (``"train"`` unless the method has phases).

    ``epoch`` and ``epochs`` are for reading outside the compiled step (logging, tests): a ``forward``
    that reads ``epoch`` makes ``torch.compile`` treat it as an input and record a CUDA graph per
    epoch. Per-epoch weights belong in :meth:`Method.term_weights_at`, phases in :meth:`Method.stage_at`.
    """

    images: Tensor
    labels: Tensor | None
    epoch: int
    epochs: int
    index: Tensor | None = None
    stage: str = "train"
    #: Under a recipe's mixup/CutMix: each image's mixed label distribution (N x classes); ``labels`` then
    #: holds each image's own (first) label, and the teachers saw the mixed images. None otherwise.
    soft_labels: Tensor | None = None


class Method(nn.Module):
    """Base class of every distillation method.

    Subclasses set ``name`` and ``paper``, take their hyperparameters as keyword-only ``__init__``
    arguments with defaults (one of them ``ce_weight``), and implement ``forward``. Trainable
    adapters are built in ``setup`` as submodules; the engine optimises every parameter of the
    method together with the student's.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: How many teachers the method takes; 0 means it needs none (the label-only baseline).
    min_teachers: ClassVar[int] = 1
    max_teachers: ClassVar[int] = 1
    #: Epochs of an init stage trained before the recipe's schedule (RepDistiller's ``--init_epochs``
    #: for AB, FT and FSP); 0: none. A method with one sets it from a hyperparameter. During it
    #: ``forward`` gets ``batch.stage == "init"``, the engine adds no cross-entropy, the rate is the
    #: recipe's base rate throughout, and only what the init terms reach trains. A shortened run
    #: (``--epochs``) shortens it in proportion (:func:`init_epochs_for`).
    init_epochs: int = 0
    #: The init stage's learning rate as a multiple of the recipe's base rate (RepDistiller trains FT's
    #: paraphraser at 0.01 for its ResNet and WRN students, 0.2 of their 0.05).
    init_lr_scale: float = 1.0

    def __init__(self, *, ce_weight: float = 1.0) -> None:
        super().__init__()
        check_weights(ce_weight=ce_weight)
        self.ce_weight = ce_weight

    # -- what the engine asks -------------------------------------------------------------
    def taps(self) -> Taps:
        """What the method needs from the student and each teacher (default: logits only)."""
        return Taps()

    def setup(self, student: Probe, teachers: Sequence[Probe]) -> None:
        """Build trainable adapters from probed shapes. Called once, before the optimizer."""

    def setup_data(self, *, train_size: int, labels: Tensor | None = None) -> None:
        """Told the number of training images, and their labels (None on an unlabelled transfer set),
        before the first step (after :meth:`setup`); ``batch.index`` indexes both.

        A method that keeps state per training image (CRD's memory bank) allocates it here, as
        buffers: they move to the run's device with the method and are saved in its checkpoints.
        """

    def variant(self) -> str:
        """A short tag for a setting that makes this a different method in every table, e.g. ``"ls"`` for KD
        with logit standardization: the run's table label is then ``kd+ls`` ('' for none, the default)."""
        return ""

    def state_bytes(self) -> int:
        """Bytes of the method's state that is not trained (buffers: a memory bank); reported in the row."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def ce_weight_at(self, epoch: int, epochs: int) -> float:
        """Weight of the engine's cross-entropy term at ``epoch`` (0-based) of ``epochs``."""
        return self.ce_weight

    def term_weights_at(self, epoch: int, epochs: int) -> dict[str, float]:
        """Multipliers of the method's terms at ``epoch`` (0-based) of ``epochs``, by term name (a warm-up
        ramp); a term not named keeps the weight ``forward`` gave it. The engine multiplies outside the
        compiled step, so the number never enters the graph. Not asked during an init stage."""
        return {}

    def stage_at(self, epoch: int, epochs: int) -> str:
        """The phase of the schedule at ``epoch`` (0-based) of ``epochs``, given to ``forward`` as
        ``batch.stage`` (FitNets' ``"hint"`` stage); ``"train"`` for a method without phases. A new name is
        one more compiled graph, not one per epoch. (``"init"`` is the init stage's, set by the engine.)"""
        return "train"

    def weigh(self, terms: dict[str, Tensor], epoch: int, epochs: int) -> dict[str, Tensor]:
        """``terms`` (from ``forward``) times :meth:`term_weights_at`: what the engine trains on."""
        return weigh_terms(terms, self.term_weights_at(epoch, epochs), f"method '{self.name}'")

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        """Return named, already weighted loss terms (scalars) for one batch."""
        raise NotImplementedError

    # -- introspection used by the registry, the CLI and the results store ----------------
    @classmethod
    def hyperparameters(cls) -> dict[str, Any]:
        """The keyword-only ``__init__`` arguments and their defaults."""
        sig = inspect.signature(cls.__init__)
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    @classmethod
    def teachers_taken(cls) -> str:
        """How many teachers the method takes, in words ("no teacher", "1 teacher", "1-64 teachers")."""
        lo, hi = cls.min_teachers, cls.max_teachers
        if hi == 0:
            return "no teacher"
        count = str(hi) if lo == hi else f"{lo}-{hi}"
        return f"{count} teacher" + ("" if count == "1" else "s")

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        doc = inspect.getdoc(cls) or ""
        return doc.splitlines()[0] if doc else ""

    def config(self) -> dict[str, Any]:
        """The hyperparameters this instance was built with."""
        return {k: getattr(self, k) for k in self.hyperparameters()}

    def extra_parameters(self) -> int:
        """Number of trainable parameters the method adds (adapters, regressors)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def weigh_terms(terms: dict[str, Tensor], weights: dict[str, float], who: str) -> dict[str, Tensor]:
    """Each term times its weight in ``weights`` (1 where not named); ``who`` names the method in the error
    raised for a weight whose term is missing (a typo would otherwise leave a ramp silently unapplied)."""
    missing = sorted(set(weights) - set(terms))
    if missing:
        raise KdbenchError(f"{who} weights term(s) {missing} that its forward did not return (it returned "
                           f"{sorted(terms)}); term_weights_at must name only terms forward returns")
    return {k: v if weights.get(k, 1.0) == 1.0 else v * weights[k] for k, v in terms.items()}


def init_epochs_for(method: Method | None, epochs: int, full_epochs: int) -> int:
    """The init-stage epochs a run of ``epochs`` of a recipe's ``full_epochs`` trains: the method's
    ``init_epochs`` scaled as the schedule is (at least 1 where it has one)."""
    init = int(getattr(method, "init_epochs", 0) or 0)
    if init <= 0:
        return 0
    return max(1, round(init * epochs / full_epochs)) if epochs < full_epochs else init


def check_init_epochs(init_epochs: int) -> int:
    """An init stage's length must be a whole number of epochs >= 0 (0: no init stage)."""
    if isinstance(init_epochs, bool) or not isinstance(init_epochs, (int, float)) or \
            not float(init_epochs).is_integer() or init_epochs < 0:
        raise ValueError(f"init_epochs must be a whole number of epochs >= 0 (0: no init stage), got {init_epochs!r}")
    return int(init_epochs)


def check_weights(**weights: float) -> None:
    """Loss weights must be >= 0: 0 turns a term off, a negative one would maximise its loss.

    Written as ``not w >= 0`` so that NaN fails too. Raises ``ValueError`` (a clear user error
    once ``build_method`` wraps it).
    """
    for name, w in weights.items():
        if not w >= 0:
            raise ValueError(f"{name} must be >= 0 (0 turns its term off; a negative weight maximises its loss), "
                             f"got {w}")


def check_temperature(temperature: float) -> None:
    """A softmax temperature must be > 0 (NaN fails too)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_stages(stages: Sequence[float], method: str) -> tuple[int, ...]:
    """The tapped stages as distinct ints (a suite may write them as TOML floats)."""
    if not stages or not all(float(i).is_integer() for i in stages) or len(set(stages)) != len(stages):
        raise ValueError(f"stages must be one or more distinct stage indices (negative counts from the end), "
                         f"e.g. {method}.stages=-3,-2,-1; got {tuple(stages)}")
    return tuple(int(i) for i in stages)


def check_maps(stages: Sequence[int], student: Probe, teachers: Sequence[Probe], method: str) -> None:
    """Refuse stages that are not C x H x W maps: a vector (an MLP's hidden layer) has no positions."""
    for probe in (student, *teachers):
        for i in stages:
            shape = probe.stages[i]
            if len(shape) != 3:
                raise ValueError(f"{method} needs C x H x W stage maps, but stage {i} of {probe.model} has shape "
                                 f"{shape} (a vector has no spatial positions); choose convolutional models or "
                                 f"other stages (--set {method}.stages=...)")


__all__ = ["Batch", "Method", "Outputs", "Probe", "Taps", "check_maps", "check_stages", "check_temperature",
           "check_init_epochs", "check_weights", "init_epochs_for", "weigh_terms"]
