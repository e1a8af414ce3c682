"""One training step: ``terms = step(batch, epoch)``, once per batch.

:class:`TrainStep` holds everything a step does: the teachers' forward pass (or the lookup of their
cached outputs), the student's, cross-entropy and the method's terms, the backward pass, the
optimizer step and the recipe's max-norm. :meth:`TrainStep.prepare_distributed` and
:meth:`TrainStep.compile` wrap its forward in DDP and ``torch.compile`` (as timm's
``TrainingTask`` does), so the training loop never sees either.

Under DDP (torchrun, :mod:`kdbench.distributed`) every rank draws the same global batch (same
generator: same order, same augmentation) and the step trains on this rank's contiguous slice of
it. The gradients, averaged by DDP and weighted by slice size, equal the single-process gradient
of the batch's mean loss (for terms that are means over samples, as CE and KD are; a term
relating samples to each other, like RKD's, sees one slice's samples per rank). What else
differs is BatchNorm: each rank normalises its slice with the slice's statistics, and running
statistics are rank 0's (plain DDP, no SyncBatchNorm).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..compiling import RECOMPILE_LIMIT, compile_mode, compiled_graphs, raise_recompile_limits  # noqa: F401
from ..data import TrainBatch
from ..errors import KdbenchError
from ..features import FeatureCapture
from ..files import warn
from ..method import Batch, Method, Outputs, Taps, weigh_terms
from ..recipe import Recipe
from .options import EngineOptions, as_fp32, freeze
from .teacher_cache import ViewCache


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Rescale each unit's incoming weights to L2 norm <= ``max_norm`` (Srivastava et al. 2014).

    A unit's incoming weights are one row of a Linear weight or one conv filter: dim 0 of
    every weight with two or more dimensions. Biases and normalisation scales are left alone.
    """
    for p in model.parameters():
        if p.dim() >= 2:
            p.copy_(torch.renorm(p, 2, 0, max_norm))


def trainable_parameters(model: nn.Module, method: Method | None) -> list[nn.Parameter]:
    """What the optimizer trains: the student's parameters, then the method's (FitNets' regressor).

    Every parameter a method owns trains with the student, so a method cannot forget to list one.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if method is not None:
        params += [p for p in method.parameters() if p.requires_grad]
    return params


class _Forward(nn.Module):
    """One training step's forward: the teachers (or their cached outputs), the student, the terms.

    The student and the method are submodules, so DDP averages the gradients of every parameter
    in them: the method's own parameters (FitNets' regressor) train across ranks as the student's
    do. The teachers are not (frozen, nothing to average). It is also the unit ``torch.compile``
    compiles, so one graph holds the whole forward.
    """

    def __init__(self, student: FeatureCapture, method: Method | None, teachers: Sequence[FeatureCapture],
                 options: EngineOptions, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model, self.method = student.model, method  # registered: their parameters are DDP's
        self.capture, self.teachers, self.options = student, list(teachers), options
        self.label_smoothing = label_smoothing  # the recipe's, of the engine's cross-entropy

    def forward(self, images: Tensor, labels: Tensor, cached: list[Outputs] | None, batch: Batch,
                with_ce: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(the engine's terms, the method's terms), before the schedule's weights: the cross-entropy comes
        unweighted (``with_ce``: whether it is a term at all) and the method's terms as ``forward`` gives them.
        :meth:`TrainStep._step` weighs both outside the graph: a weight that changes over the schedule is a
        plain multiplication there, not a new compiled (and CUDA) graph per value (issue 17, item 6)."""
        with self.options.autocast(images.device):
            if cached is None:
                with torch.no_grad():
                    cached = [cap(images) for cap in self.teachers]
            out = self.capture(images)
        # Losses in fp32 whatever the precision: a bf16 softmax at temperature 4 loses the tails.
        out, t_out = as_fp32(out), [as_fp32(t) for t in cached]
        # Skipped when its weight is 0, so layers no term reaches get no gradient at all
        # (FitNets' hint stage trains only the student's lower layers).
        own = {"ce": F.cross_entropy(out.logits, labels, label_smoothing=self.label_smoothing)} if with_ce else {}
        return own, (self.method(out, t_out, batch) if self.method is not None else {})


