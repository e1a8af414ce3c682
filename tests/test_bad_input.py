"""Every row of the README's "Bad input: what you get" table, through the real `kdbench` command.

Each bad command runs against a results folder that already holds a finished run, and must
  - exit non-zero (2: the user's input is wrong),
  - print one `kdbench: error:` line that names the problem and the fix (no traceback),
  - lose nothing: every file in the folder stays byte-identical, and none appears (no row, no *.tmp).
Most bad inputs fail while planning, before any data is loaded or anything trained, so each case
takes well under a second. Unknown executor, unwritable results folder and disk full are tested
with the executors and the store.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from kdbench import zoo
from kdbench.cli import main
from kdbench.registry import load_methods

RUN = ["run", "--seeds", "0", "--limit", "64", "--epochs", "1", "--throughput-batch", "8", "-q", "--no-report"]
PAIR = "cifar_resnet8:cifar_resnet8"  # a tiny real CIFAR ResNet on the embedded 8x8 digits
METHODS = load_methods()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A results folder holding one finished run (`ce`, which needs no teacher), made with a real run."""
    root = tmp_path_factory.mktemp("finished")
    assert main([*RUN, "--methods", "ce", "--pairs", PAIR, "--results-dir", str(root)]) == 0
    assert len(list((root / "runs").glob("*.json"))) == 1
    return root


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def refused(args: list[str], finished: Path, capsys, *expected: str) -> str:
    """Run a bad command on the finished folder; check exit 2, the message, and that nothing changed."""
    before = snapshot(finished)
    try:
        code = main([*args, "--results-dir", str(finished)])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert err.startswith("kdbench: error: ") and "Traceback" not in err, err
    for pattern in expected:
        assert re.search(pattern, err), f"{pattern!r} not in: {err}"
    assert snapshot(finished) == before  # nothing lost, nothing half-written, no new row
    return err


def run(*extra: str) -> list[str]:
    return [*RUN, *extra]


# -- unknown names ---------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "expected"), [
    (["--methods", "kdd", "--pairs", PAIR],
     [r"unknown method 'kdd'; did you mean 'kd'\?", r"available: at, cc, ce, dkd, ", r"kdbench list methods"]),
    (["--methods", "kd", "--pairs", "cifar_resnet8:cifar_resnet8x"],
     [r"unknown model 'cifar_resnet8x'; did you mean 'cifar_resnet8x4'\?", r"kdbench list models"]),
    (["--methods", "kd", "--pairs", "cifar_resnet56:resnet8x4"],
     [r"unknown model 'resnet8x4'", r"registered as 'cifar_resnet8x4'"]),
    (["--methods", "kd", "--pairs", PAIR, "--dataset", "digitz"],
     [r"unknown dataset 'digitz'; did you mean 'digits'\?", r"available: .*mnist", r"ImageFolder"]),
    (["--suite", "digit"], [r"unknown suite 'digit'; did you mean 'digits'\?", r"kdbench list suites"]),
    (["--methods", "kd", "--pairs", PAIR, "--recipe", "crdd"], [r"unknown recipe 'crdd'; did you mean 'crd'\?"]),
], ids=["method", "model", "crd-model-name", "dataset", "suite", "recipe"])
def test_unknown_name(args, expected, finished, capsys):
    refused(run(*args), finished, capsys, *expected)


# -- hyperparameters -------------------------------------------------------------------------
def test_unknown_hyperparameter(finished, capsys):
    refused(run("--methods", "kd", "--pairs", PAIR, "--set", "kd.temprature=8"), finished, capsys,
            r"unknown hyperparameter 'temprature' for method 'kd'; did you mean 'temperature'\?",
            r"it takes: ce_weight=0.1, kd_weight=0.9, temperature=4.0")


def test_hyperparameter_of_a_method_not_in_the_run(finished, capsys):
    refused(run("--methods", "kd", "--pairs", PAIR, "--set", "dkd.beta=2"), finished, capsys,
            r"--set names method 'dkd', which this run does not include \(methods: kd\)")


@pytest.mark.parametrize(("method", "value"), [("kd", "-1"), ("kd", "0"), ("dkd", "-4"), ("dkd", "0"),
                                               ("kd", "nan"), ("dkd", "inf")])
def test_temperature_out_of_range(method, value, finished, capsys):
    refused(run("--methods", method, "--pairs", PAIR, "--set", f"{method}.temperature={value}"), finished, capsys,
            rf"bad hyperparameter value for method '{method}'",
            r"temperature must be (> 0|finite)", rf"--set {method}\.temperature=VALUE")


# Every loss weight of every method: the engine's ce_weight, each `*_weight`, and DKD's α and β.
WEIGHTS = sorted((name, hp) for name, cls in METHODS.items() for hp in cls.hyperparameters()
                 if hp.endswith("_weight") or (name, hp) in {("dkd", "alpha"), ("dkd", "beta")})


def test_every_method_has_its_weights_checked():
    assert {n for n, _ in WEIGHTS} == set(METHODS) and len(WEIGHTS) >= 12


