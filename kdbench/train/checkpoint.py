"""Epoch checkpoints: everything the next epoch depends on, written at each epoch's end and read
back to resume an interrupted run, bit for bit on the CPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_torch_save, warn
from ..method import Method
from ..zoo import load_fitting

_VERSION = 1  # raise it when the contents change: older files are then ignored, not misread


@dataclass
class Checkpoint:
    """One run's checkpoint file and the live objects it saves and restores.

    Attributes:
        path: the file (written atomically, so a crash leaves the previous epoch's).
        key: the run's id; a file with another key belongs to another run and is ignored.
        model, method: weights and the method's state (adapters).
        optimizer, scheduler: momentum buffers and the learning-rate schedule.
        generator: the data order and augmentation stream.
        model_name: names the model when saved weights do not fit it.
    """

    path: Path
    key: str
    model: nn.Module
    method: Method | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    model_name: str = ""

    def save(self, epoch: int, result: dict[str, Any]) -> None:
        """Write the state at the end of ``epoch``, with the run's ``result`` so far (a plain dict).

        Besides the objects above it holds torch's global RNG (dropout) and, for a CUDA run, the RNG
        state of the run's own GPU (not every visible GPU's: a worker that resumes it may see only one).
        """
        state = {
            "version": _VERSION, "key": self.key, "next_epoch": epoch + 1,
            "model": self.model.state_dict(), "method": self.method.state_dict() if self.method is not None else {},
            "opt": self.optimizer.state_dict(), "sched": self.scheduler.state_dict(), "gen": self.generator.get_state(),
            "rng": torch.get_rng_state(),
            "cuda_rng": _own_cuda_rng(self.device),
            "result": result,
        }
        atomic_torch_save(self.path, state)

    def load(self) -> tuple[int, dict[str, Any]] | None:
        """Restore the saved state into the live objects: (the epoch to continue at, the result so far).

        None, with a warning, when there is no file, or it is damaged or belongs to another run:
        training then starts over instead of failing.
        """
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            if state.get("version") != _VERSION or state.get("key") != self.key:
                warn(f"ignoring checkpoint {self.path}: it belongs to another run or kdbench version; "
                     "starting the run over")
                return None
        except Exception as exc:  # a truncated or garbled file: any unpickling error
            warn(f"ignoring damaged checkpoint {self.path} ({type(exc).__name__}: {str(exc)[:120]}); "
                 "starting the run over")
            return None
        # Weights that do not fit the architecture name the keys instead of loading partially.
        load_fitting(self.model, state["model"], f"resume checkpoint '{self.path}'", self.model_name)
        if self.method is not None:
            load_fitting(self.method, state["method"], f"resume checkpoint '{self.path}' (method state)",
                         self.method.name)
        self.optimizer.load_state_dict(state["opt"])
        self.scheduler.load_state_dict(state["sched"])
        self.generator.set_state(state["gen"])
        torch.set_rng_state(state["rng"])
        _restore_cuda_rng(state.get("cuda_rng"), self.device, self.path)
        return state["next_epoch"], state["result"]

    @property
    def device(self) -> torch.device:
        """The run's device: its data generator lives there (the engine creates it on the data's device)."""
        return self.generator.device


def _own_cuda_rng(device: torch.device) -> torch.Tensor | None:
    """The CUDA RNG state of the run's own GPU; None for a CPU run (it draws nothing from CUDA's RNG)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_rng_state(device)


def cuda_rng_to_restore(saved: Any, device_index: int) -> tuple[torch.Tensor | None, str]:
    """Which saved CUDA RNG state to restore onto the run's GPU (number ``device_index`` in this
    process), and a warning ('' for none). Pure, so that it is tested without a GPU.

    ``saved`` is what a checkpoint holds: None (a CPU run), one state (this version: the run's own
    GPU, restored whatever its index is in this process), or a list with one state per visible GPU
    (older versions): its entry at ``device_index``, skipped with a warning when the process that
    wrote it saw fewer GPUs. An empty list is an older CPU run's.
    """
    if saved is None or isinstance(saved, torch.Tensor):
        return saved, ""
    if isinstance(saved, (list, tuple)):
        if not saved:
            return None, ""
        if 0 <= device_index < len(saved):
            return saved[device_index], ""
        return None, (f"it holds the CUDA RNG state of {len(saved)} GPU(s), none for GPU {device_index}; "
                      "dropout continues from this process's CUDA RNG, so the resumed run is not bitwise the "
                      "uninterrupted one")
    return None, f"its CUDA RNG state is a {type(saved).__name__}, not a tensor or a list; not restored"


def _restore_cuda_rng(saved: Any, device: torch.device, path: Path) -> None:
    """Restore the run's own GPU's RNG state (see :func:`cuda_rng_to_restore`); nothing for a CPU run."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    state, why = cuda_rng_to_restore(saved, index)
    if why:
        warn(f"resume checkpoint {path}: {why}")
    if state is not None:
        torch.cuda.set_rng_state(state, device)
