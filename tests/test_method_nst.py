"""Neuron selectivity transfer (`nst`): the loss against the paper / RepDistiller definition, shapes, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.method import Batch, Outputs, Probe
from kdbench.registry import build_method, load_methods

METHODS = load_methods()
STAGES = (-3, -2, -1)
SIZES = [(4, 4), (3, 3), (2, 2)]
BATCH = Batch(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), 0, 1)


def maps(channels: int, sizes, n: int = 4, seed: int = 0, grad: bool = False) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    stages = {i: torch.randn(n, channels, h, w, generator=g).requires_grad_(grad) for i, (h, w) in zip(STAGES, sizes)}
    return Outputs(torch.randn(n, 10, generator=g), stages=stages)


def probe(stages: dict[int, tuple[int, ...]], model: str = "m") -> Probe:
    return Probe(model=model, num_classes=10, stages=stages, pooled=None)


def probes_of(o: Outputs) -> Probe:
    return probe({i: tuple(f.shape[1:]) for i, f in o.stages.items()})


def unit_patterns(f: torch.Tensor, b: int) -> list[list[float]]:
    """Sample b's channels, each H x W map flattened and divided by its L2 norm."""
    out = []
    for c in range(f.shape[1]):
        v = [float(x) for x in f[b, c].flatten()]
        norm = math.sqrt(sum(x * x for x in v))
        out.append([x / norm for x in v])
    return out


def mmd2_poly(xs: list[list[float]], ys: list[list[float]]) -> float:
    """Squared MMD between two point sets with k(x, y) = (x . y)^2 (Huang & Wang, eq. 5-6 with d = 2, c = 0)."""
    def k(x, y):
        return sum(a * b for a, b in zip(x, y)) ** 2

    def mean_k(u, v):
        return sum(k(a, b) for a in u for b in v) / (len(u) * len(v))

    return mean_k(xs, xs) + mean_k(ys, ys) - 2 * mean_k(xs, ys)


def nst_reference(s: Outputs, t: Outputs, weight: float = 50.0) -> float:
    """RepDistiller's nst_loss summed over stages: the per-sample MMD^2, averaged over the batch."""
    total = 0.0
    for i in STAGES:
        f_s, f_t = s.stages[i].double(), t.stages[i].double()
        n = f_s.shape[0]
        total += sum(mmd2_poly(unit_patterns(f_s, b), unit_patterns(f_t, b)) for b in range(n)) / n
    return weight * total


def test_defaults_are_the_crd_benchmarks():
    hp = METHODS["nst"].hyperparameters()
    assert hp == {"ce_weight": 1.0, "nst_weight": 50.0, "stages": (-3, -2, -1)}
    assert build_method(METHODS["nst"]).taps().stages == (-3, -2, -1)
    assert "Neuron Selectivity Transfer" in METHODS["nst"].paper
    assert not list(build_method(METHODS["nst"]).parameters())  # parameter-free


def test_nst_matches_the_definition_written_out():
    s, t = maps(4, SIZES, seed=1), maps(6, SIZES, seed=2)  # 4 student channels, 6 teacher channels
    method = build_method(METHODS["nst"])
    method.setup(probes_of(s), [probes_of(t)])
    terms = method(s, [t], BATCH)
    assert set(terms) == {"nst"} and terms["nst"].dim() == 0
    assert terms["nst"].item() == pytest.approx(nst_reference(s, t), rel=1e-5)


def test_nst_is_zero_for_identical_patterns_and_ignores_channel_scale():
    """MMD of a set with itself is 0; each channel is normalised, so scaling a channel changes nothing."""
    s = maps(4, SIZES, seed=3)
    t = Outputs(s.logits, {i: f * torch.tensor([1.0, 3.0, 0.5, 7.0]).view(1, 4, 1, 1) for i, f in s.stages.items()})
    assert build_method(METHODS["nst"])(s, [t], BATCH)["nst"].item() == pytest.approx(0.0, abs=1e-5)