@pytest.mark.parametrize(("method", "hp"), WEIGHTS, ids=[f"{n}.{h}" for n, h in WEIGHTS])
def test_negative_weight(method, hp, finished, capsys):
    refused(run("--methods", method, "--pairs", PAIR, "--set", f"{method}.{hp}=-0.5"), finished, capsys,
            rf"bad hyperparameter value for method '{method}' \([^)]*{method}\.{hp}=-0\.5[^)]*\)",
            rf"{hp} must be >= 0", rf"--set {method}\.{hp}=VALUE")


@pytest.mark.parametrize(("setting", "expected"), [
    ("kd.kd_weight=abc", (r"bad value for kd\.kd_weight: 'abc' is not a number; "
                          r"give one like the default, kd\.kd_weight=0\.9")),
    ("kd.ce_weight=", r"bad value for kd\.ce_weight: '' is not a number"),
    ("dkd.warmup=2.5", r"bad value for dkd\.warmup: '2\.5' is not an integer; .* dkd\.warmup=20"),
    ("ensemble_kd.teacher_weights=1,x", (r"'1,x' is not a comma-separated list of numbers; "
                                         r"write e\.g\. ensemble_kd\.teacher_weights=1,3")),
    ("kd.temperature", r"is not of the form METHOD\.HYPERPARAMETER=VALUE"),
], ids=["word-for-number", "empty", "float-for-int", "bad-list", "no-value"])
def test_value_of_the_wrong_type(setting, expected, finished, capsys):
    method = setting.split(".")[0]
    refused(run("--methods", method, "--pairs", PAIR, "--set", setting), finished, capsys, expected)


# -- suite files -----------------------------------------------------------------------------
# tests/test_suites.py::test_bad_suite_file_is_a_clear_error covers each kind of mistake in a suite
# file at the parser; here a few go through the command, for the exit code and the folder.
SUITE = """name = "mine"
dataset = "digits"
pairs = ["cifar_resnet8:cifar_resnet8"]
[recipe]
base = "digits"
"""


@pytest.mark.parametrize(("text", "expected"), [
    ("name = 'x'\ndataset = [", [r"is not valid TOML", r"benchmarks/suites/README\.md"]),
    ("seed = [1]\n" + SUITE, [r"unknown key 'seed'; did you mean 'seeds'\?", r"known keys: "]),
    (SUITE.replace('pairs = ["cifar_resnet8:cifar_resnet8"]', "pairs = []"), [r"'pairs' is empty"]),
    (SUITE + "[models.cifar_resnet8]\nnum_classes = 7\n",
     [r"\[models\.cifar_resnet8\] sets num_classes, which kdbench sets itself", r"remove it"]),
    (SUITE + "[hparams.kd]\nkd_weight = 'heavy'\n", [r"\[hparams\]: bad value for kd\.kd_weight: it must be a number like 0\.9, got 'heavy'"]),
    (SUITE + "[hparams.kd]\ntemperature = -2\n", [r"temperature must be > 0", r"\[hparams\.kd\]"]),
    # A misspelt method in [hparams.X] or [sweep.X] would otherwise be ignored silently.
    (SUITE + "[hparams.kdd]\nkd_weight = 1\n", [r"unknown method 'kdd'; did you mean 'kd'\?", r"\[hparams\.X\]"]),
    (SUITE + "[sweep.cee]\nce_weight = [1, 2]\n", [r"unknown method 'cee'", r"\[sweep\.X\]"]),
    (SUITE + "[hparams.kd]\ntemprature = 2\n", [r"\[hparams\]: unknown hyperparameter 'temprature'",
                                                 r"did you mean 'temperature'"]),
], ids=["not-toml", "unknown-key", "no-pairs", "sets-class-count", "word-for-weight", "negative-temperature",
        "misspelt-hparams-method", "misspelt-sweep-method", "misspelt-hparam"])
def test_malformed_suite_file(text, expected, finished, tmp_path, capsys):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    err = refused(run("--methods", "kd", "--suite", str(path)), finished, capsys, *expected)
    if "hparams.kd]" not in text:
        assert str(path) in err  # the message names the file to fix


def test_malformed_suite_file_for_reproduce(finished, tmp_path, capsys):
    path = tmp_path / "mine.toml"
    path.write_text("name = 'x'\ndataset = [")
    refused(["reproduce", str(path), "--limit", "64", "-q"], finished, capsys, rf"suite file {path} is not valid TOML")


def test_missing_suite_file(finished, tmp_path, capsys):
    refused(run("--suite", str(tmp_path / "nowhere.toml")), finished, capsys, r"nowhere\.toml does not exist")


# -- teachers --------------------------------------------------------------------------------
ONE_TEACHER = sorted(n for n, cls in METHODS.items() if cls.max_teachers == 1)


