"""The ImageNet protocol (issue 12, item 6): the on-device RandomResizedCrop against torchvision's, the
`imagenet` recipe and dataset, and the `imagenet-r34-r18` suite planned and run on synthetic images at a reduced
size with a pretrained-teacher file the test writes (no network, no ImageNet)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torchvision.transforms import RandomResizedCrop

from kdbench.data import load_dataset
from kdbench.data.rrc import RRCSpec, draw_boxes, random_resized_crop
from kdbench.errors import KdbenchError
from kdbench.recipe import get_recipe
from kdbench.sweep.plan import cache_unusable
from kdbench.method import Taps


@pytest.mark.parametrize("height, width, scale, ratio", [(64, 48, (0.08, 1.0), (3 / 4, 4 / 3)),
                                                         (32, 96, (0.5, 1.0), (0.9, 1.1))])
def test_the_crops_are_drawn_as_torchvision_draws_them(height, width, scale, ratio):
    """20,000 crops each: the area fraction, aspect ratio and position match torchvision's get_params in mean and
    quartiles (the second case forces its fallback, a centre crop, often)."""
    n = 20_000
    ours = draw_boxes(n, height, width, RRCSpec(scale, ratio), torch.Generator().manual_seed(0), "cpu")
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    theirs = torch.tensor([RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)],
                          dtype=torch.float64)  # (top, left, h, w)
    w_o, h_o = ours[:, 2] - ours[:, 0], ours[:, 3] - ours[:, 1]
    stats = {
        "area": ((w_o * h_o).double() / (height * width), theirs[:, 2] * theirs[:, 3] / (height * width)),
        "log ratio": ((w_o / h_o).double().log(), (theirs[:, 3] / theirs[:, 2]).log()),
        "left": (ours[:, 0].double() / width, theirs[:, 1] / width),
        "top": (ours[:, 1].double() / height, theirs[:, 0] / height),
    }
    for name, (a, b) in stats.items():
        qa, qb = (torch.quantile(x.float(), torch.tensor([0.25, 0.5, 0.75])) for x in (a, b))
        assert abs(float(a.mean() - b.mean())) < 0.01, name
        assert torch.allclose(qa, qb, atol=0.02), (name, qa, qb)
    assert (w_o >= 1).all() and (ours[:, 2] <= width).all() and (ours[:, 3] <= height).all()


def test_a_whole_image_crop_resamples_to_itself():
    """Scale 1 and the image's own ratio: the crop is the image, and roi_align at pixel centres returns it."""
    x = torch.randint(0, 256, (3, 2, 16, 16), dtype=torch.uint8)
    out = random_resized_crop(x, RRCSpec((1.0, 1.0), (1.0, 1.0)), torch.Generator().manual_seed(1))
    assert out.dtype == torch.float32 and torch.allclose(out, x.float(), atol=1e-4)


def test_the_imagenet_recipe_and_its_crop_keep_no_cached_views():
    recipe = get_recipe("imagenet")
    assert (recipe.epochs, recipe.batch_size, recipe.lr, recipe.milestones, recipe.weight_decay) == \
        (100, 256, 0.1, (30, 60, 90), 1e-4)
    assert recipe.rrc == RRCSpec((0.08, 1.0), (0.75, 4 / 3)) and recipe.flip
    assert "random resized crops" in cache_unusable(Taps(), recipe)
    assert cache_unusable(Taps(), get_recipe("crd")) == ""


def test_imagenet_missing_says_how_to_lay_it_out(tmp_path):
    with pytest.raises(KdbenchError, match=rf"ImageNet is not in {tmp_path}/imagenet .*kdbench cannot download it: "
                                           r"get ILSVRC-2012 .*train/<wnid>/\*\.JPEG"):
        load_dataset("imagenet", data_dir=tmp_path)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """Random ResNet-34 weights for ImageNet's 1,000 classes, standing in for torchvision's (no network here)."""
    path = tmp_path_factory.mktemp("w") / "resnet34.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet34", num_classes=1000).state_dict(), path)
    return path


def _reproduce(teacher_file: Path, results: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kdbench", "reproduce", "imagenet-r34-r18", "--synthetic",
                           "--pretrained-file", f"resnet34.tv_in1k={teacher_file}", "--results-dir", str(results),
                           *extra], env=env, capture_output=True, text=True, timeout=900)


def test_the_suite_is_planned(teacher_file, tmp_path):
    # at 32 px: the plan's time estimate trains a few steps of each model, which at 224 px takes minutes on a CPU
    out = _reproduce(teacher_file, tmp_path / "r", "--dry-run", "--image-size", "32", "--limit", "32")
    assert out.returncode == 0, out.stderr
    assert "NOT REAL DATA" in out.stdout and "imagenet, 100 epochs, random resized crop" in out.stdout
    assert "left out: method 'reviewkd'" in out.stdout  # timm's ResNets give no pre-activation maps
    assert not (tmp_path / "r" / "runs").exists()


def test_the_suite_runs_at_a_reduced_size(teacher_file, tmp_path):
    """--image-size 32 --limit 32 --epochs 1: every method that can run does; the pretrained teacher (its classifier
    has ImageNet's 1,000 classes) is evaluated, not trained; the reproduce table sets the published cells beside."""
    out = _reproduce(teacher_file, tmp_path / "r", "--image-size", "32", "--limit", "32", "--epochs", "1")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(p.read_text()) for p in (tmp_path / "r" / "runs").glob("*.json")]
    teacher = next(r for r in rows if r["kind"] == "teacher")
    assert teacher["trained_by_kdbench"] is False and teacher["weights"].startswith("sha256:")
    assert teacher["input_norm"].startswith("model: mean (0.485, 0.456, 0.406)")
    assert {r["method"] for r in rows if r["kind"] == "student"} == {"ce", "kd", "dkd", "dist"}
    assert all(r["image_size"] == 32 and "random resized crop" in r["schedule"] for r in rows)
    table = (tmp_path / "r" / "reproduce" / "imagenet-r34-r18" / "reproduce_imagenet-r34-r18.md").read_text()
    assert "| resnet34.tv_in1k→resnet18 | dkd | 71.70 |" in table and "NOT REAL DATA" in table
    assert "methods not run here (no kdbench plugin, or not among the methods run): reviewkd (1)" in table


def test_a_random_resized_crop_recipe_trains_on_random_resized_crops(monkeypatch):
    """The engine built its batch loader without the recipe's RandomResizedCrop, so the `imagenet` recipe trained on
    flipped centre crops; now every training batch is cropped (counted through the loader's crop function)."""
    from kdbench.data import loader as loader_module
    from kdbench.train import train

    calls = []
    real = loader_module.random_resized_crop

    def counting(x, spec, gen):
        calls.append((len(x), spec))
        return real(x, spec, gen)

    monkeypatch.setattr(loader_module, "random_resized_crop", counting)
    data = load_dataset("digits", limit=64)
    recipe = get_recipe("imagenet").with_overrides({"epochs": 1, "milestones": [], "batch_size": 32}, "test")
    train(timm.create_model("hinton_mlp_30", num_classes=10, in_chans=1, img_size=8), data, recipe, seed=0)
    assert [n for n, _ in calls] == [32, 32] and calls[0][1] == recipe.rrc
