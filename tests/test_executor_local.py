"""The local executor's worker processes get the GPUs ``--gpus`` names, counted as the parent sees them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdbench.errors import KdbenchError
from kdbench.executors.local import LocalExecutor, physical_gpus


def test_no_parent_mask_keeps_the_indices():
    assert physical_gpus(["0", "1"], None) == ["0", "1"]


def test_indices_map_through_the_parents_mask():
    assert physical_gpus(["0", "1"], "4,5,6,7") == ["4", "5"]
    assert physical_gpus(["3", "0"], " 4, 5 ,6,7") == ["7", "4"]


def test_uuid_entries_pass_through_as_strings():
    mask = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6,MIG-1a2b3c4d-0000-1111-2222-333344445555"
    assert physical_gpus(["1", "0"], mask) == ["MIG-1a2b3c4d-0000-1111-2222-333344445555",
                                                "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"]
    # A UUID given to --gpus is the worker's mask as it is, whatever the parent's.
    assert physical_gpus(["GPU-abc"], "4,5") == ["GPU-abc"]


def test_an_index_beyond_the_mask_is_refused():
    with pytest.raises(KdbenchError, match=r"--gpus 2: CUDA_VISIBLE_DEVICES=4,5 leaves 2 GPU\(s\) visible"):
        physical_gpus(["2"], "4,5")
    # CUDA stops reading the mask at -1: nothing after it is visible.
    with pytest.raises(KdbenchError, match="leaves 1 GPU"):
        physical_gpus(["1"], "4,-1,5")


def test_a_malformed_entry_is_refused():
    with pytest.raises(KdbenchError, match="--gpus 'a': give GPU indices"):
        physical_gpus(["a"], None)


def test_executor_slots_use_the_parents_mask(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    ex = LocalExecutor(lambda task: None, gpus=["0", "0", "1", "1"])  # --gpus 0,1 --runs-per-gpu 2
    assert ex.slots == ["4", "4", "5", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert LocalExecutor(lambda task: None, gpus=["0", "1"]).slots == ["0", "1"]
    assert LocalExecutor(lambda task: None, workers=2).slots == [None, None]


@pytest.mark.parametrize("gpus", ["all", "0,1,2,3"])
def test_cli_gpus_map_through_the_mask(monkeypatch, gpus):
    # --gpus all under CUDA_VISIBLE_DEVICES=4,5,6,7: torch sees 4 GPUs (0..3), the workers get 4..7.
    import torch

    from kdbench.cli.args import build_parser
    from kdbench.cli.build import build_executor

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    args = build_parser().parse_args(["run", "--gpus", gpus, "--runs-per-gpu", "2"])
    ex = build_executor(args, None)
    assert isinstance(ex, LocalExecutor) and ex.slots == ["4", "4", "5", "5", "6", "6", "7", "7"]


def test_compile_threads_share_the_cpus():
    from kdbench.executors.local import compile_threads

    assert compile_threads(4, cpus=16) == 4 and compile_threads(3, cpus=16) == 5
    assert compile_threads(8, cpus=4) == 1 and compile_threads(1, cpus=128) == 32  # at least 1, torch's cap
    assert compile_threads(0, cpus=2) == 2


class _InlineProcess:
    """A worker 'process' that runs in this one when started (what the fake spawn context makes)."""

    def __init__(self, target, args, daemon):
        self.target, self.args = target, args

    def start(self):
        self.target(*self.args)

    def is_alive(self):
        return False

    def join(self, timeout=None):
        pass


def _env_threads(task):
    return os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")


@pytest.mark.parametrize("user", [None, "7"])
def test_workers_share_one_compile_pool(monkeypatch, user):
    """Each worker gets cpus // workers inductor compile processes (issue 17, item 10), unless the user set
    TORCHINDUCTOR_COMPILE_THREADS. The workers run inline here, through a fake spawn context."""
    import queue
    from types import SimpleNamespace

    import torch._inductor.config

    from kdbench.executors import local

    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "0")  # recorded, so the test's changes are undone
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS")
    if user is not None:
        monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", user)
    monkeypatch.setattr(local.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    started = []

    def process(target, args, daemon):
        started.append(args)
        return _InlineProcess(target, args, daemon)

    ctx = SimpleNamespace(Queue=queue.Queue, Process=process)
    monkeypatch.setattr(local.mp, "get_context", lambda method: ctx)
    tasks = [SimpleNamespace(run_id=f"r{i}", label=f"r{i}") for i in range(3)]
    seen = []
    config = torch._inductor.config
    old, config.compile_threads = config.compile_threads, 99  # (monkeypatch's undo hides a config entry)
    torch_threads = torch.get_num_threads()
    try:
        local.LocalExecutor(_env_threads, workers=3).execute(tasks, seen.append)
        threads = config.compile_threads
    finally:
        config.compile_threads = old
        torch.set_num_threads(torch_threads)  # the inline workers took their share of the cores in this process
    assert [args[-2] for args in started] == [4, 4, 4]  # 12 CPUs, 3 workers
    assert seen == [user or "4"] * 3
    assert threads == (99 if user else 4)


def _torch_threads(task):
    import torch

    return torch.get_num_threads()


@pytest.mark.parametrize("user", [None, "3"])
def test_cpu_workers_share_the_cores(monkeypatch, user):
    """N workers each train with cpus // N intra-op threads (torch's default, all cores for each, runs N²
    threads on N cores), unless the user set OMP_NUM_THREADS. The workers run inline, through a fake spawn."""
    import queue
    from types import SimpleNamespace

    import torch

    from kdbench.executors import local

    monkeypatch.setenv("OMP_NUM_THREADS", user or "")
    monkeypatch.setattr(local.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    ctx = SimpleNamespace(Queue=queue.Queue, Process=lambda target, args, daemon: _InlineProcess(target, args, daemon))
    monkeypatch.setattr(local.mp, "get_context", lambda method: ctx)
    tasks = [SimpleNamespace(run_id=f"r{i}", label=f"r{i}") for i in range(2)]
    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(5)  # what an inline worker finds, so that "unchanged" is visible
    try:
        local.LocalExecutor(_torch_threads, workers=2).execute(tasks, seen.append)
    finally:
        torch.set_num_threads(before)  # the workers ran in this process
    assert seen == [5 if user else 6] * 2  # 12 CPUs, 2 workers; the user's setting left alone


def _children(pid: int) -> set[int]:
    """The process ids whose parent is ``pid`` (Linux /proc)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads worker processes from Linux's /proc")
