"""FSP (Yim et al. 2017) as the CRD benchmark runs it: RepDistiller's ``FSP`` loss in a 30-epoch init stage on
the stem and every stage, then cross-entropy alone (its ``train_distill`` sets ``loss_kd = 0`` for fsp)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from init_stage import block_mean, one_init_epoch_row, tiny_models
from tiny import TINY_SHAPE

from kdbench.errors import KdbenchError
from kdbench.features import FeatureCapture, probe
from kdbench.method import Batch, Outputs, Probe
from kdbench.registry import build_method, load_methods

FSP = load_methods()["fsp"]

#: Student and teacher maps (C, H, W) by stage: equal channels, different sizes; every pooling case occurs:
#: student (0, 1) top larger, (1, 2) bottom larger, (2, 3) equal; teacher (0, 1) bottom larger, (1, 2) equal,
#: (2, 3) bottom larger.
S_SHAPES = {0: (3, 2, 2), 1: (3, 4, 4), 2: (5, 2, 2), 3: (4, 2, 2)}
T_SHAPES = {0: (3, 8, 8), 1: (3, 4, 4), 2: (5, 4, 4), 3: (4, 2, 2)}


def fixed(n: int = 3, stage: str = "init") -> tuple[Outputs, Outputs, Batch]:
    g = torch.Generator().manual_seed(7)
    s = Outputs(torch.randn(n, 5, generator=g), {i: torch.randn(n, *c, generator=g) for i, c in S_SHAPES.items()})
    t = Outputs(torch.randn(n, 5, generator=g), {i: torch.randn(n, *c, generator=g) for i, c in T_SHAPES.items()})
    return s, t, Batch(torch.zeros(n, 1, 8, 8), torch.zeros(n, dtype=torch.long), 0, 1, stage=stage)


def built(**overrides):
    m = build_method(FSP, overrides)
    m.setup(Probe("s", 5, dict(S_SHAPES), None), [Probe("t", 5, dict(T_SHAPES), None)])
    return m


def gram_by_loops(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The paper's FSP matrix, G[b, i, j] = Σ_{h,w} bottom[b, i, h, w] · top[b, j, h, w] / (h · w), in float64."""
    size = min(bottom.shape[2], top.shape[2])
    bottom, top = block_mean(bottom.double(), size), block_mean(top.double(), size)
    n, c1, c2 = bottom.shape[0], bottom.shape[1], top.shape[1]
    g = torch.zeros(n, c1, c2, dtype=torch.double)
    for b in range(n):
        for i in range(c1):
            for j in range(c2):
                g[b, i, j] = sum(float(bottom[b, i, h, w] * top[b, j, h, w])
                                 for h in range(size) for w in range(size)) / (size * size)
    return g


def reference(s: Outputs, t: Outputs, stages=(0, 1, 2, 3)) -> float:
    """Σ over consecutive pairs of the mean of (G_s - G_t)² (RepDistiller's ``FSP.compute_loss``)."""
    total = 0.0
    for a, b in zip(stages, stages[1:]):
        d = gram_by_loops(s.stages[a], s.stages[b]) - gram_by_loops(t.stages[a], t.stages[b])
        total += float((d ** 2).mean())
    return total


def test_defaults_are_crds():
    m = build_method(FSP)
    assert m.config() == {"ce_weight": 1.0, "fsp_weight": 0.0, "init_weight": 1.0, "init_epochs": 30,
                          "stages": (0, 1, 2, 3)}
    assert m.init_epochs == 30 and m.ce_weight == 1.0
    assert m.taps().stages == (0, 1, 2, 3) and not m.taps().pooled
    assert m.extra_parameters() == 0 and not list(m.parameters())
    assert "A Gift from Knowledge Distillation" in FSP.paper and "CVPR 2017" in FSP.paper


def test_init_stage_matches_the_fsp_loss_written_out():
    s, t, batch = fixed()
    terms = built(init_weight=0.5)(s, [t], batch)
    assert set(terms) == {"fsp"}
    assert terms["fsp"].item() == pytest.approx(0.5 * reference(s, t), rel=1e-5)


def test_other_stages_take_their_consecutive_pairs():
    s, t, batch = fixed()
    terms = built(stages=(1, 3))(s, [t], batch)
    assert terms["fsp"].item() == pytest.approx(reference(s, t, stages=(1, 3)), rel=1e-5)


def test_the_schedule_is_cross_entropy_alone_by_default():
    """RepDistiller's train_distill: loss_kd = 0 for fsp, so -b 50 multiplies zero; -a 0: no KL term."""
    s, t, _ = fixed()
    train = Batch(torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.long), 0, 240)
    assert built()(s, [t], train) == {}
    assert built().ce_weight_at(0, 240) == 1.0
    terms = built(fsp_weight=2.0)(s, [t], train)  # the paper's option, off in the benchmark
    assert terms["fsp"].item() == pytest.approx(2.0 * reference(s, t), rel=1e-5)


def test_unequal_channels_are_refused_at_setup():
    m = build_method(FSP)
    s = Probe("cifar_resnet8", 10, {0: (16, 8, 8), 1: (16, 8, 8), 2: (32, 4, 4), 3: (64, 2, 2)}, None)
    t = Probe("cifar_resnet8x4", 10, {0: (32, 8, 8), 1: (64, 8, 8), 2: (128, 4, 4), 3: (256, 2, 2)}, None)
    with pytest.raises(ValueError, match=r"equal channel counts.*\(16, 16, 32, 64\).*\(32, 64, 128, 256\)"):
        m.setup(s, [t])
    with pytest.raises(ValueError, match="C x H x W stage maps"):
        m.setup(Probe("mlp", 10, {0: (30,), 1: (30,), 2: (30,), 3: (30,)}, None), [s])


