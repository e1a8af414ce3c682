"""Runs survive interruptions: per-epoch checkpoints resume bit for bit, damaged files are skipped,
failures stay inside their run, and a SIGKILLed sweep ends with exactly the uninterrupted rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from executors_common import store_rows

from kdbench import zoo
from kdbench.cli import main
from kdbench.data import load_dataset
from kdbench.recipe import get_recipe
from kdbench.registry import load_methods
from kdbench.train import train
from kdbench.train.checkpoint import cuda_rng_to_restore

RECIPE = get_recipe("digits").with_epochs(4)


class StopAfter:
    """A progress bar that interrupts training after ``n`` epochs, as Ctrl-C would."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def update(self, k: int) -> None:
        self.seen += k
        if self.seen >= self.n:
            raise KeyboardInterrupt

    def set_postfix(self, **_: object) -> None:
        pass


def _train(data, method_name: str | None, state: Path | None, progress=None, model="cifar_resnet8",
           kwargs=None):
    info = data.info
    make = lambda name: zoo.create(name, num_classes=info.num_classes, in_chans=info.in_chans,  # noqa: E731
                                   img_size=info.img_size, **(kwargs or {}))
    torch.manual_seed(0)
    teacher = make("cifar_resnet8")
    torch.manual_seed(1)
    student = make(model)
    method, teachers = None, []
    if method_name:
        from kdbench.features import probe

        method = load_methods()[method_name]()
        taps = method.taps()
        shape = (info.in_chans, info.img_size, info.img_size)
        method.setup(probe(make(model), taps, shape, model), [probe(make("cifar_resnet8"), taps, shape, "t")])
        teachers = [teacher]
    result = train(student, data, RECIPE, seed=3, method=method, teachers=teachers,
                   teacher_names=["cifar_resnet8"] * len(teachers), model_name=model, progress=progress,
                   state_path=state, state_key="run-x")
    return student, method, result


@pytest.mark.parametrize("method_name", [None, "kd", "fitnets"])
def test_resume_is_bitwise_equal_on_cpu(tmp_path, method_name):
    # FitNets has trainable adapters and momentum for them: all of it must be in the checkpoint.
    data = load_dataset("digits", limit=160)
    ref_model, ref_method, ref = _train(data, method_name, None)
    state = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        _train(data, method_name, state, progress=StopAfter(2))
    assert torch.load(state, weights_only=False)["next_epoch"] == 2
    model, method, res = _train(data, method_name, state)
    assert res.resumed_from == 2
    assert [h.losses for h in res.history] == [h.losses for h in ref.history]
    assert [h.top1 for h in res.history] == [h.top1 for h in ref.history]
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    if method_name == "fitnets":
        for a, b in zip(ref_method.state_dict().values(), method.state_dict().values()):
            assert torch.equal(a, b)
    assert torch.equal(ref.test_logits, res.test_logits)


def test_resume_restores_dropout_rng(tmp_path):
    # Dropout draws from torch's global generator: a resumed run must continue the same stream.
    data = load_dataset("synthetic:mnist", limit=96)
    kw = {"drop_rate": 0.3}
    _, _, ref = _train(data, None, None, model="hinton_mlp_800", kwargs=kw)
    state = tmp_path / "c.pt"
    with pytest.raises(KeyboardInterrupt):
        _train(data, None, state, progress=StopAfter(1), model="hinton_mlp_800", kwargs=kw)
    _, _, res = _train(data, None, state, model="hinton_mlp_800", kwargs=kw)
    assert res.resumed_from == 1
    assert [h.losses for h in res.history] == [h.losses for h in ref.history]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other-run"])
def test_damaged_checkpoint_starts_over(tmp_path, damage, capsys):
    data = load_dataset("digits", limit=96)
    _, _, ref = _train(data, "kd", None)
    state = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        _train(data, "kd", state, progress=StopAfter(2))
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "garbage":
        state.write_bytes(os.urandom(2048))
    else:
        ck = torch.load(state, weights_only=False)
        ck["key"] = "another-run"
        torch.save(ck, state)
    _, _, res = _train(data, "kd", state)
    err = capsys.readouterr().err
    assert "ignoring" in err and str(state) in err and "starting the run over" in err
    assert res.resumed_from == 0
    assert [h.losses for h in res.history] == [h.losses for h in ref.history]


def test_checkpoint_of_another_architecture_names_keys(tmp_path):
    data = load_dataset("digits", limit=96)
    state = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        _train(data, None, state, progress=StopAfter(1))
    with pytest.raises(Exception, match=r"does not fit model 'cifar_resnet14'.*(missing|unexpected|shapes)"):
        _train(data, None, state, model="cifar_resnet14")



def test_cuda_rng_choice_keeps_the_runs_own_gpu():
    # This version saves one state (the run's own GPU): restored whatever index the GPU has now.
    own = torch.arange(4, dtype=torch.uint8)
    assert cuda_rng_to_restore(own, 0) == (own, "")
    assert cuda_rng_to_restore(own, 5)[0] is own
    assert cuda_rng_to_restore(None, 0) == (None, "")  # a CPU run
    assert cuda_rng_to_restore([], 0) == (None, "")  # an older CPU run
    # Older versions saved every visible GPU's state: the entry of this process's device index.
    eight = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]
    assert cuda_rng_to_restore(eight, 3)[0] is eight[3]
    state, why = cuda_rng_to_restore(eight[:1], 3)  # written by a process that saw 1 GPU, resumed on GPU 3
    assert state is None and "none for GPU 3" in why


