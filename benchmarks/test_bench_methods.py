"""Micro-benchmarks: each method's loss (forward + backward), and the cost of capturing features.

Run with timings: ``python -m pytest benchmarks --benchmark-enable``. CI runs them with timing
disabled (each body once), so they also stay working code.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from kdbench import zoo
from kdbench.features import FeatureCapture, probe
from kdbench.method import Batch, Taps
from kdbench.registry import build_method, load_methods

METHODS = load_methods()
SHAPE = (3, 32, 32)


def _models(n_teachers: int):
    kw = dict(num_classes=100, in_chans=3, img_size=32)
    student = zoo.create("cifar_resnet8x4", **kw)
    teachers = [zoo.create("cifar_resnet32x4", **kw).eval() for _ in range(n_teachers)]
    return student, teachers


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_loss_step(benchmark, name):
    """One batch of 64 CIFAR-shaped images: capture, method terms, backward (resnet32x4 → resnet8x4)."""
    cls = METHODS[name]
    method = build_method(cls)
    student, teachers = _models(min(cls.max_teachers, 2))
    taps = method.taps()
    method.setup(probe(student, taps, SHAPE), [probe(t, taps, SHAPE) for t in teachers])
    x = torch.randn(64, *SHAPE)
    y = torch.randint(0, 100, (64,))
    # A training set of these 64 images, as the engine tells a method before training (CRD's banks).
    method.setup_data(train_size=64, labels=y)
    s_cap = FeatureCapture(student, taps)
    with torch.no_grad():
        t_out = [FeatureCapture(t, taps)(x) for t in teachers]

    def step():
        student.zero_grad(set_to_none=True)
        out = s_cap(x)
        terms = method(out, t_out, Batch(x, y, 0, 1, torch.arange(64)))
        loss = torch.nn.functional.cross_entropy(out.logits, y) + sum(terms.values(), torch.zeros(()))
        loss.backward()
        return loss

    assert torch.isfinite(benchmark(step))


def test_feature_capture_overhead_ratio():
    """Capture (stages 1-3 + pooled) vs plain model(x), alternated in one process; prints the ratio.

    The capturing pass computes what model(x) computes plus a second pooling for the pre-logit
    vector, so the ratio should stay close to 1.
    """
    model = zoo.create("cifar_resnet8x4", num_classes=100, in_chans=3, img_size=32).eval()
    cap = FeatureCapture(model, Taps(stages=(1, 2, 3), pooled=True))
    x = torch.randn(32, *SHAPE)
    plain, captured = [], []
    with torch.inference_mode():
        for f in (model, cap):  # warm-up
            f(x)
        for _ in range(5):
            for f, times in ((model, plain), (cap, captured)):
                t0 = time.perf_counter()
                f(x)
                times.append(time.perf_counter() - t0)
    ratio = statistics.median(captured) / statistics.median(plain)
    print(f"\nfeature capture / plain forward (cifar_resnet8x4, batch 32, CPU): {ratio:.3f}")
    assert ratio < 1.5
