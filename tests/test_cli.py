"""The `kdbench` command end to end on tiny real data, and every kind of bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import REPO

from kdbench import zoo
from kdbench.cli import main

# Fast real models: Hinton's MLPs (flat features as stages) and a small CIFAR ResNet, at 8x8.
PAIRS = "hinton_mlp_1200:hinton_mlp_800,hinton_mlp_1200+cifar_resnet8:hinton_mlp_800"
TINY_RUN = ["run", "--seeds", "0", "--pairs", PAIRS, "--set", "fitnets.stage=-1", "--limit", "96", "--epochs", "2", "--quiet", "--throughput-batch", "32"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_end_to_end_run_report_and_resume(tmp_path):
    results = tmp_path / "res"
    cmd = [sys.executable, "-m", "kdbench", *TINY_RUN, "--methods", "all", "--results-dir", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]
    students = [r for r in rows if r["kind"] == "student"]
    teachers = [r for r in rows if r["kind"] == "teacher"]
    # ce once (it serves both pairs), every one-teacher method on the single-teacher pair, ensemble_kd on both.
    # at, nst, vid, ab, ft, fsp and reviewkd tap stage maps: the MLPs have two hidden vectors, so they are left out
    assert sorted(r["method"] for r in students) == ["cc", "ce", "crd", "crd_kd", "dist", "dkd", "ensemble_kd",
                                                     "ensemble_kd", "fitnets", "hard_kd", "kd", "logit_l2", "noisy_kd",
                                                     "pkt", "rkd", "sp"]
    assert sorted(r["student"] for r in teachers) == ["cifar_resnet8", "hinton_mlp_1200"]
    assert "left out: method 'kd' takes 1 teacher; pair hinton_mlp_1200+cifar_resnet8→hinton_mlp_800 has 2" in proc.stdout
    for r in students:
        assert r["run_id"] + ".json" in {p.name for p in (results / "runs").iterdir()}
        assert r["dataset"] == "digits[:96]" and r["shortened"] and "shortened: 2 of 20" in r["schedule"]
        assert 0 <= r["top1_last"] <= 100 and 0 <= r["top1_best"] <= 100 and r["top1_best"] >= r["top1_last"]
        assert r["top5_last"] >= r["top1_last"]
        assert r["params"] == 784 * 0 + (64 * 800 + 800) + (800 * 800 + 800) + (800 * 10 + 10)
        assert r["flops_per_image"] > 0 and r["throughput_img_s"] > 0 and r["throughput_batch"] == 32
        assert r["train_time_s"] > 0 and r["peak_mem_mb"] > 0
        assert len([k for k in r if k.startswith("class_f1.")]) == 10
        assert r["torch_version"] == torch.__version__ and "kdbench" in r["command"] and r["git_commit"]
        assert (r["agreement"] is None) == (r["method"] == "ce")
        # the engine's cross-entropy is a term exactly when the method weights it (hard_kd, logit_l2 and noisy_kd
        # learn from the teacher alone: CE weight 0)
        assert ("loss.ce" in r) == (json.loads(r["hparams"]).get("ce_weight", 1.0) > 0)
        history = json.loads(r["history_loss"])  # every term of every epoch, by name
        assert len(history) == 2 and all(set(h) == {k[5:] for k in r if k.startswith("loss.")} for h in history)
    # FLOPs and throughput belong to the architecture: measured once per sweep, shared by its runs.
    assert len({(r["throughput_img_s"], r["flops_per_image"]) for r in students}) == 1
    fit = next(r for r in students if r["method"] == "fitnets")
    assert fit["extra_params"] == 800 * 1200 + 1200  # a Linear regressor built from probed widths
    assert "loss.hint" in fit
    rkd = next(r for r in students if r["method"] == "rkd")
    assert "loss.rkd_distance" in rkd and "loss.rkd_angle" in rkd
    report = results / "report"
    assert (report / "index.md").is_file()
    tables = list(report.glob("table_*.md"))
    assert len(tables) == 1 and "shortened" in tables[0].read_text()
    assert len(list(report.glob("*.png"))) == 4  # accuracy against params, throughput, training cost; bars
    assert "kdbench report" in proc.stdout and str(report) in proc.stdout
    assert re.search(r"kd +hinton_mlp_1200→hinton_mlp_800 +seed 0: top-1 \d+\.\d\d \(best", proc.stdout)

    # The same command again finishes nothing new and changes no row.
    before = {p.name: p.read_text() for p in (results / "runs").glob("*.json")}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "0 runs finished, 16 already done" in again.stdout
    assert {p.name: p.read_text() for p in (results / "runs").glob("*.json")} == before


def test_seeded_cpu_run_is_reproducible(tmp_path, capsys):
    args = ["run", "--seeds", "0", "--pairs", "hinton_mlp_1200:hinton_mlp_800", "--methods", "kd", "--limit", "64",
            "--epochs", "2", "--quiet", "--no-report", "--throughput-batch", "16"]
    rows = []
    for d in ("a", "b"):
        assert run_cli([*args, "--results-dir", str(tmp_path / d)], capsys)[0] == 0
        rows.append({p.name: json.loads(p.read_text()) for p in (tmp_path / d / "runs").glob("*.json")})
    assert rows[0].keys() == rows[1].keys()
    for name in rows[0]:
        for key in ("top1_last", "top1_best", "history_top1", "loss.ce"):
            assert rows[0][name].get(key) == rows[1][name].get(key), key


def test_list_methods_shows_papers_and_defaults(capsys):
    code, out, _ = run_cli(["list", "methods"], capsys)
    assert code == 0
    for text in ("kd  (1 teacher)", "paper: Hinton", "kd.temperature = 4.0", "fitnets.hint_weight = 100.0",
                 "rkd.angle_weight = 50.0", "ensemble_kd.combine = 'mean_probs'", "ce  (no teacher)"):
        assert text in out


def test_help_explains_itself():
    proc = subprocess.run([sys.executable, "-m", "kdbench", "run", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--methods", "--pairs", "--seeds", "--set", "--plugin", "--teacher-checkpoint", "--epochs",
                 "--data-dir", "--download", "--quiet", "--results-dir", "examples:"):
        assert flag in proc.stdout


# -- bad input: a clear message, exit code 2, no result row ----------------------------
def _save(name: str, path: Path, **kw) -> Path:
    torch.save({"model": zoo.create(name, in_chans=1, img_size=8, **kw).state_dict()}, path)
    return path


BAD = {
    "unknown method": (["--methods", "kdd"], r"unknown method 'kdd'; did you mean 'kd'\?"),
    "unknown model": (["--pairs", "cifar_resnet56:resnet8x4"],
                      r"unknown model 'resnet8x4';.*registered as 'cifar_resnet8x4'"),
    "unknown hyperparameter": (["--set", "kd.temprature=2"], r"unknown hyperparameter 'temprature'.*did you mean"),
    "bad value": (["--set", "kd.temperature=warm"], r"bad value for kd.temperature: 'warm' is not a number"),
    "invalid value": (["--set", "kd.temperature=-1"], r"temperature must be > 0"),
    "bad pair": (["--pairs", "cifar_resnet8"], r"not of the form TEACHER\[\+TEACHER...\]:STUDENT"),
    "unknown suite": (["--suite", "digit"], r"unknown suite 'digit'; did you mean 'digits'\?"),
    "model too big for the images": (["--pairs", "convnext_atto:cifar_resnet8"],
                                     r"model 'convnext_atto' cannot run on digits's 1x8x8 images"),
    "stage the model lacks": (["--pairs", "hinton_mlp_1200:hinton_mlp_800", "--methods", "fitnets", "--set",
                               "fitnets.stage=2"],
                              r"method 'fitnets' fits none of this run's pairs: method 'fitnets': model "
                              r"'hinton_mlp_800' has 2 stages .*stage 2 does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, tmp_path, capsys):
    extra, pattern = BAD[case]
    args = ["run", "--seeds", "0", "--methods", "kd", "--limit", "32", "--epochs", "1", "--quiet", "--results-dir", str(tmp_path)]
    if "--methods" in extra:
        args = args[:1] + args[3:]
    code, _, err = run_cli([*args, *extra], capsys)
    assert code == 2
    assert re.search(pattern, err), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU, so --device cuda is valid here")
def test_cuda_without_gpu(tmp_path, capsys):
    code, _, err = run_cli(["run", "--seeds", "0", "--device", "cuda", "--methods", "kd", "--limit", "32", "--results-dir",
                            str(tmp_path), "--quiet"], capsys)
    assert code == 2 and "torch sees no CUDA GPU; use --device cpu" in err
    assert not (tmp_path / "runs").exists()


def test_missing_dataset(tmp_path, capsys):
    empty = tmp_path / "nodata"
    code, _, err = run_cli(["run", "--seeds", "0", "--suite", "hinton_mnist", "--data-dir", str(empty), "--results-dir",
                            str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 2
    assert str(empty) in err and "--download" in err and "--data-dir" in err
    assert not (tmp_path / "r").exists()


def test_checkpoint_with_other_class_count(tmp_path, capsys):
    ckpt = _save("cifar_resnet8", tmp_path / "t100.pt", num_classes=100)
    code, _, err = run_cli(["run", "--seeds", "0", "--pairs", "cifar_resnet8:hinton_mlp_800", "--methods", "kd", "--limit", "32",
                            "--teacher-checkpoint", str(ckpt), "--results-dir", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 2
    assert "trained for 100 classes" in err and "10" in err
    assert not (tmp_path / "r" / "runs").exists()


def test_checkpoint_of_another_architecture(tmp_path, capsys):
    ckpt = _save("cifar_resnet14", tmp_path / "r14.pt", num_classes=10)
    code, _, err = run_cli(["run", "--seeds", "0", "--pairs", "cifar_resnet8:hinton_mlp_800", "--methods", "kd", "--limit", "32",
                            "--teacher-checkpoint", f"cifar_resnet8={ckpt}", "--results-dir", str(tmp_path / "r"),
                            "--quiet"], capsys)
    assert code == 2
    assert "does not fit model 'cifar_resnet8'" in err and "unexpected in the file" in err
    assert not (tmp_path / "r" / "runs").exists()


def test_teacher_checkpoint_is_used_not_retrained(tmp_path, capsys):
    ckpt = _save("cifar_resnet8", tmp_path / "t.pt", num_classes=10)
    res = tmp_path / "r"
    code, _, err = run_cli(["run", "--seeds", "0", "--pairs", "cifar_resnet8:hinton_mlp_800", "--methods", "kd", "--limit", "32",
                            "--epochs", "1", "--teacher-checkpoint", str(ckpt), "--results-dir", str(res), "--quiet",
                            "--no-report", "--throughput-batch", "8"], capsys)
    assert code == 0, err
    rows = [json.loads(p.read_text()) for p in (res / "runs").glob("*.json")]
    teacher = next(r for r in rows if r["kind"] == "teacher")
    assert teacher["trained_by_kdbench"] is False and len(teacher["checkpoint_sha256"]) == 64
    assert not list((res / "teachers").glob("*.pt"))  # nothing trained, nothing cached


# -- plugins ------------------------------------------------------------------------------
def readme_plugin_code() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README's 'Write your own method' example (marked <!-- plugin-example -->) is missing"
    return match.group(1)


def test_readme_plugin_example_runs(tmp_path, capsys):
    plugin = tmp_path / "my_kd.py"
    plugin.write_text(readme_plugin_code())
    code, out, _ = run_cli(["list", "methods", "--plugin", str(plugin)], capsys)
    assert code == 0 and "my_kd" in out
    res = tmp_path / "r"
    code, out, err = run_cli(["run", "--seeds", "0", "--plugin", str(plugin), "--methods", "my_kd", "--set", "my_kd.temperature=2",
                              "--pairs", "hinton_mlp_1200:hinton_mlp_800", "--limit", "64", "--epochs", "1",
                              "--quiet", "--no-report", "--results-dir", str(res), "--throughput-batch", "8"], capsys)
    assert code == 0, err
    row = next(json.loads(p.read_text()) for p in (res / "runs").glob("*.json") if "my_kd" in p.read_text())
    assert row["method"] == "my_kd" and row["hp.temperature"] == 2.0
    assert any(k.startswith("loss.") and k != "loss.ce" for k in row)


PLUGIN_ERRORS = {
    "no paper": ("class P(Method):\n    name = 'p'\n    def forward(self, s, t, b): return {}\n",
                 r"must name its paper"),
    "positional hyperparameter": (
        "class P(Method):\n    name = 'p'\n    paper = 'x'\n    def __init__(self, w=1.0, *, ce_weight=1.0):\n"
        "        super().__init__(ce_weight=ce_weight)\n    def forward(self, s, t, b): return {}\n",
        r"argument 'w' of P must be keyword-only"),
    "duplicate name": ("class P(Method):\n    name = 'kd'\n    paper = 'x'\n    def forward(self, s, t, b): return {}\n",
                       r"duplicate method name 'kd'"),
    "no forward": ("class P(Method):\n    name = 'p'\n    paper = 'x'\n", r"does not implement forward"),
}


@pytest.mark.parametrize("case", sorted(PLUGIN_ERRORS))
def test_broken_plugin_is_refused_at_load(case, tmp_path, capsys):
    body, pattern = PLUGIN_ERRORS[case]
    plugin = tmp_path / "bad.py"
    plugin.write_text("from kdbench.method import Method\n\n" + body)
    code, _, err = run_cli(["list", "methods", "--plugin", str(plugin)], capsys)
    assert code == 2
    assert re.search(pattern, err), err
    assert str(plugin) in err


def test_hinton_mnist_suite_on_real_mnist(mnist_root, tmp_path, capsys):
    """The MNIST suite end to end on real MNIST (a shortened, limited smoke run: labelled as such)."""
    res = tmp_path / "r"
    code, out, err = run_cli(["run", "--seeds", "0", "--suite", "hinton_mnist", "--methods", "ce,kd,fitnets", "--data-dir", str(mnist_root),
                              "--limit", "512", "--epochs", "2", "--quiet", "--results-dir", str(res),
                              "--throughput-batch", "64"], capsys)
    assert code == 0, err
    rows = [json.loads(p.read_text()) for p in (res / "runs").glob("*.json")]
    assert {r["method"] for r in rows} == {"teacher", "ce", "kd", "fitnets"}
    for r in rows:
        assert r["dataset"] == "mnist[:512]" and r["test_size"] == 512 and r["schedule"] == ("mnist_mlp, shortened: 2 of 300 epochs, sgd cosine schedule" if r["kind"] == "teacher" else "mnist_mlp, shortened: 2 of 60 epochs, 5% held out for validation, gradients clipped at norm 1")
        # Every run trains: its summed loss falls from the first epoch to the second. Eight SGD steps of the
        # suite's student schedule (lr 0.05, gradients clipped at norm 1) move a distilled student's accuracy too little to assert on (it sits
        # near chance while its teacher is at about 45%), but the label-trained runs clear chance.
        first, last = (sum(terms.values()) for terms in json.loads(r["history_loss"]))
        assert last < first, (r["method"], r.get("transfer"), r["history_loss"])
        if r["method"] in ("teacher", "ce", "fitnets"):
            assert r["top1_last"] > 15, (r["method"], r["top1_last"])  # chance is 10%
    fit = next(r for r in rows if r["method"] == "fitnets")
    assert fit["hp.stage"] == 1  # the suite's own override: the MLPs have two stages


def test_interrupted_sweep_keeps_finished_runs_and_resumes(tmp_path):
    """SIGINT mid-sweep: finished rows stay whole, nothing half-written; the same command resumes."""
    import signal
    import time

    from subprocs import sigint_default

    res = tmp_path / "r"
    cmd = [sys.executable, "-m", "kdbench", "run", "--seeds", "0", "--pairs", "hinton_mlp_1200:hinton_mlp_800", "--methods",
           "ce,kd,rkd", "--limit", "256", "--epochs", "200", "--results-dir", str(res), "--throughput-batch", "16",
           "--no-report", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((res / "runs").glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    finished = sorted(p.name for p in (res / "runs").glob("*.json"))
    if proc.returncode == 0:
        pytest.fail("the sweep finished before it could be interrupted; make it longer")
    assert proc.returncode == 130 and "re-run the same command to resume" in err
    assert 2 <= len(finished) < 4  # teacher + at least one student, not all three students
    for p in (res / "runs").iterdir():
        assert not p.name.startswith("."), f"temporary file left behind: {p.name}"
        json.loads(p.read_text())  # every row is whole
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    n_students = len(finished) - 1
    assert f"{3 - n_students} runs finished, {n_students} already done" in again.stdout
    assert len(list((res / "runs").glob("*.json"))) == 4


def test_a_closed_pipe_ends_quietly():
    """`kdbench list models | head -1` printed a BrokenPipeError traceback when head left; now nothing, exit 141."""
    proc = subprocess.run(f"{sys.executable} -m kdbench list models | head -1", shell=True, capture_output=True,
                          text=True, timeout=300, executable="/bin/bash")
    assert proc.stdout.count("\n") == 1 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
