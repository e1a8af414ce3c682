"""Benchmarks share the tests' real-data fixtures (MNIST from ../shared/data)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from datasets_offline import fashion_root, mnist_root  # noqa: E402,F401  (fixtures, re-exported)
