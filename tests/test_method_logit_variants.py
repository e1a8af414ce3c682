"""Logit-only variants: hard_kd, noisy_kd, logit_l2, and kd/dkd with logit standardisation, each against its
paper's formula written out independently in float64, plus one end-to-end CLI run of all of them on digits."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from test_resume import StopAfter  # the Ctrl-C stand-in the resume tests use

from kdbench.errors import KdbenchError
from kdbench.losses import kd_loss
from kdbench.method import Batch, Outputs
from kdbench.registry import build_method, load_methods
from kdbench.zoo import load_fitting


METHODS = load_methods()
HARD, NOISY, L2, KD, DKD = (METHODS[n] for n in ("hard_kd", "noisy_kd", "logit_l2", "kd", "dkd"))


def logits(n: int = 6, classes: int = 5, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, classes, generator=g) * 2, torch.randn(n, classes, generator=g) * 3


def outputs(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None, epoch: int = 0):
    n = len(s)
    labels = torch.zeros(n, dtype=torch.long) if labels is None else labels
    return Outputs(s), [Outputs(t)], Batch(torch.zeros(n, 1, 8, 8), labels, epoch, 240)


def rows(x: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in r] for r in x.double()]


def softmax(row: list[float], T: float = 1.0) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def squared_error(s: torch.Tensor, t: torch.Tensor) -> float:
    """Ba & Caruana's 1/(2N) Σ_i ‖s_i − t_i‖², written out."""
    a, b = rows(s), rows(t)
    return sum(sum((x - y) ** 2 for x, y in zip(u, v)) for u, v in zip(a, b)) / (2 * len(a))


def gradient_check(method, s: torch.Tensor, t: torch.Tensor, labels=None) -> None:
    s, t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    terms = method(*outputs(s, t, labels))
    sum(terms.values()).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None  # the teacher's outputs are data: nothing flows back into them


def refused(cls, overrides: dict, hp: str) -> None:
    with pytest.raises(KdbenchError, match=rf"bad hyperparameter value for method '{cls.name}'.*{hp}"):
        build_method(cls, overrides)
    with pytest.raises(ValueError, match=hp):
        cls(**overrides)


# -- hard_kd ----------------------------------------------------------------------------------------
def test_hard_kd_defaults_train_on_the_teachers_labels_alone():
    assert build_method(HARD).config() == {"ce_weight": 0.0, "hard_weight": 1.0}
    assert "Hinton" in HARD.paper and "2015" in HARD.paper


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_hard_kd_is_cross_entropy_against_the_teachers_argmax(weight):
    s, t = logits(8, 5)
    terms = build_method(HARD, {"hard_weight": weight})(*outputs(s, t))
    expected = 0.0
    for srow, trow in zip(rows(s), rows(t)):
        y = max(range(len(trow)), key=trow.__getitem__)
        expected -= math.log(softmax(srow)[y])
    assert set(terms) == {"hard_kd"}
    assert terms["hard_kd"].item() == pytest.approx(weight * expected / 8, rel=1e-5)


def test_hard_kd_needs_no_true_labels_and_ignores_them():
    s, t = logits()
    student, teachers, batch = outputs(s, t)
    with_labels = build_method(HARD)(student, teachers, batch)["hard_kd"]
    without = build_method(HARD)(student, teachers, Batch(batch.images, None, 0, 1))["hard_kd"]
    assert with_labels.item() == without.item()


def test_hard_kd_gradients_and_bad_values():
    gradient_check(build_method(HARD), *logits())
    refused(HARD, {"hard_weight": -1.0}, "hard_weight")
    refused(HARD, {"ce_weight": float("nan")}, "ce_weight")


# -- logit_l2 -----------------------------------------------------------------------------------------
def test_logit_l2_defaults_are_the_papers_logits_only_training():
    assert build_method(L2).config() == {"ce_weight": 0.0, "weight": 1.0}
    assert "Ba" in L2.paper and "Really Need to be Deep" in L2.paper