def test_sigterm_stops_the_workers_too(tmp_path):
    """SIGTERM to `kdbench run --workers 2` (issue 17): the driver stops its workers on the way out and says so;
    they used to keep training and writing rows. Run as a user would, in a subprocess; the runs are long enough
    (many epochs) that they are still training when the signal comes."""
    import signal
    import subprocess
    import sys
    import time

    res = tmp_path / "res"
    cmd = [sys.executable, "-m", "kdbench", "run", "--workers", "2", "--methods", "ce", "--seeds", "0,1",
           "--pairs", "hinton_mlp_1200:hinton_mlp_800", "--epochs", "400", "--throughput-batch", "8",
           "--quiet", "--no-report", "--results-dir", str(res)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: set[int] = set()
    deadline = time.monotonic() + 120
    # Wait until both workers train (each run's checkpoint folder exists), so the signal finds them busy.
    while time.monotonic() < deadline and proc.poll() is None:
        workers |= {c for c in _children(proc.pid) if _alive(c) and b"spawn_main" in _cmdline(c)}
        if len([p for p in (res / "state").glob("*") if p.is_dir()]) >= 2 and len(workers) >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None and len(workers) >= 2, "the workers did not start training within 2 minutes"
    proc.send_signal(signal.SIGTERM)
    try:  # (orphaned workers would hold the output pipes open: communicate would time out)
        _, err = proc.communicate(timeout=60)
    finally:
        for pid in [proc.pid, *workers]:  # whatever the outcome, leave no process behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "kdbench: terminated (SIGTERM); finished runs are kept, re-run the same command to resume" in err
    time.sleep(1)
    assert not [w for w in workers if _alive(w)], "worker processes outlived the driver"
    assert not list((res / "runs").glob("*.json"))  # 400 epochs: nothing finished, and no worker goes on to
