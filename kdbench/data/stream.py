"""The streaming backend: an ImageFolder read from disk batch by batch, for sets that do not fit in memory.

The engine sees the same batches as from memory (:class:`~kdbench.data.loader.TrainBatch`: normalised float images
on the training device, labels, positions), so everything downstream is shared. What differs is where images come
from. A :class:`StreamImages` stands where the memory path holds a uint8 tensor. It names the split's files and
which of them this view holds, and its subsets (a validation hold-out, a transfer set, a DDP shard of the test set)
are views too.

The loading is timm's and torch's: timm's ``create_transform`` in its uint8 ("prefetcher") form decodes each
image in ``DataLoader`` worker processes, with pinned memory and persistent workers. Training with
RandomResizedCrop crops from the full-size image (timm's training transform: scale, ratio, flip). Evaluation
resizes to ``size / crop_pct`` and centre-crops (timm's eval transform, the memory path's decode). The pad-crop
and flip of CIFAR-style recipes are drawn on the device, on the centre-cropped images, exactly as from memory. A
``DistributedSampler`` gives each torchrun rank its own shard of every epoch: each rank decodes 1/world of the
images, and the step trains its shard as its slice (:attr:`TrainBatch.sharded`). Its seed is drawn from the run's
generator every epoch, so the order is the run's seed's and survives a resume.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import KdbenchError
from .imagefolder import IMAGEFOLDER_PREFIX, Samples, scan_folder
from .resolution import Resolution
from .splits import DatasetInfo, DataSplits, channel_stats

#: The normalisation of a streamed set is measured on at most this many training images (a stratified take).
STATS_IMAGES = 1024


@dataclass
class StreamImages:
    """A split's images on disk: ``samples`` (file, label) and which of them (``indices``) this view holds."""

    samples: Samples
    res: Resolution
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    indices: Tensor | None = None  # CPU int64 positions in samples; None: all, in order
    workers: int = 0               # DataLoader worker processes (0: the main process)
    #: Images inside tar files: timm's ReaderImageInTar, whose sample i is samples' (i, label); None: files.
    reader: Any = None

    @property
    def positions(self) -> Tensor:
        return torch.arange(len(self.samples)) if self.indices is None else self.indices

    def __len__(self) -> int:
        return len(self.samples) if self.indices is None else len(self.indices)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), 3, self.res.size, self.res.size)

    def __getitem__(self, key: slice | Tensor) -> StreamImages:
        """A view of some of these images: a slice, an index tensor or a boolean mask (on any device)."""
        if isinstance(key, Tensor):
            key = key.to("cpu")
        return replace(self, indices=self.positions[key])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StreamImages:
        return replace(self, device=torch.device(device))

    def files(self) -> list[tuple[str, int]]:
        return [self.samples[i] for i in self.positions.tolist()]


class _Files(torch.utils.data.Dataset):
    """(uint8 CHW image, position) for each file, decoded by ``transform`` (in a worker process)."""

    def __init__(self, files: list[tuple[Any, int]], transform: Any, reader: Any = None) -> None:
        self.files, self.transform, self.reader = files, transform, reader

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(_open(self.files[i][0], self.reader)), i


def transform_for(res: Resolution, *, rrc: Any = None, flip: bool = False) -> Any:
    """timm's transform in its uint8 form: training with RandomResizedCrop (``rrc``, with ``flip``), else eval."""
    from timm.data import create_transform

    if rrc is not None:
        return create_transform(res.size, is_training=True, scale=tuple(rrc.scale), ratio=tuple(rrc.ratio),
                                hflip=0.5 if flip else 0.0, color_jitter=None, interpolation=res.interpolation,
                                use_prefetcher=True)
    return create_transform(res.size, is_training=False, crop_pct=res.crop_pct, interpolation=res.interpolation,
                            use_prefetcher=True)


class EpochSampler(torch.utils.data.DistributedSampler):
    """torch's ``DistributedSampler`` (this rank's shard, padded to equal shares) whose seed the loader sets each
    epoch from the run's generator; without shuffling, the files in order (still sharded)."""

    def __init__(self, n: int, *, shuffle: bool, world: int, rank: int) -> None:
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=shuffle, drop_last=False)