def test_a_pair_with_unequal_channels_is_refused_when_the_run_is_planned(tmp_path):
    from kdbench.recipe import get_recipe
    from kdbench.suites import Pair
    from kdbench.sweep import Request, Sweep

    req = Request(methods=("fsp",), named=True, pairs=(Pair(("cifar_resnet8x4",), "cifar_resnet8"),),
                  dataset="digits", recipe=get_recipe("digits").with_epochs(1), results_dir=tmp_path, limit=32)
    with pytest.raises(KdbenchError, match="fits none of this run's pairs.*equal channel counts"):
        Sweep.prepare(req)
    assert not (tmp_path / "runs").exists()


def test_the_init_stage_reaches_the_students_features_not_its_classifier_nor_the_teacher():
    method = build_method(FSP)
    student, teacher = tiny_models()
    taps = method.taps()
    method.setup(probe(student, taps, TINY_SHAPE), [probe(teacher, taps, TINY_SHAPE)])
    student.train()
    x = torch.randn(16, *TINY_SHAPE)
    out = FeatureCapture(student, taps)(x)
    with torch.no_grad():
        t_out = FeatureCapture(teacher, taps)(x)
    terms = method(out, [t_out], Batch(x, torch.zeros(16, dtype=torch.long), 0, 1, stage="init"))
    terms["fsp"].backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    assert grads["fc.weight"] is None and grads["fc.bias"] is None
    features = {n: g for n, g in grads.items() if not n.startswith("fc.")}
    assert all(g is not None and torch.isfinite(g).all() for g in features.values())
    assert sum(float(g.abs().sum()) for g in features.values()) > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_engine_trains_features_in_the_init_stage_then_everything_on_labels():
    """Through the engine: one init epoch moves the student's features but not its classifier and not the
    teacher; the schedule's epoch then trains on cross-entropy alone; both epochs are timed and reported."""
    from kdbench.data import load_dataset
    from kdbench.recipe import get_recipe
    from kdbench.train import train

    student, teacher = tiny_models()
    method = build_method(FSP, {"init_epochs": 1})
    method.setup(probe(student, method.taps(), TINY_SHAPE), [probe(teacher, method.taps(), TINY_SHAPE)])
    snap = {k: v.clone() for k, v in student.state_dict().items()}
    t_snap = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []

    class Progress:  # the engine's progress bar: advanced once per epoch, init stage included
        def set_postfix(self, **kw):
            pass

        def update(self, n=1):
            seen.append({k: v.clone() for k, v in student.state_dict().items()})

    result = train(student, load_dataset("digits", limit=64), get_recipe("digits").with_epochs(1), seed=0,
                   method=method, teachers=[teacher], progress=Progress())
    assert len(seen) == 2 and result.init_epochs == 1 and len(result.history) == 1
    after_init = seen[0]
    assert all(torch.equal(after_init[k], snap[k]) for k in ("fc.weight", "fc.bias"))
    assert not torch.equal(after_init["conv1.weight"], snap["conv1.weight"])
    assert not torch.equal(seen[1]["fc.weight"], snap["fc.weight"])
    assert all(torch.equal(v, t_snap[k]) for k, v in teacher.state_dict().items())
    assert [set(h) for h in result.init_losses] == [{"fsp"}] and math.isfinite(result.init_losses[0]["fsp"])
    assert set(result.last.losses) == {"ce"}
    assert sorted(result.epoch_train_s) == [0, 1]
    assert result.train_time_s >= sum(result.epoch_train_s.values())


@pytest.mark.parametrize("overrides,message", [
    ({"init_epochs": -1}, "init_epochs must be a whole number of epochs >= 0"),
    ({"init_epochs": 1.5}, "init_epochs must be an integer"),
    ({"fsp_weight": -1.0}, "fsp_weight must be >= 0"),
    ({"init_weight": -1.0}, "init_weight must be >= 0"),
    ({"ce_weight": -1.0}, "ce_weight must be >= 0"),
    ({"init_weight": 0.0}, "init_weight must be > 0 while init_epochs > 0"),
    ({"init_epochs": 0}, "transfers nothing"),
    ({"ce_weight": 0.0}, "nothing trains after the init stage"),
    ({"stages": (2,)}, "two or more stages"),
    ({"stages": (1, 1)}, "distinct stage indices"),
])
def test_out_of_range_hyperparameters_are_refused(overrides, message):
    with pytest.raises(KdbenchError, match=message):
        build_method(FSP, overrides)


def test_constructor_refuses_a_fractional_init_stage():
    with pytest.raises(ValueError, match="whole number"):
        FSP(init_epochs=1.5)
    assert FSP(init_epochs=0, fsp_weight=1.0).init_epochs == 0  # no init stage: FSP during the schedule


def test_end_to_end_cli_run_with_a_one_epoch_init_stage(tmp_path):
    """fsp runs on a pair of equal channels (cifar_resnet14 -> cifar_resnet8): its row records the init stage
    (one epoch, one loss entry), trains on cross-entropy alone after it, and counts the init epoch's time."""
    row = one_init_epoch_row(tmp_path, "fsp", "cifar_resnet14:cifar_resnet8", "fsp")
    assert {k for k in row if k.startswith("loss.")} == {"loss.ce"} and math.isfinite(row["loss.ce"])
    assert len(json.loads(row["history_loss"])) == 1 and math.isfinite(row["top1_last"])
