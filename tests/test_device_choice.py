"""What --device auto means: $KDBENCH_DEVICE when set (the test suite sets cpu), else a GPU when there is one."""

from __future__ import annotations

import os

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
