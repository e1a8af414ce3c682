"""Where named datasets come from: the data folder, scikit-learn's digits, torchvision's sets, and
synthetic stand-ins of their shapes. Each source reads a whole dataset into :class:`DataSplits`."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..errors import KdbenchError, unknown
from .splits import DatasetInfo, DataSplits, channel_stats

ENV_DATA_DIR = "KDBENCH_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/kdbench/data")

class DataDir(NamedTuple):
    """A resolved data folder and where the choice came from (for error messages)."""

    path: Path
    origin: str  # 'from --data-dir', 'from KDBENCH_DATA' or 'the default'


# A registered loader reads one named dataset in full; ``load_dataset`` applies ``limit``.
DatasetLoader = Callable[[DataDir, bool], DataSplits]


# ----------------------------------------------------------------------------- data folder


def data_dir_with_origin(data_dir: str | Path | None) -> DataDir:
    """The data folder (see :func:`resolve_data_dir`) and which setting chose it."""
    if data_dir is not None and str(data_dir) != "":
        return DataDir(Path(data_dir).expanduser().absolute(), "from --data-dir")
    env = os.environ.get(ENV_DATA_DIR, "")
    if env:  # an empty variable counts as unset, as a shell user would expect
        return DataDir(Path(env).expanduser().absolute(), f"from {ENV_DATA_DIR}")
    return DataDir(DEFAULT_DATA_DIR.expanduser().absolute(), f"the default {DEFAULT_DATA_DIR}")


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The data folder: ``data_dir`` (--data-dir), else env ``KDBENCH_DATA``, else ``~/.cache/kdbench/data``."""
    return data_dir_with_origin(data_dir).path


# ----------------------------------------------------------------------------- digits

# The digits split is part of the benchmark's definition (every run must see the same test
# set), so it uses its own fixed seed, never the run seed.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def digits_split_indices(y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The fixed train/test split of scikit-learn's digits: sorted index arrays (1,437 / 360).

    Stratified: each class's indices are permuted with a fixed seed and its first share goes to
    test. The test size is ceil(20%) = 360, as sklearn's ``train_test_split(test_size=0.2)``
    would give, shared out over classes by largest remainder. ``RandomState`` is used because
    NumPy freezes its stream, so the split is the same on every NumPy version. ``y``: the digits
    targets, if already loaded.
    """
    if y is None:
        from sklearn.datasets import load_digits

        y = load_digits().target
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * DIGITS_TEST_FRACTION
    n_test = np.floor(exact).astype(int)
    short = math.ceil(len(y) * DIGITS_TEST_FRACTION) - int(n_test.sum())
    # stable sort: ties go to the lower class, so the allocation is fully determined
    n_test[np.argsort(-(exact - n_test), kind="stable")[:short]] += 1
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    test: list[np.ndarray] = []
    for cls, k in zip(classes, n_test):
        idx = np.flatnonzero(y == cls)
        test.append(idx[rng.permutation(len(idx))[:k]])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx)  # sorted
    return train_idx, test_idx


def read_digits(data_dir: DataDir, download: bool) -> DataSplits:
    """scikit-learn's bundled digits (1,797 8×8 images, 17 grey levels); data_dir/download unused."""
    import sklearn
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 0..16 grey levels -> 0..255 so every dataset shares the same uint8 pixel convention
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1)  # N×1×8×8
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = (torch.from_numpy(i) for i in digits_split_indices(bunch.target))
    train_images = images[train_idx].contiguous()
    mean, std = channel_stats(train_images)
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        in_chans=1,
        img_size=8,
        classes=tuple(str(c) for c in bunch.target_names),
        mean=mean,
        std=std,
        source=f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})",
        train_size=len(train_idx),
        test_size=len(test_idx),
    )
    return DataSplits(info, train_images, labels[train_idx], images[test_idx].contiguous(), labels[test_idx])


# ----------------------------------------------------------------------------- torchvision sets


@dataclass(frozen=True)
class TorchvisionSet:
    """A torchvision dataset kdbench reads: its class, a file whose absence means "not there", its shape."""

    cls_name: str
    probe: str
    in_chans: int
    side: int
    num_classes: int
    # The published normalisation constants (CIFAR's as used by the CRD protocol), not
    # recomputed, so results stay comparable with the literature.
    mean: tuple[float, ...]
    std: tuple[float, ...]