@pytest.mark.parametrize("method", ONE_TEACHER)
def test_more_teachers_than_the_method_takes(method, finished, capsys):
    """Named, a method that fits none of the pairs is an error (beside a pair it fits: a note)."""
    refused(run("--methods", method, "--pairs", "cifar_resnet8+cifar_resnet14:cifar_resnet8"), finished, capsys,
            rf"method '{method}' takes 1 teacher, and no pair of this run has that many "
            r"\(cifar_resnet8\+cifar_resnet14→cifar_resnet8\)",
            r"Add such a pair \(--pairs\), or drop the method")


def test_malformed_pair(finished, capsys):
    refused(run("--methods", "kd", "--pairs", "cifar_resnet8"), finished, capsys,
            r"pair 'cifar_resnet8' is not of the form TEACHER\[\+TEACHER\.\.\.\]:STUDENT", r"e\.g\. ")


# -- checkpoints -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A real teacher checkpoint for digits (10 classes, 1x8x8), as torch.save writes it."""
    path = tmp_path_factory.mktemp("ckpt") / "teacher.pt"
    torch.save({"model": zoo.create("cifar_resnet8", num_classes=10, in_chans=1, img_size=8).state_dict()}, path)
    return path


def with_checkpoint(path: Path | str) -> list[str]:
    return run("--methods", "kd", "--pairs", PAIR, "--teacher-checkpoint", str(path))


def test_checkpoint_for_another_class_count(finished, tmp_path, capsys):
    path = tmp_path / "seven.pt"
    torch.save(zoo.create("cifar_resnet8", num_classes=7, in_chans=1, img_size=8).state_dict(), path)
    refused(with_checkpoint(path), finished, capsys,
            rf"checkpoint '{path}' was trained for 7 classes but model 'cifar_resnet8' is built for 10",
            r"use a checkpoint trained on this dataset")


def test_checkpoint_of_random_bytes(finished, tmp_path, capsys):
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(4096))
    err = refused(with_checkpoint(path), finished, capsys,
                  rf"checkpoint '{path}' is not a readable PyTorch checkpoint \(4,096 bytes",
                  r"truncated or corrupted, or not a file written by torch\.save", r"download it again")
    assert "weights_only` set to `False`" not in err  # torch's advice to unpickle untrusted code is not passed on


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_checkpoint(keep, weights, finished, tmp_path, capsys):
    data = weights.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * keep)])
    refused(with_checkpoint(path), finished, capsys,
            rf"checkpoint '{path}' is not a readable PyTorch checkpoint", r"truncated or corrupted",
            r"Copy or download it again")


def test_empty_checkpoint(finished, tmp_path, capsys):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    refused(with_checkpoint(path), finished, capsys, rf"checkpoint '{path}' is empty \(0 bytes\)", r"again")


def test_checkpoint_that_is_not_a_state_dict(finished, tmp_path, capsys):
    path = tmp_path / "whole_model.pt"
    torch.save(zoo.create("cifar_resnet8", num_classes=10, in_chans=1, img_size=8), path)  # the module, pickled
    refused(with_checkpoint(path), finished, capsys,
            rf"checkpoint '{path}' holds Python objects besides tensors \(GLOBAL ", r"does not unpickle",
            r"re-save only its weights", r"state_dict\(\)")


@pytest.mark.parametrize("where", ["missing", "folder"])
def test_checkpoint_path_that_is_no_file(where, finished, tmp_path, capsys):
    path = tmp_path / "nowhere.pt" if where == "missing" else tmp_path
    refused(with_checkpoint(path), finished, capsys,
            rf"checkpoint '{path}' (not found|is a folder); pass the path of a \.pt/\.pth file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permissions")
def test_checkpoint_without_read_permission(weights, finished, tmp_path, capsys):
    path = tmp_path / "locked.pt"
    path.write_bytes(weights.read_bytes())
    path.chmod(0)
    try:
        refused(with_checkpoint(path), finished, capsys, rf"cannot read checkpoint '{path}'", r"permissions")
    finally:
        path.chmod(0o600)


def test_checkpoint_of_another_architecture(finished, tmp_path, capsys):
    path = tmp_path / "r14.pt"
    torch.save(zoo.create("cifar_resnet14", num_classes=10, in_chans=1, img_size=8).state_dict(), path)
    refused(with_checkpoint(f"cifar_resnet8={path}"), finished, capsys,
            rf"checkpoint '{path}' does not fit model 'cifar_resnet8'", r"unexpected in the file",
            r"Is it a checkpoint of this architecture\?")


def test_checkpoint_for_a_model_that_is_no_teacher(weights, finished, capsys):
    refused(with_checkpoint(f"cifar_resnet14={weights}"), finished, capsys,
            r"--teacher-checkpoint names model 'cifar_resnet14', which is no teacher of this run "
            r"\(teachers: cifar_resnet8\)")


def test_a_good_checkpoint_still_runs(weights, tmp_path, capsys):
    """The checks above refuse bad files only: the same command with a real checkpoint trains."""
    assert main([*with_checkpoint(weights), "--results-dir", str(tmp_path)]) == 0
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2  # the student and its teacher's row
