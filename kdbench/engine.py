"""The training engine: one readable loop for teachers and students alike.

The engine owns cross-entropy, the optimizer, the schedule, the frozen teachers and logging; a
method only turns outputs into named loss terms. It never looks at which method it runs.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .data import DataSplits, Loader
from .errors import KdbenchError
from .features import FeatureCapture
from .method import Batch, Method, Outputs, Taps
from .metrics import topk_accuracy
from .recipe import Recipe
from .store import atomic_torch_save, warn
from .zoo import load_fitting

if TYPE_CHECKING:
    from .viewcache import ViewCache


@dataclass
class EpochLog:
    epoch: int
    lr: float
    losses: dict[str, float]  # mean of each named, weighted term over the epoch's batches
    top1: float
    top5: float


@dataclass
class TrainResult:
    history: list[EpochLog] = field(default_factory=list)
    test_logits: Tensor | None = None  # at the last epoch
    best_epoch: int = 0
    best_top1: float = -1.0
    best_top5: float = 0.0
    train_time_s: float = 0.0  # wall time of the training steps, evaluation excluded
    eval_time_s: float = 0.0
    resumed_from: int = 0  # the epoch training resumed at from a checkpoint (0: it started fresh)
    checkpoint_time_s: float = 0.0  # writing epoch checkpoints, excluded from train_time_s

    @property
    def last(self) -> EpochLog:
        return self.history[-1]

    @classmethod
    def untrained(cls, model: nn.Module, data: DataSplits) -> TrainResult:
        """The result of evaluating a model without training it (a teacher from a checkpoint)."""
        logits, top1, top5 = evaluate(model, data)
        return cls([EpochLog(-1, 0.0, {}, top1, top5)], logits, -1, top1, top5)



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
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise KdbenchError(f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}; "
                               "use fp32 (exact) or bf16 (autocast, fp32 weights and losses)")

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


def as_fp32(out: Outputs) -> Outputs:
    """A model's outputs in fp32 (no copy when they already are): losses never run in bf16."""
    return Outputs(out.logits.float(), {k: v.float() for k, v in out.stages.items()},
                   out.pooled.float() if out.pooled is not None else None)


@torch.inference_mode()
def predict(model: nn.Module, images: Tensor, data: DataSplits, batch_size: int = 500,
            options: EngineOptions = EngineOptions()) -> Tensor:
    """Logits for ``images`` (uint8 N×C×H×W) in eval mode, without augmentation."""
    was_training = model.training
    model.eval()
    loader = Loader(images, torch.zeros(len(images), dtype=torch.long, device=images.device), data.info,
                    batch_size=batch_size, shuffle=False)
    with options.autocast(images.device):
        out = torch.cat([model(options.layout(x)).float() for x, _ in loader])
    model.train(was_training)
    return out


def evaluate(model: nn.Module, data: DataSplits, *, shard: bool = False,
             options: EngineOptions = EngineOptions()) -> tuple[Tensor, float, float]:
    """Test-set logits, top-1 and top-5 (percent).

    With ``shard`` (DDP: call it on every rank) each rank predicts its part of the test set and
    they exchange the logits: the ranks hold identical weights, so the parts make the whole.
    """
    images = data.test_images
    if shard and distributed.world_size() > 1:
        part = distributed.shard(len(images))
        logits = distributed.gather_shards(predict(model, images[part], data, options=options), len(images))
    else:
        logits = predict(model, images, data, options=options)
    return logits, topk_accuracy(logits, data.test_labels, 1), topk_accuracy(logits, data.test_labels, 5)


def freeze(model: nn.Module) -> nn.Module:
    """Teachers never train: eval mode (BatchNorm statistics fixed) and no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_optimizer(params: list[nn.Parameter], recipe: Recipe) -> tuple[torch.optim.Optimizer, object]:
    opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(recipe.lr_milestones), gamma=recipe.gamma)
    return opt, sched


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Rescale each unit's incoming weights to L2 norm <= ``max_norm`` (Srivastava et al. 2014).

    A unit's incoming weights are one row of a Linear weight or one conv filter: dim 0 of
    every weight with two or more dimensions. Biases and normalisation scales are left alone.
    """
    for p in model.parameters():
        if p.dim() >= 2:
            p.copy_(torch.renorm(p, 2, 0, max_norm))


class Diverged(KdbenchError):
    """A loss term became NaN or infinite: the run ends with status "diverged", the sweep goes on."""

    def __init__(self, message: str, epoch: int, result: TrainResult) -> None:
        super().__init__(message)
        self.epoch, self.result = epoch, result


