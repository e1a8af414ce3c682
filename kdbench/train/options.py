"""How the engine computes (precision, memory format, compilation), never what it computes."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import KdbenchError
from ..method import Outputs

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class EngineOptions:
    """How the engine computes, never what: batch, augmentation, optimizer and schedule are the recipe's.

    Attributes:
        precision: "fp32", or "bf16": the forward passes under bf16 autocast, while the weights,
            their gradients and optimizer state, BatchNorm statistics and every loss (CE, softmax,
            KL: the method sees fp32 outputs) stay fp32.
        channels_last: models and batches in NHWC memory order (faster convolutions on GPUs).
        compile: ``torch.compile`` the step's forward (teachers, student, losses); on CUDA with
            CUDA-graph replay ("reduce-overhead"), one graph per batch shape (the short last batch
            gets its own).
        compile_fallback: when compiling fails (at a compiled step), go on in eager mode with a
            warning instead of failing the run: ``--compile auto`` chose to compile, ``--compile on``
            asked for it (then a failure is an error).
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_fallback: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise KdbenchError(f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}; "
                               "use fp32 (exact: no TF32 on CUDA) or bf16 (autocast, fp32 weights and losses)")

    @classmethod
    def fast_for(cls, device: torch.device | str) -> EngineOptions:
        """The defaults for ``device``: on CUDA all three speed-ups; on the CPU plain fp32 eager,
        which is what kdbench's CPU results were produced with (bf16 is slow on most CPUs)."""
        if torch.device(device).type == "cuda":
            return cls("bf16", channels_last=True, compile=True)
        return cls()

    @property
    def label(self) -> str:
        return ", ".join([self.precision] + ["channels_last"] * self.channels_last + ["compiled"] * self.compile)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def layout(self, x: Tensor) -> Tensor:
        """A batch in the memory order the models use."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def set_tf32(self, device: torch.device) -> None:
        """On CUDA in fp32, turn TF32 off in cuDNN convolutions and in matmuls: fp32 means fp32, not TF32's
        10-bit mantissa (cuDNN's default allows it). Call it at a run's start; bf16 runs keep torch's
        settings. The row records the flags as the run left them (:func:`tf32_flags`)."""
        if device.type == "cuda" and self.precision == "fp32":
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False


def tf32_flags(device: torch.device | str) -> dict[str, bool | None]:
    """Whether TF32 is allowed in cuDNN convolutions (``tf32_conv``) and in CUDA matmuls (``tf32_matmul``); None
    for both off CUDA, where TF32 does not exist."""
    if torch.device(device).type != "cuda":
        return {"tf32_conv": None, "tf32_matmul": None}
    return {"tf32_conv": bool(torch.backends.cudnn.allow_tf32),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32)}


def as_fp32(out: Outputs) -> Outputs:
    """A model's outputs in fp32 (no copy when they already are): losses never run in bf16."""
    return Outputs(out.logits.float(), {k: v.float() for k, v in out.stages.items()},
                   out.pooled.float() if out.pooled is not None else None)


def freeze(model: nn.Module) -> nn.Module:
    """Teachers never train: eval mode (BatchNorm statistics fixed) and no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
