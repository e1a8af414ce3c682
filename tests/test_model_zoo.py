"""The CIFAR model zoo and the Hinton MLPs: layout parity with RepDistiller, timm interface.

Every CRD model in ``CRD_TO_TIMM`` is checked against the vendored reference facts
(``tests/reference/repdistiller_models.json``): same state-dict keys and shapes (so RepDistiller /
mdistiller checkpoints load unchanged), same parameter count, same MACs at 32x32, and stage
features of RepDistiller's ``is_feat`` shapes. A model added to ``CRD_TO_TIMM`` is tested here
automatically.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import kdbench.models  # noqa: F401  (registers the zoo in timm)
from kdbench.errors import KdbenchError
from kdbench.models.crd_names import CRD_TO_TIMM, timm_name

HERE = Path(__file__).resolve().parent
VENDORED = HERE / "reference" / "repdistiller_models.json"
SHARED = Path(os.environ.get("KDBENCH_SHARED", HERE.parent.parent / "shared"))
SHARED_JSON = SHARED / "reference" / "repdistiller_models.json"
REF: dict[str, dict[str, Any]] = json.loads(VENDORED.read_text())

CASES = sorted(CRD_TO_TIMM.items())
IDS = [crd for crd, _ in CASES]
MLPS = {"hinton_mlp_1200": 1200, "hinton_mlp_800": 800, "hinton_mlp_300": 300, "hinton_mlp_30": 30}
BATCH = 2


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Batch-2 CPU convs gain nothing from threads; one thread avoids OpenMP oversubscription
    stalls (tens of seconds) when other processes share the machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def _meta_model(name: str, **kwargs: Any) -> nn.Module:
    """A model on the meta device: shapes and FLOPs without allocating or initialising weights."""
    with torch.device("meta"):
        return timm.create_model(name, num_classes=100, **kwargs)


@functools.lru_cache(maxsize=None)
def _run(name: str) -> dict[str, Any]:
    """One real model in eval mode and its outputs on a fixed batch (shared by several tests).

    BatchNorm statistics are randomised so that a wrong feature (e.g. pre- vs post-BN) differs.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=100).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.1)
    x = torch.randn(BATCH, 3, 32, 32)

    # Forward hooks on the modules feature_info names, to check that their output IS the feature.
    hooked: dict[int, list[Tensor]] = {i: [] for i in range(len(model.feature_info))}
    handles = [
        model.get_submodule(info["module"]).register_forward_hook(
            lambda _m, _i, out, i=i: hooked[i].append(out.clone())
        )
        for i, info in enumerate(model.feature_info)
    ]
    with torch.no_grad():
        logits = model(x)
        for h in handles:
            h.remove()
        final, intermediates = model.forward_intermediates(x)
        pooled = model.forward_head(final, pre_logits=True)
        head_logits = model.forward_head(final)
    return dict(
        model=model, x=x, logits=logits, final=final, intermediates=intermediates,
        pooled=pooled, head_logits=head_logits, hooked=hooked,
    )


# -- the CRD zoo against the reference -------------------------------------------------------


def test_crd_names_are_reference_models_and_registered() -> None:
    assert set(CRD_TO_TIMM) <= set(REF), f"not in the reference: {set(CRD_TO_TIMM) - set(REF)}"
    for crd, name in CRD_TO_TIMM.items():
        assert timm.is_model(name), f"{crd} -> {name} is not registered in timm"
    assert len(set(CRD_TO_TIMM.values())) == len(CRD_TO_TIMM), "the mapping must be one-to-one"


@pytest.mark.parametrize(("crd", "name"), CASES, ids=IDS)
def test_state_dict_keys_shapes_and_params(crd: str, name: str) -> None:
    model = _meta_model(name)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = REF[crd]["state_dict"]
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = {k: (got[k], want[k]) for k in set(got) & set(want) if got[k] != want[k]}
    assert not (missing or extra or wrong), (
        f"{name}: missing {missing[:8]}, extra {extra[:8]}, wrong shapes {wrong}"
    )
    assert sum(p.numel() for p in model.parameters()) == REF[crd]["params"]


