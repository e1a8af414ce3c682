"""Shared fixtures: a fixed seed, and real offline datasets."""

from __future__ import annotations

import pytest
import torch
from datasets_offline import fashion_root, mnist_root  # noqa: F401  (fixtures, re-exported)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
