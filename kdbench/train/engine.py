"""The training engine: one readable loop for teachers and students alike.

The engine owns cross-entropy, the optimizer, the schedule, the frozen teachers and logging; a
method only turns outputs into named loss terms. It never looks at which method it runs. What
one step does is :class:`~kdbench.train.step.TrainStep`'s; :func:`train` is the epoch loop
around it: train, check, evaluate, checkpoint, report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..data import DataSplits, Loader, holdout, holdout_indices
from ..errors import KdbenchError
from ..method import Method, init_epochs_for
from .optim import make_optimizer
from ..metrics import topk_accuracy
from ..recipe import Recipe
from .checkpoint import Checkpoint
from .options import EngineOptions
from .step import TrainStep, trainable_parameters
from .teacher_cache import ViewCache

EVAL_BATCH = 500  # images per evaluation forward pass


@dataclass
class EpochLog:
    """One epoch's record: its learning rate, its mean loss terms, and test accuracy after it."""

    epoch: int
    lr: float
    losses: dict[str, float]  # mean of each named, weighted term over the epoch's batches
    top1: float
    top5: float
    val_top1: float | None = None  # on the held-out validation split (None: the recipe holds out none)


@dataclass
class TrainResult:
    """What a training run produced, epoch by epoch, and how long it took."""

    history: list[EpochLog] = field(default_factory=list)
    test_logits: Tensor | None = None  # at the last epoch
    best_epoch: int = 0
    best_top1: float = -1.0
    best_top5: float = 0.0
    train_time_s: float = 0.0  # wall time of the training steps, evaluation excluded
    eval_time_s: float = 0.0
    resumed_from: int = 0  # the epoch training resumed at from a checkpoint (0: it started fresh)
    checkpoint_time_s: float = 0.0  # writing epoch checkpoints, excluded from train_time_s
    # With a validation split (recipe.val_fraction): the first epoch with the best validation top-1,
    # that top-1, and the test accuracy at that epoch; the epoch early stopping ended training after.
    val_best_epoch: int | None = None
    val_best_top1: float | None = None
    top1_val_best: float | None = None
    top5_val_best: float | None = None
    stopped_epoch: int | None = None  # None: training ran all the recipe's epochs
    compile_error: str = ""  # why torch.compile failed under --compile auto and the run went on eagerly
    # Wall time of each epoch's training steps, by epoch (a checkpoint of an older version has none), and the
    # epochs that were the first this process trained (the run's first, or the first after resuming): their
    # time includes torch.compile, CUDA-graph recording and cold caches, so steady-state times leave them out.
    epoch_train_s: dict[int, float] = field(default_factory=dict)
    warm_up_epochs: list[int] = field(default_factory=list)
    # Of the training time, the steps that compiled a graph (TrainStep.compile_time_s), over every process.
    compile_time_s: float = 0.0
    # A method's init stage (Method.init_epochs): how many epochs it trained before the schedule, and each
    # one's mean loss terms. It is not evaluated (as in RepDistiller), so history holds the schedule's epochs.
    init_epochs: int = 0
    init_losses: list[dict[str, float]] = field(default_factory=list)
    # Bytes of the method's untrained state (Method.state_bytes: CRD's memory bank).
    method_state_bytes: int = 0

    @property
    def last(self) -> EpochLog:
        return self.history[-1]

    @classmethod
    def untrained(cls, model: nn.Module, data: DataSplits) -> TrainResult:
        """The result of evaluating a model without training it (a teacher from a checkpoint)."""
        logits, top1, top5 = evaluate(model, data)
        return cls([EpochLog(-1, 0.0, {}, top1, top5)], logits, -1, top1, top5)

    def add(self, log: EpochLog, test_logits: Tensor) -> None:
        """Record an epoch; the best epoch is the first with the highest test top-1 (the DKD tables' rule),
        the best validation epoch the first with the highest validation top-1."""
        self.history.append(log)
        if log.top1 > self.best_top1:
            self.best_epoch, self.best_top1, self.best_top5 = log.epoch, log.top1, log.top5
        if log.val_top1 is not None and (self.val_best_top1 is None or log.val_top1 > self.val_best_top1):
            self.val_best_epoch, self.val_best_top1 = log.epoch, log.val_top1
            self.top1_val_best, self.top5_val_best = log.top1, log.top5
        self.test_logits = test_logits

    def patience_spent(self, patience: int) -> bool:
        """Whether the last ``patience`` epochs brought no new best validation top-1 (early stopping)."""
        return self.val_best_epoch is not None and self.last.epoch - self.val_best_epoch >= patience

    def state_dict(self) -> dict[str, Any]:
        """Plain values (a checkpoint holds them)."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainResult:
        return cls(**{**state, "history": [EpochLog(**h) for h in state["history"]]})


class Diverged(KdbenchError):
    """A loss term became NaN or infinite: the run ends with status "diverged", the sweep goes on."""

    def __init__(self, message: str, epoch: int, result: TrainResult) -> None:
        super().__init__(message)
        self.epoch, self.result = epoch, result


@torch.inference_mode()
def predict(model: nn.Module, images: Tensor, data: DataSplits, batch_size: int = EVAL_BATCH,
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
    logits = _predict_all(model, data.test_images, data, shard=shard, options=options)
    return logits, topk_accuracy(logits, data.test_labels, 1), topk_accuracy(logits, data.test_labels, 5)


def _predict_all(model: nn.Module, images: Tensor, data: DataSplits, *, shard: bool,
                 options: EngineOptions) -> Tensor:
    """Logits for all of ``images``; with ``shard`` each DDP rank predicts its part and they exchange them."""
    if shard and distributed.world_size() > 1:
        part = distributed.shard(len(images))
        return distributed.gather_shards(predict(model, images[part], data, options=options), len(images))
    return predict(model, images, data, options=options)


def train(model: nn.Module, data: DataSplits, recipe: Recipe, *, seed: int, method: Method | None = None,
          teachers: Sequence[nn.Module] = (), teacher_names: Sequence[str] = (), model_name: str = "",
          progress: Any | None = None, state_path: Path | None = None, state_key: str = "",
          options: EngineOptions = EngineOptions(), teacher_caches: Sequence[ViewCache] = (),
          labelled: bool = True) -> TrainResult:
    """Train ``model`` on ``data`` with ``recipe``; distil from ``teachers`` through ``method``.

    With no method, the model trains on cross-entropy alone (how kdbench trains teachers); a method's
    init stage comes before the schedule. ``progress``: a tqdm bar advanced per epoch, or None. With
    ``state_path`` every epoch ends with a checkpoint, and one for ``state_key`` (the run id) is resumed,
    bit for bit on the CPU. ``options``: precision, memory format, compilation. ``teacher_caches`` (one per
    teacher, :func:`~kdbench.train.teacher_cache.build_view_cache`) replace the teachers' forward passes.
    Under torchrun every rank calls this alike and trains its slice of each batch (:mod:`kdbench.train.step`);
    rank 0 writes the checkpoint. ``val_fraction``/``early_stop``: :func:`_split`,
    :meth:`TrainResult.patience_spent`. ``labelled=False`` (an unlabelled transfer set): no cross-entropy,
    and ``batch.labels = None``.
    """
    device = data.train_images.device
    data, val, teacher_caches = _split(data, recipe, teacher_caches)
    _check_run(recipe, data, teachers, teacher_names, teacher_caches)
    init = init_epochs_for(method, recipe.epochs, recipe.full_epochs)
    _prepare(model, teachers, method, options, device, data, labelled)
    opt, sched = make_optimizer(trainable_parameters(model, method), recipe, init_epochs=init,
                                init_lr_scale=method.init_lr_scale if method is not None else 1.0)
    step = TrainStep(model, method, teachers, opt, recipe=recipe, device=device, options=options,
                     caches=teacher_caches, model_name=model_name, teacher_names=teacher_names, labelled=labelled,
                     init_epochs=init)
    gen = torch.Generator(device=device).manual_seed(seed)
    loader = Loader(data.train_images, data.train_labels, data.info, batch_size=recipe.batch_size, shuffle=True,
                    generator=gen, crop_padding=recipe.crop_padding, flip=recipe.flip, mix=recipe.mixing,
                    rrc=recipe.rrc, shard=True)
    checkpoint = Checkpoint(state_path, state_key, model, method, opt, sched, gen, model_name) if state_path else None
    first, result = _resume(checkpoint, progress, init + recipe.epochs)
    result.init_epochs, result.method_state_bytes = init, method.state_bytes() if method is not None else 0
    step.prepare_distributed()  # after resuming: DDP starts every rank from rank 0's weights
    if options.compile and not result.compile_error:  # a run that fell back to eager stays eager on resume
        step.compile()
    start = _start_clock(result)
    for epoch in range(first, init + recipe.epochs):
        if init and epoch == init:  # RepDistiller trains the schedule with a new optimizer: no init-stage momentum
            opt.state.clear()
        log = _train_epoch(step, loader, epoch, result, warm_up=epoch == first)
        _check_epoch(step, method, teachers, log, result, start)
        sched.step()
        if epoch < init:  # the init stage is not evaluated (RepDistiller's is not): history is the schedule's
            result.init_losses.append(log.losses)
        else:
            log.epoch = epoch - init
            _evaluate_epoch(model, data, val, result, log, options)
            if recipe.early_stop and result.patience_spent(recipe.early_stop):
                result.stopped_epoch = log.epoch  # before the checkpoint: a resumed run knows it has stopped
        if checkpoint is not None and distributed.is_main():
            _save(checkpoint, epoch, result, start)
        _show(progress, log, result)
        if result.stopped_epoch is not None:
            break
    step.check_in_sync()
    _stop_clock(result, start)
    return result


def _check_epoch(step: TrainStep, method: Method | None, teachers: Sequence[nn.Module], log: EpochLog,
                 result: TrainResult, start: float) -> None:
    """Stop a run whose loss became non-finite (:class:`Diverged`) or whose method returned no terms."""
    if bad := [k for k, v in log.losses.items() if not math.isfinite(v)]:
        _stop_clock(result, start)
        raise Diverged(f"{step.who}: loss term(s) {', '.join(bad)} became non-finite at epoch {log.epoch}; "
                       "lower the learning rate or the term's weight", log.epoch, result)
    _check_terms(step, method, teachers, log.losses)


def _show(progress: Any | None, log: EpochLog, result: TrainResult) -> None:
    """Advance the run's progress bar by the epoch, with its loss and test top-1."""
    if progress is not None:
        top1 = f"{result.last.top1:.2f}" if result.history else "init stage"
        progress.set_postfix(loss=f"{sum(log.losses.values()):.3f}", top1=top1, refresh=False)
        progress.update(1)


