"""Contract tests generated from the method registry, plus golden and reference loss values.

Every method found through the entry points is tested here without being named, so a new
built-in method is covered the moment it is registered.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY, TINY_SHAPE, TINY_STUDENT, TINY_TEACHERS

from kdbench import zoo
from kdbench.errors import KdbenchError
from kdbench.features import FeatureCapture, probe
from kdbench.method import Batch, Outputs, Probe
from kdbench.registry import build_method, load_methods
from kdbench.sweep.hparams import parse_cli
from kdbench.train import freeze

METHODS = load_methods()
GOLDEN = Path(__file__).parent / "golden" / "method_losses.json"


def teachers_for(cls) -> tuple[str, ...]:
    """The most teachers a test gives a method: up to two (ensembles get two)."""
    return TINY_TEACHERS[: min(cls.max_teachers, 2)]


def setup_run(name: str, **overrides):
    cls = METHODS[name]
    method = build_method(cls, overrides)
    student = zoo.create(TINY_STUDENT, **TINY)
    teachers = [freeze(zoo.create(t, **TINY)) for t in teachers_for(cls)]
    taps = method.taps()
    method.setup(probe(student, taps, TINY_SHAPE, TINY_STUDENT),
                 [probe(t, taps, TINY_SHAPE) for t in teachers])
    method.setup_data(train_size=TRAIN_SIZE)
    return method, student, teachers


#: The training-set size the contract tests tell a method (setup_data); batches are its first images.
TRAIN_SIZE = 64


def one_step(method, student, teachers, epoch: int = 0, epochs: int = 10, stage: str = "train"):
    """One batch's terms and total loss, as the engine computes them (no cross-entropy in an init stage)."""
    x = torch.randn(16, *TINY_SHAPE)
    y = torch.randint(0, 10, (16,))
    taps = method.taps()
    out = FeatureCapture(student, taps)(x)
    with torch.no_grad():
        t_out = [FeatureCapture(t, taps)(x) for t in teachers]
    if stage == "train":  # the engine's per-epoch decisions, made outside the compiled step
        stage = method.stage_at(epoch, epochs)
    terms = method(out, t_out, Batch(x, y, epoch, epochs, torch.arange(16), stage))
    terms = method.weigh(terms, epoch, epochs) if stage != "init" else terms
    ce_w = method.ce_weight_at(epoch, epochs) if stage != "init" else 0.0
    total = sum(terms.values()) + (ce_w * F.cross_entropy(out.logits, y) if ce_w else 0)
    return terms, total


