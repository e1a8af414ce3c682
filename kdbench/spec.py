"""Frozen run specs; a run's id is the hash of its full spec."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from .recipe import Recipe


# Fields added after the first release, with their defaults: left out of the hash at the default,
# so existing run ids (and the results stored under them) stay valid.
_LATER_FIELDS: dict[str, Any] = {"model_kwargs": (), "student_kwargs": (), "world_size": 1, "precision": "fp32"}


def _digest(obj: Any) -> str:
    obj = {k: v for k, v in obj.items() if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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

    @property
    def teacher_id(self) -> str:
        return _digest({"kind": "teacher", **asdict(self), "recipe": self.recipe.to_dict()})


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
    pair: str = ""  # the pair label this run was planned for (not part of the id: ce serves all)

    @property
    def run_id(self) -> str:
        d = asdict(self)
        d.pop("pair")
        d["recipe"] = self.recipe.to_dict()
        d["teachers"] = [t.teacher_id for t in self.teachers]
        return _digest({"kind": "student", **d})

    @property
    def teacher_names(self) -> tuple[str, ...]:
        return tuple(t.model for t in self.teachers)
