"""Shared fixtures: tiny real models and data, and the method registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kdbench.registry import load_methods

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KDBENCH_SHARED", REPO.parent / "shared"))

# Tiny real zoo models for contract tests: 8x8 single-channel inputs, 10 classes.
TINY = dict(num_classes=10, in_chans=1, img_size=8)
TINY_SHAPE = (1, 8, 8)
TINY_STUDENT = "cifar_resnet8"
TINY_TEACHERS = ("cifar_resnet14", "cifar_wrn_16_1", "cifar_resnet8x4")


@pytest.fixture(scope="session")
def registry():
    return load_methods()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