@pytest.mark.parametrize("name", sorted(METHODS))
def test_terms_are_finite_scalars(name):
    method, student, teachers = setup_run(name)
    terms, total = one_step(method, student, teachers)
    for key, value in terms.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, f"{name}.{key} is not a scalar"
        assert math.isfinite(value.item()), f"{name}.{key} = {value.item()}"
    assert torch.isfinite(total)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_gradients_reach_student_and_adapters_not_teachers(name):
    """Over the stages a method trains (its init stage, if it has one, then the schedule), every student and
    adapter parameter gets a finite gradient in some stage, and no teacher parameter ever does. (FT's paraphraser
    trains only in its init stage; its translator only after it.)"""
    method, student, teachers = setup_run(name)
    student.train()
    reached: set[str] = set()
    adapters: set[str] = set()
    for stage in (("init", "train") if method.init_epochs else ("train",)):
        student.zero_grad(set_to_none=True)
        method.zero_grad(set_to_none=True)
        _, total = one_step(method, student, teachers, stage=stage)
        if not isinstance(total, torch.Tensor) or not total.requires_grad:
            continue  # a stage with no terms (and no cross-entropy) trains nothing
        total.backward()
        reached |= {n for n, p in student.named_parameters() if p.grad is not None and torch.isfinite(p.grad).all()}
        adapters |= {n for n, p in method.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    no_grad = [n for n, _ in student.named_parameters() if n not in reached]
    assert not no_grad, f"{name}: student parameters without gradient: {no_grad[:5]}"
    for n, _ in method.named_parameters():
        assert n in adapters, f"{name}: adapter {n} gets no gradient"
    for t in teachers:
        assert not t.training
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_contract_metadata(name):
    cls = METHODS[name]
    assert cls.name == name and cls.paper.strip()
    hps = cls.hyperparameters()
    assert "ce_weight" in hps
    assert cls().config() == hps  # every hyperparameter is kept under its own name


def _other_value(default):
    if isinstance(default, bool):
        return not default, str(not default).lower()
    if isinstance(default, int):
        return default + 1, str(default + 1)
    if isinstance(default, float):
        v = default / 2 if default else 0.5  # stays inside any [0, x] or (0, x] range
        return v, repr(v)
    if isinstance(default, tuple):
        return (1.0, 2.0), "1,2"
    return default, str(default)


@pytest.mark.parametrize("name,hp", [(n, h) for n in sorted(METHODS) for h in METHODS[n].hyperparameters()])
def test_hyperparameter_override_round_trips(name, hp):
    default = METHODS[name].hyperparameters()[hp]
    value, text = _other_value(default)
    overrides = parse_cli([f"{name}.{hp}={text}"], METHODS)
    assert overrides == {name: {hp: value}}
    assert build_method(METHODS[name], overrides[name]).config()[hp] == value


@pytest.mark.parametrize("name", sorted(n for n in METHODS if METHODS[n].max_teachers >= 1))
def test_more_teachers_than_taken_is_refused_before_training(name, tmp_path):
    """Named, a method that can take none of the pairs is an error; beside a pair it can take, a note."""
    from kdbench.recipe import get_recipe
    from kdbench.suites import Pair
    from kdbench.sweep import Request, Sweep

    cls = METHODS[name]
    teachers = (TINY_TEACHERS[0],) * (cls.max_teachers + 1)
    req = Request(methods=(name,), named=True, pairs=(Pair(teachers, TINY_STUDENT),), dataset="digits",
                  recipe=get_recipe("digits").with_epochs(1), results_dir=tmp_path, limit=32)
    with pytest.raises(KdbenchError, match=f"method '{name}' takes {cls.teachers_taken()}, and no pair"):
        Sweep.prepare(req)
    fits = Pair(TINY_TEACHERS[:max(cls.min_teachers, 1)], TINY_STUDENT)
    sweep = Sweep.prepare(replace(req, pairs=(fits, *req.pairs)))
    assert [s.pair for s in sweep.plan.specs] == [fits.label]
    assert sweep.plan.skipped == [f"method '{name}' takes {cls.teachers_taken()}; pair {req.pairs[0].label} has "
                                  f"{len(teachers)}"]
    assert not (tmp_path / "runs").exists()


def test_bad_overrides_are_clear():
    with pytest.raises(KdbenchError, match="unknown hyperparameter 'temprature'.*did you mean 'temperature'"):
        parse_cli(["kd.temprature=8"], METHODS)
    with pytest.raises(KdbenchError, match="bad value for kd.temperature: 'hot' is not a number"):
        parse_cli(["kd.temperature=hot"], METHODS)
    with pytest.raises(KdbenchError, match="unknown method 'kdd'.*did you mean 'kd'"):
        parse_cli(["kdd.temperature=8"], METHODS)
    with pytest.raises(KdbenchError, match="METHOD.HYPERPARAMETER=VALUE"):
        parse_cli(["temperature=8"], METHODS)
    with pytest.raises(KdbenchError, match="temperature must be > 0"):
        build_method(METHODS["kd"], {"temperature": -1.0})


# -- reference values: independent formulas on small fixed tensors -----------------------
def fixed_outputs(n: int = 6, classes: int = 5, teachers: int = 2):
    g = torch.Generator().manual_seed(1234)
    s = Outputs(torch.randn(n, classes, generator=g) * 2,
                stages={2: torch.randn(n, 4, 4, 4, generator=g)}, pooled=torch.randn(n, 7, generator=g))
    ts = [Outputs(torch.randn(n, classes, generator=g) * 3, stages={2: torch.randn(n, 6, 2, 2, generator=g)},
                  pooled=torch.randn(n, 9, generator=g)) for _ in range(teachers)]
    return s, ts, Batch(torch.zeros(n, 1, 8, 8), torch.zeros(n, dtype=torch.long), 0, 10)


def test_kd_matches_the_formula():
    s, ts, batch = fixed_outputs()
    T = 4.0
    terms = build_method(METHODS["kd"])(s, ts[:1], batch)
    p = torch.softmax(ts[0].logits.double() / T, 1)
    q = torch.softmax(s.logits.double() / T, 1)
    expected = 0.9 * (p * (p.log() - q.log())).sum(1).mean() * T * T
    assert terms["kd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_fitnets_matches_the_formula():
    """CRD's FitNet term: 100 · mean squared error between ConvReg(student stage 2) and the teacher's."""
    s, ts, batch = fixed_outputs()
    method = build_method(METHODS["fitnets"])

    def probe_of(o):
        return Probe(model="m", num_classes=o.logits.shape[1], stages={2: tuple(o.stages[2].shape[1:])},
                     pooled=None)

    method.setup(probe_of(s), [probe_of(ts[0])])
    method.eval()  # BatchNorm with its initial running statistics: an affine map we can write out
    terms = method(s, ts[:1], batch)
    conv, bn = method.regressor[0], method.regressor[1]
    # student 4x4 -> teacher 2x2: ConvReg's 3x3 stride-2 conv, then BN (eval) and ReLU, written out
    x = s.stages[2].double()
    w, b = conv.weight.double(), conv.bias.double()
    y = torch.zeros(x.shape[0], w.shape[0], 2, 2, dtype=torch.double)
    xp = F.pad(x, (1, 1, 1, 1))
    for i in range(2):
        for j in range(2):
            patch = xp[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            y[:, :, i, j] = torch.einsum("nchw,ochw->no", patch, w) + b
    y = (y - bn.running_mean.double().view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.double().view(1, -1, 1, 1) + bn.eps)
    y = torch.relu(y * bn.weight.double().view(1, -1, 1, 1) + bn.bias.double().view(1, -1, 1, 1))
    expected = 100 * ((y - ts[0].stages[2].double()) ** 2).mean()
    assert isinstance(conv, torch.nn.Conv2d) and conv.stride == (2, 2) and conv.kernel_size == (3, 3)
    assert terms["hint"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_dkd_matches_the_papers_definition():
    """TCKD and NCKD written out per sample (Zhao et al. 2022, eq. 1-7), ramped in over the warm-up."""
    s, ts, _ = fixed_outputs(n=6, classes=5)
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    method = build_method(METHODS["dkd"], {"beta": 6.0})
    T = 4.0
    tckd, nckd = 0.0, 0.0
    for i, y in enumerate(labels.tolist()):
        p_s = torch.softmax(s.logits[i].double() / T, 0)
        p_t = torch.softmax(ts[0].logits[i].double() / T, 0)
        b_s = torch.stack([p_s[y], 1 - p_s[y]])
        b_t = torch.stack([p_t[y], 1 - p_t[y]])
        tckd += float((b_t * (b_t / b_s).log()).sum())
        keep = [j for j in range(5) if j != y]
        q_s = torch.softmax(s.logits[i, keep].double() / T, 0)
        q_t = torch.softmax(ts[0].logits[i, keep].double() / T, 0)
        nckd += float((q_t * (q_t / q_s).log()).sum())
    tckd, nckd = tckd / 6 * T * T, nckd / 6 * T * T
    for epoch, ramp in [(4, 0.25), (19, 1.0), (100, 1.0)]:
        terms = method.weigh(method(s, ts[:1], Batch(torch.zeros(6, 1, 8, 8), labels, epoch, 240)), epoch, 240)
        assert method.term_weights_at(epoch, 240) == ({} if ramp == 1.0 else {"tckd": ramp, "nckd": ramp})
        assert terms["tckd"].item() == pytest.approx(ramp * 1.0 * tckd, rel=1e-5)
        assert terms["nckd"].item() == pytest.approx(ramp * 6.0 * nckd, rel=1e-5)
    # DKD with alpha = beta = 1 and no ramp is not KD: KD couples the two terms by p_target
    plain = build_method(METHODS["dkd"], {"beta": 1.0, "warmup": 0})(s, ts[:1], Batch(torch.zeros(6, 1, 8, 8), labels, 0, 1))
    kd = build_method(METHODS["kd"], {"kd_weight": 1.0})(s, ts[:1], Batch(torch.zeros(6, 1, 8, 8), labels, 0, 1))
    assert sum(plain.values()).item() != pytest.approx(kd["kd"].item(), rel=1e-3)


def test_rkd_matches_explicit_loops():
    s, ts, batch = fixed_outputs(n=5)
    terms = build_method(METHODS["rkd"])(s, ts[:1], batch)
    a, b = s.pooled.double(), ts[0].pooled.double()
    n = len(a)

    def dist(x):
        d = torch.tensor([[float((x[i] - x[j]).norm()) for j in range(n)] for i in range(n)], dtype=torch.double)
        return d / d[~torch.eye(n, dtype=torch.bool)].mean()

    def ang(x):
        out = []
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u, v = x[i] - x[j], x[k] - x[j]
                    nu, nv = u.norm(), v.norm()
                    out.append(0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv)))
        return torch.tensor(out, dtype=torch.double)

    # The angle at j uses (x_i - x_j) and (x_k - x_j); our tensor form uses e_ji·e_jk, identical.
    assert terms["rkd_distance"].item() == pytest.approx(25 * F.smooth_l1_loss(dist(a), dist(b)).item(), rel=1e-4)
    assert terms["rkd_angle"].item() == pytest.approx(50 * F.smooth_l1_loss(ang(a), ang(b)).item(), rel=1e-4)


@pytest.mark.parametrize("combine", ["mean_probs", "mean_kl", "mean_logits"])
def test_ensemble_with_one_teacher_is_kd(combine):
    s, ts, batch = fixed_outputs()
    kd = build_method(METHODS["kd"])(s, ts[:1], batch)["kd"]
    ens = build_method(METHODS["ensemble_kd"], {"combine": combine})(s, ts[:1], batch)["kd"]
    assert ens.item() == pytest.approx(kd.item(), rel=1e-6)


def test_ensemble_combinations_differ_and_follow_their_definitions():
    s, ts, batch = fixed_outputs()
    T = 4.0
    p = [torch.softmax(t.logits.double() / T, 1) for t in ts]
    logq = torch.log_softmax(s.logits.double() / T, 1)

    def kl(target):
        return (target * (target.log() - logq)).sum(1).mean() * T * T

    w = (0.25, 0.75)
    expected = {
        "mean_probs": kl(w[0] * p[0] + w[1] * p[1]),
        "mean_kl": w[0] * kl(p[0]) + w[1] * kl(p[1]),
        "mean_logits": kl(torch.softmax((w[0] * ts[0].logits.double() + w[1] * ts[1].logits.double()) / T, 1)),
    }
    got = {c: build_method(METHODS["ensemble_kd"], {"combine": c, "teacher_weights": (1.0, 3.0)})(s, ts, batch)["kd"]
           for c in expected}
    for c in expected:
        assert got[c].item() == pytest.approx(0.9 * expected[c].item(), rel=1e-5), c
    assert len({round(v.item(), 6) for v in got.values()}) == 3


def test_ensemble_weights_must_match_teacher_count():
    m = build_method(METHODS["ensemble_kd"], {"teacher_weights": (1.0, 2.0, 3.0)})
    with pytest.raises(ValueError, match="3 entries for 2 teachers"):
        m.setup(None, [None, None])


def test_fitnets_two_stage_schedule():
    m = build_method(METHODS["fitnets"], {"schedule": "two_stage", "hint_fraction": 0.5})
    s, ts, _ = fixed_outputs()
    from kdbench.method import Probe
    m.setup(Probe("s", 5, {2: (4, 4, 4)}, None), [Probe("t", 5, {2: (6, 2, 2)}, None)])
    # The phase reaches forward as batch.stage, decided outside the compiled step (never from batch.epoch).
    assert [m.stage_at(e, 10) for e in (0, 4, 5, 9)] == ["hint", "hint", "train", "train"]
    early = m(s, ts[:1], Batch(None, None, 4, 10, stage=m.stage_at(4, 10)))
    late = m(s, ts[:1], Batch(None, None, 5, 10, stage=m.stage_at(5, 10)))
    assert set(early) == {"hint"} and m.ce_weight_at(4, 10) == 0.0
    assert set(late) == {"kd"} and m.ce_weight_at(5, 10) == 1.0
    assert build_method(METHODS["fitnets"]).stage_at(0, 10) == "train"  # the default one-stage schedule


def test_fitnets_regressor_is_built_from_probed_shapes():
    from kdbench.method import Probe
    m = build_method(METHODS["fitnets"])
    m.setup(Probe("s", 5, {2: (4, 4, 4)}, None), [Probe("t", 5, {2: (6, 2, 2)}, None)])
    out = m.regressor(torch.randn(3, 4, 4, 4))
    assert out.shape == (3, 6, 2, 2)  # student map twice the teacher's: a stride-2 conv


# -- golden values: protect every method's loss from silent change in a refactor ----------
#: Stage shapes (C, H, W) the golden values use for methods that tap stages other than FitNets' stage 2:
#: a 4-stage model as kdbench's CRD zoo has (stem, then three stages), student and teacher maps of
#: the same spatial size and different channel counts. Negative indices count from the end.
GOLDEN_STAGES = {"student": {0: (4, 8, 8), 1: (4, 8, 8), 2: (4, 4, 4), 3: (4, 2, 2)},
                 "teacher": {0: (6, 8, 8), 1: (6, 8, 8), 2: (6, 4, 4), 3: (6, 2, 2)}}


def golden_inputs(cls, taps):
    """The fixed outputs and probes a method's golden value is computed on.

    Methods that tap only stage 2 (FitNets) keep the shapes the golden file was first written with;
    others get maps for exactly the stages they tap, drawn from a generator of their own.
    """
    s, ts, batch = fixed_outputs()
    ts = ts[: min(cls.max_teachers, 2)]
    if set(taps.stages) <= {2}:
        return s, ts, batch, Probe("s", 5, {2: (4, 4, 4)}, (7,)), [Probe("t", 5, {2: (6, 2, 2)}, (9,)) for _ in ts]
    g = torch.Generator().manual_seed(4321)
    idx = {i: i % 4 for i in taps.stages}

    def maps(role):
        return {i: torch.randn(s.logits.shape[0], *GOLDEN_STAGES[role][j], generator=g) for i, j in idx.items()}

    s = Outputs(s.logits, maps("student"), s.pooled)
    ts = [Outputs(t.logits, maps("teacher"), t.pooled) for t in ts]
    shapes = {role: {i: GOLDEN_STAGES[role][j] for i, j in idx.items()} for role in GOLDEN_STAGES}
    return s, ts, batch, Probe("s", 5, shapes["student"], (7,)), [Probe("t", 5, shapes["teacher"], (9,)) for _ in ts]


def golden_values() -> dict[str, dict[str, float]]:
    """Each method's terms on fixed outputs; a method with an init stage also its init terms ('init.<term>').

    A method that needs the teacher's channel counts equal to the student's at every stage (FSP's matrices) gets
    teacher maps with the student's channels; a method with per-image state is told the batch is a training set
    of 6 images in 3 classes (``batch.index``; CRD draws its negatives from the other classes)."""
    values = {}
    for name in sorted(METHODS):
        cls = METHODS[name]
        torch.manual_seed(0)  # adapters are initialised from the global RNG
        m = build_method(cls)
        s, ts, batch, s_probe, t_probes = golden_inputs(cls, m.taps())
        try:
            m.setup(s_probe, t_probes)
        except ValueError:
            ts = [Outputs(t.logits, {i: x[:, : s.stages[i].shape[1]] for i, x in t.stages.items()}, t.pooled)
                  for t in ts]
            t_probes = [replace(p, stages={i: (s_probe.stages[i][0], *shape[1:]) for i, shape in p.stages.items()})
                        for p in t_probes]
            torch.manual_seed(0)
            m = build_method(cls)
            m.setup(s_probe, t_probes)
        m.setup_data(train_size=len(batch.images), labels=torch.arange(len(batch.images)) % 3)
        batch = replace(batch, index=torch.arange(len(batch.images)))
        batch = replace(batch, stage=m.stage_at(batch.epoch, batch.epochs))
        values[name] = {k: round(v.item(), 6) for k, v in m.weigh(m(s, ts, batch), batch.epoch, batch.epochs).items()}
        if m.init_epochs:
            init = replace(batch, stage="init", epochs=m.init_epochs)
            values[name].update({f"init.{k}": round(v.item(), 6) for k, v in m(s, ts, init).items()})
    return values


def test_golden_loss_values():
    got = golden_values()
    if os.environ.get("KDBENCH_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    for name in expected:
        assert name in got, f"golden values list method '{name}', which is no longer registered"
        assert got[name].keys() == expected[name].keys(), name
        for term, value in expected[name].items():
            assert got[name][term] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{name}.{term}"
    new = set(got) - set(expected)
    assert not new, f"methods without golden values: {new}; run with KDBENCH_REGEN_GOLDEN=1 once"
