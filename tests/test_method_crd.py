"""CRD as the CRD benchmark runs it: RepDistiller's ContrastMemory and ContrastLoss written out
independently here in float64, the banks' momentum update, the negatives' draw, resuming bit for
bit, and end-to-end CLI runs of crd and crd_kd."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

import test_resume
from kdbench.errors import KdbenchError
from kdbench.method import Batch, Outputs, Probe
from kdbench.registry import build_method
from kdbench_methods import crd as crd_module
from kdbench_methods.crd import CRD
from kdbench_methods.crd_kd import CRDKD

EPS = 1e-7
N, K, B, D = 12, 6, 4, 5  # training images, negatives, batch, embedding size of the small cases


def small(cls=CRD, n: int = N, labels: torch.Tensor | None = None, **overrides) -> CRD:
    """A method with 7-d student and 9-d teacher pooled vectors, its banks allocated for ``n`` images
    (with ``labels`` its training labels; without, the negatives are drawn uniformly)."""
    m = build_method(cls, {"feat_dim": D, "nce_k": K, **overrides})
    m.setup(Probe("s", 5, {}, (7,)), [Probe("t", 5, {}, (9,))])
    m.setup_data(train_size=n, labels=labels)
    return m


def batch_of(index: list[int], seed: int = 0, grad: bool = False) -> tuple[Outputs, list[Outputs], Batch]:
    g = torch.Generator().manual_seed(seed)
    b = len(index)
    s = Outputs(torch.randn(b, 5, generator=g) * 2, pooled=torch.randn(b, 7, generator=g).requires_grad_(grad))
    t = Outputs(torch.randn(b, 5, generator=g) * 3, pooled=torch.randn(b, 9, generator=g).requires_grad_(grad))
    return s, [t], Batch(torch.zeros(b, 1, 8, 8), torch.zeros(b, dtype=torch.long), 0, 1, torch.tensor(index))


def inject(method: CRD, negatives: torch.Tensor) -> None:
    """Replace the method's sampler by fixed negatives (its documented test hook)."""
    method.draw_negatives = lambda index: negatives


