"""SP (Tung & Mori 2019), as the CRD benchmark runs it: RepDistiller's ``Similarity`` on the last stage map."""

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
from kdbench.method import Batch, Outputs
from kdbench.registry import build_method, load_methods
from kdbench.train import freeze

SP = load_methods()["sp"]


def sp_by_loops(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """RepDistiller's similarity_loss written out in float64: Gram, row L2 norm, squared difference / B²."""
    b = student.shape[0]

    def sim(x):
        f = x.double().reshape(b, -1)
        g = [[sum(float(f[i, k] * f[j, k]) for k in range(f.shape[1])) for j in range(b)] for i in range(b)]
        return [[g[i][j] / max(math.sqrt(sum(v * v for v in g[i])), 1e-12) for j in range(b)] for i in range(b)]

    gs, gt = sim(student), sim(teacher)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


def fixed(n: int = 6):
    g = torch.Generator().manual_seed(7)
    s = Outputs(torch.randn(n, 5, generator=g), stages={-1: torch.randn(n, 4, 4, 4, generator=g),
                                                         -2: torch.randn(n, 4, 8, 8, generator=g),
                                                         0: torch.randn(n, 30, generator=g)})
    t = Outputs(torch.randn(n, 5, generator=g), stages={-1: torch.randn(n, 6, 2, 2, generator=g),
                                                         -2: torch.randn(n, 6, 4, 4, generator=g),
                                                         0: torch.randn(n, 300, generator=g)})
    return s, t, Batch(torch.zeros(n, 1, 8, 8), torch.zeros(n, dtype=torch.long), 0, 10)


def test_defaults_are_crds():
    m = build_method(SP)
    assert m.config() == {"ce_weight": 1.0, "sp_weight": 3000.0, "stages": (-1,)}
    assert m.taps().stages == (-1,) and not m.taps().pooled
    assert m.extra_parameters() == 0


def test_sp_matches_explicit_loops():
    """Student 4 channels 4x4, teacher 6 channels 2x2: only the batch size has to agree."""
    s, t, batch = fixed()
    terms = build_method(SP)(s, [t], batch)
    assert set(terms) == {"sp"}
    assert terms["sp"].item() == pytest.approx(3000 * sp_by_loops(s.stages[-1], t.stages[-1]), rel=1e-5)


def test_sp_sums_over_stages_and_takes_vectors():
    s, t, batch = fixed()
    terms = build_method(SP, {"stages": (-2, -1, 0), "sp_weight": 2.0})(s, [t], batch)
    expected = sum(sp_by_loops(s.stages[i], t.stages[i]) for i in (-2, -1, 0))
    assert terms["sp"].item() == pytest.approx(2.0 * expected, rel=1e-5)


def test_sp_is_zero_for_the_same_similarities():
    """Scaling every feature by one positive number leaves the normalised similarity matrix unchanged."""
    s, _, batch = fixed()
    t = Outputs(s.logits, stages={-1: 3.0 * s.stages[-1]})
    assert build_method(SP)(s, [t], batch)["sp"].item() == pytest.approx(0.0, abs=1e-6)


def test_gradients_reach_the_student_features_and_not_the_teacher():
    method = build_method(SP)
    student = zoo.create(TINY_STUDENT, **TINY)
    teacher = freeze(zoo.create(TINY_TEACHERS[0], **TINY))
    taps = method.taps()
    method.setup(probe(student, taps, TINY_SHAPE), [probe(teacher, taps, TINY_SHAPE)])
    student.train()
    x = torch.randn(16, *TINY_SHAPE)
    out = FeatureCapture(student, taps)(x)
    out.stages[-1].retain_grad()
    with torch.no_grad():
        t_out = FeatureCapture(teacher, taps)(x)
    method(out, [t_out], Batch(x, torch.zeros(16, dtype=torch.long), 0, 1))["sp"].backward()
    assert out.stages[-1].grad is not None and out.stages[-1].grad.abs().sum() > 0
    # SP reaches every student parameter up to the last stage, and nothing of the teacher's
    stem_and_stages = [p for n, p in student.named_parameters() if not n.startswith(student.classifier_name)]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stem_and_stages)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not t_out.stages[-1].requires_grad


def test_traces_as_one_graph():
    import torch._dynamo

    s, t, batch = fixed()
    s.stages[-1].requires_grad_(True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(build_method(SP, {"stages": (-2, -1)}))(s, [t], batch)
    assert not explained.break_reasons and explained.graph_count == 1


@pytest.mark.parametrize("overrides,message", [
    ({"sp_weight": -1.0}, "sp_weight must be >= 0"),
    ({"sp_weight": float("nan")}, "sp_weight"),
    ({"ce_weight": -0.5}, "ce_weight must be >= 0"),
    ({"stages": ()}, "stages must be one or more distinct stage indices"),
    ({"stages": (-1, -1)}, "distinct stage indices"),
    ({"stages": (1.5,)}, "stages"),
])
def test_out_of_range_hyperparameters_are_refused(overrides, message):
    with pytest.raises(KdbenchError, match=message):
        build_method(SP, overrides)


def test_end_to_end_tiny_run(tmp_path):
    """SP runs on a CNN pair (stage maps) and an MLP pair (hidden vectors), beside VID and KD."""
    code = main(["run", "--methods", "sp,vid,kd",
                 "--pairs", "cifar_resnet14:cifar_resnet8,hinton_mlp_300:hinton_mlp_30",
                 "--seeds", "0", "--limit", "48", "--epochs", "1", "--quiet", "--no-report",
                 "--throughput-batch", "8", "--results-dir", str(tmp_path)])
    assert code == 0
    rows = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    sp = {r["pair"]: r for r in rows if r.get("method") == "sp"}
    assert set(sp) == {"cifar_resnet14→cifar_resnet8", "hinton_mlp_300→hinton_mlp_30"}
    for r in sp.values():
        assert {k for k in r if k.startswith("loss.")} == {"loss.ce", "loss.sp"}
        assert math.isfinite(r["loss.sp"]) and r["loss.sp"] > 0 and math.isfinite(r["loss.ce"])
        assert r["hp.sp_weight"] == 300.0 and r["extra_params"] == 0  # the digits suite sets 300 (see its file)
    # VID's default stages (-3, -2, -1) need 3 stages past the stem: the MLPs have 2, so it is left out there
    vid = {r["pair"]: r for r in rows if r.get("method") == "vid"}
    assert set(vid) == {"cifar_resnet14→cifar_resnet8"}
    assert math.isfinite(vid["cifar_resnet14→cifar_resnet8"]["loss.vid"])
    assert {r["pair"] for r in rows if r.get("method") == "kd"} == set(sp)
