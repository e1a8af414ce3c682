"""How long a plan will take on this device, from a few timed training steps of each model.

``--dry-run`` prints it. Each architecture is timed once: a training step (forward, backward,
SGD update) at the recipe's batch size and a no-grad forward. A run's estimate is its steps ×
(student step + each teacher's forward) plus one evaluation pass per epoch; a teacher that is
not cached yet adds its own training. Method terms (adapters, losses) are not timed: they are
small next to the models. Steps are timed in the run's precision and memory format
(``--precision``, ``--channels-last``) but eager: compiling would add its own minutes, and the
compiled step is faster. Teacher forwards are counted even where the teacher cache would replace them.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .. import metrics, zoo

if TYPE_CHECKING:
    from .driver import Sweep
    from .spec import RunSpec

_EVAL_BATCH = 500  # as kdbench.train.predict


def _seconds(fn: Any, device: torch.device) -> float:
    return statistics.mean(metrics.seconds_per_call(fn, device, warmup=1, repeats=2)[0])


def step_times(name: str, kwargs: tuple[tuple[str, Any], ...], batch: int, sweep: Sweep) -> tuple[float, float]:
    """Seconds of one training step and of one no-grad forward of ``batch`` images."""
    info, device = sweep.data.info, sweep.device
    options = sweep.req.engine_options(device.type)
    model = options.prepare(zoo.create(name, num_classes=info.num_classes, in_chans=info.in_chans,
                                       img_size=info.img_size, weights=False,  # timing needs no weights
                                       **dict(kwargs)).to(device))
    x = options.layout(torch.randn(batch, info.in_chans, info.img_size, info.img_size, device=device))
    y = torch.randint(0, info.num_classes, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step() -> None:
        with options.autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad(), options.autocast(device):
            model(x)

    model.train()
    t_train = _seconds(train_step, device)
    model.eval()
    return t_train, _seconds(forward, device)


def estimate(sweep: Sweep) -> tuple[list[str], float]:
    """One line per run still to do, and the total estimated seconds."""
    plan, store = sweep.plan, sweep.store
    if sweep.device.type == "cpu":
        torch.set_flush_denormal(True)  # as the engine trains
    info = sweep.data.info
    cache: dict[tuple, tuple[float, float]] = {}

    def times(name: str, kwargs: tuple, batch: int) -> tuple[float, float]:
        key = (name, kwargs, batch)
        if key not in cache:
            cache[key] = step_times(name, kwargs, batch, sweep)
        return cache[key]

    def eval_s(name: str, kwargs: tuple, batch: int) -> float:
        # forward time scales with the batch; scale the measured one to the test set
        return times(name, kwargs, batch)[1] * info.test_size / batch

    lines: list[str] = []
    total = 0.0
    teachers_done: set[str] = set()
    for spec in plan.specs:
        if store.has(spec.run_id):
            continue
        r = spec.recipe
        steps = math.ceil(info.train_size / r.batch_size)
        seconds = 0.0
        for ts in spec.teachers:
            if ts.run_id in teachers_done or ts.trained_elsewhere or store.has(ts.run_id):
                continue
            teachers_done.add(ts.run_id)
            tr = ts.recipe
            t_steps = math.ceil(info.train_size / tr.batch_size)
            seconds += tr.epochs * (t_steps * times(ts.model, ts.model_kwargs, tr.batch_size)[0]
                                    + eval_s(ts.model, ts.model_kwargs, tr.batch_size))
        step = times(spec.student, spec.student_kwargs, r.batch_size)[0]
        step += sum(times(ts.model, ts.model_kwargs, r.batch_size)[1] for ts in spec.teachers)
        seconds += r.epochs * (steps * step + eval_s(spec.student, spec.student_kwargs, r.batch_size))
        total += seconds
        lines.append(f"  {spec.run_id}  {spec.method:<12} {_pair(spec):<45} seed {spec.seed}  "
                     f"{r.epochs} epochs  ~{seconds / 60:.1f} min")
    for spec in plan.specs:
        if store.has(spec.run_id):
            lines.append(f"  {spec.run_id}  {spec.method:<12} {_pair(spec):<45} seed {spec.seed}  done (in the store)")
    return lines, total


def _pair(spec: RunSpec) -> str:
    """The pair, with its transfer set named ('a→s (transfer: without 3)')."""
    return spec.pair + (f" (transfer: {spec.transfer.label})" if not spec.transfer.empty else "")