class TrainStep:
    """One training step of ``model`` (distilled from ``teachers`` through ``method``), called per batch.

    Args:
        model: the student (or a teacher being trained: no method, no teachers).
        method: turns outputs into named, weighted loss terms; None trains on cross-entropy alone.
        teachers: frozen here (eval mode, no gradients).
        optimizer: over :func:`trainable_parameters` of ``model`` and ``method``.
        recipe: its epoch count (for the method's schedule) and max-norm.
        device: where the model and the batches live.
        options: precision and memory format of the forward.
        caches: one :class:`ViewCache` per teacher, looked up instead of running the teachers.
        model_name, teacher_names: for error messages about stages.
        labelled: False for an unlabelled transfer set: no cross-entropy term, whatever the method's
            ``ce_weight``, and ``batch.labels`` is None for the method.
        init_epochs: the method's init stage (:func:`~kdbench.method.init_epochs_for`): epochs
            0 .. init_epochs - 1 train its init terms alone (``batch.stage == "init"``), without
            cross-entropy; epoch ``init_epochs`` is the schedule's first.
    """

    def __init__(self, model: nn.Module, method: Method | None, teachers: Sequence[nn.Module],
                 optimizer: torch.optim.Optimizer, *, recipe: Recipe, device: torch.device,
                 options: EngineOptions = EngineOptions(), caches: Sequence[ViewCache] = (),
                 model_name: str = "", teacher_names: Sequence[str] = (), labelled: bool = True,
                 init_epochs: int = 0) -> None:
        taps = method.taps() if method is not None else Taps()
        names = teacher_names or [""] * len(teachers)
        self.forward = _Forward(FeatureCapture(model, taps, model_name), method,
                                [FeatureCapture(freeze(t), taps, n) for t, n in zip(teachers, names)], options,
                                recipe.label_smoothing)
        self.net: nn.Module = self.forward  # what a step calls: the forward, under DDP and torch.compile if asked
        self.model, self.method, self.optimizer = model, method, optimizer
        self.epochs, self.max_norm, self.init_epochs = recipe.epochs, recipe.max_norm, init_epochs
        self.clip_grad = recipe.clip_grad
        self.device, self.options, self.caches = device, options, list(caches)
        self.who = f"method '{method.name}'" if method is not None else "training"
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.distributed = self.compiled = False
        self.compile_error = ""  # why compiling failed and the step went on eagerly ('' when it did not)
        self.compile_time_s = 0.0  # wall time of the steps that compiled a graph (issue 17, item 1)
        self.labelled = labelled
        if not labelled and method is None:
            raise KdbenchError("training without labels needs a method with teachers to learn from; "
                               "train teachers on labelled data")

    @property
    def uses_cache(self) -> bool:
        """Whether the teachers' outputs come from caches (then batches must name their images and views)."""
        return bool(self.caches)

    def prepare_distributed(self) -> TrainStep:
        """Average gradients over torchrun's ranks with DDP; with one process, nothing to do.

        Call it after loading a resumed checkpoint (DDP starts every rank from rank 0's weights)
        and before :meth:`compile` (the compiled graph then holds DDP's communication).
        """
        if self.compiled:
            raise RuntimeError("TrainStep.prepare_distributed() must come before compile()")
        if self.world > 1 and not self.distributed:
            # Unused parameters must be allowed: FitNets' hint stage leaves the student's head out of the loss.
            self.net = nn.parallel.DistributedDataParallel(
                self.forward, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
            # A 1x1 convolution's (FitNets' regressor's) gradient differs from its bucket only in the
            # strides of size-1 dimensions: DDP's "performance" warning about it says nothing.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.distributed = True
        return self

    def compile(self) -> TrainStep:
        """``torch.compile`` the forward; on one CUDA process its forward and backward replay as CUDA graphs
        (not under DDP with more than one rank: :func:`compile_mode`)."""
        import torch._dynamo

        raise_recompile_limits(torch._dynamo.config)
        self._eager = self.net  # what a failed compilation falls back to (options.compile_fallback)
        self.net = torch.compile(self.net, mode=compile_mode(self.device, self.world))
        self.compiled = True
        return self

    def __call__(self, batch: TrainBatch, epoch: int) -> dict[str, Tensor]:
        """Train on ``batch`` (this rank's slice of it under DDP).

        Returns:
            The weighted loss terms, detached, each scaled by the slice's share of the batch (1
            without DDP), so that their sum over the ranks is the whole batch's.
        """
        images, labels, index, view, soft = self._slice(batch)
        # A streamed batch is this rank's shard already (equal shards: the sampler pads them), a batch from memory
        # the global batch: either way the share of the global batch this rank trains.
        share = 1 / self.world if batch.sharded else len(images) / len(batch.images)
        cached = [c.lookup(index, view) for c in self.caches] if self.caches else None
        if not self.compiled:
            return self._step(images, labels, index, cached, epoch, share, soft)
        graphs, t0 = compiled_graphs(), time.perf_counter()
        try:
            return self._compiled_step(images, labels, index, cached, epoch, share, soft)
        finally:
            if compiled_graphs() > graphs:  # this step compiled: its time is compile time (synced: all of it)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.compile_time_s += time.perf_counter() - t0

    def _compiled_step(self, images: Tensor, labels: Tensor, index: Tensor | None, cached: list[Outputs] | None,
                       epoch: int, share: float, soft: Tensor | None) -> dict[str, Tensor]:
        self._mark_step(images, labels, cached)
        if not self.options.compile_fallback:
            return self._step(images, labels, index, cached, epoch, share, soft)
        try:
            return self._step(images, labels, index, cached, epoch, share, soft)
        except (KdbenchError, torch.cuda.OutOfMemoryError):  # not compiling's fault: eager would say the same
            raise
        except Exception as exc:  # compiling (or recording CUDA graphs) failed: go on eagerly
            self._fall_back(exc, epoch)
        # The failed attempt changed no weights (the optimizer had not stepped; gradients are zeroed
        # first); a forward that did run has moved BatchNorm statistics and the dropout RNG once more.
        return self._step(images, labels, index, cached, epoch, share, soft)

    def _step(self, images: Tensor, labels: Tensor, index: Tensor | None, cached: list[Outputs] | None,
              epoch: int, share: float, soft: Tensor | None = None) -> dict[str, Tensor]:
        shown = labels if self.labelled else None
        # Everything that changes over the schedule is decided here, outside the compiled forward: the
        # stage (a string: one graph per stage), the cross-entropy's weight and the method's term weights
        # (multiplied below, never graph inputs).
        if epoch < self.init_epochs:  # the method's init stage: its init terms alone
            ce_weight, weights = 0.0, {}
            seen = Batch(images, shown, epoch, self.init_epochs, index, "init", soft)
        else:
            epoch -= self.init_epochs
            ce_weight, weights, stage = 1.0, {}, "train"
            if self.method is not None:
                ce_weight = self.method.ce_weight_at(epoch, self.epochs)
                weights, stage = self.method.term_weights_at(epoch, self.epochs), self.method.stage_at(epoch, self.epochs)
            seen = Batch(images, shown, epoch, self.epochs, index, stage, soft)  # what the method sees
        if not self.labelled:  # an unlabelled transfer set: the engine's label term is dropped
            ce_weight = 0.0
        # Under mixup/CutMix the cross-entropy is against the mixed label distributions; the method sees
        # each image's own label in batch.labels and the distributions in batch.soft_labels.
        own, extra = self.net(images, labels if soft is None else soft, cached, seen, bool(ce_weight))
        terms = self._merge(own, extra, epoch)
        terms = weigh_terms(terms, {**weights, "ce": ce_weight} if "ce" in terms else weights, self.who)
        self._update(sum(terms.values()), share)
        return {k: v.detach() * share for k, v in terms.items()}

    def _fall_back(self, exc: Exception, epoch: int) -> None:
        """Stop compiling: the rest of the run is eager, and ``compile_error`` says why (the row records it)."""
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        self.compile_error = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]
        self.net, self.compiled = self._eager, False
        warn(f"{self.who}: torch.compile failed at epoch {epoch} ({self.compile_error}); going on without it "
             "(eager). --compile off skips compiling, --compile on makes this an error")

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), at an epoch's end.

        DDP copies them before each forward; after the last step they differ again, and every
        rank must evaluate (and rank 0 save) the same model.
        """
        distributed.sync_buffers(self.forward)

    def check_in_sync(self) -> None:
        """Raise when the ranks' weights differ (they cannot unless the DDP path has a bug)."""
        distributed.check_in_sync(self.forward, "weights")

    def _slice(self, batch: TrainBatch) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
        parts = (self.options.layout(batch.images), batch.labels, batch.index, batch.view, batch.soft_labels)
        if self.world == 1 or batch.sharded:
            return parts
        if not self.distributed:
            raise RuntimeError("under torchrun, call TrainStep.prepare_distributed() before the first step")
        images, labels, index, view, soft = (t.tensor_split(self.world)[self.rank] if t is not None else None
                                             for t in parts)
        return images, labels, index, view, soft

    def _mark_step(self, images: Tensor, labels: Tensor, cached: list[Outputs] | None) -> None:
        # One graph per batch size (the short last batch gets its own) rather than a dynamic-shape
        # graph for both: dynamic shapes would slow every full batch for the sake of one.
        outs = cached or ()
        for t in (images, labels, *(o.logits for o in outs), *(o.pooled for o in outs)):
            if t is not None:
                torch._dynamo.mark_static(t, 0)
        if self.device.type == "cuda":  # a new step: CUDA graphs may reuse the last step's output memory
            torch.compiler.cudagraph_mark_step_begin()

    def _merge(self, own: dict[str, Tensor], extra: dict[str, Tensor], epoch: int) -> dict[str, Tensor]:
        """The engine's terms, then the method's, after checking the method's are scalars with free names."""
        if self.method is not None:
            if not isinstance(extra, dict):
                raise KdbenchError(f"{self.who} returned {type(extra).__name__}, not a dict of loss terms; its "
                                   "forward must return {name: weighted scalar tensor}")
            for name, value in extra.items():
                if not isinstance(value, Tensor) or value.dim() != 0:
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise KdbenchError(f"{self.who} returned loss term '{name}' that is not a scalar tensor "
                                       f"({shape}); each term must be one already-weighted number per batch")
                if not value.requires_grad and torch.is_grad_enabled():
                    # Added to the loss it would change no weight: the run would be cross-entropy under the
                    # method's name (an `ok` row). Checked on every step: a cheap flag, no device sync.
                    raise KdbenchError(f"{self.who} returned loss term '{name}' with no gradient: it depends on no "
                                       "trainable weight (a constant, the teachers' outputs alone, or computed under "
                                       ".detach() or torch.no_grad()), so it would train nothing and the run would be "
                                       "cross-entropy alone under the method's name; compute it from the student's "
                                       "outputs (student.logits, student.stages, ...)")
            clash = set(extra) & set(own)
            if clash:
                raise KdbenchError(f"{self.who} returned a term named {sorted(clash)}, which the engine owns; "
                                   "rename it")
            own.update(extra)
        if not own:
            raise KdbenchError(f"{self.who} produced no loss terms at epoch {epoch}; nothing would train")
        return own

    def _update(self, loss: Tensor, share: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients; weighting each by its slice's share of the batch
        # makes that the gradient of the whole batch's mean loss, also for an uneven last batch.
        (loss * (share * self.world)).backward()
        if self.clip_grad:
            params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        self.optimizer.step()
        if self.max_norm:
            apply_max_norm(self.model, self.max_norm)
