"""One run on several GPUs: plain torch DDP in kdbench's own engine, started by ``torchrun``.

``torchrun --nproc_per_node=N -m kdbench run ...`` starts N copies of kdbench. Each plans the same
sweep (the plan is deterministic), then they run every spec together, in the same order: each
run's global batch is split among the processes ("ranks") and their gradients are averaged by
``DistributedDataParallel``. Rank 0 alone decides what is left to do (the results store) and
writes files (checkpoints, teacher weights, rows) and output; the others follow its decisions,
which it broadcasts, so no rank ever waits in a collective the others skip.

Without torchrun (``WORLD_SIZE`` unset or 1) every helper here is a no-op: world size 1, rank 0.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import KdbenchError

T = TypeVar("T")


class RankFailed(KdbenchError):
    """A run failed on some rank: under DDP the others cannot go on without it, so the sweep stops."""

    exit_code = 1


def launched() -> bool:
    """True in a process that torchrun started as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def check_options(*, executor: str, gpus: str | None, workers: int) -> None:
    """Under torchrun, the processes are the run's ranks: no executor may start others."""
    if not launched():
        return
    if executor != "local":
        raise KdbenchError(f"--executor {executor} cannot run under torchrun: torchrun's processes together train one "
                           "run at a time (DDP). Drop --executor, or drop torchrun to spread whole runs over machines")
    if gpus or workers:
        raise KdbenchError("--gpus/--workers start one process per run, torchrun one process per GPU of the same run; "
                           "use one or the other (under torchrun, --nproc_per_node says how many GPUs a run uses)")


def init(device: torch.device) -> None:
    """Join torchrun's process group: nccl for CUDA (each rank on cuda:LOCAL_RANK), gloo on the CPU."""
    if not launched() or dist.is_initialized():
        return
    if device.type == "cuda":
        if device.index is not None:
            raise KdbenchError(f"--device {device}: under torchrun each process uses the GPU of its LOCAL_RANK; "
                               "write --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
        if local_rank() >= torch.cuda.device_count():
            raise KdbenchError(f"torchrun started process LOCAL_RANK={local_rank()}, but torch sees only "
                               f"{torch.cuda.device_count()} GPU(s) here; use --nproc_per_node="
                               f"{torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise KdbenchError(f"torchrun (DDP) runs on CUDA GPUs (nccl) or the CPU (gloo), not on device '{device}'")


def local_device(device: torch.device) -> torch.device:
    """The device this rank trains on: cuda:LOCAL_RANK for CUDA under DDP, else ``device`` itself."""
    if world_size() > 1 and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def silence_other_ranks() -> None:
    """Output (the plan, one line per run, the report) is rank 0's; the other ranks keep only stderr."""
    if launched() and os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)


# -- agreeing ---------------------------------------------------------------------------------
def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` evaluated on rank 0 only, its value given to every rank: one decision for all."""
    return broadcast_object(fn() if is_main() else None)


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over the ranks (in place)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard(n: int) -> slice:
    """This rank's contiguous part of ``n`` items (the first ranks take one more when it does not divide)."""
    size = math.ceil(n / world_size())
    lo = min(rank() * size, n)
    return slice(lo, min(lo + size, n))


def gather_shards(part: Tensor, n: int) -> Tensor:
    """The ranks' :func:`shard` results, concatenated in rank order (``n`` rows in all)."""
    if world_size() == 1:
        return part
    size = math.ceil(n / world_size())
    padded = part.new_zeros((size, *part.shape[1:]))
    padded[: len(part)] = part  # all_gather needs equal shapes; the last shard may be short
    out = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(out, padded)
    return torch.cat(out)[:n]


def sync_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, as DDP does before each forward."""
    if world_size() > 1:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def check_in_sync(module: nn.Module, what: str) -> None:
    """Raise on every rank when any rank's weights or buffers differ from rank 0's.

    They cannot unless kdbench's DDP path has a bug: every rank applies the same averaged
    gradients to the same weights. Checked once per run, it costs one broadcast of the model.
    """
    if world_size() == 1:
        return
    differ = []
    for name, t in module.state_dict().items():
        ref = t.clone()
        dist.broadcast(ref, src=0)
        if not torch.equal(ref, t):
            differ.append(name)
    bad = torch.tensor([len(differ)], device=next(iter(module.state_dict().values())).device)
    all_reduce_sum(bad)
    if int(bad):
        where = f"rank {rank()} differs from rank 0 at {', '.join(differ[:5])}" if differ else "another rank differs"
        raise KdbenchError(f"after training, the ranks' {what} are not identical ({where}): a bug in kdbench's "
                           "DDP path; please report it with the command line")
