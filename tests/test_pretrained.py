"""Pretrained timm weights (issue 12, item 2), offline: a tiny timm model's weights saved by the test and loaded
through timm's pretrained path (pretrained_cfg_overlay=dict(file=...)), the weights' identity in run ids and rows,
and the errors for a missing file, an unknown tag and weights that cannot be found."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from kdbench import zoo
from kdbench.cli import main
from kdbench.errors import KdbenchError

TAGGED = "resnet10t.c3_in1k"  # a real timm model and tag; its weights come from the file the test writes
KW = dict(num_classes=10, in_chans=1, img_size=8)  # the embedded digits


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A resnet10t for the digits' 10 classes and 1 channel, its weights saved as timm would read them."""
    torch.manual_seed(5)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1).eval()
    path = tmp_path_factory.mktemp("w") / "resnet10t_digits.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_weights_from_a_file_load_through_timms_pretrained_path(weights):
    path, model = weights
    loaded = zoo.create(TAGGED, **KW, pretrained_file=path).eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))  # the file's classifier too: it has the dataset's class count
    assert zoo.weights_identity(loaded) == zoo.weights_identity(model)
    assert zoo.weights_identity(zoo.create("resnet10t", **KW)) != zoo.weights_identity(model)  # random is random


def test_imagenet_weights_are_adapted_to_the_dataset(tmp_path):
    """timm's adaptation: a 1000-class RGB file gives a 10-class 1-channel model whose body is the file's."""
    big = timm.create_model("resnet10t", num_classes=1000, in_chans=3)
    path = tmp_path / "in1k.pth"
    torch.save(big.state_dict(), path)
    loaded = zoo.create(TAGGED, **KW, pretrained_file=path)
    assert loaded.fc.weight.shape == (10, 512) and loaded.conv1[0].weight.shape[1] == 1
    assert torch.equal(loaded.layer2[0].conv1.weight, big.layer2[0].conv1.weight)
    # the first conv summed over RGB, as timm's adapt_input_conv does for one channel
    assert torch.allclose(loaded.conv1[0].weight, big.conv1[0].weight.sum(1, keepdim=True))


def test_a_fitting_pretrained_teacher_is_used_as_is_and_its_row_says_which_weights(weights, tmp_path):
    path, model = weights
    args = ["run", "--methods", "kd", "--pairs", f"{TAGGED}:cifar_resnet8", "--seeds", "0", "--limit", "48",
            "--epochs", "1", "--throughput-batch", "8", "-q", "--no-report"]
    assert main([*args, "--pretrained-file", f"{TAGGED}={path}", "--results-dir", str(tmp_path / "a")]) == 0
    rows = {r["kind"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "a" / "runs").glob("*.json"))}
    assert rows["teacher"]["student"] == TAGGED
    assert rows["teacher"]["weights"] == "sha256:" + zoo.weights_identity(model)
    assert rows["student"]["weights"] == ""  # the student starts from random weights
    # Its classifier fits the digits' 10 classes: used as it is (not trained), its accuracy is the saved model's,
    # seen through its own input normalisation as the runner sets it.
    from kdbench import input_norm
    from kdbench.data import load_dataset
    from kdbench.train import evaluate

    data = load_dataset("digits", limit=48)
    model = copy.deepcopy(model)  # the fixture's stays as saved
    input_norm.set_model_norm(model, data.info.mean, data.info.std, *input_norm.model_norm(
        zoo.create(TAGGED, **KW, weights=False), 1))
    _, top1, _ = evaluate(model, data)
    assert rows["teacher"]["trained_by_kdbench"] is False and rows["teacher"]["top1_last"] == pytest.approx(top1)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet10t", num_classes=10, in_chans=1).state_dict(), other)
    assert main([*args, "--pretrained-file", f"{TAGGED}={other}", "--results-dir", str(tmp_path / "a")]) == 0
    teachers = [json.loads(p.read_text()) for p in (tmp_path / "a" / "runs").glob("*.json")]
    assert len({t["run_id"] for t in teachers if t["kind"] == "teacher"}) == 2  # other weights: another teacher