def _split(data: DataSplits, recipe: Recipe, caches: Sequence[ViewCache]
           ) -> tuple[DataSplits, tuple[Tensor, Tensor] | None, Sequence[ViewCache]]:
    """The training data, the validation (images, labels) or None, and caches that index the training data.

    The split seed is fixed (0, :func:`~kdbench.data.holdout`), so teachers and students hold out the
    same images. A cache built on the whole training set (as the runner builds and shares them) is
    restricted to the kept images, so that image i of the training data looks up its own outputs.
    """
    if recipe.val_fraction == 0:
        return data, None, caches
    train, val_images, val_labels = holdout(data, recipe.val_fraction)
    if any(c.size == len(data.train_labels) for c in caches):
        keep, _ = holdout_indices(data.train_labels, recipe.val_fraction)
        caches = [c.restricted(keep) if c.size == len(data.train_labels) else c for c in caches]
    return train, (val_images, val_labels), caches


def _evaluate_epoch(model: nn.Module, data: DataSplits, val: tuple[Tensor, Tensor] | None, result: TrainResult,
                    log: EpochLog, options: EngineOptions) -> None:
    """Fill ``log``'s test (and validation) accuracy and add it to ``result``; the time counts as evaluation."""
    t_eval = time.perf_counter()
    logits, log.top1, log.top5 = evaluate(model, data, shard=True, options=options)
    if val is not None:
        val_logits = _predict_all(model, val[0], data, shard=True, options=options)
        log.val_top1 = topk_accuracy(val_logits, val[1], 1)
    result.add(log, logits)
    result.eval_time_s += time.perf_counter() - t_eval


