"""Knowledge review (`reviewkd`): the loss against the paper / official-code definition written out in float64, the
attention-based fusion, gradients, the warm-up ramp, refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.method import Batch, Outputs, Probe
from kdbench.registry import build_method, load_methods

REVIEWKD = load_methods()["reviewkd"]
STAGES = (-3, -2, -1)
N = 4


def batch(epoch: int = 0, epochs: int = 240) -> Batch:
    return Batch(torch.zeros(N, 3, 8, 8), torch.zeros(N, dtype=torch.long), epoch, epochs)


def outputs(shapes, pooled: int, seed: int, grad: bool = False) -> Outputs:
    """Random stage maps of the given (C, H, W) for stages -3..-1, and a pooled vector."""
    g = torch.Generator().manual_seed(seed)
    stages = {i: torch.randn(N, *s, generator=g).requires_grad_(grad) for i, s in zip(STAGES, shapes)}
    return Outputs(torch.randn(N, 10, generator=g), stages, torch.randn(N, pooled, generator=g).requires_grad_(grad))


def probe_of(o: Outputs, model: str = "m") -> Probe:
    return Probe(model, 10, {i: tuple(f.shape[1:]) for i, f in o.stages.items()}, tuple(o.pooled.shape[1:]))


def probe(stages: dict[int, tuple[int, ...]], pooled=(64,), model: str = "m") -> Probe:
    return Probe(model=model, num_classes=10, stages=stages, pooled=pooled)


STUDENT = [(4, 8, 8), (6, 4, 4), (8, 2, 2)]
TEACHER = [(5, 8, 8), (7, 4, 4), (9, 2, 2)]


def built(s: Outputs, t: Outputs, **overrides):
    torch.manual_seed(0)
    method = build_method(REVIEWKD, overrides)
    method.setup(probe_of(s), [probe_of(t)])
    return method


# -- an independent float64 implementation ---------------------------------------------------------------------
def adaptive_avg(x: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pooling written out: window i covers [floor(i*H/size), ceil((i+1)*H/size))."""
    n, c, h, w = x.shape
    out = torch.zeros(n, c, size, size, dtype=x.dtype)
    for i in range(size):
        for j in range(size):
            r0, r1 = (i * h) // size, -((-(i + 1) * h) // size)
            c0, c1 = (j * w) // size, -((-(j + 1) * w) // size)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out


