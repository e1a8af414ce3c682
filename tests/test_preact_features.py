"""Pre-activation stage maps (``forward_intermediates(preact=True)``, ``Taps(preact=True)``).

What RepDistiller's ``model(x, is_feat=True, preact=True)`` returns, model family by family
(HobbitLong/RepDistiller ``models/*.py``):

* resnet*, ResNet50, vgg*, ShuffleV1: each stage past the stem is the map before its final ReLU,
  so ``relu(preact) == stage``; the stem is the same post-ReLU map as without ``preact``.
* ShuffleV2: ``cat([x1, bn3(conv3(...))])`` of the stage's last block, before that half's ReLU
  and before the channel shuffle: ``channel_shuffle(relu(preact), 2) == stage``.
* WRN (pre-activation blocks, whose stage maps are raw residual sums): each stage past the stem
  through the BatchNorm that comes next (``block2.layer[0].bn1``, ``block3.layer[0].bn1``, the
  final ``bn1``), so ``relu(preact)`` is the next block's first activation (the pooled map for
  the last stage).
* MobileNetV2 ignores ``preact``: the same maps (its stages end in linear bottlenecks).

The logits never change, and models without the support (the MLPs, timm's) are refused clearly.
"""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdbench.models  # noqa: F401  (registers the zoo in timm)
from kdbench import zoo
from kdbench.errors import KdbenchError
from kdbench.features import FeatureCapture, probe
from kdbench.method import Taps
from kdbench.models import CRD_TO_TIMM
from kdbench.models.cifar_shufflenet import channel_shuffle

ZOO = sorted(CRD_TO_TIMM.values())
RELU = [n for n in ZOO if n.startswith(("cifar_resnet", "cifar_vgg")) or n == "cifar_shufflenetv1"]
BATCH = 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affines, so pre- and post-BN maps differ."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.1)


@functools.lru_cache(maxsize=None)
def _run(name: str) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=100).eval()
    _randomise_bn(model)
    x = torch.randn(BATCH, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        final, feats = model.forward_intermediates(x)
        pre_final, pre = model.forward_intermediates(x, preact=True)
    return dict(model=model, x=x, logits=logits, final=final, feats=feats, pre_final=pre_final, pre=pre)


@pytest.mark.parametrize("name", ZOO)
def test_every_crd_zoo_model_supports_preact_and_keeps_its_logits(name):
    run = _run(name)
    assert run["model"].supports_preact
    torch.testing.assert_close(run["pre_final"], run["final"], rtol=0, atol=0)
    torch.testing.assert_close(run["model"].forward_head(run["pre_final"]), run["logits"], rtol=0, atol=0)
    assert [p.shape for p in run["pre"]] == [f.shape for f in run["feats"]]
    # the stem is returned unchanged, as RepDistiller does
    torch.testing.assert_close(run["pre"][0], run["feats"][0], rtol=0, atol=0)


@pytest.mark.parametrize("name", RELU)
def test_relu_of_preact_is_the_stage_map(name):
    run = _run(name)
    for i, (p, f) in enumerate(zip(run["pre"][1:], run["feats"][1:]), 1):
        assert (p < 0).any(), f"{name} stage {i}: no negative value, so not before the ReLU"
        torch.testing.assert_close(F.relu(p), f, rtol=0, atol=0, msg=f"{name} stage {i}")


def test_shufflenetv2_preact_is_unshuffled_and_before_the_branch_relu():
    run = _run("cifar_shufflenetv2")
    for i, (p, f) in enumerate(zip(run["pre"][1:], run["feats"][1:]), 1):
        assert (p < 0).any()
        torch.testing.assert_close(channel_shuffle(F.relu(p), 2), f, rtol=0, atol=0, msg=f"stage {i}")
        half = p.shape[1] // 2
        assert (p[:, :half] >= 0).all()  # x1, a previous block's (activated) output, passes untouched


@pytest.mark.parametrize("name", [n for n in ZOO if n.startswith("cifar_wrn")])
def test_wrn_preact_is_the_next_batchnorm_of_the_residual_sum(name):
    run = _run(name)
    m, feats, pre = run["model"], run["feats"], run["pre"]
    with torch.no_grad():
        for i, bn in ((1, m.block2.layer[0].bn1), (2, m.block3.layer[0].bn1), (3, m.bn1)):
            torch.testing.assert_close(pre[i], bn(feats[i]), rtol=0, atol=0, msg=f"stage {i}")
        # relu(preact) is what the next block activates; for the last stage, the pooled map
        torch.testing.assert_close(F.relu(pre[1]), m.block2.layer[0].relu1(m.block2.layer[0].bn1(feats[1])))
        torch.testing.assert_close(F.relu(pre[3]), run["final"], rtol=0, atol=0)
    assert all((p < 0).any() for p in pre[1:])


def test_mobilenetv2_preact_maps_are_its_maps():
    run = _run("cifar_mobilenetv2")
    for p, f in zip(run["pre"], run["feats"]):
        torch.testing.assert_close(p, f, rtol=0, atol=0)


# -- each family's pre-activation recomputed from its submodules, as RepDistiller defines it ----


def _stage_inputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """The input of each stage (the previous stage's output; the image for the stem)."""
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
    return [x, *feats[:-1]]


def _after_all_but_last(seq: nn.Sequential, x: Tensor) -> Tensor:
    for block in list(seq)[:-1]:
        x = block(x)
    return x


def test_resnet_basic_block_preact_by_hand():
    run = _run("cifar_resnet8x4")
    m, inputs = run["model"], _stage_inputs(run["model"], run["x"])
    with torch.no_grad():
        for i, layer in enumerate((m.layer1, m.layer2, m.layer3), 1):
            h = _after_all_but_last(layer, inputs[i])
            b = layer[-1]
            residual = h if b.downsample is None else b.downsample(h)
            want = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h))))) + residual
            torch.testing.assert_close(run["pre"][i], want)


