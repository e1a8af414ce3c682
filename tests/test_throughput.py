"""How throughput is timed (issue 17, item 10), with a fake clock: calls whose cost the test sets, no wall clock."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kdbench import metrics
from kdbench.errors import KdbenchError

CPU = torch.device("cpu")


class FakeWork:
    """A callable that advances a fake clock: ``first`` seconds for each of its first ``slow`` calls (warm-up
    paying for compiling or kernel selection), ``cost`` seconds for every later one."""

    def __init__(self, monkeypatch, *, slow: int, first: float, cost: float) -> None:
        self.now, self.calls, self.slow, self.first, self.cost = 0.0, 0, slow, first, cost
        monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: self.now))

    def __call__(self) -> None:
        self.now += self.first if self.calls < self.slow else self.cost
        self.calls += 1


def test_calls_per_repeat_are_calibrated_after_warm_up(monkeypatch):
    # Warm-up calls cost 8 s each (compiling), warm ones 1/64 s: calibrating on the warm-up would time 1 call.
    work = FakeWork(monkeypatch, slow=3, first=8.0, cost=1 / 64)
    seconds, iters = metrics.seconds_per_call(work, CPU, warmup=3, repeats=5, min_time_s=1.0)
    assert iters == 64  # 1 s of 1/64 s calls
    assert seconds == [1 / 64] * 5  # every repeat timed warm calls only
    # warm-up, then calibration passes of 1, 2, 4 and 8 calls (8/64 s >= a tenth of min_time_s), then the repeats
    assert work.calls == 3 + (1 + 2 + 4 + 8) + 5 * 64


def test_no_min_time_means_one_call_per_repeat_and_no_calibration(monkeypatch):
    work = FakeWork(monkeypatch, slow=1, first=8.0, cost=0.5)
    seconds, iters = metrics.seconds_per_call(work, CPU, warmup=1, repeats=2)
    assert iters == 1 and seconds == [0.5, 0.5] and work.calls == 1 + 2


def test_a_slow_call_is_timed_once_per_repeat(monkeypatch):
    work = FakeWork(monkeypatch, slow=0, first=0.0, cost=3.0)  # longer than min_time_s on its own
    seconds, iters = metrics.seconds_per_call(work, CPU, warmup=1, repeats=2, min_time_s=1.0)
    assert iters == 1 and seconds == [3.0, 3.0] and work.calls == 1 + 1 + 2


def test_throughput_repeats_last_a_second_by_default(monkeypatch):
    monkeypatch.delenv(metrics.THROUGHPUT_MIN_TIME_ENV, raising=False)
    assert metrics.throughput_min_time_s() == metrics.THROUGHPUT_MIN_TIME_S == 1.0
    monkeypatch.setenv(metrics.THROUGHPUT_MIN_TIME_ENV, "0.05")
    assert metrics.throughput_min_time_s() == 0.05
    seen = {}

    def fake_seconds(fn, device, **kwargs):
        seen.update(kwargs)
        fn()
        return [0.5] * kwargs["repeats"], 7

    monkeypatch.setattr(metrics, "seconds_per_call", fake_seconds)
    tp = metrics.measure_throughput(torch.nn.Linear(4, 2), (4,), batch_size=8)
    assert seen == {"warmup": 3, "repeats": 5, "min_time_s": 0.05}
    assert (tp.images_per_s, tp.repeats, tp.iters_per_repeat) == (16.0, 5, 7)
    metrics.measure_throughput(torch.nn.Linear(4, 2), (4,), batch_size=8, min_time_s=0.0)
    assert seen["min_time_s"] == 0.0


@pytest.mark.parametrize("bad", ["x", "-1", "nan", "inf"])
def test_bad_min_time_env_is_refused(monkeypatch, bad):
    monkeypatch.setenv(metrics.THROUGHPUT_MIN_TIME_ENV, bad)
    with pytest.raises(KdbenchError, match="KDBENCH_THROUGHPUT_MIN_S"):
        metrics.throughput_min_time_s()


@pytest.mark.parametrize("precision, off", [("fp32", True), ("bf16", False)])
def test_fp32_on_cuda_turns_tf32_off(precision, off):
    """Issue 17, item 10: "fp32 (exact)" must not be TF32 in cuDNN convolutions. The flags are plain settings
    (set here, and restored), so no GPU is needed."""
    from kdbench.train import EngineOptions
    from kdbench.train.options import tf32_flags

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    old = cudnn.allow_tf32, matmul.allow_tf32  # restored by hand: monkeypatch cannot undo torch's flag objects
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = True
        EngineOptions(precision).set_tf32(torch.device("cuda"))
        flags = tf32_flags("cuda")  # what the row records
        now = cudnn.allow_tf32, matmul.allow_tf32
        EngineOptions(precision).set_tf32(CPU)  # nothing to set off CUDA
        after_cpu = cudnn.allow_tf32, matmul.allow_tf32
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = old
    assert flags == {"tf32_conv": not off, "tf32_matmul": not off} and now == (not off, not off)
    assert after_cpu == now and tf32_flags(CPU) == {"tf32_conv": None, "tf32_matmul": None}


def test_rows_record_tf32(tmp_path):
    import json

    from kdbench.cli import main

    args = ["run", "--seeds", "0", "--methods", "ce", "--pairs", "hinton_mlp_1200:hinton_mlp_800", "--limit", "48",
            "--epochs", "1", "--quiet", "--no-report", "--throughput-batch", "8", "--results-dir", str(tmp_path)]
    assert main(args) == 0
    rows = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert rows and all(r["tf32_conv"] is None and r["tf32_matmul"] is None for r in rows)  # the CPU: no TF32


def test_shared_gpu_throughput_is_not_measured():
    """Issue 17, item 2: with --runs-per-gpu K > 1 the other runs train while one would time: not measured."""
    from kdbench.data import load_dataset
    from kdbench.sweep.measure import Measurer

    data = load_dataset("digits", limit=64)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    costs = Measurer(data, 8, runs_per_gpu=2).costs("m", model)
    assert costs["throughput_img_s"] != costs["throughput_img_s"]  # NaN
    assert costs["throughput_note"] == "not measured: 2 runs shared the GPU (--runs-per-gpu 2)"
    assert costs["throughput_device"] == "" and costs["flops_per_image"] > 0
    measured = Measurer(data, 8).costs("m", model)
    assert measured["throughput_img_s"] > 0 and measured["throughput_note"] == ""


def test_rows_and_report_say_throughput_was_not_measured(monkeypatch, tmp_path):
    """Through the CLI, with the request saying 2 runs per GPU (on the CPU: --runs-per-gpu itself needs --gpus),
    then the report's cost table."""
    import json
    from dataclasses import replace

    import pandas as pd

    from kdbench.cli import commands, main
    from kdbench.report.markdown import cost_table

    real = commands.build_request
    monkeypatch.setattr(commands, "build_request", lambda *a, **k: replace(real(*a, **k), runs_per_gpu=2))
    args = ["run", "--seeds", "0", "--methods", "ce", "--pairs", "hinton_mlp_1200:hinton_mlp_800", "--limit", "48",
            "--epochs", "1", "--quiet", "--no-report", "--throughput-batch", "8", "--results-dir", str(tmp_path)]
    assert main(args) == 0
    rows = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert len(rows) == 1  # ce trains no teacher
    assert all(r["throughput_img_s"] is None or r["throughput_img_s"] != r["throughput_img_s"] for r in rows)
    assert {r["throughput_note"] for r in rows} == {"not measured: 2 runs shared the GPU (--runs-per-gpu 2)"}
    table, notes = cost_table(pd.DataFrame(rows))
    assert "| images/s |" in table and table.count("not measured") == 1
    assert any("not measured for 1 run(s): 2 runs shared the GPU (--runs-per-gpu 2)." in n for n in notes), notes