def hcl_reference(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    """The paper's hierarchical context loss (section 3.3, the official ``hcl``): the MSE at full resolution
    weighted 1, then the MSE after pooling to 4x4, 2x2, 1x1, each level smaller than the map weighted half the
    previous one, divided by the sum of the weights used."""
    terms = [(1.0, float(((f_s - f_t) ** 2).mean()))]
    for size in (4, 2, 1):
        if size < f_s.shape[2]:
            terms.append((terms[-1][0] / 2, float(((adaptive_avg(f_s, size) - adaptive_avg(f_t, size)) ** 2).mean())))
    return sum(w * v for w, v in terms) / sum(w for w, _ in terms)


def nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PyTorch's 'nearest' resize written out: output row r reads input row floor(r * H_in / H_out)."""
    rows = [math.floor(r * x.shape[2] / size[0]) for r in range(size[0])]
    cols = [math.floor(c * x.shape[3] / size[1]) for c in range(size[1])]
    return x[:, :, rows][:, :, :, cols]


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A stride-1 convolution with 'same' zero padding (1x1 or 3x3), as a sum of shifted channel mixes."""
    k = weight.shape[-1]
    p = k // 2
    h, w = x.shape[2:]
    xp = F.pad(x, (p, p, p, p))
    out = sum(torch.einsum("nchw,oc->nohw", xp[:, :, di:di + h, dj:dj + w], weight[:, :, di, dj])
              for di in range(k) for dj in range(k))
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def bn_train(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """BatchNorm in training mode: the batch's mean and biased variance per channel, then the affine."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    scale, shift = bn.weight.double().view(1, -1, 1, 1), bn.bias.double().view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + bn.eps) * scale + shift


def review_reference(method, s: Outputs, t: Outputs, ramp: float) -> float:
    """ReviewKD's loss (the paper's figure 2(d) and section 3.2-3.3, as the official CIFAR code computes it) from
    the method's own weights, in float64."""
    with torch.no_grad():
        return _review_reference(method, s, t, ramp)


def _review_reference(method, s: Outputs, t: Outputs, ramp: float) -> float:
    d = torch.float64
    feats = [s.stages[i].detach().to(d) for i in STAGES] + [s.pooled.detach().to(d)[:, :, None, None]]
    targets = [t.stages[i].to(d) for i in STAGES] + [t.pooled.to(d)[:, :, None, None]]
    outs, residual = {}, None
    for k in (3, 2, 1, 0):  # the review: deepest level first
        abf = method.abfs[k]
        x = bn_train(conv(feats[k], abf.conv1[0].weight.double()), abf.conv1[1])
        if k < 3:
            y = nearest(residual, tuple(x.shape[2:]))
            att = torch.sigmoid(conv(torch.cat([x, y], 1), abf.att_conv[0].weight.double(),
                                     abf.att_conv[0].bias.double()))
            x = x * att[:, 0:1] + y * att[:, 1:2]
        x = nearest(x, tuple(targets[k].shape[2:]))
        residual = x
        outs[k] = bn_train(conv(x, abf.conv2[0].weight.double()), abf.conv2[1])
    return 5.0 * ramp * sum(hcl_reference(outs[k], targets[k]) for k in range(4))


# -- defaults ---------------------------------------------------------------------------------------------------
def test_defaults_are_the_official_cifar_settings():
    assert REVIEWKD.hyperparameters() == {"ce_weight": 1.0, "reviewkd_weight": 5.0, "warmup": 20, "mid_channels": 0,
                                          "stages": (-3, -2, -1), "preact": True}
    taps = build_method(REVIEWKD).taps()
    assert taps.stages == (-3, -2, -1) and taps.pooled and taps.preact
    assert "Knowledge Review" in REVIEWKD.paper and "CVPR 2021" in REVIEWKD.paper


# -- (1) the hierarchical context loss --------------------------------------------------------------------------
@pytest.mark.parametrize("size,weights", [(8, (1, 0.5, 0.25, 0.125)), (6, (1, 0.5, 0.25, 0.125)),
                                          (4, (1, 0.5, 0.25)), (2, (1, 0.5)), (1, (1,))])
def test_hcl_matches_the_papers_pyramid(size, weights):
    from kdbench_methods.reviewkd import hcl

    g = torch.Generator().manual_seed(size)
    f_s, f_t = torch.randn(3, 5, size, size, generator=g), torch.randn(3, 5, size, size, generator=g)
    got = hcl(f_s, f_t).item()
    assert got == pytest.approx(hcl_reference(f_s.double(), f_t.double()), rel=1e-5)
    # the weights, spelled out: 1, then halves for each pyramid level smaller than the map, normalised
    pooled = [(adaptive_avg(f_s.double(), lv), adaptive_avg(f_t.double(), lv)) for lv in (4, 2, 1) if lv < size]
    levels = [F.mse_loss(f_s, f_t).item()] + [F.mse_loss(a, b).item() for a, b in pooled]
    assert len(levels) == len(weights)
    assert got == pytest.approx(sum(w * v for w, v in zip(weights, levels)) / sum(weights), rel=1e-5)


def test_reviewkd_matches_the_definition_written_out():
    s, t = outputs(STUDENT, 8, seed=1), outputs(TEACHER, 10, seed=2)
    method = built(s, t)
    terms = method.weigh(method(s, [t], batch(epoch=4)), 4, 240)
    assert set(terms) == {"reviewkd"} and terms["reviewkd"].dim() == 0
    assert terms["reviewkd"].item() == pytest.approx(review_reference(method, s, t, ramp=5 / 20), rel=1e-5)


def test_maps_are_resized_to_the_teachers_size_as_the_official_code_does():
    """A student whose maps are half the teacher's (the official shufflev1 -> resnet32x4 tables): each fused map is
    resized (nearest) to the teacher's size before its output conv, and the next shallower level upsamples it back."""
    s = outputs([(4, 4, 4), (6, 2, 2), (8, 1, 1)], 8, seed=3)
    t = outputs(TEACHER, 10, seed=4)
    method = built(s, t)
    outs = method.review(s)
    assert [tuple(o.shape[1:]) for o in outs] == [(5, 8, 8), (7, 4, 4), (9, 2, 2), (10, 1, 1)]
    got = method(s, [t], batch(epoch=30))["reviewkd"].item()
    assert got == pytest.approx(review_reference(method, s, t, ramp=1.0), rel=1e-5)


# -- (2) the attention-based fusion -----------------------------------------------------------------------------
def test_abfs_are_built_from_probed_shapes_and_the_deepest_has_no_residual():
    s, t = outputs(STUDENT, 8, seed=5), outputs(TEACHER, 10, seed=6)
    method = built(s, t)
    assert len(method.abfs) == 4  # three stages and the pooled vector
    assert method.abfs[3].att_conv is None and all(a.att_conv is not None for a in method.abfs[:3])
    mid = 8  # min(512, the student's pooled channels)
    for abf, (c_s, *_), c_t in zip(method.abfs, [*STUDENT, (8,)], (5, 7, 9, 10)):
        assert abf.conv1[0].weight.shape == (mid, c_s, 1, 1) and abf.conv2[0].weight.shape == (c_t, mid, 3, 3)
    for abf in method.abfs[:3]:
        assert abf.att_conv[0].weight.shape == (2, 2 * mid, 1, 1)
    assert method.out_sizes == [(8, 8), (4, 4), (2, 2), (1, 1)]
    # the deepest ABF reads no residual; the others refuse to run without one
    out, res = method.abfs[3](s.pooled[:, :, None, None], None, (1, 1))
    assert out.shape == (N, 10, 1, 1) and res.shape == (N, mid, 1, 1)
    with pytest.raises(ValueError, match="residual"):
        method.abfs[2](s.stages[-1], None, (2, 2))


@pytest.mark.parametrize("pooled,mid_channels,expected", [(8, 0, 8), (1024, 0, 512), (1024, 32, 32)])
def test_fused_width_is_the_official_rule_or_set(pooled, mid_channels, expected):
    s, t = outputs(STUDENT, pooled, seed=7), outputs(TEACHER, 10, seed=8)
    method = built(s, t, mid_channels=mid_channels)
    assert all(abf.conv1[0].out_channels == expected for abf in method.abfs)


def test_attention_mixes_the_stage_with_the_upsampled_residual():
    """With the attention conv's weights zero, its two outputs are sigmoid(bias): the fused map is
    sigmoid(b0) * conv1(x) + sigmoid(b1) * nearest(residual); at the extremes it is one input or the other."""
    from kdbench_methods.reviewkd import ABF

    torch.manual_seed(0)
    abf = ABF(3, 4, 5, fuse=True).eval()  # BatchNorm with its running statistics: a fixed affine map
    x, residual = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)
    own = abf.conv1(x)
    up = residual.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    att = abf.att_conv[0]
    with torch.no_grad():
        att.weight.zero_()
        for b0, b1 in [(0.3, -1.2), (30.0, -30.0), (-30.0, 30.0)]:
            att.bias.copy_(torch.tensor([b0, b1]))
            out, fused = abf(x, residual, (4, 4))
            expected = torch.sigmoid(torch.tensor(b0)) * own + torch.sigmoid(torch.tensor(b1)) * up
            torch.testing.assert_close(fused, expected)
            torch.testing.assert_close(out, abf.conv2(expected))
        att.bias.copy_(torch.tensor([30.0, -30.0]))
        torch.testing.assert_close(abf(x, residual, (4, 4))[1], own, atol=1e-6, rtol=1e-5)
        att.bias.copy_(torch.tensor([-30.0, 30.0]))
        torch.testing.assert_close(abf(x, residual, (4, 4))[1], up, atol=1e-6, rtol=1e-5)
        # position by position: a weight map that differs across positions mixes each position apart
        att.weight.normal_()
        z = torch.sigmoid(att(torch.cat([own, up], 1)))
        torch.testing.assert_close(abf(x, residual, (4, 4))[1], own * z[:, :1] + up * z[:, 1:])