def test_resnet50_bottleneck_preact_by_hand():
    run = _run("cifar_resnet50")
    m, inputs = run["model"], _stage_inputs(run["model"], run["x"])
    with torch.no_grad():
        for i, layer in enumerate((m.layer1, m.layer2, m.layer3, m.layer4), 1):
            h = _after_all_but_last(layer, inputs[i])
            b = layer[-1]
            out = F.relu(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h))))))
            torch.testing.assert_close(run["pre"][i], b.bn3(b.conv3(out)) + b.shortcut(h))


def test_vgg_preact_by_hand():
    """RepDistiller's blocks end in BatchNorm (their last ReLU stripped); pool3 only for 64-high inputs."""
    run = _run("cifar_vgg13")
    m, inputs = run["model"], _stage_inputs(run["model"], run["x"])
    pools = (m.pool0, m.pool1, m.pool2, nn.Identity())
    with torch.no_grad():
        for i, block in enumerate((m.block1, m.block2, m.block3, m.block4), 1):
            assert isinstance(block[-1], nn.ReLU) and isinstance(block[-2], nn.BatchNorm2d)
            torch.testing.assert_close(run["pre"][i], block[:-1](pools[i - 1](inputs[i])))


def test_shufflenet_preacts_by_hand():
    v1 = _run("cifar_shufflenetv1")
    inputs = _stage_inputs(v1["model"], v1["x"])
    with torch.no_grad():
        for i, layer in enumerate((v1["model"].layer1, v1["model"].layer2, v1["model"].layer3), 1):
            h = _after_all_but_last(layer, inputs[i])
            b = layer[-1]
            out = F.relu(b.bn2(b.conv2(b.shuffle1(F.relu(b.bn1(b.conv1(h)))))))
            out = b.bn3(b.conv3(out))
            want = torch.cat([out, b.shortcut(h)], 1) if b.stride == 2 else out + b.shortcut(h)
            torch.testing.assert_close(v1["pre"][i], want)
    v2 = _run("cifar_shufflenetv2")
    inputs = _stage_inputs(v2["model"], v2["x"])
    with torch.no_grad():
        for i, layer in enumerate((v2["model"].layer1, v2["model"].layer2, v2["model"].layer3), 1):
            h = _after_all_but_last(layer, inputs[i])
            b = layer[-1]
            c = h.shape[1] // 2
            branch = b.bn3(b.conv3(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h[:, c:])))))))
            torch.testing.assert_close(v2["pre"][i], torch.cat([h[:, :c], branch], 1))


# -- the timm interface around it ----------------------------------------------------------------


def test_indices_stop_early_and_intermediates_only_with_preact():
    run = _run("cifar_resnet20")
    model, x, pre = run["model"], run["x"], run["pre"]
    with torch.no_grad():
        picked = model.forward_intermediates(x, indices=[0, -1], preact=True, intermediates_only=True)
        last2 = model.forward_intermediates(x, indices=2, preact=True, intermediates_only=True)
        early, partial = model.forward_intermediates(x, indices=[2], preact=True, stop_early=True)
        normed = model.forward_intermediates(x, indices=1, preact=True, norm=True, intermediates_only=True)
    torch.testing.assert_close(picked, [pre[0], pre[-1]])
    torch.testing.assert_close(last2, pre[-2:])
    torch.testing.assert_close(partial, [pre[2]])
    torch.testing.assert_close(early, run["feats"][2])  # the stage's output, not its pre-activation
    torch.testing.assert_close(normed, [pre[-1]])  # norm does not apply to a pre-activation map


