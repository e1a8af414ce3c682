"""What a trained model is measured on, apart from training: size, cost, and what it predicts.

FLOPs and inference throughput depend on the architecture, not on the method or the weights, so
they are measured once per model per sweep and shared by that model's runs. Agreement with the
teacher compares test-set predictions with the teachers' (computed once per teacher).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import metrics
from ..bias import error_counts
from ..data import DataSplits
from ..ensemble import timed_deployments
from ..train import EngineOptions, TrainResult, predict
from .columns import Col


@dataclass
class Measurements:
    """One run's measurements besides training: what goes into its row next to the training log."""

    params: int
    costs: dict[str, Any]                      # flops_per_image, throughput_* (per architecture)
    per_class: dict[str, list[float]] = field(default_factory=dict)  # precision, recall, f1
    agreement: float = float("nan")            # top-1 agreement with the teacher(s)
    teacher_ensemble_top1: float | None = None  # the teachers' ensemble itself, with 2+ teachers
    test_errors: int | float = float("nan")    # misclassified test images (last epoch); NaN: not evaluated
    class_errors: list[int] = field(default_factory=list)  # of them, those of each class


class Measurer:
    """Measures models of one sweep on one device, caching what does not depend on the run."""

    def __init__(self, data: DataSplits, throughput_batch: int, runs_per_gpu: int = 1,
                 options: EngineOptions | None = None) -> None:
        self.data, self.throughput_batch, self.runs_per_gpu = data, throughput_batch, runs_per_gpu
        self.options = options  # the runs' precision, memory order and compilation: throughput is timed in them
        info = data.info
        self.shape = (info.in_chans, info.img_size, info.img_size)
        self._costs: dict[str, dict[str, Any]] = {}        # per architecture
        self._teacher_probs: dict[str, Tensor] = {}        # test-set probabilities, per teacher run id
        self._costs_of_ensembles: dict[tuple[str, ...], dict[str, Any]] = {}  # per student ensemble

    def costs(self, name: str, model: nn.Module) -> dict[str, Any]:
        """FLOPs per image and inference throughput of an architecture, measured once per sweep."""
        if name not in self._costs:
            self._costs[name] = {Col.FLOPS: metrics.flops_per_image(model, self.shape), **self._throughput(model)}
        return self._costs[name]

    def _throughput(self, model: nn.Module) -> dict[str, Any]:
        """The throughput columns: measured, or NaN with ``throughput_note`` saying why not."""
        if self.runs_per_gpu > 1:
            # The other runs on this GPU train while this one would time: images/s would count their load.
            return {Col.THROUGHPUT: float("nan"), Col.THROUGHPUT_BATCH: self.throughput_batch,
                    Col.THROUGHPUT_DEVICE: "", Col.THROUGHPUT_DTYPE: "", Col.THROUGHPUT_REPEATS: 0,
                    Col.THROUGHPUT_ITERS: 0,
                    Col.THROUGHPUT_NOTE: f"not measured: {self.runs_per_gpu} runs shared the GPU "
                                         f"(--runs-per-gpu {self.runs_per_gpu})"}
        tp = metrics.measure_throughput(model, self.shape, batch_size=self.throughput_batch, options=self.options)
        return {Col.THROUGHPUT: tp.images_per_s, Col.THROUGHPUT_BATCH: tp.batch_size,
                Col.THROUGHPUT_DEVICE: tp.device, Col.THROUGHPUT_DTYPE: tp.dtype,
                Col.THROUGHPUT_REPEATS: tp.repeats, Col.THROUGHPUT_ITERS: tp.iters_per_repeat,
                Col.THROUGHPUT_NOTE: ""}

    def ensemble_costs(self, members: tuple[str, ...], kwargs: Callable[[str], Any],
                       create: Callable[..., nn.Module]) -> dict[str, Any]:
        """A student ensemble's throughput as deployed (:func:`kdbench.ensemble.timed_deployments`), once per sweep.
        ``create(name, kwargs(name), weights=False)`` builds a member's architecture on the run's device."""
        if members not in self._costs_of_ensembles:
            def build(name: str) -> nn.Module:
                return create(name, kwargs(name), weights=False)

            if self.runs_per_gpu > 1:
                value = {Col.ENSEMBLE_THROUGHPUT: float("nan"),
                         Col.ENSEMBLE_THROUGHPUT_HOW: f"not measured: {self.runs_per_gpu} runs shared the GPU"}
            else:
                def measure(model: nn.Module) -> float:
                    return metrics.measure_throughput(model, self.shape, batch_size=self.throughput_batch,
                                                      options=self.options).images_per_s

                device = next(build(members[0]).parameters()).device
                tp, how = timed_deployments(members, build, measure, torch.zeros(2, *self.shape, device=device))
                value = {Col.ENSEMBLE_THROUGHPUT: tp, Col.ENSEMBLE_THROUGHPUT_HOW: how}
            self._costs_of_ensembles[members] = value
        return self._costs_of_ensembles[members]

    def teacher_probs(self, run_id: str, teacher: Callable[[], nn.Module]) -> Tensor:
        """A teacher's test-set class probabilities, computed once per sweep (``teacher()`` gives it)."""
        if run_id not in self._teacher_probs:
            self._teacher_probs[run_id] = F.softmax(predict(teacher(), self.data.test_images, self.data), 1)
        return self._teacher_probs[run_id]

    def measure(self, name: str, model: nn.Module, result: TrainResult,
                teacher_probs: Sequence[Tensor] = ()) -> Measurements:
        """Everything a row reports about ``model`` besides its training log."""
        labels = self.data.test_labels
        m = Measurements(metrics.count_params(model), self.costs(name, model))
        if not evaluated(result):
            return m
        pred = result.test_logits.argmax(1)
        m.per_class = metrics.per_class_prf(pred, labels, self.data.info.num_classes)
        m.test_errors, m.class_errors = error_counts(result.test_logits, labels, self.data.info.num_classes)
        if teacher_probs:
            probs = torch.stack(list(teacher_probs)).mean(0)
            m.agreement = metrics.agreement(pred, probs.argmax(1))
            if len(teacher_probs) > 1:  # the ensemble (mean of the teachers' probabilities) beside its student
                m.teacher_ensemble_top1 = metrics.topk_accuracy(probs, labels, 1)
        return m


def evaluated(result: TrainResult) -> bool:
    """Whether a run has an evaluated epoch (not one that diverged in its first epoch)."""
    return result.test_logits is not None and bool(result.history) and result.best_top1 >= 0