@pytest.mark.parametrize(("n", "classes", "weight"), [(6, 5, 1.0), (3, 10, 2.5)])
def test_logit_l2_is_half_the_squared_error_summed_over_classes_averaged_over_samples(n, classes, weight):
    s, t = logits(n, classes, seed=classes)
    terms = build_method(L2, {"weight": weight})(*outputs(s, t))
    assert set(terms) == {"logit_l2"}
    assert terms["logit_l2"].item() == pytest.approx(weight * squared_error(s, t), rel=1e-5)
    # not the mean over the classes too (that would be smaller by the class count)
    assert terms["logit_l2"].item() != pytest.approx(weight * squared_error(s, t) / classes, rel=1e-3)


def test_logit_l2_gradients_and_bad_values():
    s, _ = logits()
    assert build_method(L2)(*outputs(s, s.clone()))["logit_l2"].item() == 0.0
    gradient_check(build_method(L2), *logits())
    refused(L2, {"weight": -0.1}, "weight")


# -- noisy_kd -----------------------------------------------------------------------------------------
def expected_multipliers(seed: int, n: int, classes: int, sigma: float, alpha: float) -> torch.Tensor:
    """The documented stream: a uniform per sample (perturbed when < alpha), then a normal per logit."""
    g = torch.Generator().manual_seed(seed)
    chosen = [u < alpha for u in torch.rand(n, 1, generator=g).flatten().tolist()]
    xi = torch.randn(n, classes, generator=g).double()
    return torch.stack([1 + sigma * xi[i] if chosen[i] else torch.ones(classes, dtype=torch.double)
                        for i in range(n)])


def test_noisy_kd_defaults():
    m = build_method(NOISY)
    assert m.config() == {"ce_weight": 0.0, "weight": 1.0, "sigma": 0.1, "alpha": 0.5, "loss": "l2",
                          "temperature": 4.0, "noise_seed": -1}
    assert "Noisy Teachers" in NOISY.paper and "1610.09650" in NOISY.paper
    assert not list(m.parameters()) and m.state_bytes() == 0  # the generator's state is not a buffer


@pytest.mark.parametrize(("sigma", "alpha"), [(0.1, 0.5), (0.8, 1.0), (0.3, 0.25)])
def test_noisy_kd_regresses_onto_multiplicatively_perturbed_teacher_logits(sigma, alpha):
    s, t = logits(10, 5)
    terms = build_method(NOISY, {"sigma": sigma, "alpha": alpha, "noise_seed": 7})(*outputs(s, t))
    noisy = t.double() * expected_multipliers(7, 10, 5, sigma, alpha)
    assert set(terms) == {"noisy_kd"}
    assert terms["noisy_kd"].item() == pytest.approx(squared_error(s, noisy), rel=1e-5)


def test_noisy_kd_with_the_kl_loss_is_hintons_kd_on_the_noisy_logits():
    s, t = logits(10, 5)
    T = 3.0
    terms = build_method(NOISY, {"loss": "kl", "temperature": T, "weight": 0.9, "noise_seed": 2})(*outputs(s, t))
    noisy = rows(t.double() * expected_multipliers(2, 10, 5, 0.1, 0.5))
    expected = sum(kl(softmax(z, T), softmax(x, T)) for z, x in zip(noisy, rows(s))) / 10 * T * T
    assert terms["noisy_kd"].item() == pytest.approx(0.9 * expected, rel=1e-5)


def test_noisy_kd_without_noise_is_logit_l2():
    s, t = logits()
    clean = build_method(L2)(*outputs(s, t))["logit_l2"].item()
    for overrides in ({"sigma": 0.0}, {"alpha": 0.0}):
        assert build_method(NOISY, overrides)(*outputs(s, t))["noisy_kd"].item() == pytest.approx(clean, rel=1e-6)
    assert build_method(NOISY, {"alpha": 1.0})(*outputs(s, t))["noisy_kd"].item() != pytest.approx(clean, rel=1e-4)


