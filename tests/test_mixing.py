"""Mixup and CutMix as recipe options: the same draws and mixed batches as timm's Mixup, repeatable runs,
and runs that record them (run id, schedule label, the teacher cache turned off with its reason)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from timm.data.mixup import Mixup

from kdbench.data.mixing import MixSpec, draw, mix
from kdbench.errors import KdbenchError
from kdbench.recipe import RECIPES

SETTINGS = [
    MixSpec(mixup_alpha=0.8),
    MixSpec(cutmix_alpha=1.0),
    MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, switch_prob=0.5),
    MixSpec(mixup_alpha=0.2, cutmix_alpha=0.5, prob=1.0, switch_prob=0.9),
]


def batch(seed: int, n: int = 6, classes: int = 5, size: tuple[int, int] = (8, 10)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *size, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("spec", SETTINGS, ids=str)
def test_the_same_seed_gives_timms_mixed_batch_and_targets(spec):
    """timm draws from NumPy's global state; kdbench from a RandomState with the same seed, in the same order:
    batch for batch, the same λ, box, images and label distributions (timm without label smoothing)."""
    timm_mix = Mixup(mixup_alpha=spec.mixup_alpha, cutmix_alpha=spec.cutmix_alpha, prob=spec.prob,
                     switch_prob=spec.switch_prob, mode="batch", correct_lam=True, label_smoothing=0.0,
                     num_classes=5)
    mixed = 0
    for seed in range(40):
        x, y = batch(seed)
        np.random.seed(seed)
        want_x, want_y = timm_mix(x.clone(), y.clone())
        got_x, got_y = mix(x, y, 5, draw(spec, np.random.RandomState(seed), *x.shape[-2:]))
        torch.testing.assert_close(got_x, want_x, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_y, want_y, rtol=0, atol=1e-7)
        mixed += not torch.equal(got_x, x)
    assert mixed > 10  # the comparison covered mixed batches, not only unmixed ones


@pytest.mark.parametrize("spec", SETTINGS, ids=str)
def test_lambda_distribution_matches_timms(spec):
    """Over many batches the distribution of λ (CutMix's corrected to its clipped box) is timm's: equal draws."""
    timm_mix = Mixup(mixup_alpha=spec.mixup_alpha, cutmix_alpha=spec.cutmix_alpha, prob=spec.prob,
                     switch_prob=spec.switch_prob, label_smoothing=0.0, num_classes=5)
    ours, theirs = [], []
    rng = np.random.RandomState(123)
    np.random.seed(123)
    for _ in range(2000):
        ours.append(draw(spec, rng, 32, 32).lam)
        lam, cutmix = timm_mix._params_per_batch()
        if cutmix and lam != 1.0:
            _, lam = timm_mix_box(lam)
        theirs.append(lam)
    assert ours == pytest.approx(theirs)
    ours = np.array(ours)
    assert 0 <= ours.min() and ours.max() <= 1
    if spec.cutmix_alpha == 0:  # CutMix's λ is its clipped box's share: above the Beta's mean of 1/2
        # A Beta(α, α) mean is 1/2; unmixed batches (1 - prob of them) pull it towards 1.
        assert ours.mean() == pytest.approx(spec.prob * 0.5 + (1 - spec.prob), abs=0.04)
    else:
        assert ours.mean() > 0.5


def timm_mix_box(lam):
    from timm.data.mixup import cutmix_bbox_and_lam
    return cutmix_bbox_and_lam((1, 3, 32, 32), lam, correct_lam=True)


def test_recipe_mixing_is_validated_labelled_and_in_the_run_id():
    base = RECIPES["digits"]
    mixed = base.with_overrides({"mixup_alpha": 0.8, "cutmix_alpha": 1.0}, "test")
    assert base.to_dict() == {k: v for k, v in mixed.to_dict().items() if k not in ("mixup_alpha", "cutmix_alpha")}
    assert "mixup_alpha" not in base.to_dict()  # a later field at its default leaves older run ids alone
    assert "mixup α 0.8 / CutMix α 1 (CutMix with p 0.5)" in mixed.label
    assert "mix" not in base.label.lower()
    for bad in ({"mixup_alpha": -1.0}, {"mix_prob": 1.5}, {"mix_switch_prob": -0.1}):
        with pytest.raises(KdbenchError, match="mix|alpha"):
            base.with_overrides(bad, "test")


def test_loader_mixes_repeatably_from_the_runs_generator():
    from kdbench.data import Loader
    from kdbench.data.splits import DatasetInfo

    info = DatasetInfo(name="t", num_classes=4, in_chans=1, img_size=6, classes=tuple("abcd"), mean=(0.5,),
                       std=(0.25,), source="test", train_size=20, test_size=0)
    images = torch.randint(0, 256, (20, 1, 6, 6), dtype=torch.uint8)
    labels = torch.arange(20) % 4

    def epoch(seed, spec):
        loader = Loader(images, labels, info, batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(seed), mix=spec)
        return list(loader.batches())

    a, b = epoch(0, MixSpec(mixup_alpha=1.0)), epoch(0, MixSpec(mixup_alpha=1.0))
    plain = epoch(0, None)
    for x, y, p in zip(a, b, plain):
        assert torch.equal(x.images, y.images) and torch.equal(x.soft_labels, y.soft_labels)
        assert torch.equal(x.labels, p.labels) and x.soft_labels.shape == (len(x.labels), 4)
        torch.testing.assert_close(x.soft_labels.sum(1), torch.ones(len(x.labels)))
        assert p.soft_labels is None
    assert any(not torch.equal(x.images, p.images) for x, p in zip(a, plain))


def test_cli_run_with_mixup_and_cutmix_records_it(tmp_path):
    """A digits run with both: the teachers run online (the cache is off, the row says why), the schedule label
    and the run ids carry the mixing, and the results are finite. (--teacher-cache on, which no run could
    follow here, is refused: tests/test_bad_input.py.)"""
    from kdbench.cli import main

    res = tmp_path / "r"
    code = main(["run", "--pairs", "hinton_mlp_300:hinton_mlp_30", "--methods", "ce,kd", "--seeds", "0",
                 "--epochs", "2", "--limit", "256", "--mixup", "0.8", "--cutmix", "1.0", "--results-dir", str(res),
                 "--throughput-batch", "16", "--quiet", "--no-report", "--teacher-cache", "auto"])
    assert code == 0
    rows = [json.loads(p.read_text()) for p in (res / "runs").glob("*.json")]
    assert {r["method"] for r in rows} == {"teacher", "ce", "kd"}
    for r in rows:
        assert "mixup α 0.8 / CutMix α 1" in r["schedule"]
        assert json.loads(r["recipe_config"])["cutmix_alpha"] == 1.0
        assert r["top1_last"] == r["top1_last"]  # not NaN
    kd = next(r for r in rows if r["method"] == "kd")
    assert kd["teacher_cache"] is False and "mixup/CutMix" in kd["teacher_cache_off"]
