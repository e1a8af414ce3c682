"""Factor transfer (Kim et al. 2018) as the CRD benchmark runs it: RepDistiller's ``Paraphraser`` trained for 30
epochs to reconstruct the teacher's last stage map, then its frozen factor matched by a ``Translator`` of the
student's map with ``FactorTransfer`` (p1 = 2, p2 = 1), weight 200; written out independently here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from init_stage import block_mean, one_init_epoch_row, tiny_models
from tiny import TINY_SHAPE
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.features import FeatureCapture, probe
from kdbench.method import Batch, Outputs, Probe
from kdbench.registry import build_method, load_methods

FT = load_methods()["ft"]


def fixed(n: int = 4, stage: str = "train") -> tuple[Outputs, Outputs, Batch]:
    """Stage -1: student 4 channels 4x4, teacher 6 channels 2x2; stage -2: student 2x2, teacher 4x4."""
    g = torch.Generator().manual_seed(5)
    s = Outputs(torch.randn(n, 5, generator=g), {-1: torch.randn(n, 4, 4, 4, generator=g).relu(),
                                                  -2: torch.randn(n, 4, 2, 2, generator=g).relu()})
    t = Outputs(torch.randn(n, 5, generator=g), {-1: torch.randn(n, 6, 2, 2, generator=g).relu(),
                                                  -2: torch.randn(n, 6, 4, 4, generator=g).relu()})
    return s, t, Batch(torch.zeros(n, 1, 8, 8), torch.zeros(n, dtype=torch.long), 0, 1, stage=stage)


def shapes(o: Outputs) -> dict[int, tuple[int, ...]]:
    return {i: tuple(v.shape[1:]) for i, v in o.stages.items()}


def built(s: Outputs, t: Outputs, **overrides):
    torch.manual_seed(0)
    m = build_method(FT, overrides)
    m.setup(Probe("s", 5, shapes(s), None), [Probe("t", 5, shapes(t), None)])
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # BatchNorm scales and shifts away from 1 and 0, so that they are checked too
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(1 + 0.5 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.5 * torch.randn(mod.bias.shape, generator=g))
    return m


# -- RepDistiller's modules and loss in float64, written out -------------------------------------------
def lrelu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, 0.1 * x)


def conv3(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """A 3x3 convolution, stride 1, padding 1: y[o, h, w] = b[o] + Σ_{c,i,j} x[c, h+i-1, w+j-1] · W[o, c, i, j]."""
    w, b = conv.weight.detach().double(), conv.bias.detach().double()
    h, wd = x.shape[2:]
    xp = F.pad(x, (1, 1, 1, 1))
    out = b.view(1, -1, 1, 1).expand(x.shape[0], -1, h, wd).clone()
    for i in range(3):
        for j in range(3):
            out += torch.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    return out


def conv_t3(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """A 3x3 transposed convolution, stride 1, padding 1:
    y[o, h, w] = b[o] + Σ_{c,i,j} x[c, h-i+1, w-j+1] · W[c, o, i, j]."""
    w, b = conv.weight.detach().double(), conv.bias.detach().double()
    h, wd = x.shape[2:]
    xp = F.pad(x, (1, 1, 1, 1))
    out = b.view(1, -1, 1, 1).expand(x.shape[0], -1, h, wd).clone()
    for i in range(3):
        for j in range(3):
            out += torch.einsum("nchw,co->nohw", xp[:, :, 2 - i:2 - i + h, 2 - j:2 - j + wd], w[:, :, i, j])
    return out


def batch_norm_train(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """BatchNorm in train mode: each channel normalised by the batch's mean and biased variance."""
    mean = x.mean((0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)
    return ((x - mean) / torch.sqrt(var + bn.eps) * bn.weight.detach().double().view(1, -1, 1, 1)
            + bn.bias.detach().double().view(1, -1, 1, 1))


def layers(seq: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in seq if isinstance(m, kind)]


def translator(x: torch.Tensor, m) -> torch.Tensor:
    """RepDistiller's Translator (use_bn=True) in train mode: three (conv, BN, LeakyReLU(0.1))."""
    x = x.double()
    for conv, bn in zip(layers(m.translator, nn.Conv2d), layers(m.translator, nn.BatchNorm2d), strict=True):
        x = lrelu(batch_norm_train(conv3(x, conv), bn))
    return x


def paraphraser_encoder(x: torch.Tensor, m) -> torch.Tensor:
    """RepDistiller's Paraphraser encoder (use_bn=False): three (conv, LeakyReLU(0.1))."""
    x = x.double()
    for conv in layers(m.paraphraser.encoder, nn.Conv2d):
        x = lrelu(conv3(x, conv))
    return x


def paraphraser_reconstruction(x: torch.Tensor, m) -> torch.Tensor:
    x = paraphraser_encoder(x, m)
    for conv in layers(m.paraphraser.decoder, nn.ConvTranspose2d):
        x = lrelu(conv_t3(x, conv))
    return x


def factor_by_loops(f: torch.Tensor, p: float) -> list[list[float]]:
    """Per sample: a[h, w] = mean_c |f[c, h, w]|^p over the positions, divided by its L2 norm."""
    out = []
    for b in range(f.shape[0]):
        a = [sum(abs(float(f[b, c, h, w])) ** p for c in range(f.shape[1])) / f.shape[1]
             for h in range(f.shape[2]) for w in range(f.shape[3])]
        norm = math.sqrt(sum(v * v for v in a))
        out.append([v / norm for v in a])
    return out


def ft_reference(f_s: torch.Tensor, f_t: torch.Tensor, factor_p: float, distance_p: float) -> float:
    """RepDistiller's FactorTransfer.factor_loss: pool the larger map, mean over batch and positions of |Δ|^p2."""
    size = min(f_s.shape[2], f_t.shape[2])
    a_s, a_t = factor_by_loops(block_mean(f_s, size), factor_p), factor_by_loops(block_mean(f_t, size), factor_p)
    diffs = [abs(x - y) ** distance_p for rs, rt in zip(a_s, a_t) for x, y in zip(rs, rt)]
    return sum(diffs) / len(diffs)


# -- tests ----------------------------------------------------------------------------------------------
def test_defaults_are_crds():
    m = build_method(FT)
    assert m.config() == {"ce_weight": 1.0, "ft_weight": 200.0, "rec_weight": 1.0, "init_epochs": 30, "stage": -1,
                          "rate": 0.5, "factor_p": 2.0, "distance_p": 1.0, "paraphraser_bn": False,
                          "init_lr_scale": 0.2}
    assert m.init_lr_scale == 0.2  # RepDistiller's 0.01 for ResNet/WRN students, over the recipe's 0.05
    assert m.init_epochs == 30 and m.taps().stages == (-1,) and not m.taps().pooled
    assert "Factor Transfer" in FT.paper and "NeurIPS 2018" in FT.paper


def test_paraphraser_and_translator_are_repdistillers_built_from_probed_shapes():
    m = build_method(FT)
    m.setup(Probe("s", 5, {-1: (4, 4, 4)}, None), [Probe("t", 5, {-1: (6, 2, 2)}, None)])

    def convs(seq, kind):
        return [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in layers(seq, kind)]

    k3 = ((3, 3), (1, 1), (1, 1))
    assert convs(m.paraphraser.encoder, nn.Conv2d) == [(6, 6, *k3), (6, 3, *k3), (3, 3, *k3)]
    assert convs(m.paraphraser.decoder, nn.ConvTranspose2d) == [(3, 3, *k3), (3, 6, *k3), (6, 6, *k3)]
    assert not layers(m.paraphraser.modules(), nn.BatchNorm2d)  # Paraphraser(use_bn=False)
    assert convs(m.translator, nn.Conv2d) == [(4, 4, *k3), (4, 3, *k3), (3, 3, *k3)]
    assert [b.num_features for b in layers(m.translator, nn.BatchNorm2d)] == [4, 3, 3]  # Translator(use_bn=True)
    assert all(s.negative_slope == 0.1 for s in layers(m.modules(), nn.LeakyReLU))

    def conv_params(i, o):
        return i * o * 9 + o

    paraphraser = sum(conv_params(i, o) for i, o in [(6, 6), (6, 3), (3, 3), (3, 3), (3, 6), (6, 6)])
    translator = sum(conv_params(i, o) + 2 * o for i, o in [(4, 4), (4, 3), (3, 3)])
    assert m.extra_parameters() == paraphraser + translator
    assert m.paraphraser(torch.randn(2, 6, 2, 2)).shape == (2, 6, 2, 2)


@pytest.mark.parametrize("stage", [-1, -2], ids=["student-larger", "teacher-larger"])
def test_init_stage_is_the_paraphrasers_reconstruction_error(stage):
    s, t, _ = fixed()
    m = built(s, t, stage=stage, rec_weight=0.5)
    terms = m(s, [t], Batch(None, None, 0, 1, stage="init"))
    assert set(terms) == {"rec"}
    f_t = t.stages[stage].double()
    expected = 0.5 * float(((paraphraser_reconstruction(f_t, m) - f_t) ** 2).mean())
    assert terms["rec"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("stage", [-1, -2], ids=["student-larger", "teacher-larger"])
@pytest.mark.parametrize("factor_p,distance_p", [(2.0, 1.0), (1.0, 2.0)])
def test_schedule_term_matches_factor_transfer_written_out(stage, factor_p, distance_p):
    s, t, batch = fixed()
    m = built(s, t, stage=stage, ft_weight=3.0, factor_p=factor_p, distance_p=distance_p)
    terms = m(s, [t], batch)
    assert set(terms) == {"ft"} and m.ce_weight_at(0, 240) == 1.0
    f_s = translator(s.stages[stage], m)
    f_t = paraphraser_encoder(t.stages[stage], m)
    expected = 3.0 * ft_reference(f_s, f_t, factor_p, distance_p)
    assert terms["ft"].item() == pytest.approx(expected, rel=1e-5)


def test_a_paraphraser_with_batchnorm_is_frozen_on_its_running_statistics():
    """paraphraser_bn=True: the init stage trains it in train mode (its statistics move); after it, its factor
    uses the running statistics (one image's target does not depend on its batch) and leaves them alone."""
    s, t, batch = fixed()
    m = built(s, t, paraphraser_bn=True)
    bns = layers(m.paraphraser.modules(), nn.BatchNorm2d)
    assert len(bns) == 6
    m(s, [t], Batch(None, None, 0, 1, stage="init"))
    assert all(int(bn.num_batches_tracked) == 1 for bn in bns)
    stats = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    m(s, [t], batch)
    assert all(int(bn.num_batches_tracked) == 1 for bn in bns)
    assert all(torch.equal(bn.running_mean, mu) and torch.equal(bn.running_var, var)
               for bn, (mu, var) in zip(bns, stats))
    f_t = t.stages[-1]
    whole = m.paraphraser.frozen_factor(f_t)
    assert torch.allclose(whole[:1], m.paraphraser.frozen_factor(f_t[:1]), atol=1e-6)
    m.paraphraser.eval()
    assert torch.allclose(whole, m.paraphraser.encoder(f_t), atol=1e-6)  # what eval mode computes


def _forward(method, student, teacher, stage: str):
    taps = method.taps()
    x = torch.randn(16, *TINY_SHAPE)
    y = torch.randint(0, 10, (16,))
    out = FeatureCapture(student, taps)(x)
    with torch.no_grad():
        t_out = FeatureCapture(teacher, taps)(x)
    return out, y, method(out, [t_out], Batch(x, y, 0, 1, stage=stage))


def _ready():
    method = build_method(FT)
    student, teacher = tiny_models()
    method.setup(probe(student, method.taps(), TINY_SHAPE), [probe(teacher, method.taps(), TINY_SHAPE)])
    student.train()
    return method, student, teacher


def _has_grad(module: nn.Module) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()}


def test_the_init_stage_trains_the_paraphraser_alone():
    method, student, teacher = _ready()
    _, _, terms = _forward(method, student, teacher, "init")
    assert set(terms) == {"rec"}
    terms["rec"].backward()
    assert all(_has_grad(method.paraphraser).values())
    assert all(p.grad is None for p in method.translator.parameters())
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_the_schedule_trains_student_and_translator_not_the_paraphraser():
    method, student, teacher = _ready()
    out, y, terms = _forward(method, student, teacher, "train")
    assert set(terms) == {"ft"}
    terms["ft"].backward()  # the FT term alone: it reaches the student's features, not its classifier
    grads = _has_grad(student)
    assert not grads["fc.weight"] and all(v for n, v in grads.items() if not n.startswith("fc."))
    assert all(_has_grad(method.translator).values())
    assert all(p.grad is None for p in method.paraphraser.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    method.zero_grad(set_to_none=True)
    student.zero_grad(set_to_none=True)
    out, y, terms = _forward(method, student, teacher, "train")
    (terms["ft"] + F.cross_entropy(out.logits, y)).backward()  # what the engine adds: CE weight 1
    assert all(_has_grad(student).values())


def test_engine_trains_the_paraphraser_in_the_init_stage_then_freezes_it():
    """Through the engine: the init epoch moves the paraphraser alone (the student's weights stay; its BatchNorm
    statistics may move, as the engine runs it in train mode); the schedule's epoch moves the student and the
    translator but not the paraphraser; the teacher never moves; both epochs are timed and reported."""
    from kdbench.data import load_dataset
    from kdbench.recipe import get_recipe
    from kdbench.train import train

    method = build_method(FT, {"init_epochs": 1})
    student, teacher = tiny_models()
    method.setup(probe(student, method.taps(), TINY_SHAPE), [probe(teacher, method.taps(), TINY_SHAPE)])

    def params():
        return ({n: p.detach().clone() for n, p in student.named_parameters()},
                {n: p.detach().clone() for n, p in method.named_parameters()})

    before = params()
    t_snap = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []

    class Progress:  # the engine's progress bar: advanced once per epoch, init stage included
        def set_postfix(self, **kw):
            pass

        def update(self, n=1):
            seen.append(params())

    result = train(student, load_dataset("digits", limit=64), get_recipe("digits").with_epochs(1), seed=0,
                   method=method, teachers=[teacher], progress=Progress())
    assert len(seen) == 2 and result.init_epochs == 1 and len(result.history) == 1

    def moved(a, b, prefix=""):
        return {n for n in a if n.startswith(prefix) and not torch.equal(a[n], b[n])}

    (s0, m0), (s1, m1), (s2, m2) = before, *seen
    assert not moved(s0, s1) and not moved(m0, m1, "translator.")
    assert moved(m0, m1, "paraphraser.") == {n for n in m0 if n.startswith("paraphraser.")}
    assert moved(s1, s2) == set(s1)
    assert not moved(m1, m2, "paraphraser.") and moved(m1, m2, "translator.")
    assert all(torch.equal(v, t_snap[k]) for k, v in teacher.state_dict().items())
    assert [set(h) for h in result.init_losses] == [{"rec"}] and math.isfinite(result.init_losses[0]["rec"])
    assert set(result.last.losses) == {"ce", "ft"}
    assert sorted(result.epoch_train_s) == [0, 1]
    assert result.train_time_s >= sum(result.epoch_train_s.values())


def test_traces_as_one_graph_in_each_stage():
    import torch._dynamo

    s, t, batch = fixed()
    m = built(s, t, paraphraser_bn=True)
    for stage in ("init", "train"):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(m)(s, [t], Batch(None, None, 0, 1, stage=stage))
        assert not explained.break_reasons and explained.graph_count == 1, stage


def test_vectors_and_empty_factors_are_refused_at_setup():
    with pytest.raises(ValueError, match="C x H x W stage maps"):
        build_method(FT).setup(Probe("mlp", 5, {-1: (30,)}, None), [Probe("t", 5, {-1: (6, 2, 2)}, None)])
    with pytest.raises(ValueError, match="factor of no channels"):
        build_method(FT, {"rate": 0.1}).setup(Probe("s", 5, {-1: (4, 2, 2)}, None),
                                              [Probe("t", 5, {-1: (6, 2, 2)}, None)])


@pytest.mark.parametrize("overrides,message", [
    ({"init_epochs": -1}, "init_epochs must be a whole number of epochs >= 0"),
    ({"init_epochs": 2.5}, "init_epochs must be an integer"),
    ({"ft_weight": -1.0}, "ft_weight must be >= 0"),
    ({"rec_weight": -1.0}, "rec_weight must be >= 0"),
    ({"ce_weight": -1.0}, "ce_weight must be >= 0"),
    ({"rec_weight": 0.0}, "rec_weight must be > 0 while init_epochs > 0"),
    ({"ft_weight": 0.0, "ce_weight": 0.0}, "nothing trains after the init stage"),
    ({"rate": 0.0}, "rate"),
    ({"rate": float("inf")}, "rate"),
    ({"factor_p": 0.0}, "factor_p must be > 0"),
    ({"distance_p": -1.0}, "distance_p must be > 0"),
    ({"stage": 1.5}, "stage must be an integer"),
])
def test_out_of_range_hyperparameters_are_refused(overrides, message):
    with pytest.raises(KdbenchError, match=message):
        build_method(FT, overrides)


def test_constructor_refuses_a_fractional_init_stage():
    with pytest.raises(ValueError, match="whole number"):
        FT(init_epochs=0.5)
    assert FT(init_epochs=0).init_epochs == 0


def test_end_to_end_cli_run_with_a_one_epoch_init_stage(tmp_path):
    """ft on a pair of different widths (cifar_resnet8x4 -> cifar_resnet8): its row records the one-epoch init
    stage (the reconstruction loss) and the schedule's CE and FT terms."""
    row = one_init_epoch_row(tmp_path, "ft", "cifar_resnet8x4:cifar_resnet8", "rec")
    assert {k for k in row if k.startswith("loss.")} == {"loss.ce", "loss.ft"}
    assert all(math.isfinite(row[k]) for k in ("loss.ce", "loss.ft", "top1_last"))
    # teacher 256 channels at the last stage -> factor 128; student 64 -> translator to 128
    paraphraser = sum(i * o * 9 + o for i, o in [(256, 256), (256, 128), (128, 128), (128, 128), (128, 256),
                                                 (256, 256)])
    translator = sum(i * o * 9 + 3 * o for i, o in [(64, 64), (64, 128), (128, 128)])
    assert row["extra_params"] == paraphraser + translator