def _check_run(recipe: Recipe, data: DataSplits, teachers: Sequence[nn.Module], names: Sequence[str],
               caches: Sequence[ViewCache]) -> None:
    """Refuse, before any work, names or caches that do not fit the teachers and batches DDP cannot split."""
    if names and len(names) != len(teachers):
        raise KdbenchError(f"{len(names)} teacher names for {len(teachers)} teachers; give one per teacher")
    if caches and len(caches) != len(teachers):
        raise KdbenchError(f"{len(caches)} teacher caches for {len(teachers)} teachers; give one per teacher")
    for cache in caches:
        cache.check(recipe, data)
    world = distributed.world_size()
    if recipe.batch_size % world:
        raise KdbenchError(f"recipe '{recipe.name}' has batch {recipe.batch_size}, which does not split evenly among "
                           f"{world} DDP processes; use a --nproc_per_node that divides it (the recipe's batch is the "
                           "global batch, as in a single-process run)")
    if 0 < len(data.train_labels) % recipe.batch_size < world:
        raise KdbenchError(f"the last batch of {len(data.train_labels)} training images would leave DDP processes "
                           f"without any; choose a --limit with a remainder of 0 or at least {world} modulo the "
                           f"batch {recipe.batch_size}")


def _prepare(model: nn.Module, teachers: Sequence[nn.Module], method: Method | None, options: EngineOptions,
             device: torch.device, data: DataSplits, labelled: bool) -> None:
    """Models in the options' memory format; the method told the training data (``setup_data``: per-image
    state, a memory bank) and then moved, adapters and state, to the device."""
    options.prepare(model)
    for t in teachers:
        options.prepare(t)
    options.set_tf32(device)  # fp32 on CUDA: no TF32 (rows record the flags)
    if method is not None:
        method.setup_data(train_size=len(data.train_labels), labels=data.train_labels if labelled else None)
        method.to(device)
    if device.type == "cpu":
        # Denormal floats appear as weights and gradients shrink and make x86 kernels 10-50x
        # slower (measured: 0.9 s vs 39 s per digits epoch of cifar_resnet56); flushing them to
        # zero costs no accuracy.
        torch.set_flush_denormal(True)