class _Seen(torch.nn.Module):
    """A conv net that records, per call, its input's memory order and the conv's output dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.seen = torch.nn.Conv2d(3, 4, 3), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        self.seen.append((x.is_contiguous(memory_format=torch.channels_last), y.dtype))
        return y.float().mean((2, 3))


def test_throughput_is_timed_in_the_runs_settings():
    """Issue 17, item 10: the model runs as the run trained (autocast, memory order) and the setting is named."""
    from kdbench.train import EngineOptions

    plain = _Seen()
    tp = metrics.measure_throughput(plain, (3, 8, 8), batch_size=4, min_time_s=0)
    assert tp.dtype == "float32" and set(plain.seen) == {(False, torch.float32)}
    fast = _Seen().to(memory_format=torch.channels_last)
    opts = EngineOptions("bf16", channels_last=True)
    tp = metrics.measure_throughput(fast, (3, 8, 8), batch_size=4, min_time_s=0, options=opts)
    assert tp.dtype == "bfloat16 (autocast), channels_last" and set(fast.seen) == {(True, torch.bfloat16)}
    assert tp.images_per_s > 0 and fast.training  # train mode restored


def test_a_compiled_run_times_its_model_compiled_or_says_it_did_not(monkeypatch, capsys):
    """Compiled runs time a compiled model (dynamo traces for real; its backend runs the graph as traced) and
    say so; a compilation that fails is timed eagerly, with a warning and without "compiled" in the setting."""
    import torch._dynamo

    from kdbench.train import EngineOptions

    real_compile = torch.compile
    graphs = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend=lambda gm, ex: graphs.append(gm)
                                                                          or gm.forward))
    torch._dynamo.reset()
    try:
        tp = metrics.measure_throughput(_Seen(), (3, 8, 8), batch_size=4, min_time_s=0,
                                        options=EngineOptions(compile=True))
    finally:
        torch._dynamo.reset()
    assert tp.dtype == "float32, compiled" and graphs

    def broken(m, **kw):
        def fail(*a, **k):
            raise RuntimeError("backend exploded\nmore")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    model = _Seen()
    tp = metrics.measure_throughput(model, (3, 8, 8), batch_size=4, min_time_s=0, options=EngineOptions(compile=True))
    assert tp.dtype == "float32" and tp.images_per_s > 0 and model.seen
    assert "throughput: torch.compile failed (RuntimeError: backend exploded); timing the model eagerly" in \
        capsys.readouterr().err


def test_peak_memory_of_the_run_alone():
    """On the CPU the peak is the process's RSS and the run's own part is unknown (NaN)."""
    with metrics.PeakMemory(CPU) as peak:
        torch.zeros(1000)
    assert peak.kind == "process_max_rss" and peak.mb > 0 and peak.run_mb != peak.run_mb


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the run's own peak is CUDA's allocator's")
def test_peak_memory_of_the_run_alone_on_cuda():
    """What was allocated before the run (a dataset) is in peak_mem_mb but not in the run's own peak."""
    dev = torch.device("cuda")
    held = torch.zeros(64 * 2**20 // 4, device=dev)  # 64 MiB, as a dataset on the device
    with metrics.PeakMemory(dev) as peak:
        work = torch.zeros(32 * 2**20 // 4, device=dev)  # 32 MiB the run allocates
        del work
    assert peak.base_mb >= 64 and peak.mb >= peak.base_mb + 32
    assert 32 <= peak.run_mb < 64  # the run's 32 MiB (and rounding), not the dataset's 64
    del held
