"""What ``torch.compile`` needs from kdbench, in one place below the engine and the metrics: dynamo's recompile
limits under whichever names this torch has, the compile mode for a device, and dynamo's graph count."""

from __future__ import annotations

from typing import Any

import torch


#: Graphs one code object may get. One code object serves every run of a sweep (each model and method
#: gives it new graphs): dynamo's default of 8 would silently fall back to eager after a few runs.
RECOMPILE_LIMIT = 256
#: Dynamo's limits under their torch >= 2.7 names, then the older names (pyproject allows older torch).
_LIMIT_NAMES = (("recompile_limit", "cache_size_limit"),
                ("accumulated_recompile_limit", "accumulated_cache_size_limit"))
#: The switch that makes hitting a limit an error instead of a silent fall back to eager, new name first.
_FAIL_NAMES = ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")


def raise_recompile_limits(config: Any, at_least: int = RECOMPILE_LIMIT) -> list[str]:
    """Raise dynamo's per-code-object and accumulated recompile limits in ``config`` (``torch._dynamo.config``)
    to at least ``at_least``, under whichever name this torch has; a limit with neither name is skipped.
    Returns the names set. The accumulated limit is raised too: below the other it would cap it first.

    Hitting a limit is made an error (``fail_on_recompile_limit_hit``, ``fail_on_cache_limit_hit`` before it):
    dynamo would otherwise go on eagerly in silence while the row says ``compiled``. Under ``--compile auto``
    the step then falls back to eager and records ``compile_error``; under ``--compile on`` the run fails."""
    done = []
    for names in _LIMIT_NAMES:
        name = next((n for n in names if hasattr(config, n)), None)
        if name is not None:
            setattr(config, name, max(getattr(config, name), at_least))
            done.append(name)
    fail = next((n for n in _FAIL_NAMES if hasattr(config, n)), None)
    if fail is not None:
        setattr(config, fail, True)
        done.append(fail)
    return done


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process (its ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_mode(device: torch.device, world: int = 1) -> str | None:
    """``torch.compile``'s mode for the step: CUDA graphs (``reduce-overhead``) on one CUDA process; the default
    mode (no CUDA graphs) on the CPU and under DDP with more than one rank, where CUDA graphs with
    ``find_unused_parameters`` have known upstream failures (issue 17, item 8)."""
    return "reduce-overhead" if device.type == "cuda" and world <= 1 else None


__all__ = ["RECOMPILE_LIMIT", "compile_mode", "compiled_graphs", "raise_recompile_limits"]