def embed(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """RepDistiller's Embed in float64: Linear, then each row divided by its L2 norm."""
    y = x.double() @ linear.weight.detach().double().t() + linear.bias.detach().double()
    return y / y.norm(dim=1, keepdim=True)


def reference(method: CRD, banks: tuple[torch.Tensor, torch.Tensor], s: Outputs, t: Outputs,
              index: list[int], negatives: torch.Tensor, z: tuple[float, float] | None = None):
    """float64 CRD loss (before crd_weight) from the paper's NCE objective as RepDistiller's ContrastMemory and
    ContrastLoss compute it, written with loops; returns (loss, (Z_s, Z_t))."""
    mem_s, mem_t = (b.double() for b in banks)
    e_s, e_t = embed(method.embed_s, s.pooled), embed(method.embed_t, t.pooled)
    n, k, T = mem_s.shape[0], negatives.shape[1], method.nce_t
    rows = [[index[b]] + negatives[b].tolist() for b in range(len(index))]
    # student anchor against the teacher bank (RepDistiller's out_v1); teacher anchor against the student bank
    out_s = [[math.exp(float(mem_t[j] @ e_s[b]) / T) for j in rows[b]] for b in range(len(index))]
    out_t = [[math.exp(float(mem_s[j] @ e_t[b]) / T) for j in rows[b]] for b in range(len(index))]
    if z is None:  # the first batch sets Z: the mean score times the number of training images
        z = tuple(sum(map(sum, out)) / (len(out) * (k + 1)) * n for out in (out_s, out_t))
    c = k / n  # K · P_n, P_n = 1/N the uniform noise distribution

    def nce(out, zz):
        total = 0.0
        for scores in out:
            p = [v / zz for v in scores]
            total += math.log(p[0] / (p[0] + c + EPS)) + sum(math.log(c / (q + c + EPS)) for q in p[1:])
        return -total / len(out)

    return nce(out_s, z[0]) + nce(out_t, z[1]), z


def fixed_negatives(index: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.randint(0, N - 1, (len(index), K), generator=g)
    return out + (out >= torch.tensor(index).unsqueeze(1)).long()


# -- defaults and contract ------------------------------------------------------------------
def test_defaults_are_the_benchmarks():
    assert build_method(CRD).config() == {"ce_weight": 1.0, "crd_weight": 0.8, "kd_weight": 0.0, "temperature": 4.0,
                                          "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5,
                                          "negatives": "other_classes"}
    # CRD+KD: run_cifar_distill.sh's `--distill crd -a 1 -b 0.8` (-r 1 by default), kd_T 4
    assert build_method(CRDKD).config() == {**build_method(CRD).config(), "kd_weight": 1.0}
    assert CRD.name == "crd" and CRDKD.name == "crd_kd" and issubclass(CRDKD, CRD)
    for cls in (CRD, CRDKD):
        assert "Contrastive Representation Distillation" in cls.paper and "ICLR 2020" in cls.paper
        taps = cls().taps()
        assert taps.pooled and taps.stages == () and not taps.preact  # the teacher-output cache can serve it


def test_state_is_two_banks_in_the_state_dict():
    m = small(n=20)
    state = m.state_dict()
    assert state["memory_s"].shape == state["memory_t"].shape == (20, D)
    assert state["z"].tolist() == [-1.0, -1.0]
    assert m.state_bytes() == 2 * 20 * D * 4 + 2 * 4  # the banks, and Z
    assert m.extra_parameters() == (7 * D + D) + (9 * D + D)  # the two embeddings
    # RepDistiller's initialisation: uniform in [-stdv, stdv], stdv = 1/sqrt(feat_dim/3)
    stdv = 1 / math.sqrt(D / 3)
    assert state["memory_s"].abs().max() <= stdv and not torch.equal(state["memory_s"], state["memory_t"])
    big = small(n=50_000, feat_dim=128)
    assert big.state_bytes() == 2 * 50_000 * 128 * 4 + 8


# -- the loss, written out -----------------------------------------------------------------
@pytest.mark.parametrize("cls", [CRD, CRDKD])
def test_matches_repdistillers_contrast_memory_and_loss_written_out(cls):
    torch.manual_seed(3)
    m = small(cls)
    index1, index2 = [3, 0, 7, 11], [5, 3, 9, 1]  # the second batch sees an updated row (3) again
    banks = (m.memory_s.clone(), m.memory_t.clone())
    s, t, batch = batch_of(index1, seed=1)
    neg1 = fixed_negatives(index1, 10)
    inject(m, neg1)
    terms = m(s, t, batch)
    expected, z = reference(m, banks, s, t[0], index1, neg1)
    assert set(terms) == ({"crd", "kd"} if cls is CRDKD else {"crd"})
    assert terms["crd"].item() == pytest.approx(0.8 * expected, rel=1e-5)
    assert m.z.tolist() == pytest.approx(list(z), rel=1e-5)
    if cls is CRDKD:  # Hinton's KD at T = 4, weight 1
        p = torch.softmax(t[0].logits.double() / 4, 1)
        q = torch.softmax(s.logits.double() / 4, 1)
        assert terms["kd"].item() == pytest.approx(float((p * (p / q).log()).sum(1).mean() * 16), rel=1e-5)
    # The next batch: Z stays as the first batch set it, the banks hold the first batch's updates.
    banks = (m.memory_s.clone(), m.memory_t.clone())
    s, t, batch = batch_of(index2, seed=2)
    neg2 = fixed_negatives(index2, 11)
    inject(m, neg2)
    terms = m(s, t, batch)
    expected, _ = reference(m, banks, s, t[0], index2, neg2, z=z)
    assert terms["crd"].item() == pytest.approx(0.8 * expected, rel=1e-5)
    assert m.z.tolist() == pytest.approx(list(z), rel=1e-5)


def test_weights_scale_their_terms_and_zero_kd_is_left_out():
    torch.manual_seed(3)
    a = small(crd_weight=2.0, kd_weight=0.5, temperature=2.0)
    torch.manual_seed(3)
    b = small(crd_weight=1.0, kd_weight=1.0, temperature=2.0)
    neg = fixed_negatives([1, 2], 0)
    inject(a, neg)
    inject(b, neg)
    ta, tb = a(*batch_of([1, 2])), b(*batch_of([1, 2]))
    assert ta["crd"].item() == pytest.approx(2 * tb["crd"].item(), rel=1e-6)
    assert ta["kd"].item() == pytest.approx(0.5 * tb["kd"].item(), rel=1e-6)
    assert set(small()(*batch_of([1, 2]))) == {"crd"}


def test_bank_rows_move_by_momentum_and_are_normalised():
    torch.manual_seed(4)
    m = small(nce_m=0.3)
    index = [2, 9, 4]
    before_s, before_t = m.memory_s.clone(), m.memory_t.clone()
    s, t, batch = batch_of(index, seed=5)
    m(s, t, batch)
    e_s, e_t = embed(m.embed_s, s.pooled), embed(m.embed_t, t[0].pooled)
    for bank, old, e in ((m.memory_s, before_s, e_s), (m.memory_t, before_t, e_t)):
        moved = 0.3 * old[index].double() + 0.7 * e
        expected = moved / moved.norm(dim=1, keepdim=True)
        assert torch.allclose(bank[index].double(), expected, atol=1e-6)
        assert torch.allclose(bank[index].norm(dim=1), torch.ones(3), atol=1e-6)
        others = [i for i in range(N) if i not in index]
        assert torch.equal(bank[others], old[others])  # only the positives' rows change
    assert not m.memory_s.requires_grad and not m.memory_t.requires_grad


# -- the negatives -------------------------------------------------------------------------
def test_a_sample_is_never_its_own_negative_and_draws_are_uniform():
    m = small(n=5, nce_k=400, negatives="uniform")
    index = torch.arange(5)
    counts = torch.zeros(5, 5)
    for _ in range(30):
        neg = m.draw_negatives(index)
        assert neg.shape == (5, 400) and neg.dtype == torch.long
        assert ((neg >= 0) & (neg < 5)).all()
        assert not (neg == index.unsqueeze(1)).any()
        counts += torch.nn.functional.one_hot(neg, 5).sum(1)
    assert (counts.diagonal() == 0).all()
    off = counts[~torch.eye(5, dtype=torch.bool)]
    assert off.min() > 0.85 * 3000 and off.max() < 1.15 * 3000  # 12000 draws per sample over 4 others


@pytest.mark.parametrize("negatives", ["other_classes", "uniform"])
def test_draws_are_deterministic_and_their_state_travels_in_the_state_dict(negatives):
    labels = torch.arange(50) % 3
    torch.manual_seed(7)
    a = small(n=50, nce_k=32, labels=labels, negatives=negatives)
    torch.manual_seed(7)
    b = small(n=50, nce_k=32, labels=labels, negatives=negatives)
    index = torch.tensor([4, 8, 15])
    assert torch.equal(a.draw_negatives(index), b.draw_negatives(index))
    first = a.draw_negatives(index)
    assert not torch.equal(first, a.draw_negatives(index))  # a new draw each step
    saved = {k: v.clone() for k, v in a.state_dict().items()}
    expected = [a.draw_negatives(index) for _ in range(3)]
    torch.manual_seed(99)  # another global seed: only the saved state may decide what comes next
    c = small(n=50, nce_k=32, labels=labels, negatives=negatives)
    c.load_state_dict(saved)
    assert all(torch.equal(e, c.draw_negatives(index)) for e in expected)


def _batched(monkeypatch) -> None:
    """Draw the other classes' subsets as on a GPU (random keys and topk) here on the CPU."""
    plain = crd_module.sample_positions
    monkeypatch.setattr(crd_module, "sample_positions", lambda *a, **kw: plain(*a, **{**kw, "batched": True}))


def _check_other_classes(neg: torch.Tensor, index: torch.Tensor, labels: torch.Tensor, k: int) -> None:
    assert neg.shape == (len(index), k) and neg.dtype == torch.long
    assert ((neg >= 0) & (neg < len(labels))).all()
    assert not (neg == index.unsqueeze(1)).any()
    assert not (labels[neg] == labels[index].unsqueeze(1)).any()  # never an image of the sample's own class


@pytest.mark.parametrize("batched", [False, True], ids=["cpu-randperm", "topk"])
def test_other_classes_are_drawn_without_replacement_when_there_are_enough(batched, monkeypatch):
    if batched:
        _batched(monkeypatch)
    torch.manual_seed(0)
    labels = torch.arange(30) % 3  # 3 classes of 10: 20 candidates per sample, 15 of them drawn
    m = small(n=30, nce_k=15, labels=labels)
    index = torch.arange(30)
    counts = torch.zeros(30, 30)
    for _ in range(400):
        neg = m.draw_negatives(index)
        _check_other_classes(neg, index, labels, 15)
        assert all(len(set(row)) == 15 for row in neg.tolist())  # no duplicates in a row
        counts += torch.nn.functional.one_hot(neg, 30).sum(1)
    other = labels.unsqueeze(1) != labels.unsqueeze(0)
    assert (counts[~other] == 0).all()
    # each candidate is drawn with probability 15/20 per draw: 300 of 400 draws (sd 8.7)
    assert counts[other].min() > 0.85 * 300 and counts[other].max() < 1.15 * 300


@pytest.mark.parametrize("batched", [False, True], ids=["cpu-randperm", "topk"])
def test_other_classes_are_drawn_with_replacement_when_too_few(batched, monkeypatch):
    if batched:
        _batched(monkeypatch)
    torch.manual_seed(0)
    labels = torch.arange(30) % 3  # 20 candidates per sample, 40 negatives wanted
    m = small(n=30, nce_k=40, labels=labels)
    index = torch.tensor([0, 4, 8, 29, 0])
    counts = torch.zeros(5, 30)
    for _ in range(400):
        neg = m.draw_negatives(index)
        _check_other_classes(neg, index, labels, 40)
        counts += torch.nn.functional.one_hot(neg, 30).sum(1)
    other = labels[index].unsqueeze(1) != labels.unsqueeze(0)
    assert (counts[~other] == 0).all()
    assert counts[other].min() > 0.85 * 800 and counts[other].max() < 1.15 * 800  # 16000 over 20 (sd 28)


@pytest.mark.parametrize("batched", [False, True], ids=["cpu-randperm", "topk"])
def test_unequal_classes_draw_with_and_without_replacement_in_one_batch(batched, monkeypatch):
    if batched:
        _batched(monkeypatch)
    labels = torch.tensor([0] * 2 + [1] * 8 + [2] * 20)[torch.randperm(30, generator=torch.Generator().manual_seed(0))]
    m = small(n=30, nce_k=15, labels=labels)  # candidates: 28, 22 (enough), 10 (too few)
    index = torch.arange(30)
    for _ in range(20):
        neg = m.draw_negatives(index)
        _check_other_classes(neg, index, labels, 15)
        for row, label in zip(neg.tolist(), labels.tolist()):
            if label != 2:
                assert len(set(row)) == 15
            else:
                assert set(row) <= set(torch.nonzero(labels != 2).flatten().tolist())


def test_sample_positions_covers_every_position_of_each_row():
    g = torch.Generator().manual_seed(0)
    m = torch.tensor([5, 9, 3, 12])
    for batched in (False, True):
        j = crd_module.sample_positions(m, 5, g, width=12, short=True, enough=True, batched=batched)
        assert j.shape == (4, 5) and ((j >= 0) & (j < m.unsqueeze(1))).all()
        assert sorted(j[0].tolist()) == [0, 1, 2, 3, 4]  # all 5 of 5
        assert len(set(j[1].tolist())) == len(set(j[3].tolist())) == 5
        # an exhaustive draw is a permutation
        full = crd_module.sample_positions(torch.tensor([7, 7]), 7, g, width=7, short=False, enough=True,
                                           batched=batched)
        assert all(sorted(row) == list(range(7)) for row in full.tolist())


def test_uniform_ignores_the_labels():
    labels = torch.arange(20) % 2
    torch.manual_seed(5)
    a = small(n=20, nce_k=30, labels=labels, negatives="uniform")
    torch.manual_seed(5)
    b = small(n=20, nce_k=30, negatives="uniform")
    index = torch.tensor([0, 3, 19])
    neg = a.draw_negatives(index)
    assert torch.equal(neg, b.draw_negatives(index))
    assert (labels[neg] == labels[index].unsqueeze(1)).any()  # its own class's images are negatives too


def test_without_labels_other_classes_falls_back_to_uniform_and_says_so_once(capsys):
    torch.manual_seed(5)
    a = small(n=20, nce_k=30)
    a.setup_data(train_size=20)  # again: no second warning
    warned = capsys.readouterr().err
    assert warned.count("kdbench: warning: crd: negatives='other_classes'") == 1 and "uniform" in warned
    assert a.negatives == "other_classes" and a.config()["negatives"] == "other_classes"
    torch.manual_seed(5)
    a = small(n=20, nce_k=30)  # a new instance: a new warning
    assert capsys.readouterr().err.count("warning") == 1
    torch.manual_seed(5)
    b = small(n=20, nce_k=30, negatives="uniform")
    index = torch.tensor([2, 7])
    assert torch.equal(a.draw_negatives(index), b.draw_negatives(index))
    assert capsys.readouterr().err == ""
    small(n=20, labels=torch.arange(20) % 2)  # with labels: nothing to say
    assert capsys.readouterr().err == ""


def test_bad_labels_are_clear_errors():
    with pytest.raises(KdbenchError, match="integer class labels"):
        small(n=20, labels=torch.arange(19) % 2)
    with pytest.raises(KdbenchError, match="integer class labels"):
        small(n=20, labels=(torch.arange(20) % 2).float())
    with pytest.raises(KdbenchError, match=r"same label.*crd\.negatives=uniform"):
        small(n=20, labels=torch.zeros(20, dtype=torch.long))
    small(n=20, labels=torch.zeros(20, dtype=torch.long), negatives="uniform")  # any other image will do


# -- gradients -----------------------------------------------------------------------------
def test_gradients_reach_the_student_and_both_embeddings_not_the_teacher():
    m = small(CRDKD)
    s, t, batch = batch_of([1, 5, 6], grad=True)
    s.logits.requires_grad_(True)
    t[0].logits.requires_grad_(True)  # as if the teacher's outputs were part of a graph
    sum(m(s, t, batch).values()).backward()
    assert s.pooled.grad is not None and torch.isfinite(s.pooled.grad).all() and s.pooled.grad.abs().sum() > 0
    assert s.logits.grad is not None and s.logits.grad.abs().sum() > 0  # through KD
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert t[0].pooled.grad is None and t[0].logits.grad is None
    assert all(b.grad is None for b in m.buffers())


def test_gradients_use_the_banks_as_they_were_before_the_update():
    """The positives' rows change in the forward; the backward must still see the rows the scores used."""
    torch.manual_seed(6)
    m = small()
    index = [2, 7, 3, 10]
    banks = (m.memory_s.double().clone(), m.memory_t.double().clone())
    s, t, batch = batch_of(index, seed=8, grad=True)
    neg = fixed_negatives(index, 9)
    inject(m, neg)
    m(s, t, batch)["crd"].backward()
    # float64 autograd through the written-out objective, on copies of the banks taken before the step
    x = s.pooled.detach().double().requires_grad_(True)
    e_s, e_t = embed(m.embed_s, x), embed(m.embed_t, t[0].pooled)
    rows = torch.cat([torch.tensor(index).unsqueeze(1), neg], 1)
    out_s = torch.exp(torch.einsum("bkd,bd->bk", banks[1][rows], e_s) / m.nce_t)
    out_t = torch.exp(torch.einsum("bkd,bd->bk", banks[0][rows], e_t) / m.nce_t)
    c = K / N

    def nce(out):
        p = out / (out.detach().mean() * N)  # the first batch's Z, a constant
        return -(torch.log(p[:, 0] / (p[:, 0] + c + EPS)).sum() + torch.log(c / (p[:, 1:] + c + EPS)).sum()) / len(p)

    (0.8 * (nce(out_s) + nce(out_t))).backward()
    assert torch.allclose(s.pooled.grad.double(), x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_forward_gives_the_eager_losses_gradients_and_banks():
    """torch.compile (inductor) once gave wrong gradients while the banks were written inside its graph."""
    import copy

    torch.manual_seed(0)
    eager = small(n=40, nce_k=16, feat_dim=8)
    plain = copy.deepcopy(eager)
    compiled = torch.compile(plain)
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(40, generator=g)
    for step in range(2):
        index = order[step * 8:(step + 1) * 8].tolist()
        s, t, batch = batch_of(index, seed=step, grad=True)
        got = []
        for m in (eager, compiled):
            x = s.pooled.detach().clone().requires_grad_(True)
            loss = m(Outputs(s.logits, pooled=x), t, batch)["crd"]
            loss.backward()
            got.append((loss.detach(), x.grad))
        assert torch.allclose(got[0][0], got[1][0], rtol=1e-5), step
        assert torch.allclose(got[0][1], got[1][1], rtol=1e-4, atol=1e-6), step
        assert torch.allclose(eager.memory_s, plain.memory_s, atol=1e-6)
        assert torch.allclose(eager.memory_t, plain.memory_t, atol=1e-6)
        assert eager.get_extra_state().tolist() == plain.get_extra_state().tolist()


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    {"crd_weight": -1.0}, {"kd_weight": float("nan")}, {"ce_weight": -0.5}, {"temperature": 0.0},
    {"feat_dim": 0}, {"nce_k": 0}, {"nce_k": 2.5}, {"nce_t": 0.0}, {"nce_t": float("nan")}, {"nce_m": 1.0},
    {"nce_m": -0.1}, {"negatives": "relax"}, {"negatives": "exact"},
])
@pytest.mark.parametrize("cls", [CRD, CRDKD])
def test_out_of_range_hyperparameters_are_refused(cls, overrides):
    (hp,) = overrides
    with pytest.raises(ValueError, match=hp):
        cls(**overrides)
    with pytest.raises(KdbenchError, match=rf"bad hyperparameter value for method '{cls.name}'.*{hp}"):
        build_method(cls, overrides)


def test_missing_index_or_banks_are_clear_errors():
    m = build_method(CRD, {"feat_dim": D, "nce_k": K})
    m.setup(Probe("s", 5, {}, (7,)), [Probe("t", 5, {}, (9,))])
    with pytest.raises(KdbenchError, match=r"setup_data\(train_size=...\)"):
        m(*batch_of([0, 1]))
    with pytest.raises(KdbenchError, match="at least 2 training images"):
        m.setup_data(train_size=1)
    m.setup_data(train_size=N)
    s, t, batch = batch_of([0, 1])
    batch.index = None
    with pytest.raises(KdbenchError, match=r"batch\.index"):
        m(s, t, batch)


# -- end to end ----------------------------------------------------------------------------
@pytest.mark.parametrize("negatives", ["other_classes", "uniform"])
def test_resume_is_bitwise_equal_on_cpu(tmp_path, monkeypatch, negatives):
    """Interrupted after its first epoch and resumed, a crd run ends with the uninterrupted run's weights,
    history, banks, Z and sampler state (test_resume's runs, 4 digits epochs)."""
    monkeypatch.setattr(test_resume, "load_methods",
                        lambda: {"crd": functools.partial(CRD, nce_k=64, negatives=negatives)})
    data = test_resume.load_dataset("digits", limit=160)
    ref_model, ref_method, ref = test_resume._train(data, "crd", None)
    state = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        test_resume._train(data, "crd", state, progress=test_resume.StopAfter(1))
    saved = torch.load(state, weights_only=False)
    assert saved["next_epoch"] == 1 and {"memory_s", "memory_t", "z", "_extra_state"} <= set(saved["method"])
    model, method, res = test_resume._train(data, "crd", state)
    assert res.resumed_from == 1
    assert (method._classes is not None) == (negatives == "other_classes")  # the engine gave it the labels
    assert [h.losses for h in res.history] == [h.losses for h in ref.history]
    assert all(math.isfinite(v) for h in res.history for v in h.losses.values())
    assert [h.top1 for h in res.history] == [h.top1 for h in ref.history]
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    ref_state, state_now = ref_method.state_dict(), method.state_dict()
    assert ref_state.keys() == state_now.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], state_now[k]), k
    assert torch.equal(ref.test_logits, res.test_logits)
    assert res.method_state_bytes == ref.method_state_bytes == 2 * 160 * 128 * 4 + 8


