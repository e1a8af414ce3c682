"""Shared fixtures: a fixed seed, and real offline datasets; every test on the CPU unless it asks for CUDA."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch
from datasets_offline import fashion_root, mnist_root  # noqa: F401  (fixtures, re-exported)

# The tests mean the same on a machine with a GPU: --device auto (the CLI's default) is the CPU here and in
# every process a test starts (torchrun, workers, Ray), as the bitwise resume tests, golden values and 2-rank
# gloo DDP tests assume. Tests meant for CUDA ask for it explicitly (--device cuda, .to("cuda")).
# KDBENCH_TEST_DEVICE=auto (or cuda) runs the --device auto tests on the GPU instead; an exported
# KDBENCH_DEVICE meant for real sweeps does not leak in.
os.environ["KDBENCH_DEVICE"] = os.environ.get("KDBENCH_TEST_DEVICE", "cpu")
# Throughput repeats of 0.05 s instead of 1 s: the suite's many short sweeps each measure their models.
os.environ.setdefault("KDBENCH_THROUGHPUT_MIN_S", "0.05")
# Decoded ImageFolder sets are kept in a folder of this test session, not in the user's ~/.cache.
if "KDBENCH_DECODE_CACHE" not in os.environ:
    os.environ["KDBENCH_DECODE_CACHE"] = tempfile.mkdtemp(prefix="kdbench-decoded-")
    atexit.register(shutil.rmtree, os.environ["KDBENCH_DECODE_CACHE"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
