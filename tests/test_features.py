"""Feature capture over real timm models: the capturing pass must not change the logits."""

from __future__ import annotations

import pytest
import timm
import torch

from kdbench import zoo
from kdbench.errors import KdbenchError
from kdbench.features import FeatureCapture, has_intermediates, probe
from kdbench.method import Taps
from kdbench.models import CRD_TO_TIMM

# timm's own families (forward_intermediates) and ones without it (forward hooks), at 32x32.
TIMM_MODELS = ["resnet18", "mobilenetv3_small_050", "convnext_atto", "efficientnet_b0", "vgg11",
               "vit_tiny_patch16_224"]
ZOO_MODELS = sorted(CRD_TO_TIMM.values()) + ["hinton_mlp_800", "hinton_mlp_1200"]


def build(name: str) -> torch.nn.Module:
    in_chans, size = (1, 28) if name.startswith("hinton_") else (3, 32)
    model = zoo.create(name, num_classes=10, in_chans=in_chans, img_size=size).eval()
    return model, (in_chans, size, size)


@pytest.mark.parametrize("name", TIMM_MODELS + ZOO_MODELS)
def test_capture_logits_equal_plain_forward(name):
    model, shape = build(name)
    x = torch.randn(2, *shape)
    n = len(model.feature_info)
    taps = Taps(stages=tuple(sorted({0, n // 2, -1})), pooled=True)
    with torch.no_grad():
        expected = model(x)
        out = FeatureCapture(model, taps, name)(x)
    torch.testing.assert_close(out.logits, expected)
    assert set(out.stages) == set(taps.stages)
    assert out.pooled is not None and out.pooled.shape[0] == 2
    assert out.pooled.flatten(1).shape[1] == (getattr(model, "head_hidden_size", None) or model.num_features)


@pytest.mark.parametrize("name", [m for m in TIMM_MODELS + ZOO_MODELS if not m.startswith("vit")])
def test_hook_path_matches_forward_intermediates(name):
    """The fallback (hooks on feature_info modules) sees the same maps as forward_intermediates."""
    model, shape = build(name)
    if not has_intermediates(model):
        pytest.skip(f"{name} has no forward_intermediates: only the hook path exists, tested above")
    x = torch.randn(2, *shape)
    taps = Taps(stages=tuple(range(len(model.feature_info))), pooled=True)
    with torch.no_grad():
        a = FeatureCapture(model, taps, name)(x)
        b = FeatureCapture(model, taps, name, force_hooks=True)(x)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.pooled.flatten(1), b.pooled.flatten(1))
    for i in taps.stages:
        torch.testing.assert_close(a.stages[i], b.stages[i], msg=f"{name} stage {i}")


def test_probe_reports_shapes_and_leaves_batchnorm_alone():
    model, shape = build("cifar_resnet20")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = probe(model, Taps(stages=(2,), pooled=True), shape, "cifar_resnet20")
    assert p.stages == {2: (32, 16, 16)} and p.pooled == (64,) and p.num_classes == 10
    assert model.training  # mode restored
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])  # no running-stat update from the dummy batch


def test_bad_stage_index_is_a_clear_error():
    model, _ = build("cifar_resnet20")
    with pytest.raises(KdbenchError, match="has 4 stages.*stage 7 does not exist"):
        FeatureCapture(model, Taps(stages=(7,)), "cifar_resnet20")


def test_our_names_shadow_no_timm_model():
    ours = set(ZOO_MODELS)
    for name in ours:
        assert name.startswith(("cifar_", "hinton_"))
        assert timm.models.get_arch_name(name) == name
    assert not ours & {"vgg11", "vgg13", "vgg16", "vgg19", "resnet50"}
