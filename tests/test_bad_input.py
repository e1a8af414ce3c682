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

import json

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
     [r"unknown method 'kdd'; did you mean 'kd'\?", r"available: ab, at, cc, ce, crd, crd_kd, ", r"kdbench list methods"]),
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


# -- the results folder, suite names and files, report folders ------------------------------------
@pytest.mark.parametrize("how", ["option", "env"])
def test_empty_results_folder(how, tmp_path, monkeypatch, capsys):
    """An empty --results-dir or KDBENCH_RESULTS would write runs/, teachers/ and report/ into the current folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDBENCH_RESULTS", "" if how == "env" else str(tmp_path / "unused"))
    given = ["--results-dir", ""] if how == "option" else []
    for args in ([*RUN, "--methods", "ce", "--pairs", PAIR, *given], ["report", *given]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("kdbench: error: ") and "Traceback" not in err, err
        assert re.search(r"(--results-dir|KDBENCH_RESULTS) is (set but )?empty, which would write results into "
                         r"the current folder", err), err
    assert not list(tmp_path.iterdir())  # nothing written here


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", "", "back\\\\slash"])
def test_suite_name_with_path_parts(name, finished, tmp_path, capsys):
    """`kdbench reproduce` writes into RESULTS_DIR/reproduce/NAME: a name may not lead out of it."""
    path = tmp_path / "mine.toml"
    path.write_text(SUITE.replace('name = "mine"', f'name = "{name}"'))
    for args in (run("--methods", "kd", "--suite", str(path)), ["reproduce", str(path), "--limit", "64", "-q"]):
        refused(args, finished, capsys, rf"suite file {path}: name '.*' cannot name a folder", r"e\.g\. name = ")
    assert not (tmp_path / "escaped").exists()


def test_suite_file_that_is_not_utf8(finished, tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes(SUITE.replace("mine", "caf\u00e9").encode("latin-1"))
    refused(run("--methods", "kd", "--suite", str(path)), finished, capsys,
            rf"suite file {path} is not UTF-8 text \(byte 0xe9 at offset \d+\); save it as UTF-8")


def test_plugin_file_that_is_not_python(finished, tmp_path, capsys):
    path = tmp_path / "my_kd.txt"
    path.write_text("from kdbench.method import Method\n")
    refused(run("--methods", "kd", "--pairs", PAIR, "--plugin", str(path)), finished, capsys,
            rf"plugin file '{path}' is not a Python file \(its name does not end in \.py\)")


def test_report_folder_that_is_a_file(finished, tmp_path, capsys):
    out = tmp_path / "report.md"
    out.write_text("mine\n")
    refused(["report", "--out", str(out)], finished, capsys,
            rf"report folder {out}: {out} is an existing file, not a folder; give a folder")
    refused(["reproduce", "hinton-mnist", "--out", str(out / "sub"), "--limit", "64", "-q"], finished, capsys,
            rf"--out {out / 'sub'}: {out} is an existing file, not a folder")  # before training, not after
    assert out.read_text() == "mine\n"


# -- seeds, methods, pairs, recipes, executors ------------------------------------------------------
@pytest.mark.parametrize(("args", "expected"), [
    (["--seeds", "99999999999999999999"], r"--seeds: seed 99999999999999999999 is out of range; .* 0 to 2\*\*63-1"),
    (["--seeds=-1"], r"--seeds: seed -1 is out of range"),
    (["--pairs", "cifar_resnet8@99999999999999999999:cifar_resnet8"], r"pair '.*': seed 9+ is out of range"),
], ids=["too-big", "negative", "teacher-seed"])
def test_seed_out_of_range(args, expected, finished, capsys):
    refused(run("--methods", "kd", *(["--pairs", PAIR] if "--pairs" not in args else []), *args), finished, capsys,
            expected)


def test_suite_seed_out_of_range(finished, tmp_path, capsys):
    path = tmp_path / "mine.toml"
    path.write_text("seeds = [0, -3]\n" + SUITE)
    refused(run("--methods", "kd", "--suite", str(path)), finished, capsys,
            rf"suite file {path} seeds: seed -3 is out of range")


@pytest.mark.parametrize("methods", ["", ","])
def test_no_methods(methods, finished, capsys):
    refused(run("--methods", methods, "--pairs", PAIR), finished, capsys,
            r"--methods '.*' names no method, so nothing would run", r"--methods kd,dkd")


@pytest.mark.parametrize("pair", ["cifar_resnet8+:cifar_resnet8", "+cifar_resnet8:cifar_resnet8",
                                  "@1:cifar_resnet8"])
def test_empty_teacher_name(pair, finished, capsys):
    refused(run("--methods", "kd", "--pairs", pair), finished, capsys,
            rf"pair '{re.escape(pair)}' has an empty teacher name", r"e\.g\. cifar_resnet56:cifar_resnet20")


@pytest.mark.parametrize(("recipe", "expected"), [
    ("milestones = [25, 20]", r"milestones must be increasing, got \[25, 20\]; .* milestones = \[20, 25\]"),
    ("milestones = [20, 20]", r"milestones must be increasing"),
    ("milestones = [20, 30]", r"milestone 30 is not within its 30 epochs"),
    ("epochs = 10", r"milestone 20 is not within its 10 epochs, .* milestones = \[\] for a constant rate"),
], ids=["unsorted", "repeated", "at-the-end", "epochs-without-milestones"])
def test_bad_milestones(recipe, expected, finished, tmp_path, capsys):
    path = tmp_path / "mine.toml"
    path.write_text(SUITE + recipe + "\n")
    refused(run("--methods", "kd", "--suite", str(path)), finished, capsys,
            rf"suite file {path} \[recipe\]: recipe 'digits': " + expected)


def test_slurm_option_with_another_executor(finished, capsys):
    refused(run("--methods", "kd", "--pairs", PAIR, "--slurm-extra", "constraint=h100"), finished, capsys,
            r"--slurm-extra is for --executor slurm, and this run uses the local executor, which would ignore it")


# -- a method's forward -----------------------------------------------------------------------------
@pytest.mark.parametrize(("returns", "expected"), [
    ("[F.mse_loss(student.logits, teachers[0].logits)]",
     r"method 'odd' returned list, not a dict of loss terms; its forward must return \{name: "),
    ("{'mse': F.mse_loss(student.logits, teachers[0].logits, reduction='none')}",
     r"method 'odd' returned loss term 'mse' that is not a scalar tensor \(\(\d+, 10\)\)"),
    ("{}", r"odd .*returned no loss terms \(an empty dict\): its run would train on cross-entropy alone"),
    ("{'mse': F.mse_loss(student.logits.detach(), teachers[0].logits)}",
     r"method 'odd' returned loss term 'mse' with no gradient: it depends on no trainable weight .* compute it "
     r"from the student's outputs"),
], ids=["list", "not-scalar", "no-terms", "no-gradient"])
def test_method_forward_of_the_wrong_form(returns, expected, finished, tmp_path, capsys):
    """Found in the first training step (planning never runs a method's forward: it may need the
    workers' environment, or have side effects): the run fails with the message, exit 1, no row."""
    path = tmp_path / "odd.py"
    path.write_text("import torch.nn.functional as F\nfrom kdbench.method import Method\n\n\nclass Odd(Method):\n"
                    "    name = 'odd'\n    paper = 'a test'\n\n    def forward(self, student, teachers, batch):\n"
                    f"        return {returns}\n")
    import shutil

    results = tmp_path / "results"  # a copy: this run trains its teacher there (the shared folder stays as it is)
    shutil.copytree(finished, results)
    before = snapshot(results)
    code = main([*run("--methods", "odd", "--pairs", PAIR, "--plugin", str(path)), "--results-dir", str(results)])
    err = capsys.readouterr().err
    assert code == 1 and re.search(expected, err) and "re-run the same command" in err, err
    after = snapshot(results)
    new = [json.loads(v) for k, v in after.items() if k.startswith("runs/") and k not in before]
    assert all(r["kind"] == "teacher" for r in new)  # its teacher is a result; the method's run wrote no row
    assert all(after[k] == v for k, v in before.items() if k.startswith("runs/"))  # nothing lost


# -- rows the report and the sweep must not trust ---------------------------------------------------
def test_copied_row_file_is_no_second_seed(finished, tmp_path, capsys):
    import shutil

    from kdbench.report.rows import load_rows

    root = tmp_path / "results"
    shutil.copytree(finished / "runs", root / "runs")
    (row,) = (root / "runs").glob("*.json")
    shutil.copy(row, root / "runs" / f"{row.stem} copy.json")
    assert len(load_rows(root)) == 1
    err = capsys.readouterr().err
    assert re.search(rf"warning: skipping run file .*{re.escape(row.stem)} copy\.json: it holds run "
                     rf"{row.stem}, whose file is {row.stem}\.json", err), err
    assert main(["report", "--results-dir", str(root), "--out", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("top1", ["high", float("nan"), None])
def test_finished_row_without_a_number(top1, finished, tmp_path, capsys):
    """A row of status ok whose top1_last is not a number: the report skips it, naming the file, and the
    sweep counts the run as not done (so re-running the command redoes it)."""
    import json
    import shutil

    from kdbench.errors import KdbenchError
    from kdbench.report.rows import load_rows
    from kdbench.sweep.store import ResultsStore

    root = tmp_path / "results"
    shutil.copytree(finished / "runs", root / "runs")
    (path,) = (root / "runs").glob("*.json")
    row = json.loads(path.read_text())
    assert ResultsStore(root).has(row["run_id"])
    path.write_text(json.dumps({**row, "top1_last": top1}))
    assert not ResultsStore(root).has(row["run_id"])
    with pytest.raises(KdbenchError, match="no finished runs"):
        load_rows(root)
    err = capsys.readouterr().err
    assert re.search(rf"run file {re.escape(str(path))} has status ok but top1_last .*, not a number", err), err


# -- ImageFolder datasets ---------------------------------------------------------------------------
def imagefolder(root: Path, classes: list[str], n: int = 4) -> Path:
    """``root/{train,val}/<class>/<i>.png``: ``n`` random 8x8 RGB images per class and split."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def test_limit_on_an_imagefolder_takes_every_class(tmp_path):
    """ImageFolder lists files class by class: --limit takes in turn from each class, not the first class's."""
    from kdbench.data import load_dataset

    root = imagefolder(tmp_path / "three", ["a", "b", "c"])
    data = load_dataset(str(root), limit=7, image_size=8)
    assert data.train_labels.tolist() == data.test_labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert data.info.train_size == data.info.test_size == 7
    whole = load_dataset(str(root), image_size=8)
    assert torch.equal(data.train_images[[0, 3, 5]], whole.train_images[[0, 4, 8]])  # each class's first image
    assert torch.equal(load_dataset(str(root), limit=12, image_size=8).train_images, whole.train_images)


def test_imagefolder_of_one_class(finished, tmp_path, capsys):
    root = imagefolder(tmp_path / "one", ["only"])
    refused(run("--methods", "ce", "--pairs", PAIR, "--dataset", str(root)), finished, capsys,
            rf"ImageFolder split {root / 'train'} has 1 class folder \(only\): classifying needs at least 2")


def test_corrupt_image_in_an_imagefolder(finished, tmp_path, capsys):
    root = imagefolder(tmp_path / "bad", ["a", "b"])
    bad = root / "train" / "b" / "1.png"
    bad.write_bytes(b"not an image")
    refused(run("--methods", "ce", "--pairs", PAIR, "--dataset", str(root)), finished, capsys,
            rf"ImageFolder image {re.escape(str(bad))} cannot be read \(no image format PIL knows\); replace it")


# -- plugins, GPUs, the teacher cache ---------------------------------------------------------------
def test_plugin_that_exits_at_import(finished, tmp_path, capsys):
    path = tmp_path / "quits.py"
    path.write_text("import sys\n\nsys.exit(0)\n")
    refused(run("--methods", "kd", "--pairs", PAIR, "--plugin", str(path)), finished, capsys,
            rf"plugin file '{path}' called sys\.exit\(0\) while being imported", r"if __name__ == ")


@pytest.mark.parametrize(("gpus", "count", "expected"), [
    ("0", 0, r"--gpus 0: torch sees no CUDA GPU on this machine, so the runs would train on the CPU; drop --gpus"),
    ("all", 0, r"--gpus all: torch sees no CUDA GPU on this machine; drop --gpus"),
    ("0,2", 2, r"--gpus 0,2: torch sees 2 GPU\(s\) here, numbered 0 to 1, so GPU 2 is not among them"),
], ids=["index-without-gpu", "all-without-gpu", "index-beyond"])
def test_gpus_this_machine_lacks(gpus, count, expected, finished, tmp_path, monkeypatch, capsys):
    """Refused before planning, so not even an empty results folder is made."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    args = run("--methods", "ce", "--pairs", PAIR, "--gpus", gpus)
    refused(args, finished, capsys, expected)
    assert main([*args, "--results-dir", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


def test_teacher_cache_on_that_no_run_can_use(finished, tmp_path, capsys):
    refused(run("--methods", "fitnets,at", "--pairs", PAIR, "--teacher-cache", "on"), finished, capsys,
            r"--teacher-cache on, but no run of this sweep can use the teacher cache: method 'at' \(the method taps "
            r"stage maps, which the cache does not hold\); method 'fitnets' \(", r"Use --teacher-cache auto or off")
    refused(run("--methods", "kd", "--pairs", PAIR, "--teacher-cache", "on", "--mixup", "0.8"), finished, capsys,
            r"no run of this sweep can use the teacher cache: method 'kd' \(mixup/CutMix: the teachers see each "
            r"mixed batch, which no cached view holds\)")
    # Beside a method that uses it, "on" is "wherever it can": the plan names the method that cannot.
    assert main([*run("--methods", "kd,fitnets", "--pairs", PAIR, "--teacher-cache", "on"), "--dry-run",
                 "--results-dir", str(tmp_path / "dry")]) == 0
    assert "note: --teacher-cache on: method 'fitnets' (the method taps stage maps" in capsys.readouterr().out


# -- locks ------------------------------------------------------------------------------------------
def test_no_lock_is_left_behind(tmp_path):
    """A teacher trained, or loaded from the store for a later command, leaves no state/<id>/lock."""
    for method in ("kd", "dkd"):  # dkd's command loads the teacher kd's trained
        assert main([*run("--methods", method, "--pairs", PAIR), "--results-dir", str(tmp_path)]) == 0
        assert not list((tmp_path / "state").rglob("*")), method
    assert len(list((tmp_path / "runs").glob("*.json"))) == 3  # the teacher's row and the two students'


def _timm_train_checkpoint(folder: Path) -> tuple[Path, dict, dict]:
    """model_best.pth.tar as timm's train.py writes it, by timm's own CheckpointSaver: 'args' is an
    argparse.Namespace, and a model EMA (decay 0.5, updated after one changed step) sits in 'state_dict_ema'.
    Returns the file, the model's weights and the EMA's."""
    import argparse

    from timm.utils import CheckpointSaver, ModelEmaV3

    torch.manual_seed(0)
    model = zoo.create("cifar_resnet8", num_classes=10, in_chans=1, img_size=8)
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # the model moves away from the EMA's copy
    ema.update(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(model, opt, args=argparse.Namespace(model="cifar_resnet8", lr=0.1, epochs=1),
                            model_ema=ema, checkpoint_dir=str(folder), recovery_dir=str(folder))
    saver.save_checkpoint(0, metric=1.0)
    return folder / "model_best.pth.tar", model.state_dict(), ema.module.state_dict()


def test_a_timm_train_checkpoint_loads_its_weights_or_its_ema(tmp_path, capsys):
    """Issue 12, item 3: timm's train.py checkpoint (with its argparse.Namespace) is no longer refused as 'holds
    Python objects'; FILE#ema selects the EMA weights; the two are different teachers (ids and rows)."""
    path, weights, ema_weights = _timm_train_checkpoint(tmp_path)
    got, got_ema = zoo.read_state_dict(path), zoo.read_state_dict(f"{path}#ema")
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)
    assert all(torch.equal(got_ema[k], ema_weights[k]) for k in ema_weights)
    assert not all(torch.equal(got[k], got_ema[k]) for k in weights)  # truly another set of weights
    res = tmp_path / "res"
    for spec in (str(path), f"{path}#ema"):
        assert main([*with_checkpoint(spec), "--results-dir", str(res)]) == 0
    teachers = [json.loads(p.read_text()) for p in (res / "runs").glob("*.json")]
    teachers = {t["checkpoint_sha256"]: t for t in teachers if t["kind"] == "teacher"}
    sha = zoo.file_sha256(path)
    assert set(teachers) == {sha, f"{sha}#ema"}  # two teachers, told apart by the weights they loaded
    assert teachers[sha]["run_id"] != teachers[f"{sha}#ema"]["run_id"]


def test_ema_weights_asked_of_a_checkpoint_without_them(finished, tmp_path, capsys):
    path = tmp_path / "plain.pt"
    torch.save({"model": zoo.create("cifar_resnet8", num_classes=10, in_chans=1, img_size=8).state_dict()}, path)
    refused(with_checkpoint(f"{path}#ema"), finished, capsys,
            rf"checkpoint '{path}#ema' asks for EMA weights, but the file holds no state_dict_ema or model_ema "
            r"\(it holds: model\)", r"drop '#ema' to load its weights")
