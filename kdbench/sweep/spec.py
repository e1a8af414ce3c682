"""Frozen run specs; a run's id is the hash of its full spec, the method's code included."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..bias import Bias
from ..data.transfer import TransferSet
from ..ids import digest, without_later_fields
from ..recipe import Recipe

# Fields added after the first release, with their defaults: left out of the hash at the default,
# so existing run ids (and the results stored under them) stay valid. A transfer set and a bias
# adjustment are hashed as their non-default items (() for none).
_LATER_FIELDS: dict[str, Any] = {"model_kwargs": (), "student_kwargs": (), "world_size": 1, "precision": "fp32",
                                 "method_source": "", "transfer": (), "bias": (), "weights": "",
                                 "student_weights": "", "as_is": False, "ensemble": (), "member": 0}


#: Members of one student ensemble that share a model are trained with seeds this far apart.
MEMBER_SEED_STRIDE = 1000


def _id(kind: str, fields: dict[str, Any]) -> str:
    return digest(without_later_fields({"kind": kind, **fields}, _LATER_FIELDS))


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher: trained by kdbench (cached by this spec) or loaded from a checkpoint file."""

    model: str
    dataset: str
    recipe: Recipe
    seed: int
    device: str
    checkpoint_sha256: str = ""   # set when weights come from a file: then nothing is trained
    data_limit: int = 0
    model_kwargs: tuple[tuple[str, Any], ...] = ()  # extra timm.create_model arguments (dropout, ...)
    world_size: int = 1  # processes of one DDP run (torchrun); the recipe's batch is split among them
    precision: str = "fp32"  # the engine's: fp32 or bf16 (autocast)
    #: Pretrained weights it starts from (a timm tag, hf-hub: name or --pretrained-file): 'sha256:<hash of the
    #: loaded tensors>'; '' for random initialisation.
    weights: str = ""
    #: Pretrained weights whose classifier already fits the dataset (its class count): the teacher is used as it
    #: is, evaluated and never trained (a torchvision ResNet-34 on ImageNet). Else pretrained weights are fine-tuned.
    as_is: bool = False

    @property
    def trained_elsewhere(self) -> bool:
        """Whether its weights come ready (a checkpoint, or pretrained weights used as they are): nothing to train."""
        return bool(self.checkpoint_sha256) or self.as_is

    @property
    def run_id(self) -> str:
        return _id("teacher", {**asdict(self), "recipe": self.recipe.to_dict()})

    @property
    def label(self) -> str:
        """How progress lines and errors name this run."""
        return f"teacher {self.model} seed {self.seed}"


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one student run."""

    method: str
    hparams: tuple[tuple[str, Any], ...]
    teachers: tuple[TeacherSpec, ...]
    student: str
    dataset: str
    recipe: Recipe
    seed: int
    device: str
    data_limit: int = 0
    student_kwargs: tuple[tuple[str, Any], ...] = ()  # extra timm.create_model arguments
    world_size: int = 1  # processes of one DDP run (torchrun); the recipe's batch is split among them
    precision: str = "fp32"  # the engine's: fp32 or bf16 (autocast)
    #: A fingerprint of the method's code (:func:`kdbench.registry.method_source`): an edited method
    #: is a new run, never a skip.
    method_source: str = ""
    pair: str = ""  # the pair label this run was planned for (not part of the id: ce serves all)
    #: The images the student distils on (kdbench.data.transfer); the default is the suite's training set.
    transfer: TransferSet = TransferSet()
    #: Bias adjustments the row reports (kdbench.bias). It changes no training, yet it is part of the id:
    #: the row holds the numbers with and without it, so one run per transfer set serves both, and a
    #: changed offset is a new row rather than a stale one.
    bias: Bias = Bias()
    #: Pretrained weights the student starts from ('sha256:...', as TeacherSpec.weights); '' for random.
    student_weights: str = ""
    #: A member of a student ensemble (``T:S*3``): the ensemble's models in order, and which member this run is.
    #: Its teachers are trained with ``seed``; the student with :attr:`train_seed`.
    ensemble: tuple[str, ...] = ()
    member: int = 0

    @property
    def train_seed(self) -> int:
        """The seed the student is initialised and fed with: ``seed``, plus 1000 for each earlier member of its
        ensemble with the same model (members of different models train exactly as single students would)."""
        return self.seed + MEMBER_SEED_STRIDE * self.ensemble[:self.member].count(self.student)

    @property
    def run_id(self) -> str:
        d = asdict(self)
        d.pop("pair")
        d["recipe"] = self.recipe.to_dict()
        d["teachers"] = [t.run_id for t in self.teachers]
        d["transfer"], d["bias"] = self.transfer.items(), self.bias.items()
        return _id("student", d)

    @property
    def label(self) -> str:
        on = f" on {self.transfer.label}" if not self.transfer.empty else ""
        member = f" member {self.member + 1}/{len(self.ensemble)}" if self.ensemble else ""
        return f"{self.method} {self.pair}{member}{on} seed {self.seed}"

    @property
    def teacher_names(self) -> tuple[str, ...]:
        return tuple(t.model for t in self.teachers)


Spec = RunSpec | TeacherSpec
