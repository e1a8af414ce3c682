"""PKT as the CRD benchmark runs it (RepDistiller's ``PKT.cosine_similarity_loss``, written out
independently here), and an end-to-end CLI run of cc and pkt with and without the teacher cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.method import Batch, Outputs
from kdbench.registry import build_method, load_methods

PKT = load_methods()["pkt"]
EPS = 1e-7


def pooled_pair(n: int = 6, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, generator=g), torch.randn(n, 9, generator=g) * 3


def outputs(s: torch.Tensor, t: torch.Tensor) -> tuple[Outputs, list[Outputs], Batch]:
    n = len(s)
    return (Outputs(torch.zeros(n, 5), pooled=s), [Outputs(torch.zeros(n, 5), pooled=t)],
            Batch(torch.zeros(n, 1, 8, 8), torch.zeros(n, dtype=torch.long), 0, 1))


def reference(s: torch.Tensor, t: torch.Tensor, weight: float = 30000.0) -> float:
    """weight · (1/N²) Σ_ij p_ij log((p_ij + eps) / (q_ij + eps)), where p (teacher) and q (student) are
    p_ij = c_ij / Σ_k c_ik with c_ij = (1 + x_i·x_j / ((‖x_i‖ + eps)(‖x_j‖ + eps))) / 2; float64 loops."""
    n = len(s)

    def conditionals(x):
        x = x.double()
        norms = [math.sqrt(sum(float(v) ** 2 for v in x[i])) + EPS for i in range(n)]
        c = [[(1 + sum(float(x[i, k]) * float(x[j, k]) for k in range(x.shape[1])) / (norms[i] * norms[j])) / 2
              for j in range(n)] for i in range(n)]
        return [[c[i][j] / sum(c[i]) for j in range(n)] for i in range(n)]

    p, q = conditionals(t), conditionals(s)
    kl = sum(p[i][j] * math.log((p[i][j] + EPS) / (q[i][j] + EPS)) for i in range(n) for j in range(n))
    return weight * kl / (n * n)


def test_defaults_are_crds():
    m = build_method(PKT)
    assert m.config() == {"ce_weight": 1.0, "pkt_weight": 30000.0}
    assert m.taps().pooled and m.taps().stages == ()  # so the teacher-output cache can serve it
    assert m.extra_parameters() == 0 and not list(m.parameters())
    assert "Probabilistic Knowledge Transfer" in PKT.paper and "ECCV 2018" in PKT.paper


@pytest.mark.parametrize(("n", "weight"), [(6, 30000.0), (5, 2.0)])
def test_matches_repdistillers_cosine_similarity_loss_written_out(n, weight):
    s, t = pooled_pair(n=n, seed=n)
    terms = build_method(PKT, {"pkt_weight": weight})(*outputs(s, t))
    assert set(terms) == {"pkt"}
    assert terms["pkt"].item() == pytest.approx(reference(s, t, weight), rel=1e-5)


def test_same_geometry_gives_zero_and_a_zero_vector_stays_finite():
    s, _ = pooled_pair()
    # Scaled copies have the same cosines: the distributions agree and the KL is 0.
    assert build_method(PKT, {"pkt_weight": 1.0})(*outputs(s, 5 * s))["pkt"].item() == pytest.approx(0.0, abs=1e-7)
    # A sample whose pooled vector is all zero (a dead ReLU layer) has cosine 0 to everything.
    s = s.clone()
    s[2] = 0
    s.requires_grad_(True)
    _, t = pooled_pair()
    loss = build_method(PKT)(*outputs(s, t))["pkt"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_gradients_reach_the_student_not_the_teacher():
    s, t = pooled_pair()
    s.requires_grad_(True)
    t.requires_grad_(True)  # as if the teacher's output were part of a graph: nothing may flow there
    build_method(PKT)(*outputs(s, t))["pkt"].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("overrides", [{"pkt_weight": -1.0}, {"pkt_weight": float("nan")}, {"ce_weight": -0.5}])
def test_out_of_range_hyperparameters_are_refused(overrides):
    (hp,) = overrides
    with pytest.raises(KdbenchError, match=rf"bad hyperparameter value for method 'pkt'.*{hp} must be"):
        build_method(PKT, overrides)


# -- end to end: cc and pkt through the CLI, from the teacher cache and from the teacher ------------
PAIRS = ("cifar_resnet14:cifar_resnet8", "cifar_resnet8:hinton_mlp_30")


def _run(results, cache: str) -> list[dict]:
    from kdbench.cli import main
    from kdbench.sweep.store import ResultsStore

    code = main(["run", "--methods", "cc,pkt,kd", "--pairs", ",".join(PAIRS), "--seeds", "0", "--limit", "48",
                 "--epochs", "1", "--quiet", "--no-report", "--throughput-batch", "8", "--results-dir", str(results),
                 "--teacher-cache", cache])
    assert code == 0
    return [r for r in ResultsStore(results).rows() if r["kind"] == "student"]


def _by_run(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["method"], r["pair"]): r for r in rows}


def _history(row: dict):
    h = row["history_loss"]
    return json.loads(h) if isinstance(h, str) else h


def test_cli_runs_cc_and_pkt_from_the_teacher_cache_with_the_same_numbers(tmp_path):
    on = _by_run(_run(tmp_path / "on", "on"))
    labels = {pair for _, pair in on}
    assert len(labels) == 2
    for method in ("cc", "pkt", "kd"):
        for pair in labels:
            row = on[method, pair]
            assert row["teacher_cache"] is True, (method, pair)
            losses = [r for r in row if r.startswith("loss.")]
            assert f"loss.{method}" in losses, (method, pair, sorted(row))
            assert all(math.isfinite(row[k]) for k in losses), {k: row[k] for k in losses}
    off = _by_run(_run(tmp_path / "off", "off"))
    assert set(off) == set(on)
    for key, row in off.items():
        assert not row["teacher_cache"] and row["run_id"] == on[key]["run_id"]
    # The cache holds the teacher's exact logits and pooled vectors: training from it changes nothing.
    for pair in labels:
        assert _history(on["pkt", pair]) == _history(off["pkt", pair])
        assert _history(on["cc", pair]) == _history(off["cc", pair])
