"""CC (correlation congruence) as the CRD benchmark runs it: RepDistiller's ``Correlation`` loss on
trainable linear embeddings of the pooled vectors, written out independently here."""

from __future__ import annotations

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.method import Batch, Outputs, Probe
from kdbench.registry import build_method, load_methods

CC = load_methods()["cc"]


def pooled_pair(n: int = 6, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, generator=g), torch.randn(n, 9, generator=g) * 3


def built(overrides=None, s_dim: int = 7, t_dim: int = 9):
    torch.manual_seed(0)
    m = build_method(CC, overrides)
    m.setup(Probe("s", 5, {}, (s_dim,)), [Probe("t", 5, {}, (t_dim,))])
    return m


def outputs(s: torch.Tensor, t: torch.Tensor) -> tuple[Outputs, list[Outputs], Batch]:
    n = len(s)
    return (Outputs(torch.zeros(n, 5), pooled=s), [Outputs(torch.zeros(n, 5), pooled=t)],
            Batch(torch.zeros(n, 1, 8, 8), torch.zeros(n, dtype=torch.long), 0, 1))


def reference(m, s: torch.Tensor, t: torch.Tensor) -> float:
    """0.02 · mean over neighbouring samples i, i+1 of Σ_d |e_s,i − e_t,i|_d · |e_s,i+1 − e_t,i+1|_d,
    with e = W x + b (RepDistiller's LinearEmbed: no normalisation), in float64 loops."""
    ws, bs = m.embed_s.weight.detach().double(), m.embed_s.bias.detach().double()
    wt, bt = m.embed_t.weight.detach().double(), m.embed_t.bias.detach().double()
    n, dim = len(s), ws.shape[0]

    def embed(w, b, x):
        return [sum(float(w[d, k]) * float(x[k]) for k in range(len(x))) + float(b[d]) for d in range(dim)]

    es = [embed(ws, bs, s[i].double()) for i in range(n)]
    et = [embed(wt, bt, t[i].double()) for i in range(n)]
    total = 0.0
    for i in range(n - 1):
        total += sum(abs(es[i][d] - et[i][d]) * abs(es[i + 1][d] - et[i + 1][d]) for d in range(dim))
    return m.cc_weight * total / (n - 1)


def test_defaults_are_crds():
    m = build_method(CC)
    assert m.config() == {"ce_weight": 1.0, "cc_weight": 0.02, "embed_dim": 128}
    assert m.taps().pooled and m.taps().stages == ()  # so the teacher-output cache can serve it
    assert "Correlation Congruence" in CC.paper and "ICCV 2019" in CC.paper


def test_matches_repdistillers_correlation_written_out():
    s, t = pooled_pair()
    m = built()
    terms = m(*outputs(s, t))
    assert set(terms) == {"cc"}
    assert terms["cc"].item() == pytest.approx(reference(m, s, t), rel=1e-5)


def test_other_weight_and_embedding_size():
    s, t = pooled_pair(n=5, seed=7)
    m = built({"cc_weight": 3.0, "embed_dim": 4})
    assert m.embed_s.weight.shape == (4, 7) and m.embed_t.weight.shape == (4, 9)
    assert m.extra_parameters() == 4 * 7 + 4 + 4 * 9 + 4
    assert m(*outputs(s, t))["cc"].item() == pytest.approx(reference(m, s, t), rel=1e-5)


def test_embeddings_are_linear_not_normalised():
    """RepDistiller's cc uses LinearEmbed (models/util.py), not the L2-normalised Embed of CRD."""
    m = built()
    s, _ = pooled_pair()
    e = m.embed_s(s)
    assert not torch.allclose(e.norm(dim=1), torch.ones(len(s)))
    assert torch.allclose(e, s @ m.embed_s.weight.t() + m.embed_s.bias)


def test_one_sample_batch_has_no_pair_and_gives_zero():
    s, t = pooled_pair(n=1)
    assert built()(*outputs(s, t))["cc"].item() == 0.0


def test_gradients_reach_student_and_both_embeddings_not_the_teacher():
    s, t = pooled_pair()
    s.requires_grad_(True)
    t.requires_grad_(True)  # as if the teacher's output were part of a graph: nothing may flow there
    m = built()
    m(*outputs(s, t))["cc"].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n.split(".")[0] for n, _ in m.named_parameters()} == {"embed_s", "embed_t"}
    assert t.grad is None


def test_setup_needs_pooled_vectors():
    m = build_method(CC)
    with pytest.raises(ValueError, match="pooled"):
        m.setup(Probe("s", 5, {}, None), [Probe("t", 5, {}, (9,))])


@pytest.mark.parametrize("overrides", [{"cc_weight": -1.0}, {"cc_weight": float("nan")}, {"ce_weight": -0.5},
                                       {"embed_dim": 0}, {"embed_dim": -3}])
def test_out_of_range_hyperparameters_are_refused(overrides):
    (hp,) = overrides
    with pytest.raises(KdbenchError, match=rf"bad hyperparameter value for method 'cc'.*{hp} must be"):
        build_method(CC, overrides)