_CKPT_VERSION = 1


def save_state(path: Path, *, key: str, epoch: int, model: nn.Module, method: Method | None,
               opt: torch.optim.Optimizer, sched: Any, gen: torch.Generator, result: TrainResult) -> None:
    """Everything the next epoch depends on, written atomically: weights, method state (adapters),
    optimizer momentum, schedule, the data-order generator and torch's global RNG (dropout)."""
    state = {
        "version": _CKPT_VERSION, "key": key, "next_epoch": epoch + 1,
        "model": model.state_dict(), "method": method.state_dict() if method is not None else {},
        "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "result": {**asdict(result), "history": [asdict(h) for h in result.history]},
    }
    atomic_torch_save(path, state)


def load_state(path: Path, *, key: str, model: nn.Module, method: Method | None, opt: torch.optim.Optimizer,
               sched: Any, gen: torch.Generator, model_name: str) -> tuple[int, TrainResult] | None:
    """Restore a checkpoint written by :func:`save_state`; None (with a warning) when it is damaged
    or belongs to another run, so training starts over instead of failing."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("version") != _CKPT_VERSION or state.get("key") != key:
            warn(f"ignoring checkpoint {path}: it belongs to another run or kdbench version; starting the run over")
            return None
    except Exception as exc:  # a truncated or garbled file: any unpickling error
        warn(f"ignoring damaged checkpoint {path} ({type(exc).__name__}: {str(exc)[:120]}); starting the run over")
        return None
    # Weights that do not fit the architecture name the keys instead of loading partially.
    load_fitting(model, state["model"], f"resume checkpoint '{path}'", model_name)
    if method is not None:
        load_fitting(method, state["method"], f"resume checkpoint '{path}' (method state)", method.name)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    r = dict(state["result"])
    r["history"] = [EpochLog(**h) for h in r["history"]]
    return state["next_epoch"], TrainResult(**r)


def check_terms(terms: dict[str, Tensor], who: str) -> None:
    for name, value in terms.items():
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise KdbenchError(f"{who} returned loss term '{name}' that is not a scalar tensor ({shape}); "
                               "each term must be one already-weighted number per batch")


class _Losses(nn.Module):
    """One training step's forward: the teachers (or their cached outputs), the student, the terms.

    The student and the method are submodules, so DDP averages the gradients of every parameter
    in them: the method's own parameters (FitNets' regressor) train across ranks as the student's
    do. The teachers are not (frozen, nothing to average). It is also the unit ``torch.compile``
    compiles, so one graph holds the whole forward.
    """

    def __init__(self, student: FeatureCapture, method: Method | None, teachers: Sequence[FeatureCapture],
                 options: EngineOptions) -> None:
        super().__init__()
        self.model, self.method = student.model, method  # registered: their parameters are DDP's
        self.capture, self.teachers, self.options = student, list(teachers), options

    def forward(self, images: Tensor, labels: Tensor, cached: list[Outputs] | None, batch: Batch,
                ce_weight: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(the engine's terms, the method's terms)."""
        with self.options.autocast(images.device):
            if cached is None:
                with torch.no_grad():
                    cached = [cap(images) for cap in self.teachers]
            out = self.capture(images)
        # Losses in fp32 whatever the precision: a bf16 softmax at temperature 4 loses the tails.
        out, t_out = as_fp32(out), [as_fp32(t) for t in cached]
        # Skipped when its weight is 0, so layers no term reaches get no gradient at all
        # (FitNets' hint stage trains only the student's lower layers).
        own = {"ce": ce_weight * F.cross_entropy(out.logits, labels)} if ce_weight else {}
        return own, (self.method(out, t_out, batch) if self.method is not None else {})


