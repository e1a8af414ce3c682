"""ImageFolder trees as datasets: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or ``test/``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import KdbenchError
from .decoded import entry_key, load_or_decode
from .flat import flat_labels
from .resolution import Resolution
from .splits import DatasetInfo, DataSplits, channel_stats

IMAGEFOLDER_PREFIX = "imagefolder:"
Samples = list[tuple[str, int]]


def read_imagefolder(path: Path, res: Resolution, limit: int | None) -> DataSplits:
    """An ImageFolder tree: ``path/train/<class>/*`` and ``path/val`` (or ``path/test``), whose images may also lie
    flat in ``val/`` with a labels file (:func:`flat_labels`).

    Each image's shorter side is resized to ``res.size / res.crop_pct`` (32 px when no size is set) with
    ``res.interpolation``, then centre-cropped to a square of ``res.size``; the normalisation is the loaded
    training images' own per-channel statistics. Before decoding, the decoded size is checked against the memory
    available; the decoded set is kept on disk (:mod:`kdbench.data.decoded`) for the next run.
    """
    image_size = res.imagefolder_size()
    res = Resolution(image_size, res.crop_pct, res.interpolation)
    folder = scan_folder(path, limit)
    train_samples, test_samples, train_classes = folder.train, folder.test, folder.classes
    check_memory(len(train_samples) + len(test_samples), image_size, path)
    key = entry_key(path, res, limit, [f for f, _ in train_samples + test_samples])
    decoded = load_or_decode(key, lambda: {"train": _decode(train_samples, res), "test": _decode(test_samples, res)},
                             what=f"ImageFolder {path} at {image_size} px")
    train_images, test_images = decoded["train"], decoded["test"]
    train_labels = torch.tensor([t for _, t in train_samples], dtype=torch.int64)
    test_labels = torch.tensor([t for _, t in test_samples], dtype=torch.int64)
    mean, std = channel_stats(train_images)
    info = DatasetInfo(
        name=f"{IMAGEFOLDER_PREFIX}{path}",
        num_classes=len(train_classes),
        in_chans=3,
        img_size=image_size,
        classes=tuple(train_classes),
        mean=mean,
        std=std,
        source=f"torchvision.datasets.ImageFolder from {path} (train/, {folder.test_dir.name}/)",
        train_size=len(train_images),
        test_size=len(test_images),
    )
    return DataSplits(info, train_images, train_labels, test_images, test_labels)


@dataclass(frozen=True)
class Folder:
    """An ImageFolder's classes and (file, label) samples of each split, before any image is decoded."""

    classes: list[str]
    train: Samples
    test: Samples
    test_dir: Path


#: The last scan, by (path, limit, the folders' modification times): a sweep under --data-backend auto scans to
#: choose the backend, then the loader scans again; listing ImageNet takes seconds to minutes.
_LAST_SCAN: dict[tuple, Folder] = {}


def scan_folder(path: Path, limit: int | None) -> Folder:
    """List an ImageFolder's splits (class folders, or a flat val/ with a labels file); ``limit`` per split.

    A repeated scan of an unchanged folder is answered from memory: adding or removing an image changes its class
    folder's modification time, which is part of the key, as are the labels files' (:mod:`kdbench.data.flat`)."""
    train_dir, test_dir = _split_dirs(path)
    labels_files = [p for p in path.iterdir() if p.is_file()] + [test_dir / "labels.txt"]
    key = (str(path.resolve()), limit, _stamp(train_dir), _stamp(test_dir),
           tuple((p.name, p.stat().st_mtime_ns) for p in labels_files if p.is_file()))
    if key not in _LAST_SCAN:
        _LAST_SCAN.clear()
        _LAST_SCAN[key] = _scan_splits(path, train_dir, test_dir, limit)
    return _LAST_SCAN[key]


def _stamp(split_dir: Path) -> tuple[tuple[str, int], ...]:
    """The modification times of a split folder and of the folders in it (its classes)."""
    dirs = [split_dir] + sorted(p for p in split_dir.iterdir() if p.is_dir())
    return tuple((p.name, p.stat().st_mtime_ns) for p in dirs)


def _scan_splits(path: Path, train_dir: Path, test_dir: Path, limit: int | None) -> Folder:
    train_classes, train_samples = _scan(train_dir, limit)
    test_classes, test_samples = _scan(test_dir, limit, train_classes)
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise KdbenchError(
            f"ImageFolder dataset {path}: class folders differ between {train_dir.name}/ and "
            f"{test_dir.name}/ (only in {train_dir.name}/: {only_train or 'none'}; only in "
            f"{test_dir.name}/: {only_test or 'none'}). Labels are assigned by sorted folder name, "
            f"so both splits must have the same class folders."
        )
    return Folder(train_classes, train_samples, test_samples, test_dir)


def decoded_bytes(folder: Folder, size: int) -> int:
    """What the memory path would hold: uint8 RGB images of ``size``² for both splits."""
    return (len(folder.train) + len(folder.test)) * 3 * size * size


#: Decoded images may take at most this fraction of the memory available when loading starts.
MEMORY_FRACTION = 0.8


def check_memory(n: int, size: int, path: Path) -> None:
    """Refuse, before decoding, a set whose uint8 images would not fit in the memory available, with the figures
    and the fix (kdbench holds every image in memory)."""
    need = n * 3 * size * size
    available = available_memory()
    if available and need > MEMORY_FRACTION * available:
        raise KdbenchError(
            f"ImageFolder {path}: {n:,} images at {size} px decode to {need / 2**30:.1f} GiB of uint8 images, more "
            f"than {MEMORY_FRACTION:.0%} of the {available / 2**30:.1f} GiB of memory available here; kdbench holds "
            "every image in memory. Use --data-backend stream (read from disk batch by batch), --limit N (N images "
            "per split, taken from every class), a smaller --image-size, or a machine with more memory")


def available_memory() -> int:
    """The memory available to new allocations in bytes (Linux's MemAvailable), 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _split_dirs(path: Path) -> tuple[Path, Path]:
    """``path/train`` and ``path/val`` (or ``path/test``), or an error that shows the layout."""
    if not path.is_dir():
        raise KdbenchError(
            f"ImageFolder dataset {path} does not exist or is not a directory. Give a folder with "
            f"train/ and val/ (or test/) subfolders, each holding one folder per class."
        )
    train_dir = path / "train"
    test_dir = next((path / s for s in ("val", "test") if (path / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        missing = " and ".join(
            x for x, ok in (("train/", train_dir.is_dir()), ("val/ (or test/)", test_dir is not None)) if not ok
        )
        raise KdbenchError(
            f"ImageFolder dataset {path} has no {missing} subfolder. Lay it out as "
            f"{path}/train/<class>/<image> and {path}/val/<class>/<image>."
        )
    return train_dir, test_dir




def _scan(split_dir: Path, limit: int | None, classes: list[str] | None = None) -> tuple[list[str], Samples]:
    """One split's class names and (file, label) samples, ``limit`` of them taken across the classes
    (:func:`stratified_take`). A split of flat files (no class folders) takes its labels from a labels file, by
    the training split's ``classes``."""
    from torchvision import datasets

    if classes is not None and not any(p.is_dir() for p in split_dir.iterdir()):
        samples = flat_labels(split_dir, classes)
        found = classes
    else:
        try:
            ds = datasets.ImageFolder(str(split_dir))
        except FileNotFoundError as e:  # no class folders, or a class folder with no images
            raise KdbenchError(f"ImageFolder split {split_dir}: {e}") from None
        samples, found = list(ds.samples), ds.classes
    if len(found) < 2:
        raise KdbenchError(
            f"ImageFolder split {split_dir} has {len(found)} class folder ({', '.join(found)}): "
            f"classifying needs at least 2. Put each class's images in its own folder, "
            f"{split_dir}/<class>/<image>, with two or more classes."
        )
    if limit is not None:
        samples = [samples[i] for i in stratified_take([t for _, t in samples], limit)]
    return found, samples


def _decode(samples: Samples, res: Resolution) -> Tensor:
    """The samples' images as uint8 (res.size², RGB): shorter side resized, then centre-cropped."""
    from torchvision import transforms
    from torchvision.datasets.folder import default_loader

    to_tensor = transforms.Compose(
        [transforms.Resize(res.resize_to, interpolation=transforms.InterpolationMode(res.interpolation)),
         transforms.CenterCrop(res.size), transforms.PILToTensor()]
    )
    imgs = [_read_image(default_loader, path, to_tensor) for path, _ in samples]  # the loader gives RGB PIL images
    return torch.stack(imgs) if imgs else torch.empty(0, 3, res.size, res.size, dtype=torch.uint8)


def stratified_take(labels: list[int], limit: int) -> list[int]:
    """Positions of ``limit`` samples taken in turn from each class: the first image of every class,
    then the second of every class, and so on (ascending positions).

    ImageFolder lists its samples class by class, so its first ``limit`` would be about one class:
    a test set of one class scores 100% whatever the model. This take keeps the classes balanced
    (their counts differ by at most one, until a class runs out) and is deterministic.
    """
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    taken: list[int] = []
    for rank in range(max((len(v) for v in by_class.values()), default=0)):
        if len(taken) >= limit:
            break
        taken += [idx[rank] for _, idx in sorted(by_class.items()) if rank < len(idx)]
    return sorted(taken[:limit])


def _read_image(loader: Callable[[str], Any], path: str, to_tensor: Callable[[Any], Tensor]) -> Tensor:
    """One image as a uint8 tensor, or an error naming the file that cannot be read (not a traceback)."""
    from PIL import UnidentifiedImageError

    try:
        return to_tensor(loader(path))
    except (OSError, SyntaxError, ValueError) as exc:  # PIL: not an image, truncated, a broken header
        why = "no image format PIL knows" if isinstance(exc, UnidentifiedImageError) else f"{type(exc).__name__}: {exc}"
        raise KdbenchError(
            f"ImageFolder image {path} cannot be read ({why}); replace it with a readable image, or move it out "
            f"of the dataset folder"
        ) from None