def test_a_deeper_stage_reaches_the_shallower_outputs_through_the_review():
    """The review path: changing the pooled vector changes every level's output (it is fused into each); changing
    the shallowest stage changes only the shallowest output."""
    s, t = outputs(STUDENT, 8, seed=9), outputs(TEACHER, 10, seed=10)
    method = built(s, t).eval()
    base = method.review(s)
    deep = method.review(Outputs(s.logits, s.stages, s.pooled + 1.0))
    assert all(not torch.allclose(a, b) for a, b in zip(base, deep))
    shallow = method.review(Outputs(s.logits, {**s.stages, -3: s.stages[-3] + 1.0}, s.pooled))
    assert not torch.allclose(base[0], shallow[0])
    assert all(torch.equal(a, b) for a, b in zip(base[1:], shallow[1:]))


# -- (3) gradients ----------------------------------------------------------------------------------------------
def test_gradients_reach_the_student_and_the_abfs_not_the_teacher():
    s, t = outputs(STUDENT, 8, seed=11, grad=True), outputs(TEACHER, 10, seed=12)
    method = built(s, t)
    method(s, [t], batch())["reviewkd"].backward()
    for f in [*s.stages.values(), s.pooled]:
        assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for f in [*t.stages.values(), t.pooled]:
        assert not f.requires_grad and f.grad is None