def test_old_all_gpus_checkpoint_resumes_on_a_worker_with_one_gpu(tmp_path, monkeypatch, capsys):
    """A checkpoint holding 8 GPUs' states, resumed where the run's device is cuda:0 of 1 or cuda:3 of 2:
    no IndexError, the entry of its own index or a warning. CUDA itself is faked (no GPU needed)."""
    from kdbench.train import checkpoint as ck_module

    data = load_dataset("digits", limit=96)
    state = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        _train(data, None, state, progress=StopAfter(1))
    saved = torch.load(state, weights_only=False)
    assert saved["cuda_rng"] is None  # a CPU run saves no CUDA state
    saved["cuda_rng"] = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]  # as older versions wrote it
    torch.save(saved, state)
    restored: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append((int(s[0]), device)))
    for index in (0, 3, 9):
        ck_module._restore_cuda_rng(saved["cuda_rng"], torch.device("cuda", index), state)
    assert restored == [(0, torch.device("cuda", 0)), (3, torch.device("cuda", 3))]
    assert "none for GPU 9" in capsys.readouterr().err
    # The whole load path (on the CPU: CUDA's state is left alone) still resumes such a file.
    _, _, res = _train(data, None, state)
    assert res.resumed_from == 1


# -- whole sweeps through the CLI ----------------------------------------------------------
SWEEP = ["run", "--seeds", "0", "--methods", "ce,kd", "--pairs", "cifar_resnet8:cifar_resnet8", "--limit", "256", "--epochs", "5",
         "--throughput-batch", "8", "--no-report", "-q"]


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdbench", *args], capture_output=True, text=True, timeout=600, **kw)