def _history(row: dict):
    h = row["history_loss"]
    return json.loads(h) if isinstance(h, str) else h


def _cli_rows(results, cache: str) -> dict[str, dict]:
    from kdbench.cli import main
    from kdbench.sweep.store import ResultsStore

    code = main(["run", "--methods", "crd,crd_kd", "--pairs", "cifar_resnet14:cifar_resnet8", "--seeds", "0",
                 "--limit", "48", "--epochs", "1", "--quiet", "--no-report", "--throughput-batch", "8",
                 "--set", "crd.nce_k=64", "--set", "crd_kd.nce_k=64", "--teacher-cache", cache,
                 "--results-dir", str(results)])
    assert code == 0
    return {r["method"]: r for r in ResultsStore(results).rows() if r["kind"] == "student"}


def test_cli_runs_crd_and_crd_kd_with_finite_losses_and_their_bank_size(tmp_path):
    on = _cli_rows(tmp_path / "on", "on")
    assert set(on) == {"crd", "crd_kd"}
    for method, row in on.items():
        assert row["teacher_cache"] is True, method  # pooled vectors only: the cache serves it
        losses = {k: row[k] for k in row if k.startswith("loss.")}
        assert "loss.crd" in losses and ("loss.kd" in losses) == (method == "crd_kd"), losses
        assert all(math.isfinite(v) for v in losses.values()), losses
        assert row["method_state_mb"] > 0
        history = _history(row)
        assert history and all(math.isfinite(v) for epoch in history for v in epoch.values())
    # The teachers' cached outputs are their exact pooled vectors: training from them changes nothing.
    off = _cli_rows(tmp_path / "off", "off")
    for method, row in off.items():
        assert not row["teacher_cache"] and _history(row) == _history(on[method]), method