TORCHVISION_SETS: dict[str, TorchvisionSet] = {
    "mnist": TorchvisionSet("MNIST", "MNIST/raw/train-images-idx3-ubyte", 1, 28, 10, (0.1307,), (0.3081,)),
    "fashion_mnist": TorchvisionSet("FashionMNIST", "FashionMNIST/raw/train-images-idx3-ubyte", 1, 28, 10,
                                    (0.2860,), (0.3530,)),
    "cifar10": TorchvisionSet("CIFAR10", "cifar-10-batches-py/data_batch_1", 3, 32, 10,
                              (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": TorchvisionSet("CIFAR100", "cifar-100-python/train", 3, 32, 100,
                               (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    name: (t.mean, t.std) for name, t in TORCHVISION_SETS.items()
}


def torchvision_loader(name: str) -> DatasetLoader:
    """The reader of torchvision set ``name`` (a key of :data:`TORCHVISION_SETS`)."""
    return functools.partial(read_torchvision, name)


def read_torchvision(name: str, data_dir: DataDir, download: bool) -> DataSplits:
    """Read a torchvision dataset's train and test sets straight from its ``.data``/``.targets``."""
    import torchvision

    t = TORCHVISION_SETS[name]
    train, test = _open_torchvision(name, t, data_dir, download)
    train_images, test_images = _images_of(train), _images_of(test)
    info = DatasetInfo(
        name=name,
        num_classes=len(train.classes),
        in_chans=train_images.shape[1],
        img_size=train_images.shape[-1],
        classes=tuple(train.classes),
        mean=t.mean,
        std=t.std,
        source=f"torchvision.datasets.{t.cls_name} (torchvision {torchvision.__version__}) from {data_dir.path}",
        train_size=len(train_images),
        test_size=len(test_images),
    )
    return DataSplits(info, train_images, _labels_of(train), test_images, _labels_of(test))


def _open_torchvision(name: str, t: TorchvisionSet, data_dir: DataDir, download: bool) -> tuple[Any, Any]:
    """torchvision's train and test dataset objects; missing files and failed downloads as KdbenchError."""
    from torchvision import datasets

    cls = getattr(datasets, t.cls_name)
    root = data_dir.path
    if download:
        root.mkdir(parents=True, exist_ok=True)
    try:
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except RuntimeError as e:
        # torchvision signals absent (or, for CIFAR, corrupt) files with a bare RuntimeError
        if "not found" in str(e).lower():
            why = "missing or corrupt" if t.cls_name.startswith("CIFAR") else "missing"
            raise KdbenchError(_missing_message(name, t.cls_name, data_dir, t.probe, why)) from None
        if download:
            raise KdbenchError(_download_failed(name, root, e)) from None
        raise
    except OSError as e:  # URLError and socket errors while downloading
        if download:
            raise KdbenchError(_download_failed(name, root, e)) from None
        raise


def _images_of(ds: Any) -> Tensor:
    data = ds.data
    if isinstance(data, np.ndarray):  # CIFAR: numpy N×H×W×C
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    return data.unsqueeze(1).contiguous()  # (Fashion-)MNIST: uint8 tensor N×H×W


def _labels_of(ds: Any) -> Tensor:
    return torch.as_tensor(ds.targets, dtype=torch.int64)


def _missing_message(name: str, cls_name: str, data_dir: DataDir, probe: str, why: str) -> str:
    """The 'dataset not found' text: what, where (and why there), how to provide it."""
    root = data_dir.path
    expected = root / probe
    msg = (
        f"dataset '{name}' not found: torchvision.datasets.{cls_name} looked in {root} "
        f"({data_dir.origin}) and expects files such as {expected} ({why})."
    )
    gz = expected.with_name(expected.name + ".gz")
    if gz.is_file():  # a common trap: torchvision reads only the extracted files
        msg += f" {gz} is there, but torchvision reads the extracted file: decompress it in place (gunzip -k)."
    msg += (
        f" To fix: pass --download to fetch it into that folder (needs internet), or pass "
        f"--data-dir DIR (or set {ENV_DATA_DIR}=DIR) for a folder laid out as torchvision expects, "
        f"e.g. DIR/{probe}."
    )
    return msg


def _download_failed(name: str, root: Path, err: BaseException) -> str:
    # torchvision's MNIST error is 'Error downloading X:' then one 'Tried <mirror>, got:' block
    # per mirror; the first and last lines say what failed and why
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
    reason = lines[0].rstrip(":") + (f": {lines[-1]}" if len(lines) > 1 else "")
    return (
        f"could not download dataset '{name}' into {root}: {reason}. --download needs internet; "
        f"without it, copy the files into a folder laid out as torchvision expects and pass "
        f"--data-dir DIR (or set {ENV_DATA_DIR}=DIR)."
    )


# ----------------------------------------------------------------------------- synthetic stand-ins

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 512, 256
# (channels, side, classes, mean, std) of the datasets a synthetic stand-in can mimic.
#: ImageNet-1k (ILSVRC-2012) as kdbench holds it: 224 px RGB, 1,000 classes, torchvision's statistics.
IMAGENET_SHAPE = (3, 224, 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_SHAPES: dict[str, tuple[int, int, int, tuple[float, ...], tuple[float, ...]]] = {
    "digits": (1, 8, 10, (0.5,), (0.5,)),
    "imagenet": IMAGENET_SHAPE,
    **{name: (t.in_chans, t.side, t.num_classes, t.mean, t.std) for name, t in TORCHVISION_SETS.items()},
}


def read_synthetic(of: str) -> DataSplits:
    """Random images with ``of``'s shape, classes and normalisation (torchvision's FakeData)."""
    from torchvision import datasets
    from torchvision.transforms.functional import pil_to_tensor

    key = of.lower().replace("-", "_")
    if key not in _SHAPES:
        raise unknown("dataset to make synthetic", of, _SHAPES, fix="Write synthetic:NAME, e.g. synthetic:cifar100")
    c, side, classes, mean, std = _SHAPES[key]

    def split(n: int, offset: int) -> tuple[Tensor, Tensor]:
        # FakeData draws image i from a generator seeded with i + random_offset: deterministic.
        ds = datasets.FakeData(size=n, image_size=(c, side, side), num_classes=classes, random_offset=offset)
        items = [ds[i] for i in range(n)]
        images = torch.stack([pil_to_tensor(img) for img, _ in items])
        return images, torch.tensor([int(y) for _, y in items], dtype=torch.int64)

    tr, tr_y = split(SYNTHETIC_TRAIN, 0)
    te, te_y = split(SYNTHETIC_TEST, SYNTHETIC_TRAIN)
    info = DatasetInfo(
        name=f"{SYNTHETIC_PREFIX}{key}", num_classes=classes, in_chans=c, img_size=side,
        classes=tuple(str(i) for i in range(classes)), mean=mean, std=std,
        source=f"torchvision.datasets.FakeData shaped as {key}: NOT REAL DATA",
        train_size=SYNTHETIC_TRAIN, test_size=SYNTHETIC_TEST, real_data=False,
    )
    return DataSplits(info, tr, tr_y, te, te_y)