def test_missing_pretrained_weights_offline_exit_2_with_where_kdbench_looked(tmp_path):
    """A tag whose weights are neither in the (empty) Hugging Face cache nor reachable: one line, exit 2, before
    anything is written. Run as a user would, offline (HF_HUB_OFFLINE=1, a fresh HF_HOME)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = tmp_path / "res"
    out = subprocess.run([sys.executable, "-m", "kdbench", "run", "--methods", "kd", "--pairs", f"{TAGGED}:cifar_resnet8",
                          "--limit", "32", "--epochs", "1", "-q", "--results-dir", str(res)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert f"kdbench: error: pretrained weights for model '{TAGGED}' could not be loaded" in out.stderr
    assert f"Hugging Face cache ({tmp_path / 'hf' / 'hub'}" in out.stderr
    assert f"--pretrained-file {TAGGED}=FILE" in out.stderr and "Traceback" not in out.stderr
    assert not res.exists()


def test_bad_pretrained_names_and_files(weights, tmp_path, capsys):
    with pytest.raises(KdbenchError, match="timm has no pretrained weights tagged 'nope' for resnet10t; its tags: "
                                           "resnet10t.c3_in1k"):
        zoo.create("resnet10t.nope", **KW)
    with pytest.raises(KdbenchError, match="pretrained weights file '.*missing.pth' for model 'resnet10t' not found"):
        zoo.create("resnet10t", **KW, pretrained_file=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save(timm.create_model("resnet18", num_classes=10, in_chans=1).state_dict(), bad)
    with pytest.raises(KdbenchError, match="pretrained weights file '.*bad.pth' did not load into model 'resnet10t'"):
        zoo.create("resnet10t", **KW, pretrained_file=bad)
    base = ["run", "--methods", "kd", "--pairs", "cifar_resnet14:cifar_resnet8", "--limit", "32", "-q",
            "--results-dir", str(tmp_path / "r")]
    assert main([*base, "--pretrained-file", f"resnet18={weights[0]}"]) == 2
    assert "--pretrained-file names model 'resnet18', which is in no pair of this run" in capsys.readouterr().err
    assert main([*base, "--pretrained-file", str(weights[0])]) == 2
    assert "--pretrained-file '" in capsys.readouterr().err
    assert not (tmp_path / "r" / "runs").exists()


# -- each model's own input normalisation (issue 12, item 4) ---------------------------------------------------------
def test_a_pretrained_model_sees_its_own_normalisation_on_every_path(weights):
    """From the same dataset-normalised batch, the pretrained model gets its config's statistics (ImageNet's,
    averaged for one channel) on model(x) and on the forward_intermediates path FeatureCapture takes; the student
    keeps the dataset's."""
    from kdbench import input_norm
    from kdbench.features import FeatureCapture
    from kdbench.method import Taps

    path, plain = weights
    model = zoo.create(TAGGED, **KW, pretrained_file=path).eval()
    cfg = model.pretrained_cfg
    mean, std = sum(cfg["mean"]) / 3, sum(cfg["std"]) / 3
    assert input_norm.model_norm(model, 1) == ((pytest.approx(mean),), (pytest.approx(std),))
    d_mean, d_std = 0.3, 0.2  # the dataset's
    input_norm.set_model_norm(model, (d_mean,), (d_std,), (mean,), (std,))
    u = torch.rand(3, 1, 8, 8)  # pixels in [0, 1]
    x_data = (u - d_mean) / d_std  # what the loader gives every model
    x_model = (u - mean) / std  # what this model was trained on
    want = plain(x_model)
    assert torch.allclose(model(x_data), want, atol=1e-5)
    taps = Taps(stages=(-1,), pooled=True)
    out, ref = FeatureCapture(model, taps)(x_data), FeatureCapture(plain, taps)(x_model)
    assert torch.allclose(out.logits, want, atol=1e-5) and torch.allclose(out.stages[-1], ref.stages[-1], atol=1e-5)
    assert input_norm.describe(model).startswith("model: mean (") and input_norm.describe(plain) == "dataset"
    assert set(model.state_dict()) == set(plain.state_dict())  # no weights added


