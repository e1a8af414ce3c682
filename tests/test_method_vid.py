"""VID (Ahn et al. 2019), as the CRD benchmark runs it: RepDistiller's ``VIDLoss`` on every stage past the stem."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import TINY, TINY_SHAPE, TINY_STUDENT, TINY_TEACHERS

from kdbench import zoo
from kdbench.cli import main
from kdbench.errors import KdbenchError
from kdbench.features import FeatureCapture, probe
from kdbench.method import Batch, Outputs, Probe
from kdbench.registry import build_method, load_methods
from kdbench.train import freeze

VID = load_methods()["vid"]


def shapes(o: Outputs) -> dict[int, tuple[int, ...]]:
    return {i: tuple(t.shape[1:]) for i, t in o.stages.items()}


def built(s: Outputs, t: Outputs, **overrides):
    torch.manual_seed(0)
    m = build_method(VID, overrides)
    m.setup(Probe("s", 5, shapes(s), None), [Probe("t", 5, shapes(t), None)])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a different variance per channel, so its broadcasting is checked too
        for reg in m.regressors:
            reg.log_scale.add_(torch.randn(reg.log_scale.shape, generator=g))
    return m


def fixed(n: int = 5):
    """Stage -1: student 4 channels 4x4, teacher 6 channels 2x2. Stage -2: student 2x2, teacher 4x4.
    Stage 0: vectors (an MLP's hidden layer)."""
    g = torch.Generator().manual_seed(11)
    s = Outputs(torch.randn(n, 5, generator=g), stages={-1: torch.randn(n, 4, 4, 4, generator=g).relu(),
                                                         -2: torch.randn(n, 4, 2, 2, generator=g).relu(),
                                                         0: torch.randn(n, 4, generator=g).relu()})
    t = Outputs(torch.randn(n, 5, generator=g), stages={-1: torch.randn(n, 6, 2, 2, generator=g).relu(),
                                                         -2: torch.randn(n, 6, 4, 4, generator=g).relu(),
                                                         0: torch.randn(n, 6, generator=g).relu()})
    return s, t, Batch(torch.zeros(n, 1, 8, 8), torch.zeros(n, dtype=torch.long), 0, 10)


def pool2(x: torch.Tensor) -> torch.Tensor:
    """Average of each 2x2 block, written out (an exact halving, what adaptive pooling does here)."""
    return (x[:, :, 0::2, 0::2] + x[:, :, 1::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 1::2]) / 4


def nll_by_loops(reg, student: torch.Tensor, teacher: torch.Tensor) -> float:
    """RepDistiller's VIDLoss in float64, one position at a time, with the module's own weights."""
    w = [c.weight.detach().double()[:, :, 0, 0] for c in reg.regressor if isinstance(c, torch.nn.Conv2d)]
    var = torch.log(1 + torch.exp(reg.log_scale.detach().double())) + reg.eps
    s, t = student.detach().double(), teacher.detach().double()
    if s.dim() == 2:
        s, t = s[:, :, None, None], t[:, :, None, None]
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for h in range(s.shape[2]):
            for x in range(s.shape[3]):
                mu = w[2] @ torch.relu(w[1] @ torch.relu(w[0] @ s[b, :, h, x]))
                for c in range(t.shape[1]):
                    total += 0.5 * (float((mu[c] - t[b, c, h, x]) ** 2 / var[c]) + math.log(float(var[c])))
                    count += 1
    return total / count


def test_defaults_are_crds():
    m = build_method(VID)
    assert m.config() == {"ce_weight": 1.0, "vid_weight": 1.0, "stages": (-3, -2, -1), "init_pred_var": 5.0,
                          "eps": 1e-5}
    assert m.taps().stages == (-3, -2, -1) and not m.taps().pooled


def test_regressors_are_built_from_probed_shapes():
    m = build_method(VID, {"stages": (-1, 0)})
    m.setup(Probe("s", 5, {-1: (4, 4, 4), 0: (30,)}, None), [Probe("t", 5, {-1: (6, 2, 2), 0: (300,)}, None)])
    conv = m.regressors[0].regressor
    # RepDistiller's VIDLoss(s, t, t): mid width = teacher channels, 1x1 convs without bias
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in conv if isinstance(c, torch.nn.Conv2d)] \
        == [(4, 6, (1, 1), None), (6, 6, (1, 1), None), (6, 6, (1, 1), None)]
    assert m.regressors[1].log_scale.shape == (300,)
    assert m.extra_parameters() == (4 * 6 + 6 * 6 * 2 + 6) + (30 * 300 + 300 * 300 * 2 + 300)
    # the variance starts at init_pred_var: softplus(log(exp(5 - eps) - 1)) + eps
    assert torch.allclose(m.regressors[0].variance(), torch.full((6,), 5.0), rtol=1e-6)


@pytest.mark.parametrize("stage", [-1, -2, 0], ids=["student-larger", "teacher-larger", "vectors"])
def test_vid_matches_explicit_loops(stage):
    """Student 4 channels, teacher 6; the larger map is average-pooled to the smaller, as RepDistiller does."""
    s, t, batch = fixed()
    m = built(s, t, stages=(stage,), vid_weight=0.5)
    s_map, t_map = s.stages[stage], t.stages[stage]
    if stage == -1:
        s_map = pool2(s_map)
    elif stage == -2:
        t_map = pool2(t_map)
    expected = 0.5 * nll_by_loops(m.regressors[0], s_map, t_map)
    assert m(s, [t], batch)["vid"].item() == pytest.approx(expected, rel=1e-5)