def test_features_only_is_unchanged():
    net = timm.create_model("cifar_resnet8", features_only=True, out_indices=(1, 3))
    net.eval()
    x = torch.randn(BATCH, 3, 32, 32)
    with torch.no_grad():
        feats = net(x)
        plain = net.model.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
    torch.testing.assert_close(feats, plain)
    assert all((f >= 0).all() for f in feats)  # post-activation, as before


def test_capture_gives_preact_maps_and_the_same_logits():
    run = _run("cifar_vgg8")
    model, x = run["model"], run["x"]
    with torch.no_grad():
        out = FeatureCapture(model, Taps(stages=(-4, -3, -2, -1), preact=True, pooled=True), "cifar_vgg8")(x)
        plain = FeatureCapture(model, Taps(stages=(-4, -3, -2, -1), pooled=True), "cifar_vgg8")(x)
    torch.testing.assert_close(out.logits, run["logits"], rtol=0, atol=0)
    torch.testing.assert_close(out.pooled, plain.pooled, rtol=0, atol=0)
    for i in (-4, -3, -2, -1):
        torch.testing.assert_close(out.stages[i], run["pre"][i])
        torch.testing.assert_close(F.relu(out.stages[i]), plain.stages[i], rtol=0, atol=0)


def test_probe_with_preact_reports_the_stage_shapes():
    model = zoo.create("cifar_shufflenetv2", num_classes=10, in_chans=3, img_size=32)
    taps = Taps(stages=(1, 2, 3), preact=True)
    assert probe(model, taps, (3, 32, 32)).stages == probe(model, Taps(stages=(1, 2, 3)), (3, 32, 32)).stages


@pytest.mark.parametrize("name", ["cifar_wrn_16_1", "cifar_resnet8"])
def test_preact_in_training_mode_leaves_the_state_as_a_plain_forward_does(name):
    """WRN's preact is BatchNorm applied once more; it must not update the running statistics twice
    (RepDistiller's second call does). Values: the batch statistics, as the BatchNorm itself computes."""
    torch.manual_seed(1)
    a = zoo.create(name, num_classes=10, in_chans=3, img_size=32).train()
    b = zoo.create(name, num_classes=10, in_chans=3, img_size=32).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fa, feats = a.forward_intermediates(x)
        fb, pre = b.forward_intermediates(x, preact=True)
    torch.testing.assert_close(fa, fb, rtol=0, atol=0)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0, msg=k)
    if name.startswith("cifar_wrn"):
        with torch.no_grad():
            want = F.batch_norm(feats[1], None, None, b.block2.layer[0].bn1.weight, b.block2.layer[0].bn1.bias,
                                True, 0.0, b.block2.layer[0].bn1.eps)
        torch.testing.assert_close(pre[1], want)


def test_gradients_flow_through_preact_maps():
    model = zoo.create("cifar_resnet8", num_classes=10, in_chans=1, img_size=8).train()
    out = FeatureCapture(model, Taps(stages=(1, 2, 3), preact=True))(torch.randn(4, 1, 8, 8))
    sum(s.square().sum() for s in out.stages.values()).backward()
    assert model.conv1.weight.grad is not None and model.layer3[-1].bn2.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None  # the logits took no part


@pytest.mark.parametrize("name", ["cifar_resnet8", "cifar_wrn_16_1"])
def test_preact_capture_traces_as_one_graph(name):
    """The training step may be compiled: the preact path must not break the graph."""
    import torch._dynamo

    model = zoo.create(name, num_classes=10, in_chans=1, img_size=8).train()
    cap = FeatureCapture(model, Taps(stages=(1, 2, 3), preact=True))

    def f(x):
        out = cap(x)
        return out.logits, list(out.stages.values())

    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(torch.randn(2, 1, 8, 8))
    assert not explained.break_reasons and explained.graph_count == 1


# -- models without the support are refused clearly ---------------------------------------------


@pytest.mark.parametrize("name", ["hinton_mlp_30", "resnet18"])
def test_models_without_preact_are_refused_at_capture(name):
    shape = (1, 28, 28) if name.startswith("hinton") else (3, 32, 32)
    model = zoo.create(name, num_classes=10, in_chans=shape[0], img_size=shape[1])
    assert not getattr(model, "supports_preact", False)
    with pytest.raises(KdbenchError, match=f"model '{name}' cannot give its stage maps before their final activation"):
        FeatureCapture(model, Taps(stages=(-1,), preact=True), name)
    FeatureCapture(model, Taps(stages=(-1,)), name)  # without preact it is fine


def test_zoo_model_without_support_refuses_preact_in_forward_intermediates():
    model = zoo.create("hinton_mlp_30", num_classes=10, in_chans=1, img_size=28)
    with pytest.raises(KdbenchError, match="HintonMLP cannot give its stage maps before their final activation"):
        model.forward_intermediates(torch.randn(BATCH, 1, 28, 28), preact=True)
