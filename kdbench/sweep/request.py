"""What the user asked for: one frozen value, built once by the CLI (or a script) and never changed.

Everything a sweep does follows from a :class:`Request`: :func:`kdbench.sweep.plan.build_plan`
turns it into run specs, and a worker process on another machine rebuilds the same sweep from it
(it is plain data: method names and plugin paths, never classes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..data.resolution import Resolution
from ..recipe import Recipe, finetune_recipe
from ..suites import Pair
from ..train import EngineOptions
from .hparams import HParams

_AUTO = "auto"


@dataclass(frozen=True)
class Request:
    """A sweep: methods × pairs × seeds on one dataset and recipe, and how to run it.

    Attributes:
        methods: method names, or None for every loadable method.
        named: the user named the methods (``--methods a,b``): a method that can take none of the
            pairs is an error then; otherwise (all, or a suite's list) it is left out with a note.
        device: ``auto``, ``cpu`` or ``cuda[:N]``; for Ray and Slurm the workers' device.
        remote: the runs happen in other processes (Ray, Slurm, or a local worker pool: ``--gpus``,
            ``--workers N``): this process only plans, on its CPU, and ``device`` is the workers'.
    """

    methods: tuple[str, ...] | None
    pairs: tuple[Pair, ...]
    dataset: str
    recipe: Recipe
    seeds: tuple[int, ...] = (0,)
    named: bool = False
    hparams: HParams = field(default_factory=HParams)
    plugins: tuple[str, ...] = ()                        # --plugin files (absolute paths)
    teacher_checkpoints: Mapping[str, str] = field(default_factory=dict)  # teacher model -> file
    recipe_by_model: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # --epochs N / --epochs-scale F as given (0 = not given): a model whose suite recipe sets its own
    # length (a 150-epoch teacher beside 60-epoch students) is shortened by them too.
    epochs: int = 0
    epochs_scale: float = 0.0
    model_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: How a pretrained teacher whose classifier is replaced is fine-tuned (kdbench.recipe.finetune_recipe): the
    #: suite's [teacher_finetune] fields, {} for the built-in settings (--teacher-finetune); None: refused.
    teacher_finetune: Mapping[str, Any] | None = None
    results_dir: Path = Path("kdbench-results")
    data_dir: str | None = None
    download: bool = False
    limit: int = 0
    pad_to: int = 0
    resolution: Resolution = Resolution()  # --image-size/--crop-pct/--interpolation, or the suite's
    pretrained_files: Mapping[str, str] = field(default_factory=dict)  # --pretrained-file MODEL=FILE
    data_backend: str = _AUTO      # --data-backend: auto, memory or stream (kdbench.data.stream)
    loader_workers: int = 0        # --loader-workers: the streaming DataLoader's workers (0: default_workers())
    device: str = _AUTO
    remote: bool = False
    throughput_batch: int = 256
    runs_per_gpu: int = 1          # --runs-per-gpu: K > 1 runs share a GPU, so throughput is not measured
    quiet: bool = False
    command: str = ""              # the command line, recorded in every row (workers have other argv)
    # How the engine computes: "auto" picks by device (fast on CUDA, plain fp32 on the CPU). Only
    # the precision is part of a run's id; the others change float rounding only.
    precision: str = _AUTO         # auto, fp32 or bf16
    compile: str = _AUTO           # auto, on or off
    channels_last: str = _AUTO     # auto, on or off
    teacher_cache: str = _AUTO     # auto (when it saves teacher compute, on CUDA), on or off

    @property
    def member_pairs(self) -> tuple[Pair, ...]:
        """The pairs as student runs see them: a student ensemble's members each a pair of its own."""
        return tuple(m for p in self.pairs for m in p.expand())

    def engine_options(self, device_type: str) -> EngineOptions:
        fast = EngineOptions.fast_for(device_type)
        return EngineOptions(
            precision=fast.precision if self.precision == _AUTO else self.precision,
            channels_last=fast.channels_last if self.channels_last == _AUTO else self.channels_last == "on",
            compile=fast.compile if self.compile == _AUTO else self.compile == "on",
            compile_fallback=self.compile == _AUTO and fast.compile)

    def recipe_for(self, model: str) -> Recipe:
        """The recipe ``model`` trains with: the sweep's, with the suite's fields for that model."""
        extra = self.recipe_by_model.get(model)
        if not extra:
            return self.recipe
        recipe = self.recipe.with_overrides(dict(extra), f"recipe for {model}")
        if "epochs" in extra and self.epochs:
            return recipe.with_epochs(self.epochs)
        if "epochs" in extra and self.epochs_scale:
            return recipe.with_epochs(max(1, round(recipe.epochs * self.epochs_scale)))
        return recipe

    def teacher_recipe_for(self, model: str, *, finetune: bool) -> Recipe:
        """A teacher's recipe: :meth:`recipe_for`, or with ``finetune`` its fine-tuning (--epochs and --epochs-scale
        shorten that too)."""
        recipe = self.recipe_for(model)
        if not finetune:
            return recipe
        tuned = finetune_recipe(recipe, self.teacher_finetune or {}, "[teacher_finetune]")
        if self.epochs:
            return tuned.with_epochs(min(self.epochs, tuned.epochs))
        return tuned.with_epochs(max(1, round(tuned.epochs * self.epochs_scale))) if self.epochs_scale else tuned

    def kwargs_for(self, model: str) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted(self.model_kwargs.get(model, {}).items()))

    def kwargs_dict(self, model: str) -> dict[str, Any]:
        return dict(self.kwargs_for(model))

    def for_workers(self) -> Request:
        """This request as worker processes get it: absolute paths, no progress bars (the
        driver prints one line per finished run instead), planned on the workers' device."""
        return replace(
            self, remote=False, quiet=True, results_dir=Path(self.results_dir).resolve(),
            data_dir=str(Path(self.data_dir).expanduser().resolve()) if self.data_dir else None,
            teacher_checkpoints={k: str(Path(v).resolve()) for k, v in self.teacher_checkpoints.items()},
            pretrained_files={k: str(Path(v).resolve()) for k, v in self.pretrained_files.items()})