def _resume(checkpoint: Checkpoint | None, progress: Any | None, epochs: int) -> tuple[int, TrainResult]:
    """The epoch to start at and the result so far: from the run's checkpoint when there is one.

    An early-stopped run's checkpoint is a finished run: it starts at ``epochs``, training nothing.
    """
    loaded = checkpoint.load() if checkpoint is not None else None
    if loaded is None:
        return 0, TrainResult()
    first, state = loaded
    result = TrainResult.from_state_dict(state)
    result.resumed_from = first
    if result.stopped_epoch is not None:
        first = epochs
    if progress is not None:
        progress.update(first)
    return first, result


def _check_terms(step: TrainStep, method: Method | None, teachers: Sequence[nn.Module],
                 losses: dict[str, float]) -> None:
    """A method with teachers whose forward returned no term all epoch would train on cross-entropy
    alone under its name: refuse it. (Checked here, not while planning: planning never runs a
    method's forward, which may need the workers' environment or have side effects.)"""
    # A method with an init stage may transfer everything there (RepDistiller's AB and FSP train on labels alone
    # after it): after its init stage it may return no terms.
    if method is not None and teachers and not set(losses) - {"ce"} and not method.init_epochs:
        raise KdbenchError(f"{step.who} returned no loss terms (an empty dict): its run would train on "
                           "cross-entropy alone under its name; return its weighted terms from forward, e.g. "
                           "{'kd': self.kd_weight * loss}")


def _train_epoch(step: TrainStep, loader: Loader, epoch: int, result: TrainResult, *, warm_up: bool) -> EpochLog:
    """One epoch of steps; its log before evaluation: the learning rate and the mean of each term over its
    batches (and under DDP over the ranks' slices). How it ran goes into ``result``: its wall time, whether
    it was this process's first (``warm_up``), and a fallback from torch.compile to eager.

    The sums stay on the device and are read once, at the epoch's end: nothing inside the epoch
    waits for the device, and that read makes the time the device's too, not just the launches'.
    """
    t0, compiling0 = time.perf_counter(), step.compile_time_s
    sums: dict[str, Tensor] = {}
    steps = 0
    for batch in loader.batches(views=step.uses_cache):
        for k, v in step(batch, epoch).items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
    if distributed.world_size() > 1:  # one exchange per epoch: the epoch's sums over every rank's slices
        keys = sorted(sums)
        total = distributed.all_reduce_sum(torch.stack([sums[k] for k in keys]))
        sums = dict(zip(keys, total))
        step.sync_buffers()
    means = {k: float(v) / steps for k, v in sums.items()}
    result.epoch_train_s[epoch] = time.perf_counter() - t0
    result.compile_time_s += step.compile_time_s - compiling0
    if warm_up:
        result.warm_up_epochs.append(epoch)
    result.compile_error = step.compile_error or result.compile_error
    lr = step.optimizer.param_groups[0]["lr"]  # the epoch's: the schedule steps after it
    return EpochLog(epoch, lr, means, 0.0, 0.0)


def _save(checkpoint: Checkpoint, epoch: int, result: TrainResult, start: float) -> None:
    """Write the epoch's checkpoint; the writing counts as checkpoint time, not training time."""
    _stop_clock(result, start)
    t_save = time.perf_counter()
    checkpoint.save(epoch, result.state_dict())
    result.checkpoint_time_s += time.perf_counter() - t_save


def _start_clock(result: TrainResult) -> float:
    # A resumed run's clock goes on: it starts as far back as the time the run has already spent.
    return time.perf_counter() - result.train_time_s - result.eval_time_s - result.checkpoint_time_s


def _stop_clock(result: TrainResult, start: float) -> None:
    # Training time is the wall time since ``start`` less the time spent evaluating and writing
    # checkpoints (kept apart, so that train_time_s measures the steps alone).
    result.train_time_s = time.perf_counter() - start - result.eval_time_s - result.checkpoint_time_s
