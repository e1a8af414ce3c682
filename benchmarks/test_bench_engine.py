"""Micro-benchmarks of the training engine: one step on the CPU, one fast-path step on CUDA, and
each method's loss in bf16 on CUDA.

Run with timings: ``python -m pytest benchmarks/test_bench_engine.py --benchmark-enable``. CI runs
them with timing disabled (each body once, the CUDA ones skipped without a GPU), so they stay
working code. The side-by-side comparison with an anchor-style loop is
``benchmarks/engine_vs_reference.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench import zoo
from kdbench.data import DataSplits, load_dataset
from kdbench.features import FeatureCapture, probe
from kdbench.method import Batch, Method
from kdbench.recipe import Recipe
from kdbench.registry import build_method, load_methods
from kdbench.train import EngineOptions, TrainResult, as_fp32, train

METHODS = load_methods()
BATCH = 64
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: it measures the engine's GPU path "
                                                 "(bf16 autocast, channels_last, torch.compile)")
# One epoch of exactly one batch: train() then runs one optimiser step.
ONE_STEP = Recipe(name="bench-step", epochs=1, batch_size=BATCH, lr=0.05, milestones=())


def one_batch(name: str, device: str) -> DataSplits:
    """One batch of training images and a few test images (the engine evaluates after its epoch;
    few test images keep that small next to the step)."""
    data = load_dataset(name, limit=BATCH)
    return DataSplits(data.info, data.train_images, data.train_labels, data.test_images[:8],
                      data.test_labels[:8]).to(device)


def pair(teacher: str, student: str, data: DataSplits, device: str) -> tuple[nn.Module, nn.Module, Method]:
    """Teacher, student and the KD method, set up as kdbench's runner does."""
    info = data.info
    kw = dict(num_classes=info.num_classes, in_chans=info.in_chans, img_size=info.img_size)
    torch.manual_seed(0)
    t, s = zoo.create(teacher, **kw), zoo.create(student, **kw)
    method = build_method(METHODS["kd"])
    shape = (info.in_chans, info.img_size, info.img_size)
    method.setup(probe(s, method.taps(), shape, student), [probe(t, method.taps(), shape, teacher)])
    return t.to(device), s.to(device), method


def check_trained(result: TrainResult, student: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """What a broken step would get wrong: non-finite losses, missing gradients, unchanged weights."""
    losses = result.last.losses
    assert set(losses) == {"ce", "kd"} and all(math.isfinite(v) for v in losses.values()), losses
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"no finite gradient for {name}"
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items() if k in before), \
        "the step changed no weight"


def test_engine_step_cpu(benchmark):
    """One train() step of KD on the CPU, fp32 eager: digits, cifar_resnet8 -> cifar_resnet8."""
    data = one_batch("digits", "cpu")
    teacher, student, method = pair("cifar_resnet8", "cifar_resnet8", data, "cpu")
    before = {k: v.clone() for k, v in student.named_parameters()}

    def step() -> TrainResult:
        return train(student, data, ONE_STEP, seed=0, method=method, teachers=[teacher],
                     teacher_names=["cifar_resnet8"], model_name="cifar_resnet8", options=EngineOptions())

    result = benchmark(step)
    assert len(result.history) == 1
    check_trained(result, student, before)


@needs_cuda
def test_engine_step_cuda_fast(benchmark):
    """One train() step of KD on CUDA with bf16 + channels_last + compile (resnet32x4 -> resnet8x4).

    A first, untimed call compiles (and records the CUDA graphs), so the benchmark times the
    steady state that a 240-epoch run spends nearly all its time in.
    """
    data = one_batch("synthetic:cifar100", "cuda")
    teacher, student, method = pair("cifar_resnet32x4", "cifar_resnet8x4", data, "cuda")
    options = EngineOptions(precision="bf16", channels_last=True, compile=True)
    before = {k: v.clone() for k, v in student.named_parameters()}

    def step() -> TrainResult:
        result = train(student, data, ONE_STEP, seed=0, method=method, teachers=[teacher],
                       teacher_names=["cifar_resnet32x4"], model_name="cifar_resnet8x4", options=options)
        torch.cuda.synchronize()
        return result

    step()  # compilation is not the step
    result = benchmark(step)
    check_trained(result, student, before)


@needs_cuda
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_loss_step_cuda_bf16(benchmark, name):
    """Each method's loss, forward + backward, on CUDA under bf16 autocast with fp32 losses as the
    engine computes them (batch 64 of CIFAR-shaped images, resnet32x4 -> resnet8x4)."""
    cls = METHODS[name]
    method = build_method(cls)
    shape = (3, 32, 32)
    kw = dict(num_classes=100, in_chans=3, img_size=32)
    torch.manual_seed(0)
    student = zoo.create("cifar_resnet8x4", **kw)
    teachers = [zoo.create("cifar_resnet32x4", **kw).eval() for _ in range(min(cls.max_teachers, 2))]
    taps = method.taps()
    method.setup(probe(student, taps, shape), [probe(t, taps, shape) for t in teachers])
    student, method = student.cuda(), method.cuda()
    teachers = [t.cuda() for t in teachers]
    x = torch.randn(BATCH, *shape, device="cuda")
    y = torch.randint(0, 100, (BATCH,), device="cuda")
    s_cap = FeatureCapture(student, taps)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        t_out = [as_fp32(FeatureCapture(t, taps)(x)) for t in teachers]

    def step() -> torch.Tensor:
        student.zero_grad(set_to_none=True)
        method.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = s_cap(x)
        out = as_fp32(out)  # losses in fp32, as the engine computes them
        terms = method(out, t_out, Batch(x, y, 0, 1))
        loss = F.cross_entropy(out.logits, y) + sum(terms.values(), torch.zeros((), device="cuda"))
        loss.backward()
        torch.cuda.synchronize()
        return loss

    loss = benchmark(step)
    assert torch.isfinite(loss)
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert any(g is not None for g in grads), "no gradient reached the student"
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
