"""AB (Heo et al. 2019), as the CRD benchmark runs it: RepDistiller's ``ABLoss`` and ``Connector`` in a
30-epoch init stage (``helper/pretrain.py``), then cross-entropy alone (``train_student.py``: ``loss_kd = 0``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import TINY, TINY_SHAPE, TINY_STUDENT

from kdbench import zoo
from kdbench.cli import main
from kdbench.errors import KdbenchError
from kdbench.features import FeatureCapture, probe
from kdbench.method import Batch, Outputs, Probe, Taps, init_epochs_for
from kdbench.registry import build_method, load_methods
from kdbench.train import freeze

AB = load_methods()["ab"]

WIDE_TEACHER = "cifar_resnet8x4"  # 32/64/128/256 channels against the student's 16/16/32/64


def init_batch(n: int) -> Batch:
    return Batch(torch.zeros(n, 1, 8, 8), torch.zeros(n, dtype=torch.long), 0, 30, stage="init")


def shapes(o: Outputs) -> dict[int, tuple[int, ...]]:
    return {i: tuple(t.shape[1:]) for i, t in o.stages.items()}


def fixed(n: int = 4):
    """Stage -3: equal shapes (an identity connector). Stage -2: student 3 channels 4x4, teacher 5
    channels 4x4 (1x1 conv). Stage -1: student 2 channels 4x4, teacher 3 channels 2x2 (stride-2 conv).
    Values straddle the margin, both signs."""
    g = torch.Generator().manual_seed(5)
    s = Outputs(torch.randn(n, 5, generator=g), stages={-3: 2 * torch.randn(n, 2, 4, 4, generator=g),
                                                         -2: 2 * torch.randn(n, 3, 4, 4, generator=g),
                                                         -1: 2 * torch.randn(n, 2, 4, 4, generator=g)})
    t = Outputs(torch.randn(n, 5, generator=g), stages={-3: torch.randn(n, 2, 4, 4, generator=g),
                                                         -2: torch.randn(n, 5, 4, 4, generator=g),
                                                         -1: torch.randn(n, 3, 2, 2, generator=g)})
    return s, t


def built(s: Outputs, t: Outputs, **overrides):
    torch.manual_seed(0)
    m = build_method(AB, overrides)
    m.setup(Probe("s", 5, shapes(s), None), [Probe("t", 5, shapes(t), None)])
    return m


def ab_by_loops(m, s: Outputs, t: Outputs) -> float:
    """RepDistiller's ABLoss in float64, one element at a time, on the method's own connector outputs:
    sum_i 2^(i-n+1) * sum((s+m)^2 [s > -m, t <= 0] + (s-m)^2 [s <= m, t > 0]) / batch / 1000 * 3."""
    n = len(m.stages)
    total = 0.0
    for k, (i, conn) in enumerate(zip(m.stages, m.connectors)):
        with torch.no_grad():
            src = conn(s.stages[i]).double().flatten().tolist()
        tgt = t.stages[i].double().flatten().tolist()
        assert len(src) == len(tgt)
        stage = 0.0
        for a, b in zip(src, tgt):
            if b <= 0 and a > -m.margin:
                stage += (a + m.margin) ** 2
            elif b > 0 and a <= m.margin:
                stage += (a - m.margin) ** 2
        total += 2.0 ** (k - n + 1) * stage
    return m.ab_weight * total / s.logits.shape[0] / 1000 * 3


def test_defaults_are_crds():
    m = build_method(AB)
    assert m.config() == {"ce_weight": 1.0, "ab_weight": 1.0, "margin": 1.0, "stages": (-3, -2, -1),
                          "init_epochs": 30}
    assert m.taps() == Taps(stages=(-3, -2, -1), preact=True)
    assert m.init_epochs == 30 and init_epochs_for(m, 240, 240) == 30
    assert m.stage_weights() == [0.25, 0.5, 1.0]
    assert build_method(AB, {"stages": (-4, -3, -2, -1)}).stage_weights() == [0.125, 0.25, 0.5, 1.0]
    assert build_method(AB, {"init_epochs": 1}).init_epochs == 1


def test_connectors_follow_repdistillers():
    m = build_method(AB, {"stages": (0, 1, 2, 3, 4)})
    s = {0: (4, 8, 8), 1: (4, 8, 8), 2: (4, 8, 8), 3: (4, 2, 2), 4: (4, 5, 5)}
    t = {0: (4, 8, 8), 1: (6, 8, 8), 2: (6, 4, 4), 3: (6, 4, 4), 4: (6, 3, 3)}
    m.setup(Probe("s", 5, s, None), [Probe("t", 5, t, None)])
    assert isinstance(m.connectors[0], torch.nn.Identity)  # equal shapes: no parameters
    convs = [c[0] for c in list(m.connectors)[1:]]
    assert [(type(c).__name__, c.kernel_size, c.stride) for c in convs] == [
        ("Conv2d", (1, 1), (1, 1)), ("Conv2d", (3, 3), (2, 2)), ("ConvTranspose2d", (4, 4), (2, 2)),
        ("Conv2d", (3, 3), (1, 1))]
    assert all(isinstance(c[1], torch.nn.BatchNorm2d) and len(c) == 2 for c in list(m.connectors)[1:])  # no ReLU
    for k, c in enumerate(list(m.connectors)[1:], 1):
        assert c(torch.randn(2, *s[k])).shape[1:] == t[k]


def test_maps_the_connector_cannot_join_and_vectors_are_refused_at_setup():
    m = build_method(AB, {"stages": (-1,)})
    with pytest.raises(ValueError, match="smaller by more than 2x"):
        m.setup(Probe("s", 5, {-1: (4, 2, 2)}, None), [Probe("t", 5, {-1: (6, 8, 8)}, None)])
    with pytest.raises(ValueError, match="C x H x W stage maps"):
        m.setup(Probe("s", 5, {-1: (30,)}, None), [Probe("t", 5, {-1: (300,)}, None)])


@pytest.mark.parametrize("overrides", [{}, {"margin": 0.5, "ab_weight": 2.0}, {"stages": (-2, -1)}])
def test_ab_matches_explicit_loops(overrides):
    s, t = fixed()
    m = built(s, t, **overrides)
    m.train()  # the connectors' BatchNorm as in the init stage: batch statistics
    got = m(s, [t], init_batch(4))
    assert set(got) == {"ab"}
    assert got["ab"].item() == pytest.approx(ab_by_loops(m, s, t), rel=1e-5)


def test_no_term_after_the_init_stage():
    """train_student.py: loss_kd = 0 for abound (and -a 0): the schedule trains on cross-entropy alone."""
    s, t = fixed()
    m = built(s, t)
    assert m(s, [t], Batch(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 0, 240)) == {}
    assert m.ce_weight_at(0, 240) == 1.0


def test_gradients_in_the_init_stage_reach_student_features_and_connectors_not_the_teacher():
    method = build_method(AB)
    student = zoo.create(TINY_STUDENT, **TINY)
    teacher = freeze(zoo.create(WIDE_TEACHER, **TINY))
    taps = method.taps()
    method.setup(probe(student, taps, TINY_SHAPE), [probe(teacher, taps, TINY_SHAPE)])
    assert len(list(method.parameters())) == 3 * 4  # conv weight + bias, BatchNorm weight + bias per stage
    student.train()
    x = torch.randn(16, *TINY_SHAPE)
    out = FeatureCapture(student, taps)(x)
    with torch.no_grad():
        t_out = FeatureCapture(teacher, taps)(x)
    assert all((f < 0).any() for f in t_out.stages.values())  # pre-activation maps, both signs
    method(out, [t_out], init_batch(16))["ab"].backward()
    for n, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    features = [n for n, _ in student.named_parameters() if not n.startswith("fc.")]
    for n, p in student.named_parameters():
        if n in features:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert student.conv1.weight.grad.abs().sum() > 0 and student.layer3[-1].bn2.weight.grad.abs().sum() > 0
    assert student.fc.weight.grad is None  # only what the init term reaches trains
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_traces_as_one_graph():
    import torch._dynamo

    s, t = fixed()
    m = built(s, t)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(m)(s, [t], init_batch(4))
    assert not explained.break_reasons and explained.graph_count == 1


@pytest.mark.parametrize("overrides,message", [
    ({"ab_weight": -1.0}, "ab_weight must be >= 0"),
    ({"ce_weight": -1.0}, "ce_weight must be >= 0"),
    ({"margin": -1.0}, "margin must be finite and >= 0"),
    ({"margin": float("nan")}, "margin must be finite"),
    ({"margin": float("inf")}, "margin must be finite"),
    ({"init_epochs": 0}, "init_epochs must be a whole number >= 1"),
    ({"init_epochs": 2.5}, "init_epochs must be an integer"),
    ({"stages": ()}, "stages must be one or more distinct stage indices"),
    ({"stages": (-2, -2)}, "distinct stage indices"),
    ({"stages": (-1, -2, -3)}, "list stages shallow to deep"),
])
def test_out_of_range_hyperparameters_are_refused(overrides, message):
    with pytest.raises(KdbenchError, match=message):
        build_method(AB, overrides)


@pytest.mark.parametrize("kwargs,message", [
    ({"margin": float("nan")}, "margin must be finite and >= 0"),
    ({"init_epochs": 2.5}, "init_epochs must be a whole number >= 1"),
    ({"init_epochs": -1}, "init_epochs must be a whole number >= 1"),
])
def test_the_constructor_itself_refuses_what_build_method_would(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AB(**kwargs)


def _rows(root) -> list[dict]:
    return [json.loads(p.read_text()) for p in (root / "runs").glob("*.json")]


def _run(tmp_path, *args: str) -> int:
    return main(["run", "--methods", "ab", *args, "--seeds", "0", "--quiet", "--no-report",
                 "--throughput-batch", "8", "--results-dir", str(tmp_path)])


def test_end_to_end_init_stage_then_labels(tmp_path):
    code = _run(tmp_path, "--pairs", f"{WIDE_TEACHER}:{TINY_STUDENT}", "--set", "ab.init_epochs=1",
                "--epochs", "2", "--limit", "256")
    assert code == 0
    (ab,) = [r for r in _rows(tmp_path) if r.get("method") == "ab"]
    assert ab["status"] == "ok" and ab["init_epochs"] == 1
    (init_losses,) = json.loads(ab["history_init_loss"])
    assert set(init_losses) == {"ab"} and math.isfinite(init_losses["ab"]) and init_losses["ab"] > 0
    # after the init stage: cross-entropy alone
    assert {k for k in ab if k.startswith("loss.")} == {"loss.ce"} and math.isfinite(ab["loss.ce"])
    assert math.isfinite(ab["top1_last"])
    # three 1x1 conv + BatchNorm connectors, 16/32/64 student channels onto 64/128/256
    assert ab["extra_params"] == sum(s * t + t + 2 * t for s, t in ((16, 64), (32, 128), (64, 256)))


@pytest.mark.parametrize("pair,extra,model", [
    ("hinton_mlp_300:hinton_mlp_30", ["--set", "ab.stages=-2,-1"], "hinton_mlp_30"),
    ("resnet18:cifar_resnet8", [], "resnet18"),
])
def test_models_without_preact_are_refused_when_planned(tmp_path, capsys, pair, extra, model):
    code = _run(tmp_path, "--pairs", pair, *extra, "--epochs", "1", "--limit", "64")
    assert code == 2
    err = capsys.readouterr().err
    assert f"model '{model}' cannot give its stage maps before their final activation" in err
    assert "method 'ab'" in err
    assert not (tmp_path / "runs").exists()  # refused before any training