def test_noisy_kd_perturbs_a_fraction_alpha_of_the_samples_by_sigma_relative_noise():
    m = build_method(NOISY, {"sigma": 0.2, "alpha": 0.3, "noise_seed": 0})
    mult = m.multipliers(4000, 10)
    perturbed = (mult != 1).any(dim=1)
    assert perturbed.float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert (mult[perturbed] - 1).std().item() == pytest.approx(0.2, rel=0.03)
    assert (mult[~perturbed] == 1).all()


def test_noisy_kd_same_seed_same_noise_and_the_run_seed_by_default():
    s, t = logits()

    def stream(m, steps=3):
        return [m(*outputs(s, t))["noisy_kd"].item() for _ in range(steps)]

    a, b = stream(build_method(NOISY, {"noise_seed": 3})), stream(build_method(NOISY, {"noise_seed": 3}))
    assert a == b and len(set(a)) == 3  # repeatable, and a fresh draw every step
    assert stream(build_method(NOISY, {"noise_seed": 4})) != a
    # noise_seed -1: the seed the runner sets (torch.manual_seed(run seed)) before building the method
    torch.manual_seed(11)
    first = stream(build_method(NOISY))
    torch.manual_seed(11)
    torch.rand(5)  # draws from the global RNG in between change nothing: the seed, not the state, is used
    assert stream(build_method(NOISY)) == first
    torch.manual_seed(12)
    assert stream(build_method(NOISY)) != first


def test_noisy_kd_state_dict_round_trip_continues_the_same_stream():
    s, t = logits()
    m = build_method(NOISY, {"noise_seed": 5})
    m(*outputs(s, t))
    saved = io.BytesIO()
    torch.save(m.state_dict(), saved)  # as the epoch checkpoint does (kdbench.train.checkpoint)
    rest = [m(*outputs(s, t))["noisy_kd"].item() for _ in range(3)]
    resumed = build_method(NOISY, {"noise_seed": 99})
    saved.seek(0)
    load_fitting(resumed, torch.load(saved, weights_only=False), "test checkpoint", "noisy_kd")  # the resume loader
    assert [resumed(*outputs(s, t))["noisy_kd"].item() for _ in range(3)] == rest
    with pytest.raises(ValueError, match="generator state"):
        resumed.set_extra_state({"not": "a state"})


def _train_noisy(data, state, progress=None):
    from kdbench import zoo
    from kdbench.recipe import get_recipe
    from kdbench.train import train

    info = data.info
    make = lambda name: zoo.create(name, num_classes=info.num_classes, in_chans=info.in_chans,  # noqa: E731
                                   img_size=info.img_size)
    torch.manual_seed(0)
    teacher = make("cifar_resnet8")
    torch.manual_seed(1)  # the run's seed, as the runner sets it: noise_seed -1 follows it
    student = make("hinton_mlp_30")
    method = build_method(NOISY, {"alpha": 1.0, "sigma": 0.5})
    return train(student, data, get_recipe("digits").with_epochs(4), seed=3, method=method, teachers=[teacher],
                 teacher_names=["cifar_resnet8"], model_name="hinton_mlp_30", progress=progress, state_path=state,
                 state_key="run-noisy")


def test_noisy_kd_resumed_run_repeats_the_uninterrupted_one_bit_for_bit(tmp_path, monkeypatch):
    from kdbench.data import load_dataset

    data = load_dataset("digits", limit=160)
    ref = _train_noisy(data, None)
    state = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        _train_noisy(data, state, progress=StopAfter(2))
    assert "_extra_state" in torch.load(state, weights_only=False)["method"]
    res = _train_noisy(data, state)
    assert res.resumed_from == 2
    assert [h.losses for h in res.history] == [h.losses for h in ref.history]
    assert torch.equal(ref.test_logits, res.test_logits)
    # Without the saved stream the resumed epochs would draw the first epochs' noise again.
    monkeypatch.setattr(NOISY, "set_extra_state", lambda self, state: None)
    with pytest.raises(KeyboardInterrupt):
        _train_noisy(data, tmp_path / "other.pt", progress=StopAfter(2))
    replayed = _train_noisy(data, tmp_path / "other.pt")
    assert [h.losses for h in replayed.history] != [h.losses for h in ref.history]


