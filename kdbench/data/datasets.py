"""Datasets by name, held fully in memory as uint8 tensors.

Every dataset is loaded once into ``uint8`` N×C×H×W image tensors plus ``int64`` labels
(:class:`DataSplits`). Training can then move the whole set to the accelerator and do
augmentation and normalisation there with batched tensor ops (as KellerJordan/cifar10-airbench
does) instead of a per-image PIL pipeline in worker processes, which is what bounds small-model
throughput.

Names (see :data:`DATASETS`):

* ``digits``: scikit-learn's bundled 8×8 handwritten digits; needs no download, so it is the
  default for tests and smoke runs.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: read through ``torchvision.datasets``
  from the data folder (:func:`resolve_data_dir`), or fetched there with ``download=True``.
* ``synthetic:<name>`` (e.g. ``synthetic:cifar100``): random images of that dataset's shape, class
  count and normalisation from ``torchvision.datasets.FakeData``. Not real data, and marked so in
  every row: it checks that a suite runs end to end where the real data is absent.
* a path to an ImageFolder tree (``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` or
  ``DIR/test/<class>/*``), or ``imagefolder:<path>``.

Missing data is reported as a :class:`~kdbench.errors.KdbenchError` that says what was looked
for, where, and how to provide it.

This module is the catalogue (:data:`DATASETS`) and the entry point (:func:`load_dataset`); the
sources are :mod:`.sources` (data folder, digits, torchvision, synthetic) and :mod:`.imagefolder`,
the in-memory form is :mod:`.splits`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import KdbenchError, unknown
from .imagefolder import IMAGEFOLDER_PREFIX, read_imagefolder
from .resolution import Resolution, resize_splits
from .sources import (
    SYNTHETIC_PREFIX,
    TORCHVISION_SETS,
    DatasetLoader,
    data_dir_with_origin,
    read_digits,
    read_synthetic,
    torchvision_loader,
)
from .splits import DataSplits, limit_splits, pad_images

DATASETS: dict[str, DatasetLoader] = {
    "digits": read_digits,
    **{name: torchvision_loader(name) for name in TORCHVISION_SETS},
}


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    limit: int | None = None,
    image_size: int = 0,
    pad_to: int = 0,
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
    imagefolder_size: int = 0,
) -> DataSplits:
    """Load a dataset by name into memory (CPU, uint8 images, int64 labels).

    name: a key of :data:`DATASETS` (case-insensitive, '-' taken as '_'), or an ImageFolder
        directory given as ``imagefolder:<path>``, any name containing '/', or an existing
        directory whose name is not a registered dataset.
    data_dir: root for torchvision datasets (see :func:`resolve_data_dir`).
    download: let torchvision fetch missing files into the data folder (needs internet).
        Ignored for ``digits`` and ImageFolder, which have nothing to fetch.
    limit: keep only the first ``limit`` train and the first ``limit`` test images, for fast tests
        and smoke runs; from an ImageFolder (whose files are listed class by class) ``limit`` taken
        in turn from each class instead. Normalisation stats of ``digits`` still come from its full
        train split; an ImageFolder's come from the images actually loaded.
    image_size, crop_pct, interpolation: the run's resolution (:class:`~kdbench.data.resolution.Resolution`):
        each image's shorter side resized to image_size / crop_pct, then centre-cropped to image_size ×
        image_size; 0 keeps the stored size (an ImageFolder's: ``imagefolder_size``, else 32).
    pad_to: zero-pad every image to pad_to × pad_to (0 = as stored), e.g. 28×28 MNIST to the
        32×32 that CIFAR-style models expect.
    """
    res = Resolution(image_size, crop_pct, interpolation)
    splits = _load_unpadded(name, data_dir=data_dir, download=download, limit=limit, res=res,
                            imagefolder=Resolution(image_size or imagefolder_size, crop_pct, interpolation))
    return pad_images(splits, pad_to) if pad_to else splits


#: ImageNet-1k: an ImageFolder in the data folder (kdbench cannot download it).
IMAGENET = "imagenet"


def imagenet_dir(data_dir: str | Path | None) -> Path:
    """``<data folder>/imagenet``, laid out as an ImageFolder, or an error saying how to lay it out."""
    where = data_dir_with_origin(data_dir)
    path = where.path / IMAGENET
    if not (path / "train").is_dir() or not ((path / "val").is_dir() or (path / "test").is_dir()):
        raise KdbenchError(
            f"ImageNet is not in {path} (data folder {where.path}, {where.origin}). kdbench cannot download it: "
            f"get ILSVRC-2012 from image-net.org and lay it out as {path}/train/<wnid>/*.JPEG and "
            f"{path}/val/<wnid>/*.JPEG (or the flat val/ with a val_labels.txt beside it: docs/data.md), or give the "
            "folder with --dataset DIR. At 224 px its decoded images take 187 GiB, so it streams from disk (--data-"
            "backend auto or stream)")
    return path


def is_imagefolder(name: str) -> bool:
    """Whether ``name`` loads an ImageFolder (whose resolution is a choice), as :func:`load_dataset` decides."""
    if name.startswith(SYNTHETIC_PREFIX):
        return False
    key = name.lower().replace("-", "_")
    if name.startswith(IMAGEFOLDER_PREFIX) or (key == IMAGENET and "/" not in name and os.sep not in name):
        return True
    if key in DATASETS and "/" not in name and os.sep not in name:
        return False
    return "/" in name or os.sep in name or Path(name).expanduser().is_dir()


def imagefolder_path(name: str, data_dir: str | Path | None) -> Path:
    """The folder an ImageFolder dataset name (:func:`is_imagefolder`) reads."""
    if name.startswith(IMAGEFOLDER_PREFIX):
        return Path(name[len(IMAGEFOLDER_PREFIX):]).expanduser().absolute()
    if name.lower().replace("-", "_") == IMAGENET and "/" not in name and os.sep not in name:
        return imagenet_dir(data_dir)
    return Path(name).expanduser().absolute()


def _load_unpadded(name: str, *, data_dir: str | Path | None, download: bool, limit: int | None,
                   res: Resolution, imagefolder: Resolution) -> DataSplits:
    if limit is not None and limit < 1:
        raise KdbenchError(f"limit must be a positive number of images, got {limit}.")
    if name.startswith(SYNTHETIC_PREFIX):
        return resize_splits(limit_splits(read_synthetic(name[len(SYNTHETIC_PREFIX):]), limit), res)
    if name.startswith(IMAGEFOLDER_PREFIX):
        return read_imagefolder(Path(name[len(IMAGEFOLDER_PREFIX) :]).expanduser().absolute(), imagefolder, limit)
    key = name.lower().replace("-", "_")
    if key == IMAGENET and "/" not in name and os.sep not in name:
        return read_imagefolder(imagenet_dir(data_dir), imagefolder, limit)
    # a registered name wins over a same-named directory in the working folder
    if key in DATASETS and "/" not in name and os.sep not in name:
        return resize_splits(limit_splits(DATASETS[key](data_dir_with_origin(data_dir), download), limit), res)
    if "/" in name or os.sep in name or Path(name).expanduser().is_dir():
        return read_imagefolder(Path(name).expanduser().absolute(), imagefolder, limit)
    raise unknown(
        "dataset",
        name,
        DATASETS,
        fix="Or give a path to an ImageFolder directory with train/ and val/ (or test/) subfolders of class folders",
    )

