"""A dataset in memory: its description (:class:`DatasetInfo`), its tensors (:class:`DataSplits`),
and the operations every source shares (channel statistics, ``limit``, padding)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KdbenchError


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a report need to know about a dataset."""

    name: str  # 'digits', 'mnist', 'fashion_mnist', 'cifar10', 'cifar100' or 'imagefolder:<abs path>'
    num_classes: int
    in_chans: int
    img_size: int  # square side of the stored images
    classes: tuple[str, ...]  # class names, indexed by label
    mean: tuple[float, ...]  # per-channel normalisation, in [0,1] pixel units
    std: tuple[float, ...]
    source: str  # where it was read from (path or package), for provenance
    train_size: int  # sizes of the tensors actually held (after ``limit``)
    test_size: int
    real_data: bool = True  # False for synthetic stand-in images (``synthetic:<name>``)
    #: Where the images are while training: "memory" (uint8 tensors on the device) or "stream" (read from disk as
    #: batches are drawn: kdbench.data.stream).
    backend: str = "memory"


@dataclass
class DataSplits:
    """A dataset in memory: uint8 N×C×H×W images and int64 labels for train and test."""

    info: DatasetInfo
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    @property
    def nbytes(self) -> int:
        """Bytes of the four tensors (what a copy on a device takes)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.train_images, self.train_labels, self.test_images, self.test_labels)
                   if isinstance(t, Tensor))  # streamed images (kdbench.data.stream) hold no memory

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DataSplits:
        """Return a copy with all four tensors on ``device`` (still uint8, so 4× cheaper than floats)."""
        return DataSplits(
            self.info,
            self.train_images.to(device, non_blocking=non_blocking),
            self.train_labels.to(device, non_blocking=non_blocking),
            self.test_images.to(device, non_blocking=non_blocking),
            self.test_labels.to(device, non_blocking=non_blocking),
        )


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0,1] units.

    Sums are taken exactly in int64 over chunks, so the result does not depend on chunking or
    float accumulation order and memory stays bounded for large sets.
    """
    c = images.shape[1]
    s1 = torch.zeros(c, dtype=torch.int64)
    s2 = torch.zeros(c, dtype=torch.int64)
    for chunk in images.split(4096):
        x = chunk.to("cpu", torch.int64)
        s1 += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
    n = images.numel() // c
    mean = s1.double() / n
    var = (s2.double() / n - mean * mean).clamp_min(0)
    return tuple((mean / 255).tolist()), tuple((var.sqrt() / 255).tolist())


def limit_splits(splits: DataSplits, limit: int | None) -> DataSplits:
    """The first ``limit`` training and the first ``limit`` test images (all with None)."""
    if limit is None:
        return splits
    tr, te = splits.train_images[:limit], splits.test_images[:limit]
    info = replace(splits.info, train_size=len(tr), test_size=len(te))
    return DataSplits(info, tr, splits.train_labels[:limit], te, splits.test_labels[:limit])


def pad_images(splits: DataSplits, size: int) -> DataSplits:
    """Zero-pad (black border) both splits symmetrically to ``size``×``size`` (e.g. MNIST 28 -> 32)."""
    side = splits.info.img_size
    if size == side:
        return splits
    if size < side:
        raise KdbenchError(f"--pad-to {size} is smaller than {splits.info.name}'s {side}x{side} images; "
                           f"padding only enlarges: use at least {side}")
    lo = (size - side) // 2
    pad = (lo, size - side - lo, lo, size - side - lo)
    info = replace(splits.info, img_size=size)
    return DataSplits(info, F.pad(splits.train_images, pad), splits.train_labels,
                      F.pad(splits.test_images, pad), splits.test_labels)



def holdout(splits: DataSplits, fraction: float, *, seed: int = 0) -> tuple[DataSplits, Tensor, Tensor]:
    """Hold out a stratified part of the training set as a validation split.

    Returns ``(train splits without the held-out images, val uint8 images, val int64 labels)``; the test
    split is unchanged and ``info.train_size`` counts the remaining images, which keep their order.
    Which images: :func:`holdout_indices`. ``seed`` is a fixed split seed (0), not a run's seed: the
    teachers and every student of a sweep must hold out the same images, or a teacher would have trained
    on a student's validation images and the students' validation numbers would not be comparable.
    """
    keep, val = holdout_indices(splits.train_labels, fraction, seed=seed)
    device = splits.train_images.device
    keep, val = keep.to(device), val.to(device)
    info = replace(splits.info, train_size=len(keep))
    train = DataSplits(info, splits.train_images[keep], splits.train_labels[keep],
                       splits.test_images, splits.test_labels)
    return train, splits.train_images[val], splits.train_labels[val]


def holdout_indices(labels: Tensor, fraction: float, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(kept, held-out) positions in ``labels``, each ascending, on the CPU: :func:`holdout`'s choice.

    ``round(fraction × count)`` of each class are held out (at least one of each class present), chosen
    by a seeded CPU permutation per class, so the split is deterministic and the same on every device.
    """
    if not 0 < fraction < 1:
        raise KdbenchError(f"holdout fraction {fraction} must lie in (0, 1); use e.g. 0.1 to hold out 10%")
    labels = labels.to("cpu")
    gen = torch.Generator().manual_seed(seed)
    held = [torch.zeros(0, dtype=torch.int64)]
    for cls in torch.unique(labels).tolist():  # ascending classes: the generator's draws are in a fixed order
        idx = (labels == cls).nonzero().flatten()
        k = min(len(idx), max(1, round(fraction * len(idx))))
        held.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    val = torch.cat(held).sort().values
    kept = torch.ones(len(labels), dtype=torch.bool)
    kept[val] = False
    keep = kept.nonzero().flatten()
    if len(keep) == 0:
        raise KdbenchError(f"holding out {fraction} of {len(labels)} training images leaves none to train on; "
                           "use a smaller fraction or more images")
    return keep, val
