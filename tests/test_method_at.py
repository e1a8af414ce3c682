"""Attention transfer (`at`): the loss against the paper / RepDistiller definition, shapes, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.method import Batch, Outputs, Probe
from kdbench.registry import build_method, load_methods

METHODS = load_methods()
STAGES = (-3, -2, -1)


def maps(channels: int, sizes, n: int = 5, seed: int = 0, grad: bool = False) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    stages = {i: torch.randn(n, channels, h, w, generator=g).requires_grad_(grad) for i, (h, w) in zip(STAGES, sizes)}
    return Outputs(torch.randn(n, 10, generator=g), stages=stages)


def probe(stages: dict[int, tuple[int, ...]], model: str = "m") -> Probe:
    return Probe(model=model, num_classes=10, stages=stages, pooled=None)


BATCH = Batch(torch.zeros(5, 3, 8, 8), torch.zeros(5, dtype=torch.long), 0, 1)
SIZES = [(8, 8), (4, 4), (2, 2)]


def attention_loop(f: torch.Tensor) -> list[list[float]]:
    """Q = sum_c |A_c|^2 per position (the paper's F_sum^2), divided by its L2 norm, written out."""
    n, c, h, w = f.shape
    out = []
    for b in range(n):
        q = [sum(float(f[b, k, y, x]) ** 2 for k in range(c)) for y in range(h) for x in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        out.append([v / norm for v in q])
    return out


def at_reference(s: Outputs, t: Outputs, weight: float = 1000.0) -> float:
    """RepDistiller's at_loss, summed over stages: mean over batch and positions of the squared difference."""
    total = 0.0
    for i in STAGES:
        a_s, a_t = attention_loop(s.stages[i].double()), attention_loop(t.stages[i].double())
        diffs = [(x - y) ** 2 for row_s, row_t in zip(a_s, a_t) for x, y in zip(row_s, row_t)]
        total += sum(diffs) / len(diffs)
    return weight * total


def test_defaults_are_the_crd_benchmarks():
    hp = METHODS["at"].hyperparameters()
    assert hp == {"ce_weight": 1.0, "at_weight": 1000.0, "p": 2.0, "stages": (-3, -2, -1)}
    assert build_method(METHODS["at"]).taps().stages == (-3, -2, -1)
    assert "Zagoruyko" in METHODS["at"].paper and "ICLR 2017" in METHODS["at"].paper
    assert not list(build_method(METHODS["at"]).parameters())  # parameter-free


def test_at_matches_the_definition_written_out():
    s, t = maps(4, SIZES, seed=1), maps(6, SIZES, seed=2)  # 4 student channels, 6 teacher channels
    method = build_method(METHODS["at"])
    method.setup(probe({i: tuple(s.stages[i].shape[1:]) for i in STAGES}),
                 [probe({i: tuple(t.stages[i].shape[1:]) for i in STAGES})])
    terms = method(s, [t], BATCH)
    assert set(terms) == {"at"} and terms["at"].dim() == 0
    assert terms["at"].item() == pytest.approx(at_reference(s, t), rel=1e-5)


def test_p_is_the_power_of_the_absolute_activation():
    """With p = 1 the map is mean_c |f| (the paper's |A_i|^p), not mean_c f."""
    s, t = maps(4, SIZES, seed=3), maps(6, SIZES, seed=4)
    got = build_method(METHODS["at"], {"p": 1.0, "at_weight": 1.0})(s, [t], BATCH)["at"]
    expected = 0.0
    for i in STAGES:
        a_s = torch.nn.functional.normalize(s.stages[i].double().abs().sum(1).flatten(1), dim=1)
        a_t = torch.nn.functional.normalize(t.stages[i].double().abs().sum(1).flatten(1), dim=1)
        expected += float(((a_s - a_t) ** 2).mean())
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_different_spatial_sizes_pool_the_larger_map_as_repdistiller_does():
    """RepDistiller's at_loss average-pools the larger map to the smaller one's size (CRD Table 2 pairs)."""
    s, t = maps(4, [(8, 8), (4, 4), (2, 2)], seed=5), maps(6, [(4, 4), (4, 4), (4, 4)], seed=6)
    method = build_method(METHODS["at"])
    method.setup(probe({i: tuple(s.stages[i].shape[1:]) for i in STAGES}),
                 [probe({i: tuple(t.stages[i].shape[1:]) for i in STAGES})])
    got = method(s, [t], BATCH)["at"]

    def block_mean(f: torch.Tensor, k: int) -> torch.Tensor:  # k x k blocks averaged, by hand
        n, c, h, w = f.shape
        return f.reshape(n, c, h // k, k, w // k, k).mean(dim=(3, 5))

    pooled_s = Outputs(s.logits, {-3: block_mean(s.stages[-3], 2), -2: s.stages[-2], -1: s.stages[-1]})
    pooled_t = Outputs(t.logits, {-3: t.stages[-3], -2: t.stages[-2], -1: block_mean(t.stages[-1], 2)})
    assert got.item() == pytest.approx(at_reference(pooled_s, pooled_t), rel=1e-5)


def test_gradients_reach_the_student_maps_only():
    s, t = maps(4, SIZES, seed=7, grad=True), maps(6, SIZES, seed=8)
    loss = build_method(METHODS["at"])(s, [t], BATCH)["at"]
    loss.backward()
    for i in STAGES:
        grad = s.stages[i].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, f"stage {i}"
        assert not t.stages[i].requires_grad and t.stages[i].grad is None


def test_setup_refuses_vector_stages():
    method = build_method(METHODS["at"], {"stages": (-2, -1)})
    with pytest.raises(ValueError, match=r"stage -2 of mlp has shape \(30,\).*no spatial positions"):
        method.setup(probe({-2: (4, 8, 8), -1: (4, 4, 4)}), [probe({-2: (30,), -1: (30,)}, "mlp")])
    with pytest.raises(ValueError, match="C x H x W"):
        method.setup(probe({-2: (30,), -1: (30,)}, "mlp"), [probe({-2: (4, 8, 8), -1: (4, 4, 4)})])


def test_setup_accepts_different_spatial_sizes_and_channels():
    method = build_method(METHODS["at"])
    method.setup(probe({-3: (16, 32, 32), -2: (32, 16, 16), -1: (64, 8, 8)}),
                 [probe({-3: (240, 16, 16), -2: (480, 8, 8), -1: (960, 4, 4)})])


@pytest.mark.parametrize("overrides,match", [
    ({"at_weight": -1.0}, "at_weight must be >= 0"),
    ({"at_weight": float("nan")}, "at_weight must be"),
    ({"ce_weight": -0.5}, "ce_weight must be >= 0"),
    ({"p": 0.0}, "p must be > 0"),
    ({"p": -2.0}, "p must be > 0"),
    ({"stages": ()}, "stages must be one or more distinct"),
    ({"stages": (1, 1)}, "stages must be one or more distinct"),
    ({"stages": (1.5,)}, "stages"),
])
def test_out_of_range_hyperparameters_are_refused(overrides, match):
    with pytest.raises(KdbenchError, match=match):
        build_method(METHODS["at"], overrides)


def test_kdbench_leaves_at_out_of_a_cnn_to_mlp_pair(tmp_path, capsys):
    from kdbench.cli import main
    from kdbench.sweep.store import ResultsStore

    code = main(["run", "--methods", "at,kd", "--pairs", "cifar_resnet8:hinton_mlp_30,cifar_resnet14:cifar_resnet8",
                 "--seeds", "0", "--limit", "48", "--epochs", "1", "--quiet", "--no-report",
                 "--throughput-batch", "8", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "left out: method 'at'" in out and "hinton_mlp_30" in out
    rows = [r for r in ResultsStore(tmp_path).rows() if r["method"] == "at"]
    assert [r["student"] for r in rows] == ["cifar_resnet8"], rows
    assert math.isfinite(rows[0]["loss.at"]) and rows[0]["loss.at"] > 0
