"""Real datasets that live outside the repository, laid out for torchvision in a temporary folder.

MNIST comes from ../shared/data beside the checkout (or $KDBENCH_SHARED); Fashion-MNIST from Debian's
package dataset-fashion-mnist. Where either is absent, the fixture skips with the reason.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _shared_data_dir() -> Path:
    """shared/data beside the checkout, or $KDBENCH_SHARED (the shared/ folder or its data/)."""
    env = os.environ.get("KDBENCH_SHARED")
    if env:
        base = Path(env)
        return base / "data" if (base / "data" / "MNIST").is_dir() else base
    return REPO.parent / "shared" / "data"


def _gunzip_into(src_dir: Path, dest: Path) -> None:
    """The README's recipe: decompress each .gz into dest (torchvision reads only extracted files)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        with gzip.open(src_dir / f"{name}.gz", "rb") as f, open(dest / name, "wb") as out:
            shutil.copyfileobj(f, out, length=1 << 20)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = _shared_data_dir() / "MNIST" / "raw"
    if not all((raw / f"{n}.gz").is_file() for n in MNIST_FILES):
        pytest.skip(
            f"MNIST needs ../shared/data (absent here): no MNIST .gz files in {raw}; the offline copy "
            f"lives beside the checkout, or set KDBENCH_SHARED to the shared/ folder"
        )
    root = tmp_path_factory.mktemp("mnist_root")
    _gunzip_into(raw, root / "MNIST" / "raw")
    return root


@pytest.fixture(scope="session")
def fashion_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not all((FASHION_DIR / f"{n}.gz").is_file() for n in MNIST_FILES):
        pytest.skip(
            f"Fashion-MNIST needs Debian's dataset-fashion-mnist package (absent here: no .gz files in "
            f"{FASHION_DIR}); install it with apt-get install dataset-fashion-mnist"
        )
    root = tmp_path_factory.mktemp("fashion_root")
    _gunzip_into(FASHION_DIR, root / "FashionMNIST" / "raw")
    return root


