"""Resolution as a setting (issue 12, item 1): image size, crop fraction and interpolation, from the CLI and
suites, in the data, the dataset label (so the run ids), the rows, and the FLOPs measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TVF
from torchvision.transforms.v2 import functional as TF2

from kdbench.cli import main
from kdbench.data import load_dataset
from kdbench.data.resolution import Resolution
from kdbench.errors import KdbenchError
from test_data import _make_imagefolder


def test_a_tensor_dataset_is_resized_then_centre_cropped_as_torchvision_does():
    stored = load_dataset("digits", limit=20)
    got = load_dataset("digits", limit=20, image_size=16, crop_pct=0.8, interpolation="bicubic")
    assert got.train_images.shape == (20, 1, 16, 16) and got.info.img_size == 16 and got.train_images.dtype == torch.uint8
    # the same steps, one image at a time, with torchvision: shorter side to 16 / 0.8 = 20, centre crop 16
    for i in (0, 7):
        img = TF2.resize(stored.train_images[i], [20], interpolation=InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(got.train_images[i], TF2.center_crop(img, [16, 16]))
    assert torch.equal(got.train_labels, stored.train_labels)
    assert torch.equal(load_dataset("digits", limit=20).train_images, stored.train_images)  # default: as stored


def test_an_imagefolder_is_decoded_at_the_size_with_pil(tmp_path: Path):
    root = _make_imagefolder(tmp_path / "f", {"train": ["a", "b"], "val": ["a", "b"]})
    got = load_dataset(str(root), image_size=12, crop_pct=0.75, interpolation="nearest")
    assert got.train_images.shape == (6, 3, 12, 12) and got.info.img_size == 12
    first = Image.open(root / "train" / "a" / "0.png").convert("RGB")  # 40 x 20: shorter side 20 -> 16
    want = TVF.pil_to_tensor(TVF.center_crop(TVF.resize(first, 16, interpolation=InterpolationMode.NEAREST), 12))
    assert torch.equal(got.train_images[0], want)
    assert load_dataset(str(root)).train_images.shape[-1] == 32  # an ImageFolder's default stays 32


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=-1), "image size must be a whole number of pixels >= 1"),
    (dict(size=8, crop_pct=0.0), r"crop fraction must be in \(0, 1\]"),
    (dict(size=8, crop_pct=1.2), r"crop fraction must be in \(0, 1\]"),
    (dict(size=8, interpolation="lanczos"), "interpolation 'lanczos' is not one of bilinear, bicubic, nearest"),
    (dict(crop_pct=0.875), r"a crop fraction or interpolation needs an image size \(--image-size N\)"),
])
def test_bad_resolutions_are_refused(kwargs, message):
    with pytest.raises(KdbenchError, match=message):
        Resolution(**kwargs)


def test_labels_mark_what_differs_from_the_default():
    assert Resolution().label == "" and Resolution(160).label == "~160px"
    assert Resolution(224, 0.875, "bicubic").label == "~224px/0.875/bicubic"


def _rows(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (root / "runs").glob("*.json")]


def test_runs_at_another_resolution_are_other_runs_measured_at_it(tmp_path, capsys):
    """Through the CLI: the rows record the resolution, FLOPs grow with the pixels (4x for twice the side), and the
    same command at the stored size is new runs, not a skip."""
    args = ["run", "--methods", "kd", "--pairs", "cifar_resnet14:cifar_resnet8", "--seeds", "0", "--limit", "48",
            "--epochs", "1", "--throughput-batch", "8", "-q", "--no-report", "--results-dir", str(tmp_path)]
    assert main([*args, "--image-size", "16", "--crop-pct", "0.5", "--interpolation", "bicubic"]) == 0
    big = {r["kind"]: r for r in _rows(tmp_path)}
    assert main(args) == 0
    small = {r["kind"]: r for r in _rows(tmp_path) if r["run_id"] not in {b["run_id"] for b in big.values()}}
    assert set(big) == set(small) == {"teacher", "student"}  # nothing skipped: other runs
    for kind in big:
        assert (big[kind]["image_size"], big[kind]["crop_pct"], big[kind]["interpolation"]) == (16, 0.5, "bicubic")
        assert big[kind]["dataset"] == "digits[:48]~16px/0.5/bicubic" and small[kind]["dataset"] == "digits[:48]"
        assert (small[kind]["image_size"], small[kind]["interpolation"]) == (8, "")
        assert big[kind]["flops_per_image"] == pytest.approx(4 * small[kind]["flops_per_image"], rel=0.02)


def test_a_suite_sets_the_resolution_and_the_cli_overrides_it(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text('name = "s"\ndataset = "digits"\npairs = ["cifar_resnet14:cifar_resnet8"]\n'
                     'image_size = 12\ninterpolation = "bicubic"\n[recipe]\nbase = "digits"\n')
    args = ["run", "--suite", str(suite), "--methods", "ce", "--seeds", "0", "--limit", "32", "--epochs", "1",
            "--throughput-batch", "8", "-q", "--no-report", "--results-dir", str(tmp_path / "r")]
    assert main(args) == 0
    assert {r["dataset"] for r in _rows(tmp_path / "r")} == {"digits[:32]~12px/bicubic"}
    assert main([*args, "--image-size", "10"]) == 0
    assert "digits[:32]~10px/bicubic" in {r["dataset"] for r in _rows(tmp_path / "r")}
    suite.write_text(suite.read_text().replace("image_size = 12\n", "image_size = 12\ncrop_pct = 2.0\n"))
    assert main(args) == 2
    assert "crop fraction must be in (0, 1]" in capsys.readouterr().err