def test_vid_sums_over_stages():
    s, t, batch = fixed()
    m = built(s, t, stages=(-1, -2, 0))
    one = [built(s, t, stages=(i,)) for i in (-1, -2, 0)]
    for single, reg in zip(one, m.regressors):  # the same weights, stage by stage
        single.regressors[0].load_state_dict(reg.state_dict())
    assert m(s, [t], batch)["vid"].item() == pytest.approx(sum(o(s, [t], batch)["vid"].item() for o in one), rel=1e-6)


def test_maps_against_vectors_are_refused_at_setup():
    m = build_method(VID, {"stages": (-1,)})
    with pytest.raises(ValueError, match="both maps"):
        m.setup(Probe("s", 5, {-1: (30,)}, None), [Probe("t", 5, {-1: (6, 2, 2)}, None)])


def test_gradients_reach_student_features_and_the_regressors_not_the_teacher():
    method = build_method(VID)
    student = zoo.create(TINY_STUDENT, **TINY)
    teacher = freeze(zoo.create(TINY_TEACHERS[0], **TINY))
    taps = method.taps()
    method.setup(probe(student, taps, TINY_SHAPE), [probe(teacher, taps, TINY_SHAPE)])
    student.train()
    x = torch.randn(16, *TINY_SHAPE)
    out = FeatureCapture(student, taps)(x)
    for f in out.stages.values():
        f.retain_grad()
    with torch.no_grad():
        t_out = FeatureCapture(teacher, taps)(x)
    method(out, [t_out], Batch(x, torch.zeros(16, dtype=torch.long), 0, 1))["vid"].backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in out.stages.values())
    names = [n for n, _ in method.named_parameters()]
    assert len(names) == 3 * 4 and sum(n.endswith("log_scale") for n in names) == 3
    for n, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not any(f.requires_grad for f in t_out.stages.values())


def test_traces_as_one_graph():
    import torch._dynamo

    s, t, batch = fixed()
    m = built(s, t, stages=(-1, -2, 0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(m)(s, [t], batch)
    assert not explained.break_reasons and explained.graph_count == 1


@pytest.mark.parametrize("overrides,message", [
    ({"vid_weight": -1.0}, "vid_weight must be >= 0"),
    ({"ce_weight": -1.0}, "ce_weight must be >= 0"),
    ({"init_pred_var": 0.0}, "init_pred_var must be"),
    ({"init_pred_var": -5.0}, "init_pred_var must be"),
    ({"init_pred_var": 1e-6}, "init_pred_var must be"),  # below eps: no softplus gives it
    ({"init_pred_var": float("inf")}, "init_pred_var must be finite"),
    ({"eps": 0.0}, "eps"),
    ({"stages": ()}, "stages must be one or more distinct stage indices"),
    ({"stages": (-2, -2)}, "distinct stage indices"),
])
def test_out_of_range_hyperparameters_are_refused(overrides, message):
    with pytest.raises(KdbenchError, match=message):
        build_method(VID, overrides)


def _rows(root) -> list[dict]:
    return [json.loads(p.read_text()) for p in (root / "runs").glob("*.json")]


def test_end_to_end_tiny_run(tmp_path):
    """VID runs on the CNN pair; its default stages (-3, -2, -1) are more than the MLPs' 2, so it is left
    out of the MLP pair, with a note, while SP and KD run there."""
    code = main(["run", "--methods", "sp,vid,kd",
                 "--pairs", "cifar_resnet14:cifar_resnet8,hinton_mlp_300:hinton_mlp_30",
                 "--seeds", "0", "--limit", "48", "--epochs", "1", "--quiet", "--no-report",
                 "--throughput-batch", "8", "--results-dir", str(tmp_path)])
    assert code == 0
    rows = _rows(tmp_path)
    ran = {(r.get("method"), r["pair"]) for r in rows if r.get("method") in ("sp", "vid", "kd")}
    cnn, mlp = "cifar_resnet14→cifar_resnet8", "hinton_mlp_300→hinton_mlp_30"
    assert ran == {("sp", cnn), ("sp", mlp), ("kd", cnn), ("kd", mlp), ("vid", cnn)}
    (vid,) = [r for r in rows if r.get("method") == "vid"]
    assert {k for k in vid if k.startswith("loss.")} == {"loss.ce", "loss.vid"}
    assert math.isfinite(vid["loss.vid"]) and math.isfinite(vid["loss.ce"])
    # 16/32/64 channels (both ResNets): three regressors student -> teacher with teacher-wide middles
    assert vid["extra_params"] == sum(c * c * 3 + c for c in (16, 32, 64))
    for r in rows:
        if r.get("method") in ("sp", "kd"):
            assert all(math.isfinite(v) for k, v in r.items() if k.startswith("loss."))


def test_end_to_end_on_mlp_vectors(tmp_path):
    """With the MLPs' two hidden layers named, VID regresses the teacher's vectors from the student's."""
    code = main(["run", "--methods", "vid", "--pairs", "hinton_mlp_300:hinton_mlp_30", "--set", "vid.stages=-2,-1",
                 "--seeds", "0", "--limit", "48", "--epochs", "1", "--quiet", "--no-report",
                 "--throughput-batch", "8", "--results-dir", str(tmp_path)])
    assert code == 0
    (vid,) = [r for r in _rows(tmp_path) if r.get("method") == "vid"]
    assert vid["pair"] == "hinton_mlp_300→hinton_mlp_30" and math.isfinite(vid["loss.vid"])
    assert vid["extra_params"] == 2 * (30 * 300 + 300 * 300 * 2 + 300)