def test_gradients_with_real_models_leave_the_teacher_untouched():
    from tiny import TINY, TINY_SHAPE

    from kdbench import zoo
    from kdbench.features import FeatureCapture
    from kdbench.features import probe as probe_model
    from kdbench.train import freeze

    student = zoo.create("cifar_resnet8", **TINY)
    teacher = freeze(zoo.create("cifar_wrn_16_1", **TINY))
    method = build_method(REVIEWKD)
    taps = method.taps()
    method.setup(probe_model(student, taps, TINY_SHAPE), [probe_model(teacher, taps, TINY_SHAPE)])
    x = torch.randn(8, *TINY_SHAPE)
    with torch.no_grad():
        t_out = FeatureCapture(teacher, taps)(x)
    method(FeatureCapture(student, taps)(x), [t_out], batch())["reviewkd"].backward()
    assert all(p.grad is not None for n, p in student.named_parameters() if not n.startswith("fc."))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_a_batch_of_one_image_trains():
    """The pooled level of a last batch of one image is a single 1x1 map: no batch statistics, so the ABFs'
    BatchNorms use their running ones there (the official code stops with an error); larger levels use the batch's."""
    def first(o: Outputs) -> Outputs:
        return Outputs(o.logits[:1], {i: f[:1] for i, f in o.stages.items()}, o.pooled[:1])

    s1, t1 = outputs(STUDENT, 8, seed=17, grad=True), outputs(TEACHER, 10, seed=18)
    s, t = first(s1), first(t1)
    method = built(s, t)
    term = method(s, [t], batch())["reviewkd"]
    assert torch.isfinite(term)
    term.backward()
    assert s1.pooled.grad is not None and s1.pooled.grad[:1].abs().sum() > 0
    # the pooled level is normalised with the running statistics (initially mean 0, variance 1)
    deepest = method.abfs[3]
    x = s.pooled.detach()[:, :, None, None]
    expected = deepest.conv1[0](x) / math.sqrt(1 + deepest.conv1[1].eps)
    torch.testing.assert_close(method.review(s)[3], deepest.conv2[0](expected) / math.sqrt(1 + deepest.conv2[1].eps))
    assert torch.equal(deepest.conv1[1].running_mean, torch.zeros(8))  # and left unchanged


# -- (4) the warm-up --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup,epoch,ramp", [(20, 0, 1 / 20), (20, 4, 5 / 20), (20, 18, 19 / 20), (20, 19, 1.0),
                                               (20, 200, 1.0), (1, 0, 1.0), (0, 0, 1.0)])
def test_the_term_is_ramped_in_over_the_warm_up(warmup, epoch, ramp):
    s, t = outputs(STUDENT, 8, seed=13), outputs(TEACHER, 10, seed=14)
    method = built(s, t, warmup=warmup).eval()  # eval: BatchNorm's running statistics stay put between calls
    full = built(s, t, warmup=0).eval()(s, [t], batch(epoch))["reviewkd"]
    assert method.ramp(epoch) == pytest.approx(ramp)
    assert method.term_weights_at(epoch, 240) == ({} if ramp == 1.0 else {"reviewkd": pytest.approx(ramp)})
    # forward leaves the ramp to the engine (outside the compiled step); weigh applies it as the engine does
    assert method(s, [t], batch(epoch))["reviewkd"].item() == pytest.approx(full.item(), rel=1e-6)
    assert method.weigh(method(s, [t], batch(epoch)), epoch, 240)["reviewkd"].item() == \
        pytest.approx(ramp * full.item(), rel=1e-6)