@pytest.mark.parametrize(("crd", "name"), CASES, ids=IDS)
def test_macs_at_32x32(crd: str, name: str) -> None:
    model = _meta_model(name).eval()
    x = torch.empty(BATCH, 3, 32, 32, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert counter.get_total_flops() // 2 // BATCH == REF[crd]["macs_per_image"]


@pytest.mark.parametrize(("crd", "name"), CASES, ids=IDS)
def test_stage_and_pooled_shapes_match_is_feat(crd: str, name: str) -> None:
    run = _run(name)
    want = [[BATCH, *s] for s in REF[crd]["is_feat_shapes"]]
    assert [list(t.shape) for t in run["intermediates"]] == want[:-1]
    assert list(run["pooled"].shape) == want[-1]
    assert list(run["logits"].shape) == [BATCH, *REF[crd]["logits_shape"]]
    info = run["model"].feature_info
    assert [f["num_chs"] for f in info] == [s[0] for s in REF[crd]["is_feat_shapes"][:-1]]
    assert run["model"].num_features == REF[crd]["is_feat_shapes"][-1][0]


@pytest.mark.parametrize(("crd", "name"), CASES, ids=IDS)
def test_head_of_final_map_equals_forward(crd: str, name: str) -> None:
    run = _run(name)
    torch.testing.assert_close(run["head_logits"], run["logits"])


@pytest.mark.parametrize(("crd", "name"), CASES, ids=IDS)
def test_feature_info_modules_output_the_stage_features(crd: str, name: str) -> None:
    run = _run(name)
    for i, feat in enumerate(run["intermediates"]):
        outs = run["hooked"][i]
        module = run["model"].feature_info[i]["module"]
        assert len(outs) == 1, f"{name}: module '{module}' ran {len(outs)} times in one forward"
        torch.testing.assert_close(outs[0], feat, msg=f"{name}: output of '{module}' is not stage {i}")


@pytest.mark.parametrize(("crd", "name"), CASES, ids=IDS)
def test_state_dict_loads_strictly_into_a_new_instance(crd: str, name: str) -> None:
    run = _run(name)
    other = timm.create_model(name, num_classes=100).eval()
    other.load_state_dict(run["model"].state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(other(run["x"]), run["logits"])


@pytest.mark.parametrize(("crd", "name"), CASES, ids=IDS)
def test_small_grayscale_input_and_classifier_reset(crd: str, name: str) -> None:
    # Any input >= 8x8 and any in_chans: the zoo is used on tiny single-channel test data too.
    model = timm.create_model(name, num_classes=10, in_chans=1, img_size=8).eval()
    x = torch.randn(BATCH, 1, 8, 8)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        torch.testing.assert_close(model.forward_head(final), model(x))
    assert model(x).shape == (BATCH, 10) and len(feats) == len(model.feature_info)
    assert model.pretrained_cfg["input_size"][0] == 1
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.get_classifier().out_features == 7
    assert model(x).shape == (BATCH, 7)
    model.reset_classifier(0)
    assert model(x).shape == (BATCH, model.num_features)


def test_vendored_reference_equals_shared_copy() -> None:
    if not SHARED_JSON.is_file():
        pytest.skip(f"{SHARED_JSON} is not present (no shared reference folder here), so the "
                    "vendored copy cannot be compared with it")
    assert json.loads(SHARED_JSON.read_text()) == REF


# -- timm interface details ------------------------------------------------------------------


def test_forward_intermediates_indices_and_flags() -> None:
    run = _run("cifar_resnet8")
    model, x, feats = run["model"], run["x"], run["intermediates"]
    with torch.no_grad():
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        early, partial = model.forward_intermediates(x, indices=[1], stop_early=True)
    torch.testing.assert_close(last2, feats[-2:])
    torch.testing.assert_close(picked, [feats[0], feats[-1]])
    assert len(partial) == 1
    torch.testing.assert_close(early, feats[1])  # stopped after stage 1
    with pytest.raises(Exception, match="out of range"):
        model.forward_intermediates(x, indices=[4])


def test_wrn_norm_applies_final_bn_relu_to_last_stage() -> None:
    run = _run("cifar_wrn_16_1")
    with torch.no_grad():
        normed = run["model"].forward_intermediates(run["x"], indices=1, norm=True, intermediates_only=True)
    # RepDistiller's WRN stages are pre-activation; norm=True gives the map that is pooled.
    torch.testing.assert_close(normed[0], run["final"])
    assert run["intermediates"][-1].min() < 0


def test_pretrained_cfg_and_data_config() -> None:
    model = _run("cifar_resnet8x4")["model"]
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 100 and cfg["input_size"] == (3, 32, 32)
    assert cfg["mean"] == (0.5071, 0.4867, 0.4408) and cfg["std"] == (0.2675, 0.2565, 0.2761)
    assert cfg["classifier"] == "fc" and model.default_cfg is cfg
    data_cfg = timm.data.resolve_data_config(model=model)
    assert data_cfg["input_size"] == (3, 32, 32) and data_cfg["mean"] == cfg["mean"]
    # The registry knows the cfg too, and reports no downloadable weights.
    assert timm.models.get_pretrained_cfg("cifar_resnet8x4").mean == cfg["mean"]
    assert "cifar_resnet8x4" not in timm.list_pretrained()


def test_pretrained_true_raises_clear_error() -> None:
    with pytest.raises(KdbenchError, match="checkpoint"):
        timm.create_model("cifar_resnet8", pretrained=True)


def test_repdistiller_style_checkpoint_file_loads(tmp_path: Path) -> None:
    run = _run("cifar_resnet8x4")
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": run["model"].state_dict(), "best_acc": 75.0}, path)
    loaded = timm.create_model("cifar_resnet8x4", num_classes=100, checkpoint_path=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(run["x"]), run["logits"])


def test_features_only() -> None:
    net = timm.create_model("cifar_wrn_16_2", features_only=True, out_indices=(1, 3))
    feats = net(torch.randn(BATCH, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(BATCH, 32, 32, 32), (BATCH, 128, 8, 8)]
    assert net.feature_info.channels() == [32, 128]


def test_registered_names_are_ours_and_shadow_nothing() -> None:
    registry = timm.models._registry
    ours = {n for n, fn in registry._model_entrypoints.items() if fn.__module__.startswith("kdbench.")}
    # Everything we register is tested here (CRD models above, MLPs below).
    assert ours == set(CRD_TO_TIMM.values()) | set(MLPS)
    timm_modules = [m for k, m in list(sys.modules.items()) if k.startswith("timm.models.") and m is not None]
    for name in ours:
        assert name.startswith(("cifar_", "hinton_")), name
        assert registry.model_entrypoint(name).__module__.startswith("kdbench.models."), name
        # No timm model module defines an entrypoint of that name, so registering it replaced nothing.
        shadowed = [m.__name__ for m in timm_modules if callable(getattr(m, name, None))]
        assert not shadowed, f"{name} shadows timm's {shadowed}"


def test_timm_name_accepts_crd_spellings() -> None:
    assert timm_name("resnet8x4") == "cifar_resnet8x4"
    assert timm_name("wrn-40-2") == "cifar_wrn_40_2"
    assert timm_name("WRN_16_2") == "cifar_wrn_16_2"
    assert timm_name("ResNet50") == "cifar_resnet50"
    assert timm_name("resnet50") == "cifar_resnet50"
    assert timm_name("MobileNetV2") == "cifar_mobilenetv2"
    assert timm_name("ShuffleNetV1") == "cifar_shufflenetv1"
    assert timm_name("ShuffleV2") == "cifar_shufflenetv2"
    assert timm_name("cifar_vgg13") == "cifar_vgg13"
    with pytest.raises(KeyError, match="did you mean 'resnet8x4'"):
        timm_name("resnet9x4")


def test_timm_name_covers_the_crd_table() -> None:
    csv_path = SHARED / "reference" / "crd_cifar100.csv"
    if not csv_path.is_file():
        pytest.skip(f"{csv_path} is not present, so the CRD table's spellings cannot be checked")
    import csv

    with csv_path.open() as f:
        names = {row[k] for row in csv.DictReader(f) for k in ("teacher", "student")}
    for n in names:
        assert timm.is_model(timm_name(n)), n


# -- Hinton et al. 2015 MLPs -----------------------------------------------------------------


def _mlp_params(n_in: int, hidden: int, n_out: int) -> int:
    return (n_in * hidden + hidden) + (hidden * hidden + hidden) + (hidden * n_out + n_out)


@pytest.mark.parametrize(("name", "hidden"), sorted(MLPS.items()))
def test_hinton_mlp_param_count_and_layout(name: str, hidden: int) -> None:
    model = timm.create_model(name)
    assert model.num_classes == 10 and model.num_features == hidden
    assert sum(p.numel() for p in model.parameters()) == _mlp_params(784, hidden, 10)
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)
    with torch.no_grad():
        assert model(torch.randn(BATCH, 1, 28, 28)).shape == (BATCH, 10)


@pytest.mark.parametrize(("name", "hidden"), sorted(MLPS.items()))
def test_hinton_mlp_small_images_and_hidden_stages(name: str, hidden: int) -> None:
    model = timm.create_model(name, in_chans=1, img_size=8).eval()
    assert sum(p.numel() for p in model.parameters()) == _mlp_params(64, hidden, 10)
    x = torch.randn(BATCH, 1, 8, 8)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        pooled = model.forward_head(final, pre_logits=True)
        torch.testing.assert_close(model.forward_head(final), model(x))
    assert [tuple(f.shape) for f in feats] == [(BATCH, hidden), (BATCH, hidden)]
    assert [f["module"] for f in model.feature_info] == ["act1", "act2"]
    torch.testing.assert_close(pooled, feats[-1])  # the pooled vector is the last hidden activation
    # A rectangular size, more channels, and an input that is already flat.
    rect = timm.create_model(name, in_chans=3, img_size=(4, 6), num_classes=5)
    assert rect(torch.randn(BATCH, 3, 4, 6)).shape == (BATCH, 5)
    assert rect(torch.randn(BATCH, 72)).shape == (BATCH, 5)
    with pytest.raises(ValueError, match="in_chans"):
        model(torch.randn(BATCH, 1, 28, 28))


def test_hinton_mlp_dropout_only_in_training() -> None:
    model = timm.create_model("hinton_mlp_800", drop_rate=0.5)
    x = torch.randn(BATCH, 1, 28, 28)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_list_models_shows_the_reference_params_and_macs(capsys) -> None:
    """`kdbench list models` counts each zoo model itself; the numbers equal RepDistiller's."""
    from kdbench.cli import main

    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    shown = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1].startswith("cifar_"):
            shown[parts[0]] = (parts[1], int(parts[2].replace(",", "")), int(parts[3].replace(",", "")))
    assert set(shown) == set(REF) == set(CRD_TO_TIMM)
    for crd, (name, params, macs) in shown.items():
        assert (name, params, macs) == (CRD_TO_TIMM[crd], REF[crd]["params"], REF[crd]["macs_per_image"]), crd
    assert "hinton_mlp_1200" in out and "2,395,210" in out