def _compiled(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` under torch.compile; on CUDA its forward and backward replay as CUDA graphs."""
    import torch._dynamo

    # One code object serves every run of a sweep (each model and method gives it new graphs): the
    # default limit of 8 would silently fall back to eager after a few runs.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(net, mode="reduce-overhead" if device.type == "cuda" else None)


def _static_batch(*tensors: Tensor | None) -> None:
    # One graph per batch size (the short last batch gets its own) rather than a dynamic-shape
    # graph for both: dynamic shapes would slow every full batch for the sake of one.
    for t in tensors:
        if t is not None:
            torch._dynamo.mark_static(t, 0)


def train(
    model: nn.Module,
    data: DataSplits,
    recipe: Recipe,
    *,
    seed: int,
    method: Method | None = None,
    teachers: Sequence[nn.Module] = (),
    teacher_names: Sequence[str] = (),
    model_name: str = "",
    progress: object | None = None,
    state_path: Path | None = None,
    state_key: str = "",
    options: EngineOptions = EngineOptions(),
    teacher_caches: Sequence[ViewCache] = (),
) -> TrainResult:
    """Train ``model`` on ``data`` with ``recipe``; distil from ``teachers`` through ``method``.

    With no method, the model trains on cross-entropy alone (how kdbench trains teachers).
    ``progress`` is a tqdm bar advanced once per epoch, or None. With ``state_path``, every epoch
    ends with a checkpoint there, and an existing checkpoint (for ``state_key``, the run id) is
    resumed: the result equals an uninterrupted run's, bit for bit on the CPU.

    ``options`` choose precision, memory format and compilation (:class:`EngineOptions`).
    ``teacher_caches`` (one per teacher, from :func:`kdbench.viewcache.build_view_cache`) replace
    the teachers' forward passes by a lookup of each image's augmented view: same numbers, no
    teacher compute. Nothing inside an epoch waits for the device: loss sums stay on it and are
    read once, at the epoch's end.

    Under torchrun (DDP, :mod:`kdbench.distributed`) every rank calls this with the same arguments.
    Each draws the same global batch (same generator: same order, same augmentation) and trains on
    its contiguous slice; the gradients, averaged by DDP and weighted by slice size, equal the
    single-process gradient of the batch's mean loss (for terms that are means over samples, as
    CE and KD are; a term relating samples to each other, like RKD's, sees one slice's samples
    per rank). What else differs is BatchNorm: each rank
    normalises its slice with the slice's statistics, and running statistics are rank 0's (plain
    DDP, no SyncBatchNorm). Rank 0 alone writes the checkpoint; a resumed run loads it on every rank.
    """
    device = data.train_images.device
    if teacher_caches and len(teacher_caches) != len(teachers):
        raise KdbenchError(f"{len(teacher_caches)} teacher caches for {len(teachers)} teachers; give one per teacher")
    for cache in teacher_caches:
        cache.check(recipe, data)
    options.prepare(model)
    for t in teachers:
        options.prepare(t)
    if device.type == "cpu":
        # Denormal floats appear as weights and gradients shrink and make x86 kernels 10-50x
        # slower (measured: 0.9 s vs 39 s per digits epoch of cifar_resnet56); flushing them to
        # zero costs no accuracy.
        torch.set_flush_denormal(True)
    taps = method.taps() if method is not None else Taps()
    student = FeatureCapture(model, taps, model_name)
    teacher_caps = [FeatureCapture(freeze(t), taps, n) for t, n in zip(teachers, teacher_names or [""] * len(teachers))]
    params = [p for p in model.parameters() if p.requires_grad]
    if method is not None:
        method.to(device)
        # Every parameter a method owns trains with the student: nothing can be forgotten.
        params += [p for p in method.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, recipe)
    world = distributed.world_size()
    if recipe.batch_size % world:
        raise KdbenchError(f"recipe '{recipe.name}' has batch {recipe.batch_size}, which does not split evenly among "
                           f"{world} DDP processes; use a --nproc_per_node that divides it (the recipe's batch is the "
                           "global batch, as in a single-process run)")
    if 0 < len(data.train_labels) % recipe.batch_size < world:
        raise KdbenchError(f"the last batch of {len(data.train_labels)} training images would leave DDP processes "
                           f"without any; choose a --limit with a remainder of 0 or at least {world} modulo the "
                           f"batch {recipe.batch_size}")
    gen = torch.Generator(device=device).manual_seed(seed)
    loader = Loader(data.train_images, data.train_labels, data.info, batch_size=recipe.batch_size, shuffle=True,
                    generator=gen, crop_padding=recipe.crop_padding, flip=recipe.flip)
    who = f"method '{method.name}'" if method is not None else "training"
    result = TrainResult()
    first = 0
    if state_path is not None and state_path.is_file():
        resumed = load_state(state_path, key=state_key, model=model, method=method, opt=opt, sched=sched, gen=gen,
                             model_name=model_name)
        if resumed is not None:
            first, result = resumed
            result.resumed_from = first
            if progress is not None:
                progress.update(first)
    losses_of = _Losses(student, method, teacher_caps, options)
    net: nn.Module = losses_of
    if world > 1:
        # Built after a resumed checkpoint is loaded (DDP starts from rank 0's weights). Unused
        # parameters must be allowed: FitNets' hint stage leaves the student's head out of the loss.
        net = nn.parallel.DistributedDataParallel(
            losses_of, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        # A 1x1 convolution's (FitNets' regressor's) gradient differs from its bucket only in the
        # strides of size-1 dimensions: DDP's "performance" warning about it says nothing.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    if options.compile:
        net = _compiled(net, device)
    start = time.perf_counter() - result.train_time_s - result.eval_time_s - result.checkpoint_time_s
    for epoch in range(first, recipe.epochs):
        model.train()
        if method is not None:
            method.train()
        ce_weight = method.ce_weight_at(epoch, recipe.epochs) if method is not None else 1.0
        sums: dict[str, Tensor] = {}
        steps = 0
        for b in loader.batches(views=bool(teacher_caches)):
            images, labels, index, view = options.layout(b.images), b.labels, b.index, b.view
            n = len(images)
            if world > 1:  # this rank's slice of the global batch
                images, labels, index, view = (t.tensor_split(world)[distributed.rank()] if t is not None else None
                                               for t in (images, labels, index, view))
            share = len(images) / n  # 1 without DDP
            cached = [c.lookup(index, view) for c in teacher_caches] if teacher_caches else None
            if options.compile:
                _static_batch(images, labels, *(t.logits for t in cached or ()), *(t.pooled for t in cached or ()))
                if device.type == "cuda":  # a new step: CUDA graphs may reuse the last step's output memory
                    torch.compiler.cudagraph_mark_step_begin()
            terms, extra = net(images, labels, cached, Batch(images, labels, epoch, recipe.epochs), ce_weight)
            if method is not None:
                if steps == 0:
                    check_terms(extra, who)
                clash = set(extra) & set(terms)
                if clash:
                    raise KdbenchError(f"{who} returned a term named {sorted(clash)}, which the engine owns; rename it")
                terms.update(extra)
            if not terms:
                raise KdbenchError(f"{who} produced no loss terms at epoch {epoch}; nothing would train")
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients; weighting each by its slice's share of the batch
            # makes that the gradient of the whole batch's mean loss, also for an uneven last batch.
            (loss * (share * world)).backward()
            opt.step()
            if recipe.max_norm:
                apply_max_norm(model, recipe.max_norm)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach() * share
            steps += 1
        if world > 1:  # one exchange per epoch: the epoch's sums over every rank's slices
            keys = sorted(sums)
            total = distributed.all_reduce_sum(torch.stack([sums[k] for k in keys]))
            sums = dict(zip(keys, total))
            # DDP copies rank 0's buffers to the others before each forward; after the last step
            # they differ again, and every rank must evaluate (and rank 0 save) the same model.
            distributed.sync_buffers(losses_of)
        losses = {k: float(v) / steps for k, v in sums.items()}
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        if bad:
            result.train_time_s = time.perf_counter() - start - result.eval_time_s - result.checkpoint_time_s
            raise Diverged(f"{who}: loss term(s) {', '.join(bad)} became non-finite at epoch {epoch}; "
                           "lower the learning rate or the term's weight", epoch, result)
        lr = opt.param_groups[0]["lr"]
        sched.step()
        t_eval = time.perf_counter()
        logits, top1, top5 = evaluate(model, data, shard=True, options=options)
        result.history.append(EpochLog(epoch, lr, losses, top1, top5))
        if top1 > result.best_top1:
            result.best_epoch, result.best_top1, result.best_top5 = epoch, top1, top5
        result.test_logits = logits
        result.eval_time_s += time.perf_counter() - t_eval
        if state_path is not None and distributed.is_main():
            result.train_time_s = time.perf_counter() - start - result.eval_time_s - result.checkpoint_time_s
            t_save = time.perf_counter()
            save_state(state_path, key=state_key, epoch=epoch, model=model, method=method, opt=opt, sched=sched,
                       gen=gen, result=result)
            result.checkpoint_time_s += time.perf_counter() - t_save
        if progress is not None:
            progress.set_postfix(loss=f"{sum(losses.values()):.3f}", top1=f"{top1:.2f}", refresh=False)
            progress.update(1)
    distributed.check_in_sync(losses_of, "weights")
    result.train_time_s = time.perf_counter() - start - result.eval_time_s - result.checkpoint_time_s
    return result