def test_the_weight_scales_the_term():
    s, t = outputs(STUDENT, 8, seed=15), outputs(TEACHER, 10, seed=16)
    one = built(s, t, reviewkd_weight=1.0).eval()(s, [t], batch(30))["reviewkd"]
    five = built(s, t).eval()(s, [t], batch(30))["reviewkd"]
    assert five.item() == pytest.approx(5 * one.item(), rel=1e-6)


# -- (5) bad hyperparameters ------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    ({"reviewkd_weight": -1.0}, "reviewkd_weight must be >= 0"),
    ({"reviewkd_weight": float("nan")}, "reviewkd_weight must be"),
    ({"ce_weight": -0.5}, "ce_weight must be >= 0"),
    ({"warmup": -1}, "warmup must be a whole number of epochs >= 0"),
    ({"warmup": 2.5}, "warmup must be an integer"),
    ({"mid_channels": -4}, r"mid_channels must be a whole number >= 0 \(0: min\(512"),
    ({"stages": ()}, "stages must be one or more distinct"),
    ({"stages": (-1, -1)}, "stages must be one or more distinct"),
    ({"stages": (-1, -3, -2)}, "list stages shallow to deep"),
    ({"preact": "yes"}, "preact must be true or false"),
])
def test_out_of_range_hyperparameters_are_refused(overrides, match):
    with pytest.raises(KdbenchError, match=match):
        build_method(REVIEWKD, overrides)


# -- (6) pairs it cannot take -----------------------------------------------------------------------------------
CNN = {-3: (16, 8, 8), -2: (32, 4, 4), -1: (64, 2, 2)}


def test_setup_refuses_vector_stages():
    method = build_method(REVIEWKD)
    with pytest.raises(ValueError, match=r"reviewkd needs C x H x W stage maps, but stage -3 of mlp has shape \(30,\)"):
        method.setup(probe(CNN), [probe({-3: (30,), -2: (30,), -1: (30,)}, (30,), "mlp")])
    with pytest.raises(ValueError, match="C x H x W"):
        method.setup(probe({-3: (30,), -2: (30,), -1: (30,)}, (30,), "mlp"), [probe(CNN)])


def test_setup_refuses_a_model_without_a_pooled_vector():
    with pytest.raises(ValueError, match=r"reviewkd needs a pooled pre-logit vector \(its deepest level\), but t "
                                         r"gives None"):
        build_method(REVIEWKD).setup(probe(CNN), [probe(CNN, None, "t")])


def test_setup_refuses_stages_whose_maps_grow_with_depth():
    """Stages listed out of order (possible with mixed signs) would review a shallow map as a deep one."""
    method = build_method(REVIEWKD, {"stages": (3, -3)})
    stages = {3: (64, 2, 2), -3: (16, 8, 8)}
    with pytest.raises(ValueError, match=r"must not grow with depth, but those of s do \(3: 2x2, -3: 8x8\); "
                                         r"list the stages shallow to deep"):
        method.setup(probe(stages, model="s"), [probe(stages)])


def test_setup_accepts_different_channels_and_sizes():
    method = build_method(REVIEWKD)
    method.setup(probe({-3: (240, 16, 16), -2: (480, 8, 8), -1: (960, 4, 4)}, (960,)),
                 [probe({-3: (64, 32, 32), -2: (128, 16, 16), -1: (256, 8, 8)}, (256,))])
    assert method.out_sizes == [(32, 32), (16, 16), (8, 8), (1, 1)]
    assert method.abfs[0].conv1[0].out_channels == 512


def test_kdbench_leaves_reviewkd_out_of_a_cnn_to_mlp_pair(tmp_path, capsys):
    """Planned (a dry run): the MLP pair gets a note, the CNN pair is kept."""
    from kdbench.cli import main

    code = main(["run", "--methods", "reviewkd", "--pairs", "cifar_resnet8:hinton_mlp_30,cifar_resnet14:cifar_resnet8",
                 "--seeds", "0", "--limit", "48", "--epochs", "1", "--quiet", "--dry-run",
                 "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "left out: method 'reviewkd'" in out and "hinton_mlp_30" in out
    assert "cifar_resnet14→cifar_resnet8" in out