def test_noisy_kd_gradients_and_bad_values():
    gradient_check(build_method(NOISY, {"alpha": 1.0}), *logits())
    gradient_check(build_method(NOISY, {"loss": "kl"}), *logits())
    for overrides, hp in [({"sigma": -0.1}, "sigma"), ({"sigma": float("nan")}, "sigma"), ({"alpha": 1.5}, "alpha"),
                          ({"alpha": -0.1}, "alpha"), ({"loss": "mse"}, "loss"), ({"temperature": 0.0}, "temperature"),
                          ({"noise_seed": -2}, "noise_seed"), ({"weight": -1.0}, "weight")]:
        refused(NOISY, overrides, hp)


# -- kd and dkd with logit standardisation (Sun et al., CVPR 2024) ------------------------------------
def zscored(row: list[float]) -> list[float]:
    """The official ``normalize``: (z - mean) / (unbiased std + 1e-7)."""
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (std + 1e-7) for v in row]


def affine(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Each sample's logits scaled by its own positive factor and shifted by its own offset."""
    g = torch.Generator().manual_seed(seed)
    return x * (0.25 + 3 * torch.rand(len(x), 1, generator=g)) + 10 * torch.randn(len(x), 1, generator=g)


def test_standardize_is_off_by_default_and_then_changes_nothing():
    assert KD.hyperparameters()["standardize"] is False and DKD.hyperparameters()["standardize"] is False
    s, t = logits()
    got = build_method(KD)(*outputs(s, t))["kd"]
    assert torch.equal(got, 0.9 * kd_loss(s, t, 4.0))  # bit for bit the old computation
    assert got.item() != pytest.approx(build_method(KD, {"standardize": True})(*outputs(s, t))["kd"].item(), rel=1e-3)
    refused(KD, {"standardize": "yes"}, "standardize")
    refused(DKD, {"standardize": 1}, "standardize")


@pytest.mark.parametrize(("T", "weight"), [(4.0, 0.9), (2.0, 9.0)])  # the default, and the paper's base T and weight
def test_standardized_kd_matches_the_formula(T, weight):
    s, t = logits(7, 6)
    terms = build_method(KD, {"standardize": True, "temperature": T, "kd_weight": weight})(*outputs(s, t))
    expected = sum(kl(softmax(zscored(b), T), softmax(zscored(a), T)) for a, b in zip(rows(s), rows(t))) / 7 * T * T
    assert terms["kd"].item() == pytest.approx(weight * expected, rel=1e-5)


def dkd_reference(s: torch.Tensor, t: torch.Tensor, labels: list[int], T: float) -> tuple[float, float]:
    """TCKD and NCKD per sample (Zhao et al. 2022) on z-scored logits, batch means times T²."""
    tckd = nckd = 0.0
    for a, b, y in zip(rows(s), rows(t), labels):
        ps, pt = softmax(zscored(a), T), softmax(zscored(b), T)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        keep = [j for j in range(len(a)) if j != y]
        nckd += kl(softmax([zscored(b)[j] for j in keep], T), softmax([zscored(a)[j] for j in keep], T))
    return tckd / len(labels) * T * T, nckd / len(labels) * T * T


def test_standardized_dkd_matches_the_formula():
    s, t = logits(6, 5)
    labels = [0, 1, 2, 3, 4, 1]
    m = build_method(DKD, {"standardize": True, "temperature": 2.0, "alpha": 9.0, "beta": 72.0, "warmup": 0})
    terms = m(*outputs(s, t, torch.tensor(labels)))
    tckd, nckd = dkd_reference(s, t, labels, 2.0)
    assert terms["tckd"].item() == pytest.approx(9.0 * tckd, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(72.0 * nckd, rel=1e-5)


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_standardized_loss_ignores_a_per_sample_shift_and_scale_of_either_models_logits(name):
    s, t = logits(8, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    m = build_method(METHODS[name], {"standardize": True})
    before = m(*outputs(s, t, labels, epoch=30))
    after = m(*outputs(affine(s, 1), affine(t, 2), labels, epoch=30))
    for k in before:
        assert after[k].item() == pytest.approx(before[k].item(), rel=1e-5), k
    plain = build_method(METHODS[name])  # without it, the shift cancels in the softmax but the scale does not
    moved, still = plain(*outputs(affine(s, 1), t, labels, 30)), plain(*outputs(s, t, labels, 30))
    assert sum(moved.values()).item() != pytest.approx(sum(still.values()).item(), rel=1e-3)


def test_standardized_gradients_reach_the_student():
    s, t = logits()
    for name in ("kd", "dkd"):
        s_ = s.clone().requires_grad_(True)
        terms = build_method(METHODS[name], {"standardize": True})(*outputs(s_, t, epoch=30))
        sum(terms.values()).backward()
        assert torch.isfinite(s_.grad).all() and s_.grad.abs().sum() > 0


# -- end to end: the new methods through the CLI on the embedded digits data ---------------------------
def _run(results, *extra: str) -> int:
    from kdbench.cli import main

    return main(["run", "--pairs", "cifar_resnet8:hinton_mlp_30", "--seeds", "0", "--limit", "128", "--epochs", "2",
                 "--quiet", "--throughput-batch", "8", "--results-dir", str(results), *extra])


def test_cli_runs_the_logit_variants_on_digits_and_tells_standardized_kd_apart(tmp_path):
    from kdbench.sweep.store import ResultsStore

    assert _run(tmp_path, "--methods", "dist,hard_kd,noisy_kd,logit_l2,kd", "--no-report") == 0
    students = {r["method"]: r for r in ResultsStore(tmp_path).rows() if r["kind"] == "student"}
    assert set(students) == {"dist", "hard_kd", "noisy_kd", "logit_l2", "kd"}
    terms = {"dist": {"dist_inter", "dist_intra", "ce"}, "hard_kd": {"hard_kd"}, "noisy_kd": {"noisy_kd"},
             "logit_l2": {"logit_l2"}, "kd": {"kd", "ce"}}  # CE weight 0 (the papers'): no ce term at all
    for method, row in students.items():
        losses = {k[5:] for k in row if k.startswith("loss.")}
        assert losses == terms[method], (method, losses)
        assert all(math.isfinite(row[f"loss.{k}"]) for k in losses), row
        assert math.isfinite(row["top1_last"]) and 0 <= row["top1_last"] <= 100
        history = row["history_loss"]
        assert len(json.loads(history) if isinstance(history, str) else history) == 2
    # --set kd.standardize=true is another run (its hyperparameters are in the id) ...
    assert _run(tmp_path, "--methods", "kd", "--set", "kd.standardize=true") == 0
    kd = [r for r in ResultsStore(tmp_path).rows() if r["kind"] == "student" and r["method"] == "kd"]
    assert len(kd) == 2 and len({r["run_id"] for r in kd}) == 2
    assert sorted(json.loads(r["hparams"])["standardize"] for r in kd) == [False, True]
    # ... and the table names it as a method of its own (Method.variant), beside plain kd
    assert sorted(r["method_variant"] for r in kd) == ["", "ls"]
    table = "\n".join(p.read_text() for p in (tmp_path / "report").glob("table_*.md"))
    assert "| kd+ls |" in table and "| kd |" in table and "standardize=" not in table
