"""Accuracy, size and speed measurements of a trained model."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .compiling import compile_mode, raise_recompile_limits
from .errors import KdbenchError
from .files import warn


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    """Percentage of rows whose label is among the ``k`` largest logits."""
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1)
    return 100.0 * hit.float().mean().item()


def agreement(pred_a: Tensor, pred_b: Tensor) -> float:
    """Percentage of examples on which two models predict the same class."""
    return 100.0 * (pred_a == pred_b).float().mean().item()


def per_class_prf(pred: Tensor, labels: Tensor, num_classes: int) -> dict[str, list[float]]:
    """Per-class precision, recall and F1 in percent (0 where undefined, as scikit-learn's default)."""
    idx = labels * num_classes + pred
    confusion = torch.bincount(idx.cpu(), minlength=num_classes**2).reshape(num_classes, num_classes).double()
    tp = confusion.diag()
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return {k: (100.0 * v).tolist() for k, v in (("precision", precision), ("recall", recall), ("f1", f1))}


#: Bins of the expected calibration error (Guo et al., ICML 2017, use 15).
ECE_BINS = 15


def macro_prf(pred: Tensor, labels: Tensor, num_classes: int) -> tuple[float, float, float]:
    """Macro precision, recall and F1 in %: the per-class scores (:func:`per_class_prf`) averaged with equal
    weight, as scikit-learn's ``average="macro"``."""
    scores = per_class_prf(pred, labels, num_classes)
    return tuple(statistics.fmean(scores[k]) for k in ("precision", "recall", "f1"))  # type: ignore[return-value]


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    """ECE in %: confidences (top probabilities) in ``bins`` equal-width bins over (0, 1]; the mean over images
    of |accuracy − mean confidence| of each image's bin."""
    conf, pred = probs.double().max(1)
    correct = (pred == labels).double()
    which = (conf * bins).ceil().long().clamp(1, bins) - 1  # bin b holds (b/bins, (b+1)/bins]
    count = torch.bincount(which, minlength=bins).double()
    gap = (torch.bincount(which, correct, minlength=bins) - torch.bincount(which, conf, minlength=bins)).abs()
    return 100 * float(gap.sum() / count.sum())


def nll(logits: Tensor, labels: Tensor) -> float:
    """The mean negative log-likelihood of the true labels (nats)."""
    return float(F.cross_entropy(logits.double(), labels))


def kl_to_teacher(teacher_logits: Sequence[Tensor], student_logits: Tensor, temperature: float = 1.0) -> float:
    """KL(teacher ‖ student) between the softmaxes at ``temperature``, the mean over images (nats), without KD's
    T² factor. With several teachers the teacher's distribution is the mean of theirs (the teachers' ensemble).
    NaN for a temperature that is not a positive number."""
    if not temperature > 0 or math.isinf(temperature):
        return math.nan
    p = torch.stack([F.softmax(t.double() / temperature, 1) for t in teacher_logits]).mean(0)
    log_q = F.log_softmax(student_logits.double() / temperature, 1)
    # 0 · log 0 = 0: a class the teacher gives no probability adds nothing
    terms = torch.where(p > 0, p * (p.clamp(min=1e-300).log() - log_q), torch.zeros_like(p))
    return float(terms.sum(1).mean())


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Floating-point operations of one forward pass of one image (torch.utils.flop_counter).

    Counted on the CPU in eval mode; a multiply-add counts as 2 FLOPs.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class Throughput:
    images_per_s: float
    batch_size: int
    device: str
    dtype: str
    repeats: int
    iters_per_repeat: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: How long each throughput repeat runs by default: shorter repeats of one model varied 2-3x (issue 17).
THROUGHPUT_MIN_TIME_S = 1.0
#: Overrides it (seconds): the test suite sets it low, so that its many short sweeps stay fast.
THROUGHPUT_MIN_TIME_ENV = "KDBENCH_THROUGHPUT_MIN_S"


def throughput_min_time_s() -> float:
    """Seconds per throughput repeat: ``$KDBENCH_THROUGHPUT_MIN_S`` when set, else :data:`THROUGHPUT_MIN_TIME_S`."""
    value = os.environ.get(THROUGHPUT_MIN_TIME_ENV, "").strip()
    if not value:
        return THROUGHPUT_MIN_TIME_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or math.isinf(seconds):
        raise KdbenchError(f"${THROUGHPUT_MIN_TIME_ENV} is {value!r}: give seconds per throughput repeat, "
                           f"a number >= 0 (unset: {THROUGHPUT_MIN_TIME_S:g})")
    return seconds


def _timed(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Seconds ``calls`` back-to-back calls of ``fn`` take, synchronised on GPU."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return time.perf_counter() - t0


def calls_for(fn: Callable[[], object], device: torch.device, min_time_s: float) -> int:
    """Calls of ``fn`` that take about ``min_time_s``, from a timed pass of already warm calls: 1, 2, 4, ...
    calls until a pass takes a tenth of ``min_time_s`` (one call is noise on a fast model). 1 when
    ``min_time_s`` is 0 (nothing is called)."""
    if min_time_s <= 0:
        return 1
    calls = 1
    while True:
        elapsed = _timed(fn, device, calls)
        if elapsed >= min_time_s / 10 or calls >= 1 << 20:
            break
        calls *= 2
    return max(1, math.ceil(min_time_s / max(elapsed / calls, 1e-9)))


def seconds_per_call(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, repeats: int = 2,
                     min_time_s: float = 0.0) -> tuple[list[float], int]:
    """kdbench's one timing helper: seconds per call of ``fn``, one figure per repeat, and the
    number of calls each repeat timed.

    ``warmup`` untimed calls first (allocator, kernel selection, compiling); then the calls per repeat
    are calibrated on warm calls (:func:`calls_for`), not on the warm-up's, which pay for the first
    call's setup; then each repeat times that many back-to-back calls, about ``min_time_s`` (every
    repeat does the same work), synchronised on GPU so the time is the device's, not the launch queue's.
    """
    for _ in range(warmup):
        fn()
    iters = calls_for(fn, device, min_time_s)
    out = []
    for _ in range(repeats):
        out.append(_timed(fn, device, iters) / iters)
    return out, iters


@torch.inference_mode()
def measure_throughput(model: nn.Module, input_shape: tuple[int, ...], *, batch_size: int = 256,
                       dtype: torch.dtype = torch.float32, warmup: int = 3, repeats: int = 5,
                       min_time_s: float | None = None, options: Any = None) -> Throughput:
    """Inference images/s: eval mode, inference mode, fixed batch, warm-up, median of repeats of at least
    ``min_time_s`` each (None: :func:`throughput_min_time_s`, 1 s by default).

    With ``options`` (the run's :class:`~kdbench.train.EngineOptions`) the model runs as the run trained: under
    its autocast, on input in its memory order, and compiled when it compiled (a compilation that fails is
    measured eagerly, with a warning). ``Throughput.dtype`` names the setting: ``float32`` for
    plain fp32 eager, else e.g. ``bfloat16 (autocast), channels_last, compiled``."""
    min_time_s = throughput_min_time_s() if min_time_s is None else min_time_s
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(batch_size, *input_shape, device=device, dtype=dtype)
    setting = [str(dtype).replace("torch.", "")]
    autocast: Callable[[], Any] = contextlib.nullcontext
    run = model
    if options is not None:
        x = options.layout(x)
        autocast = lambda: options.autocast(device)  # noqa: E731
        if options.precision == "bf16":
            setting = ["bfloat16 (autocast)"]
        setting += ["channels_last"] * options.channels_last
        if options.compile:
            from torch import _dynamo

            raise_recompile_limits(_dynamo.config)
            run = torch.compile(model, mode=compile_mode(device))

    def call() -> object:
        with autocast():
            return run(x)

    try:
        try:
            seconds, iters = seconds_per_call(call, device, warmup=warmup, repeats=repeats, min_time_s=min_time_s)
            setting += ["compiled"] * (run is not model)
        except Exception as exc:
            if run is model:
                raise
            # Compiling failed (as it may under --compile auto): the eager model's figure (the setting then
            # does not say "compiled"), and a warning saying why.
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
            warn(f"throughput: torch.compile failed ({type(exc).__name__}: {first[:160]}); timing the model eagerly")
            run = model
            seconds, iters = seconds_per_call(call, device, warmup=warmup, repeats=repeats, min_time_s=min_time_s)
    finally:
        model.train(was_training)
    return Throughput(batch_size / statistics.median(seconds), batch_size, device_name(device),
                      ", ".join(setting), repeats, iters)


def device_name(device: torch.device) -> str:
    """A human-readable name: the GPU model, or the CPU model and thread count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu:{cpu} ({torch.get_num_threads()} threads)"


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device as the driver reports it (other processes' use counted); None on the CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


#: Of a GPU's free memory, what one resident thing (a dataset, a teacher cache) may take: the rest is for the
#: training itself (weights, activations, optimizer state) and for the other runs sharing the GPU.
RESIDENT_FRACTION = 0.8


def fits_on_device(nbytes: int, device: torch.device, fraction: float = RESIDENT_FRACTION) -> tuple[bool, str]:
    """Whether ``nbytes`` fit in ``fraction`` of ``device``'s free memory, and the figures in words
    ("3.2 GiB of 1.5 GiB free on cuda:0"); always (True, '') on the CPU."""
    free = device_free_bytes(device)
    if free is None:
        return True, ""
    return nbytes <= fraction * free, f"{nbytes / 2**30:.2f} GiB, with {free / 2**30:.2f} GiB free on {device}"


class PeakMemory:
    """Peak memory over a block: CUDA's max allocated on GPU; the process's max RSS on CPU.

    The CPU figure is process-wide and never decreases, so it is an upper bound for the block.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"
        self.mb = 0.0
        # On a GPU, what was allocated when the block began (the dataset, teachers, caches, the new model), and
        # the block's own peak above it; NaN on the CPU, whose process-wide peak RSS cannot be split so.
        self.base_mb = self.run_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.run_mb = self.mb - self.base_mb
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
