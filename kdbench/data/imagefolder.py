"""ImageFolder trees as datasets: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or ``test/``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import KdbenchError
from .resolution import Resolution
from .splits import DatasetInfo, DataSplits, channel_stats

IMAGEFOLDER_PREFIX = "imagefolder:"


def read_imagefolder(path: Path, res: Resolution, limit: int | None) -> DataSplits:
    """An ImageFolder tree: ``path/train/<class>/*`` and ``path/val`` (or ``path/test``).

    Each image's shorter side is resized to ``res.size / res.crop_pct`` (32 px when no size is set) with
    ``res.interpolation``, then centre-cropped to a square of ``res.size``; the normalisation is the loaded
    training images' own per-channel statistics.
    """
    train_dir, test_dir = _split_dirs(path)
    image_size = res.imagefolder_size()
    res = Resolution(image_size, res.crop_pct, res.interpolation)
    train_classes, train_images, train_labels = _read_split(train_dir, res, limit)
    test_classes, test_images, test_labels = _read_split(test_dir, res, limit)
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise KdbenchError(
            f"ImageFolder dataset {path}: class folders differ between {train_dir.name}/ and "
            f"{test_dir.name}/ (only in {train_dir.name}/: {only_train or 'none'}; only in "
            f"{test_dir.name}/: {only_test or 'none'}). Labels are assigned by sorted folder name, "
            f"so both splits must have the same class folders."
        )
    mean, std = channel_stats(train_images)
    info = DatasetInfo(
        name=f"{IMAGEFOLDER_PREFIX}{path}",
        num_classes=len(train_classes),
        in_chans=3,
        img_size=image_size,
        classes=tuple(train_classes),
        mean=mean,
        std=std,
        source=f"torchvision.datasets.ImageFolder from {path} (train/, {test_dir.name}/)",
        train_size=len(train_images),
        test_size=len(test_images),
    )
    return DataSplits(info, train_images, train_labels, test_images, test_labels)


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


def _read_split(split_dir: Path, res: Resolution, limit: int | None) -> tuple[list[str], Tensor, Tensor]:
    """One split's class names, uint8 images (res.size², RGB) and labels; ``limit`` of them taken
    across the classes (:func:`stratified_take`)."""
    from torchvision import datasets, transforms

    image_size = res.size
    # Resize the shorter side then center-crop: every image becomes image_size², keeping aspect.
    to_tensor = transforms.Compose(
        [transforms.Resize(res.resize_to, interpolation=transforms.InterpolationMode(res.interpolation)),
         transforms.CenterCrop(image_size), transforms.PILToTensor()]
    )
    try:
        ds = datasets.ImageFolder(str(split_dir))
    except FileNotFoundError as e:  # no class folders, or a class folder with no images
        raise KdbenchError(f"ImageFolder split {split_dir}: {e}") from None
    if len(ds.classes) < 2:
        raise KdbenchError(
            f"ImageFolder split {split_dir} has {len(ds.classes)} class folder ({', '.join(ds.classes)}): "
            f"classifying needs at least 2. Put each class's images in its own folder, "
            f"{split_dir}/<class>/<image>, with two or more classes."
        )
    samples = ds.samples if limit is None else [ds.samples[i] for i in stratified_take(ds.targets, limit)]
    imgs = [_read_image(ds.loader, path, to_tensor) for path, _ in samples]  # loader gives RGB PIL images
    images = torch.stack(imgs) if imgs else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
    labels = torch.tensor([t for _, t in samples], dtype=torch.int64)
    return ds.classes, images, labels


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