def test_different_spatial_sizes_pool_the_larger_map_as_repdistiller_does():
    """RepDistiller's nst_loss average-pools the larger map to the smaller one's size (CRD Table 2 pairs)."""
    s, t = maps(4, [(4, 4), (2, 2), (2, 2)], seed=5), maps(6, [(2, 2), (4, 4), (2, 2)], seed=6)
    method = build_method(METHODS["nst"])
    method.setup(probes_of(s), [probes_of(t)])
    got = method(s, [t], BATCH)["nst"]

    def block_mean(f: torch.Tensor) -> torch.Tensor:  # 2 x 2 blocks averaged, by hand
        n, c, h, w = f.shape
        return f.reshape(n, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))

    pooled_s = Outputs(s.logits, {-3: block_mean(s.stages[-3]), -2: s.stages[-2], -1: s.stages[-1]})
    pooled_t = Outputs(t.logits, {-3: t.stages[-3], -2: block_mean(t.stages[-2]), -1: t.stages[-1]})
    assert got.item() == pytest.approx(nst_reference(pooled_s, pooled_t), rel=1e-5)


def test_gradients_reach_the_student_maps_only():
    s, t = maps(4, SIZES, seed=7, grad=True), maps(6, SIZES, seed=8)
    loss = build_method(METHODS["nst"])(s, [t], BATCH)["nst"]
    loss.backward()
    for i in STAGES:
        grad = s.stages[i].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, f"stage {i}"
        assert not t.stages[i].requires_grad and t.stages[i].grad is None


def test_the_teacher_teacher_term_is_detached():
    """As in RepDistiller: even teacher maps that require grad get gradient only through the cross term."""
    from kdbench_methods.nst import nst_loss, poly_kernel_mean

    s, t = maps(4, SIZES, seed=9), maps(6, SIZES, seed=10, grad=True)
    nst_loss(s.stages[-1], t.stages[-1]).backward()
    t2 = t.stages[-1].detach().clone().requires_grad_(True)
    n_s = torch.nn.functional.normalize(s.stages[-1].flatten(2), dim=2)
    cross = -2 * poly_kernel_mean(n_s, torch.nn.functional.normalize(t2.flatten(2), dim=2))
    cross.backward()
    torch.testing.assert_close(t.stages[-1].grad, t2.grad)


def test_setup_refuses_vector_stages():
    method = build_method(METHODS["nst"], {"stages": (-2, -1)})
    with pytest.raises(ValueError, match=r"stage -2 of mlp has shape \(30,\).*no spatial positions"):
        method.setup(probe({-2: (4, 8, 8), -1: (4, 4, 4)}), [probe({-2: (30,), -1: (30,)}, "mlp")])
    with pytest.raises(ValueError, match="C x H x W"):
        method.setup(probe({-2: (30,), -1: (30,)}, "mlp"), [probe({-2: (4, 8, 8), -1: (4, 4, 4)})])


def test_setup_accepts_different_spatial_sizes_and_channels():
    method = build_method(METHODS["nst"])
    method.setup(probe({-3: (16, 32, 32), -2: (32, 16, 16), -1: (64, 8, 8)}),
                 [probe({-3: (240, 16, 16), -2: (480, 8, 8), -1: (960, 4, 4)})])


@pytest.mark.parametrize("overrides,match", [
    ({"nst_weight": -1.0}, "nst_weight must be >= 0"),
    ({"nst_weight": float("nan")}, "nst_weight must be"),
    ({"ce_weight": -0.5}, "ce_weight must be >= 0"),
    ({"stages": ()}, "stages must be one or more distinct"),
    ({"stages": (-1, -1)}, "stages must be one or more distinct"),
    ({"stages": (1.5,)}, "stages"),
])
def test_out_of_range_hyperparameters_are_refused(overrides, match):
    with pytest.raises(KdbenchError, match=match):
        build_method(METHODS["nst"], overrides)


def test_kdbench_leaves_nst_out_of_a_cnn_to_mlp_pair(tmp_path, capsys):
    from kdbench.cli import main
    from kdbench.sweep.store import ResultsStore

    code = main(["run", "--methods", "nst,kd", "--pairs", "cifar_resnet8:hinton_mlp_30,cifar_resnet14:cifar_resnet8",
                 "--seeds", "0", "--limit", "48", "--epochs", "1", "--quiet", "--no-report",
                 "--throughput-batch", "8", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "left out: method 'nst'" in out and "hinton_mlp_30" in out
    rows = [r for r in ResultsStore(tmp_path).rows() if r["method"] == "nst"]
    assert [r["student"] for r in rows] == ["cifar_resnet8"], rows
    assert math.isfinite(rows[0]["loss.nst"]) and rows[0]["loss.nst"] > 0
