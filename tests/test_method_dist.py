"""DIST (Huang et al., NeurIPS 2022) against the paper's relations written out in float64 loops."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.method import Batch, Outputs
from kdbench.registry import build_method, load_methods


DIST = load_methods()["dist"]
EPS = 1e-8  # the official code's, added to the product of norms


def logits(n: int = 6, classes: int = 5, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, classes, generator=g) * 2, torch.randn(n, classes, generator=g) * 3


def outputs(s: torch.Tensor, t: torch.Tensor) -> tuple[Outputs, list[Outputs], Batch]:
    n = len(s)
    return Outputs(s), [Outputs(t)], Batch(torch.zeros(n, 1, 8, 8), torch.zeros(n, dtype=torch.long), 0, 1)


def pearson(u: list[float], v: list[float]) -> float:
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    cov = sum((a - mu) * (b - mv) for a, b in zip(u, v))
    nu = math.sqrt(sum((a - mu) ** 2 for a in u))
    nv = math.sqrt(sum((b - mv) ** 2 for b in v))
    return cov / (nu * nv + EPS)


def reference(s: torch.Tensor, t: torch.Tensor, T: float) -> tuple[float, float]:
    """(T²·(1 - mean over samples of ρ(Y_s[i], Y_t[i])), T²·(1 - mean over classes of ρ(Y_s[:, j], Y_t[:, j]))),
    Y = softmax(z / T) written out per row."""
    def softmax(row):
        m = max(row)
        e = [math.exp((x - m) / T) for x in row]
        return [x / sum(e) for x in e]

    ys = [softmax([float(x) for x in row]) for row in s.double()]
    yt = [softmax([float(x) for x in row]) for row in t.double()]
    n, c = len(ys), len(ys[0])
    inter = 1 - sum(pearson(ys[i], yt[i]) for i in range(n)) / n
    intra = 1 - sum(pearson([ys[i][j] for i in range(n)], [yt[i][j] for i in range(n)]) for j in range(c)) / c
    return T * T * inter, T * T * intra


def test_defaults_are_the_official_cifar100_setting():
    m = build_method(DIST)
    # dist_cifar.yaml: kd dist_t4 (tau 4, beta = gamma = 1 inside DIST), kd_loss_weight 2, ori_loss_weight 1
    assert m.config() == {"ce_weight": 1.0, "beta": 2.0, "gamma": 2.0, "temperature": 4.0}
    assert m.taps().stages == () and not m.taps().pooled and not list(m.parameters())
    assert "Stronger Teacher" in DIST.paper and "NeurIPS 2022" in DIST.paper


@pytest.mark.parametrize(("n", "classes", "T", "beta", "gamma"), [(6, 5, 4.0, 2.0, 2.0), (9, 3, 1.0, 1.0, 0.5)])
def test_matches_the_papers_relations_written_out(n, classes, T, beta, gamma):
    s, t = logits(n, classes, seed=n)
    terms = build_method(DIST, {"temperature": T, "beta": beta, "gamma": gamma})(*outputs(s, t))
    inter, intra = reference(s, t, T)
    assert set(terms) == {"dist_inter", "dist_intra"}
    assert terms["dist_inter"].item() == pytest.approx(beta * inter, rel=1e-5)
    assert terms["dist_intra"].item() == pytest.approx(gamma * intra, rel=1e-5)


def test_the_two_relations_are_different_things():
    # The inter-class term correlates rows, the intra-class term columns: transposing swaps them.
    s, t = logits(5, 5)
    m = build_method(DIST, {"temperature": 1.0})
    inter, intra = reference(s, t, 1.0)
    assert inter != pytest.approx(intra, rel=1e-3)
    terms = m(*outputs(s, t))
    assert terms["dist_inter"].item() == pytest.approx(2 * inter, rel=1e-5)


def test_identical_predictions_cost_nothing_and_a_batch_of_one_stays_finite():
    s, _ = logits()
    terms = build_method(DIST)(*outputs(s, s.clone()))
    assert all(v.item() == pytest.approx(0.0, abs=1e-4) for v in terms.values())  # float32 rounding, times 2·T²
    # One sample: each class's column is a single value, centred to 0: correlation 0, not NaN.
    s1, t1 = logits(1, 5)
    terms = build_method(DIST)(*outputs(s1, t1))
    assert all(math.isfinite(v.item()) for v in terms.values())
    assert terms["dist_intra"].item() == pytest.approx(2.0 * 16.0, rel=1e-6)


def test_gradients_reach_the_student_not_the_teacher():
    s, t = logits()
    s.requires_grad_(True)
    t.requires_grad_(True)  # as if the teacher's output were part of a graph: nothing may flow there
    terms = build_method(DIST)(*outputs(s, t))
    sum(terms.values()).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("overrides", [{"beta": -1.0}, {"gamma": float("nan")}, {"temperature": 0.0},
                                       {"temperature": -4.0}, {"ce_weight": -0.5}])
def test_out_of_range_hyperparameters_are_refused(overrides):
    (hp,) = overrides
    with pytest.raises(KdbenchError, match=rf"bad hyperparameter value for method 'dist'.*{hp} must be"):
        build_method(DIST, overrides)
    with pytest.raises(ValueError, match=f"{hp} must be"):
        DIST(**overrides)