def stream_loader(images: StreamImages, *, batch_size: int, shuffle: bool, world: int, rank: int,
                  transform: Any) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    """The DataLoader over ``images`` (its batch is this rank's share of ``batch_size``) and its sampler."""
    sampler = EpochSampler(len(images), shuffle=shuffle, world=world, rank=rank)
    workers = images.workers
    loader = torch.utils.data.DataLoader(
        _Files(images.files(), transform, images.reader), batch_size=max(1, batch_size // world), sampler=sampler,
        num_workers=workers, pin_memory=images.device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)
    return loader, sampler


def default_workers() -> int:
    """DataLoader workers per process: the cores this process may use, less one for training, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, cores // max(1, world) - 1))


def stream_imagefolder(path: Path, res: Resolution, limit: int | None, *, workers: int = 0) -> DataSplits:
    """An ImageFolder to stream: its files and labels, and its normalisation measured on up to
    :data:`STATS_IMAGES` training images."""
    from .imagefolder import stratified_take

    res = Resolution(res.imagefolder_size(), res.crop_pct, res.interpolation)
    workers = workers or default_workers()
    if (tars := tar_splits(path)) is not None:
        train_reader, test_reader, classes, train_samples, test_samples = _tar_folder(path, limit)
        where = f"{tars[0].name}, {tars[1].name}: timm's ReaderImageInTar"
    else:
        folder = scan_folder(path, limit)
        train_reader = test_reader = None
        classes, train_samples, test_samples = folder.classes, folder.train, folder.test
        where = f"train/, {folder.test_dir.name}/"
    train = StreamImages(train_samples, res, workers=workers, reader=train_reader)
    test = StreamImages(test_samples, res, workers=workers, reader=test_reader)
    some = stratified_take([t for _, t in train_samples], STATS_IMAGES)
    sample = torch.stack([transform_for(res)(_open(train_samples[i][0], train_reader)) for i in some])
    mean, std = channel_stats(sample)
    _close_tars(train_reader)  # the DataLoader's workers get the reader pickled: no open file may travel with it
    info = DatasetInfo(
        name=f"{IMAGEFOLDER_PREFIX}{path}", num_classes=len(classes), in_chans=3, img_size=res.size,
        classes=tuple(classes), mean=mean, std=std,
        source=f"streamed from {path} ({where}), timm transforms; normalisation from {len(some)} training images",
        train_size=len(train), test_size=len(test), backend="stream")
    return DataSplits(info, train, torch.tensor([t for _, t in train_samples], dtype=torch.int64),  # type: ignore[arg-type]
                      test, torch.tensor([t for _, t in test_samples], dtype=torch.int64))  # type: ignore[arg-type]


def _open(key: Any, reader: Any = None) -> Any:
    """An image as RGB PIL: a file's path, or sample ``key`` of a tar reader."""
    from PIL import Image

    where = key if reader is None else f"{reader.root} member {reader._filename(key)}"
    try:
        if reader is None:
            with open(key, "rb") as f:
                return Image.open(f).convert("RGB")
        return Image.open(reader[key][0]).convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise KdbenchError(f"image {where} cannot be read ({type(exc).__name__}: {exc}); replace it or move it "
                           "out of the dataset") from None


def _close_tars(reader: Any) -> None:
    """Close and forget the tar files a timm ReaderImageInTar opened (it caches them in its tar states)."""
    if reader is None:
        return
    states = [reader.tar_state] if reader.root_is_tar else list(reader.tar_state.values())
    for state in states:
        for st in (state, *state.children.values()):
            if st.tf is not None:
                st.tf.close()
                st.tf = None


def tar_splits(path: Path) -> tuple[Path, Path] | None:
    """A dataset of tar files, as timm's ReaderImageInTar reads them: ``train.tar`` (class folders inside), or a
    ``train/`` of one tar per class (ILSVRC's training archive unpacked once), and ``val.tar`` (or ``test.tar``, or
    such a folder); None when ``path`` is no such layout."""
    def split(name: str) -> Path | None:
        if (path / f"{name}.tar").is_file():
            return path / f"{name}.tar"
        folder = path / name
        return folder if folder.is_dir() and any(folder.glob("*.tar")) else None

    train, test = split("train"), split("val") or split("test")
    return (train, test) if train is not None and test is not None else None


def _tar_folder(path: Path, limit: int | None) -> tuple[Any, Any, list[str], list, list]:
    """The train and test readers of a tar dataset, the class names, and (index, label) samples per split."""
    from timm.data.readers.reader_image_in_tar import ReaderImageInTar

    from .imagefolder import stratified_take

    train_path, test_path = tar_splits(path)  # type: ignore[misc]
    train = ReaderImageInTar(str(train_path))
    test = ReaderImageInTar(str(test_path), class_map=dict(train.class_name_to_idx))
    classes = [train.class_idx_to_name[i] for i in range(len(train.class_idx_to_name))]
    samples = []
    for reader in (train, test):
        targets = [int(t) for t in reader.targets]
        keep = range(len(targets)) if limit is None else stratified_take(targets, limit)
        samples.append([(i, targets[i]) for i in keep])
    return train, test, classes, samples[0], samples[1]


def epoch_batches(images: StreamImages, loader: torch.utils.data.DataLoader, sampler: EpochSampler,
                  seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of (uint8 images, positions) on the images' device, in the order ``seed`` draws."""
    sampler.seed = seed
    for x, pos in loader:
        yield x.to(images.device, non_blocking=True), pos.to(images.device, non_blocking=True)
