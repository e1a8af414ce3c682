"""What --device auto means: $KDBENCH_DEVICE when set (the test suite sets cpu), else a GPU when there is one."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from kdbench.cli.args import build_parser
from kdbench.cli.build import _where_runs
from kdbench.errors import KdbenchError
from kdbench.sweep.plan import DEVICE_ENV, device_override, resolve_device


def test_the_suite_runs_auto_on_the_cpu(monkeypatch):
    # conftest sets it for every test and every process tests start, so a GPU machine changes nothing.
    assert os.environ[DEVICE_ENV] == os.environ.get("KDBENCH_TEST_DEVICE", "cpu")
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("value", ["", "auto"])
def test_unset_or_auto_detects(monkeypatch, value):
    monkeypatch.setenv(DEVICE_ENV, value)
    assert device_override() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_an_explicit_device_wins_over_the_variable(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "gpu")
    with pytest.raises(KdbenchError, match="KDBENCH_DEVICE='gpu' is not a device; set it to cpu, cuda or cuda:N"):
        resolve_device("auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU, so cuda is valid here")
def test_cuda_without_gpu_names_the_variable(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cuda:1")
    with pytest.raises(KdbenchError, match="--device auto with KDBENCH_DEVICE=cuda:1 asked for, but torch sees no"):
        resolve_device("auto")


def test_remote_runs_follow_the_variable(monkeypatch):
    # Ray and Slurm resolve auto on the driver (the GPUs each run asks for): the variable decides there too.
    monkeypatch.setattr("kdbench.cli.build._has_cuda", lambda: True)
    args = build_parser().parse_args(["run", "--executor", "ray"])
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert _where_runs(args) == ("cpu", True, 0.0)
    monkeypatch.setenv(DEVICE_ENV, "auto")
    assert _where_runs(args) == ("cuda", True, 1.0)


def test_a_local_worker_pool_only_plans_here_on_the_cpu(monkeypatch, tmp_path):
    """Issue 17, item 9: with --gpus or --workers N the workers train and this process only plans, on its CPU:
    on a GPU machine it used to hold the dataset on GPU 0 for the whole sweep. The device is the workers'."""
    from kdbench.sweep.driver import Sweep

    def where(*argv: str):
        return _where_runs(build_parser().parse_args(["run", *argv]))

    assert where() == ("auto", False, None)  # in this process: resolved where it trains
    assert where("--workers", "1") == ("auto", False, None)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert where("--workers", "2") == ("cpu", True, None)
    assert where("--gpus", "0") == ("cuda", True, None)  # --gpus: the workers' device is a GPU
    assert where("--gpus", "0", "--device", "cuda:0") == ("cuda:0", True, None)
    # A planned pool sweep holds its data on the CPU even where auto would pick a GPU.
    req = _request("--workers", "2", "--methods", "kd", "--limit", "64", "--results-dir", str(tmp_path))
    assert req.remote and req.device == "cpu"
    for where_used in ("kdbench.sweep.plan.resolve_device", "kdbench.sweep.driver.resolve_device"):
        monkeypatch.setattr(where_used, lambda name: torch.device("cuda"))  # "a GPU here": must not be asked
    sweep = Sweep.prepare(req, log=lambda line: None)
    assert sweep.device == torch.device("cpu") and sweep.data.train_images.device.type == "cpu"


def _request(*argv: str):
    from kdbench.cli.build import build_request
    from kdbench.suites import get_suite

    args = build_parser().parse_args(["run", *argv])
    suite = get_suite(args.suite)
    return build_request(args, suite, dataset=suite.dataset, recipe=suite.recipe, pairs=list(suite.pairs))


def test_what_does_not_fit_in_free_gpu_memory(monkeypatch):
    """Issue 17, item 9, with the driver's free-memory figure set (no GPU needed): 80% of it for a dataset."""
    from kdbench import metrics

    monkeypatch.setattr(metrics, "device_free_bytes", lambda device: 2**30 if device.type == "cuda" else None)
    assert metrics.fits_on_device(int(0.8 * 2**30), torch.device("cuda")) == \
        (True, "0.80 GiB, with 1.00 GiB free on cuda")
    assert metrics.fits_on_device(int(0.81 * 2**30), torch.device("cuda"))[0] is False
    assert metrics.fits_on_device(10**15, torch.device("cpu")) == (True, "")  # the CPU: never checked


def test_a_dataset_larger_than_free_gpu_memory_is_refused_before_copying(monkeypatch, tmp_path):
    from kdbench import metrics
    from kdbench.sweep.driver import load_data

    monkeypatch.setattr(metrics, "device_free_bytes", lambda device: 10_000)  # 10 kB free on "the GPU"
    req = _request("--methods", "kd", "--limit", "64", "--results-dir", str(tmp_path))
    with pytest.raises(KdbenchError, match=r"dataset digits would take 0\.00 GiB, with 0\.00 GiB free on cuda:0 "
                                           r"\(kdbench holds it .*; use --limit N or a smaller --pad-to, fewer "
                                           r"--runs-per-gpu .*--device cpu"):
        load_data(req, torch.device("cuda:0"))  # refused before any copy: no GPU is touched


def test_a_teacher_cache_that_does_not_fit_the_gpu(monkeypatch, tmp_path):
    """auto leaves it off with the reason in the row; on is an error naming the fix. The decision is made once per
    run, so the row says what the run did even after the cache took the memory."""
    from kdbench import metrics
    from kdbench.sweep.driver import Sweep

    sweep = Sweep.prepare(_request("--methods", "kd", "--limit", "64", "--epochs", "200", "--teacher-cache", "auto",
                                   "--results-dir", str(tmp_path)), log=lambda line: None)
    runner = sweep.runner
    spec = next(s for s in sweep.plan.specs if getattr(s, "method", "") == "kd")
    taps = runner.methods["kd"]().taps()
    assert runner.cache_off_reason(spec, taps) == ""  # the CPU: the cache is used
    runner._cache_reasons.clear()
    runner.device = torch.device("cuda")  # as on a GPU with 1 kB free
    monkeypatch.setattr(metrics, "device_free_bytes", lambda device: 1000)
    reason = runner.cache_off_reason(spec, taps)
    assert reason.startswith("auto: the cache would not fit in the GPU's free memory (") and "free on cuda" in reason
    monkeypatch.setattr(metrics, "device_free_bytes", lambda device: 10**12)  # now plenty: the decision stands
    assert runner.cache_off_reason(spec, taps) == reason
    runner._cache_reasons.clear()
    monkeypatch.setattr(metrics, "device_free_bytes", lambda device: 1000)
    runner.req = replace(runner.req, teacher_cache="on")
    with pytest.raises(KdbenchError, match=r"--teacher-cache on: the teacher cache of .* would take .*; use "
                                           r"--teacher-cache auto or off, or fewer --runs-per-gpu"):
        runner.cache_off_reason(spec, taps)