def rerun_completes(d: Path, reference: dict) -> None:
    """Re-running the sweep's command finishes it with exactly the uninterrupted sweep's rows."""
    again = _cli([*SWEEP, "--results-dir", str(d)])
    assert again.returncode == 0, again.stderr
    assert store_rows(d) == reference


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The rows of an uninterrupted sweep."""
    d = tmp_path_factory.mktemp("ref")
    assert main([*SWEEP, "--results-dir", str(d)]) == 0
    return store_rows(d)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_rows(tmp_path, reference):
    """The fault test: SIGKILL in the middle of a run, restart, and the store is exactly right."""
    d = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-m", "kdbench", *SWEEP, "--results-dir", str(d)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Wait until a student run has a checkpoint (it is mid-run), then kill without warning.
    deadline = time.time() + 300
    victim = None
    while time.time() < deadline and victim is None:
        for ck in (d / "state").glob("*/checkpoint.pt") if (d / "state").is_dir() else []:
            run_id = ck.parent.name
            if run_id in reference and reference[run_id]["kind"] == "student":
                victim = run_id
        time.sleep(0.05)
    assert victim, "no student checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (d / "runs" / f"{victim}.json").exists()
    rerun_completes(d, reference)
    row = json.loads((d / "runs" / f"{victim}.json").read_text())
    assert row["resumed_from_epoch"] >= 1, "the killed run did not resume from its checkpoint"
    assert not any((d / "state").glob("*/checkpoint.pt")), "finished runs keep no checkpoint"


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resumes(tmp_path, reference):
    from subprocs import sigint_default

    d = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-m", "kdbench", *SWEEP, "--results-dir", str(d)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (d / "runs").is_dir() and any(json.loads(p.read_text())["kind"] == "student"
                                         for p in (d / "runs").glob("*.json")):
            break
        time.sleep(0.05)
    finished_before = {p.name: p.read_bytes() for p in (d / "runs").glob("*.json")}
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the sweep finished before Ctrl-C arrived (machine too fast for this timing)")
    assert proc.returncode == 130, err
    assert "interrupted" in err and "re-run" in err
    for name, data in finished_before.items():
        assert (d / "runs" / name).read_bytes() == data
    assert not list((d / "runs").glob(".*"))  # no half-written row
    rerun_completes(d, reference)


@pytest.mark.slow
def test_two_sweeps_at_once_share_one_store(tmp_path, reference):
    d = tmp_path / "res"
    procs = [subprocess.Popen([sys.executable, "-m", "kdbench", *SWEEP, "--results-dir", str(d)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert store_rows(d) == reference
    # Each run was trained by exactly one of the two sweeps (the other found it locked or done).
    trained = sum(o[0].count("top-1") for o in outs)
    assert trained == len(reference)


@pytest.mark.slow
def test_damaged_row_is_redone_and_others_kept(tmp_path, reference):
    d = tmp_path / "res"
    assert main([*SWEEP, "--results-dir", str(d)]) == 0
    files = sorted((d / "runs").glob("*.json"))
    student = next(p for p in files if json.loads(p.read_text())["kind"] == "student")
    student.write_text(student.read_text()[:100])  # as a crash of an older writer could leave it
    others = {p.name: p.read_bytes() for p in files if p != student}
    r = _cli([*SWEEP, "--results-dir", str(d)])
    assert r.returncode == 0, r.stderr
    assert student.name in r.stderr and "damaged" in r.stderr
    assert store_rows(d) == reference
    assert {p.name: p.read_bytes() for p in files if p != student} == others


PLUGIN = textwrap.dedent('''
    """Test plugins: a method whose loss turns NaN at epoch 1, and one that runs out of memory."""
    import torch
    from kdbench.method import Method

    class NanAtOne(Method):
        name = "nan_at_one"
        paper = "none (a test of divergence handling)"
        def __init__(self, *, ce_weight: float = 1.0) -> None:
            super().__init__(ce_weight=ce_weight)
        def forward(self, student, teachers, batch):
            bad = float("nan") if batch.epoch >= 1 else 0.0
            return {"boom": student.logits.sum() * 0 + bad}

    class Oom(Method):
        name = "oom"
        paper = "none (a test of out-of-memory handling)"
        def __init__(self, *, ce_weight: float = 1.0) -> None:
            super().__init__(ce_weight=ce_weight)
        def forward(self, student, teachers, batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
''')


@pytest.mark.slow
def test_divergence_and_oom_stay_inside_their_run(tmp_path, capsys):
    plugin = tmp_path / "bad_methods.py"
    plugin.write_text(PLUGIN)
    d = tmp_path / "res"
    args = ["run", "--seeds", "0", "--methods", "ce,nan_at_one,oom", "--plugin", str(plugin), "--pairs", "cifar_resnet8:cifar_resnet8",
            "--limit", "64", "--epochs", "3", "--throughput-batch", "8", "-q", "--results-dir", str(d)]
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 1  # the OOM run did not finish: re-running will retry it
    rows = {r["method"]: r for r in map(json.loads, (p.read_text() for p in (d / "runs").glob("*.json")))}
    assert rows["ce"]["status"] == "ok"
    assert rows["nan_at_one"]["status"] == "diverged" and rows["nan_at_one"]["top1_last"] is None
    assert "boom" in rows["nan_at_one"]["error"] and rows["nan_at_one"]["diverged_at_epoch"] == 1
    assert "oom" not in rows
    assert "DIVERGED" in out and "out of memory" in err.lower() and "re-run" in err
    errors = list((d / "state").glob("*/error.txt"))
    assert len(errors) == 1 and "OutOfMemoryError" in errors[0].read_text()
    index = (d / "report" / "index.md").read_text()
    assert "Runs without a result" in index and "diverged" in index


def test_results_dir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main([*SWEEP, "--results-dir", str(blocker / "results")])
    err = capsys.readouterr().err
    assert code == 2
    assert "not writable" in err and "--results-dir" in err and str(blocker) in err
    assert blocker.read_text() == "not a folder"


def test_unknown_executor(tmp_path, capsys):
    code = main([*SWEEP, "--results-dir", str(tmp_path / "r"), "--executor", "rey"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown executor 'rey'" in err and "did you mean 'ray'" in err and "slurm" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_disk_full_while_writing_loses_nothing(tmp_path, reference):
    """A file-size limit makes every write past it fail as a full disk would (EFBIG)."""
    d = tmp_path / "res"

    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write() instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    r = subprocess.run([sys.executable, "-m", "kdbench", *SWEEP, "--results-dir", str(d)], capture_output=True,
                       text=True, timeout=600, preexec_fn=limit)
    assert r.returncode == 1, r.stderr
    assert "disk full while writing" in r.stderr and "free space and re-run" in r.stderr
    assert not list(d.rglob(".*.tmp")), "a half-written file was left behind"
    for p in (d / "runs").glob("*.json") if (d / "runs").is_dir() else []:
        json.loads(p.read_text())  # whatever was written is whole
    rerun_completes(d, reference)


@pytest.mark.slow
def test_worker_processes_give_the_same_rows(tmp_path, reference, monkeypatch):
    d = tmp_path / "res"
    # Float results depend on the thread count: the workers (which would take a share of the cores each) keep the
    # reference's, as a user's OMP_NUM_THREADS makes them.
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    assert main([*SWEEP, "--results-dir", str(d), "--workers", "2"]) == 0
    assert store_rows(d) == reference


def test_sweeps_starting_at_once_all_pass_the_writable_check(tmp_path):
    """Each check writes and removes a file of its own: concurrent sweeps must not remove each
    other's (a fixed probe name made one of two sweeps started together fail)."""
    import threading

    from kdbench.sweep.store import ResultsStore

    errors: list[BaseException] = []
    for round_ in range(40):
        store = ResultsStore(tmp_path / f"r{round_}")
        start = threading.Barrier(8)

        def check(store: ResultsStore = store, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                store.check_writable()
            except BaseException as exc:  # collected: an exception in a thread would be lost
                errors.append(exc)

        threads = [threading.Thread(target=check) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert list(store.root.iterdir()) == []  # nothing left behind
    assert not errors, errors[:3]