def test_rows_say_how_each_model_saw_its_input(weights, tmp_path):
    path, _ = weights
    assert main(["run", "--methods", "kd", "--pairs", f"{TAGGED}:cifar_resnet8", "--seeds", "0", "--limit", "48",
                 "--epochs", "1", "--throughput-batch", "8", "-q", "--no-report", "--pretrained-file",
                 f"{TAGGED}={path}", "--results-dir", str(tmp_path)]) == 0
    rows = {r["kind"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json"))}
    assert rows["teacher"]["input_norm"].startswith("model: mean (0.4") and rows["student"]["input_norm"] == "dataset"


@pytest.fixture(scope="module")
def in1k(tmp_path_factory) -> Path:
    """A 1000-class RGB resnet10t file: weights for other classes than the digits'."""
    path = tmp_path_factory.mktemp("in1k") / "in1k.pth"
    torch.save(timm.create_model("resnet10t", num_classes=1000, in_chans=3).state_dict(), path)
    return path


def _teacher_row(root: Path) -> dict:
    return next(r for r in (json.loads(p.read_text()) for p in (root / "runs").glob("*.json")) if r["kind"] == "teacher")


def test_imagenet_weights_on_another_dataset_are_fine_tuned(in1k, tmp_path):
    """A 1000-class file on the digits: the classifier is replaced, so the teacher is fine-tuned (from those weights)
    with the teacher_finetune recipe: the run's recipe for 10 epochs, cosine, 1 warm-up epoch, a tenth of its lr."""
    args = ["run", "--methods", "kd", "--pairs", f"{TAGGED}:cifar_resnet8", "--seeds", "0", "--limit", "48",
            "--throughput-batch", "8", "-q", "--no-report", "--pretrained-file", f"{TAGGED}={in1k}",
            "--teacher-finetune"]
    assert main([*args, "--epochs", "1", "--results-dir", str(tmp_path / "r")]) == 0
    teacher = _teacher_row(tmp_path / "r")
    assert teacher["trained_by_kdbench"] is True and teacher["weights"].startswith("sha256:")
    recipe = json.loads(teacher["recipe_config"])
    assert teacher["recipe"] == "teacher_finetune" and teacher["epochs"] == 1 and recipe["full_epochs"] == 10
    assert recipe["lr"] == pytest.approx(0.005) and recipe["schedule"] == "cosine" and recipe["warmup_epochs"] == 1
    assert teacher["schedule"].startswith("teacher_finetune, shortened: 1 of 10 epochs")  # --epochs 1 shortens it
    student = next(r for r in (json.loads(p.read_text()) for p in (tmp_path / "r" / "runs").glob("*.json"))
                   if r["kind"] == "student")
    assert student["recipe"] == "digits" and student["epochs"] == 1


def test_a_suites_teacher_finetune_table_sets_its_own(in1k, tmp_path):
    suite = tmp_path / "ft.toml"
    suite.write_text(f'''name = "ft"
dataset = "digits"
pairs = ["{TAGGED}:cifar_resnet8"]
methods = ["kd"]
[recipe]
base = "digits"
epochs = 1
milestones = []
[teacher_finetune]
epochs = 2
lr = 0.002
''')
    assert main(["run", "--suite", str(suite), "--limit", "48", "--throughput-batch", "8", "-q", "--no-report",
                 "--pretrained-file", f"{TAGGED}={in1k}", "--results-dir", str(tmp_path / "r")]) == 0
    teacher = _teacher_row(tmp_path / "r")
    assert teacher["recipe"] == "teacher_finetune" and teacher["epochs"] == 2
    assert json.loads(teacher["recipe_config"])["lr"] == pytest.approx(0.002)
    suite.write_text(suite.read_text().replace("epochs = 2", "epochs = 0"))
    assert main(["run", "--suite", str(suite), "--pretrained-file", f"{TAGGED}={in1k}", "--results-dir",
                 str(tmp_path / "s")]) == 2


def test_a_teacher_for_other_classes_without_finetuning_is_refused(in1k, tmp_path, capsys):
    assert main(["run", "--methods", "kd", "--pairs", f"{TAGGED}:cifar_resnet8", "--epochs", "1", "-q",
                 "--pretrained-file", f"{TAGGED}={in1k}", "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"teacher {TAGGED} is pretrained for other classes than the 10 of digits" in err
    assert "--teacher-finetune" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "runs").exists() or not any((tmp_path / "r" / "runs").iterdir())  # nothing trained


def test_hf_hub_names_in_pairs_keep_their_colon():
    """'hf-hub:' names (teacher or student) are one model each in a pair: the colon after hf-hub is no separator."""
    from kdbench.suites import Pair

    assert Pair.parse("hf-hub:timm/resnet34.a1_in1k:hf-hub:timm/resnet18.a1_in1k").teachers == \
        ("hf-hub:timm/resnet34.a1_in1k",)
    pair = Pair.parse("resnet34.tv_in1k+hf-hub:timm/resnet50.a1_in1k@1:hf-hub:timm/resnet18.a1_in1k")
    assert pair.teachers == ("resnet34.tv_in1k", "hf-hub:timm/resnet50.a1_in1k")
    assert pair.student == "hf-hub:timm/resnet18.a1_in1k" and pair.teacher_seeds == (None, 1)
    assert zoo.wants_pretrained("hf-hub:timm/resnet18.a1_in1k") and not zoo.wants_pretrained("resnet18")


def test_an_imagefolder_takes_its_pretrained_teachers_resolution(in1k, tmp_path, capsys):
    """Issue 12 item 1: with no size set, a pretrained teacher's own config (timm's resolve_data_config) sets the
    resolution of an ImageFolder run: resnet10t.c3_in1k was trained at 176 px, crop 0.875, bicubic."""
    from test_data import _make_imagefolder

    root = _make_imagefolder(tmp_path / "imgs", {"train": ["a", "b"], "val": ["a", "b"]}, n=2)
    args = ["run", "--dataset", str(root), "--methods", "kd", "--pairs", f"{TAGGED}:resnet10t", "--seeds", "0",
            "--epochs", "1", "--throughput-batch", "2", "-q", "--no-report", "--teacher-finetune",
            "--pretrained-file", f"{TAGGED}={in1k}"]
    assert main([*args, "--results-dir", str(tmp_path / "r")]) == 0
    assert f"176 px (crop 0.875, bicubic) from the pretrained config of teacher {TAGGED}" in capsys.readouterr().err
    rows = [json.loads(p.read_text()) for p in (tmp_path / "r" / "runs").glob("*.json")]
    assert {(r["image_size"], r["crop_pct"], r["interpolation"]) for r in rows} == {(176, 0.875, "bicubic")}
    assert all(r["dataset"].endswith("~176px/0.875/bicubic") for r in rows)
    # a size given wins
    assert main([*args, "--image-size", "24", "--results-dir", str(tmp_path / "s")]) == 0
    assert {json.loads(p.read_text())["image_size"] for p in (tmp_path / "s" / "runs").glob("*.json")} == {24}


def test_the_which_student_suite_runs_on_an_imagefolder(tmp_path):
    """Issue 12 item 7: the suite's pretrained ResNet-50 (weights from a file the test writes, 1,000 classes) is
    fine-tuned on a 2-class ImageFolder and distilled into its four timm students; the report ends in the
    accuracy-vs-throughput plot. Tiny: 32 px, 4 images a class, 1 epoch."""
    from test_data import _make_imagefolder

    root = _make_imagefolder(tmp_path / "imgs", {"train": ["a", "b"], "val": ["a", "b"]}, n=2)
    weights = tmp_path / "r50.pth"
    torch.save(timm.create_model("resnet50", num_classes=1000).state_dict(), weights)
    assert main(["run", "--suite", "which-student", "--dataset", str(root), "--methods", "ce,kd", "--image-size", "32",
                 "--epochs", "1", "--throughput-batch", "2", "-q", "--pretrained-file",
                 f"resnet50.a1_in1k={weights}", "--results-dir", str(tmp_path / "r")]) == 0
    rows = [json.loads(p.read_text()) for p in (tmp_path / "r" / "runs").glob("*.json")]
    teacher = next(r for r in rows if r["kind"] == "teacher")
    assert teacher["student"] == "resnet50.a1_in1k" and teacher["recipe"] == "teacher_finetune"
    students = {(r["method"], r["student"]) for r in rows if r["kind"] == "student"}
    assert students == {(m, s) for m in ("ce", "kd") for s in ("resnet18", "mobilenetv3_large_100",
                                                                 "efficientnet_b0", "convnext_atto")}
    assert all(r["image_size"] == 32 and r["throughput_img_s"] > 0 for r in rows)
    assert next((tmp_path / "r" / "report").glob("acc_vs_throughput_*.png")).stat().st_size > 0
