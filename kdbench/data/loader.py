"""The on-device pipeline: normalisation, augmentation views and the batch loader.

Images stay uint8 on the training device; each batch is cropped, flipped and normalised there
with batched tensor ops (as KellerJordan/cifar10-airbench does), never through PIL. Streamed images
(:mod:`kdbench.data.stream`) arrive as uint8 batches from DataLoader workers and take the same path from there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KdbenchError
from .mixing import MixSpec, draw, epoch_rng, mix
from .rrc import RRCSpec, random_resized_crop
from .splits import DatasetInfo


def normalize(images_uint8: Tensor, info: DatasetInfo) -> Tensor:
    """float32 ``(x/255 - mean) / std`` per channel, on the images' device."""
    return _normalize_with(images_uint8, *_affine(info, images_uint8.device))


def _affine(info: DatasetInfo, device: torch.device) -> tuple[Tensor, Tensor]:
    # fold /255, -mean and /std into one multiply-add: x*scale + shift
    mean = torch.tensor(info.mean, dtype=torch.float32, device=device)
    std = torch.tensor(info.std, dtype=torch.float32, device=device)
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (-mean / std).view(1, -1, 1, 1)
    return scale, shift


def _normalize_with(images_uint8: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    # Into the float copy itself: the same numbers as a new output, without the broadcast output that made
    # addcmul twice as slow on the CPU (65 against 36 ms for a 128 x 3 x 224 x 224 batch on 2 cores).
    out = images_uint8.to(torch.float32, copy=True)
    return torch.addcmul(shift, out, scale, out=out)


class Views(NamedTuple):
    """The augmentation drawn for each image of a batch: crop offsets (rows, cols) and mirror flags."""

    offsets: Tensor | None  # 2×N int64 in [0, 2·padding], or None without cropping
    mirror: Tensor | None   # N bool, or None without flipping


def draw_views(n: int, *, crop_padding: int, flip: bool, generator: torch.Generator,
               device: torch.device | str) -> Views:
    """Draw ``n`` images' crop offsets, then their flips, from ``generator`` (in that fixed order)."""
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    offsets = mirror = None
    if crop_padding > 0 and n > 0:
        offsets = torch.randint(0, 2 * crop_padding + 1, (2, n), generator=generator,
                                device=generator.device).to(device)
    if flip and n > 0:
        mirror = (torch.rand(n, generator=generator, device=generator.device) < 0.5).to(device)
    return Views(offsets, mirror)


def apply_views(images: Tensor, views: Views, crop_padding: int) -> Tensor:
    """Crop each zero-padded image at its offsets, then mirror the flagged ones (any dtype)."""
    n, _, h, w = images.shape
    dev = images.device
    out = images
    if views.offsets is not None:
        p, offsets = crop_padding, views.offsets
        padded = F.pad(images, (p, p, p, p))  # zeros, like RandomCrop's fill=0
        rows = (offsets[0, :, None] + torch.arange(h, device=dev)).view(n, h, 1)
        cols = (offsets[1, :, None] + torch.arange(w, device=dev)).view(n, 1, w)
        batch = torch.arange(n, device=dev).view(n, 1, 1)
        # advanced indices split by a slice put the indexed dims first: N×H×W×C
        out = padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()
    if views.mirror is not None:
        out = torch.where(views.mirror.view(n, 1, 1, 1), out.flip(-1), out)
    return out


def view_count(crop_padding: int, flip: bool) -> int:
    """How many distinct augmented views one image has: (2p+1)² crops × 2 flips (162 for CIFAR's)."""
    return (2 * crop_padding + 1) ** 2 * (2 if flip else 1)


def view_index(views: Views, crop_padding: int, n: int, device: torch.device | str) -> Tensor:
    """Each image's view as one number in [0, view_count): (row offset, col offset, mirror)."""
    side = 2 * crop_padding + 1
    index = torch.zeros(n, dtype=torch.int64, device=device)
    if views.offsets is not None:
        index = views.offsets[0] * side + views.offsets[1]
    if views.mirror is not None:
        index = index * 2 + views.mirror.long()
    return index


def fixed_views(index: int, n: int, crop_padding: int, flip: bool, device: torch.device | str) -> Views:
    """``n`` copies of view number ``index`` (the inverse of :func:`view_index`)."""
    side = 2 * crop_padding + 1
    mirror = None
    if flip:
        index, bit = divmod(index, 2)
        mirror = torch.full((n,), bool(bit), device=device)
    offsets = None
    if crop_padding > 0:
        offsets = torch.tensor(divmod(index, side), device=device).view(2, 1).expand(2, n)
    return Views(offsets, mirror)


def augment(images_uint8: Tensor, *, crop_padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Random crop with zero padding and random horizontal flip, batched on the images' device.

    Equivalent in distribution to torchvision's ``RandomCrop(size, padding=crop_padding)`` then
    ``RandomHorizontalFlip()`` applied per image: each image gets its own offsets in
    [0, 2·crop_padding] and its own coin flip. The random numbers are drawn from ``generator``
    (on its device, in a fixed order: offsets, then flips), so the result is deterministic given
    the generator state. With ``crop_padding=0`` and ``flip=False`` the input is returned as is.
    Works for any dtype; shape and dtype are kept.
    """
    views = draw_views(len(images_uint8), crop_padding=crop_padding, flip=flip, generator=generator,
                       device=images_uint8.device)
    return apply_views(images_uint8, views, crop_padding)


class TrainBatch(NamedTuple):
    """One training batch: normalised float32 images, labels, and (for the teacher cache) which
    training images and which of their augmented views these are."""

    images: Tensor
    labels: Tensor
    index: Tensor  # positions in the training set (memory banks index by it; the teacher cache too)
    view: Tensor | None   # see view_index (None unless asked for)
    # Mixup/CutMix (kdbench.data.mixing): the mixed label distributions the cross-entropy is taken against;
    # ``labels`` then names each image's own (first) label. None when the batch is not mixed.
    soft_labels: Tensor | None = None
    # Under torchrun, a streamed batch is already this rank's shard (kdbench.data.stream): the step trains all of
    # it. A batch from memory is the global batch, of which the step takes this rank's slice.
    sharded: bool = False


class Loader:
    """Batches ``(normalised float32 images, int64 labels)`` from in-memory tensors on their device.

    No worker processes: indexing, augmentation and normalisation are tensor ops on the device
    the images live on. With ``shuffle`` each epoch (each ``iter()``) draws a new permutation from
    ``generator``; the same generator seed gives the same batches. Without a generator, one is
    seeded from torch's global RNG, so ``torch.manual_seed`` still makes runs repeatable.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        info: DatasetInfo,
        *,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        mix: MixSpec | None = None,
        rrc: RRCSpec | None = None,
        shard: bool = False,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise KdbenchError(f"batch size must be at least 1, got {batch_size}.")
        self.images, self.labels, self.info = images, labels, info
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.crop_padding, self.flip = crop_padding, flip
        self.mix = mix if mix is not None and mix.enabled else None
        self.rrc = rrc  # RandomResizedCrop instead of the pad-crop (then batches name no views: none is cached)
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        self.generator = generator
        self._scale, self._shift = _affine(info, images.device)  # built once, not per batch
        # Streamed images (kdbench.data.stream): a DataLoader, built at the first epoch; with ``shard`` (training
        # under torchrun) each rank reads its own shard.
        self.shard, self._stream = shard, None

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for b in self.batches():
            yield b.images, b.labels

    def batches(self, *, views: bool = False) -> Iterator[TrainBatch]:
        """One epoch of batches, each with its images' positions in the training set; with ``views``,
        each image's view number too (what the teacher cache looks up), otherwise None (no work
        spent on it per step)."""
        if not isinstance(self.images, Tensor):
            yield from self._streamed(views)
            return
        n, bs, dev = len(self.images), self.batch_size, self.images.device
        order = None
        if self.shuffle:
            gen = self.generator
            order = torch.randperm(n, generator=gen, device=gen.device).to(dev)
        rng = epoch_rng(self.generator) if self.mix is not None else None
        for b in range(len(self)):
            if order is None:
                idx = torch.arange(b * bs, min(n, (b + 1) * bs), device=dev)
                x, y = self.images[b * bs : (b + 1) * bs], self.labels[b * bs : (b + 1) * bs]
            else:
                idx = order[b * bs : (b + 1) * bs]
                x, y = self.images[idx], self.labels[idx]
            if self.rrc is not None:
                x = random_resized_crop(x, self.rrc, self.generator)
                if self.flip:
                    mirror = torch.rand(len(x), generator=self.generator, device=self.generator.device).to(dev) < 0.5
                    x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
                x = torch.addcmul(self._shift, x, self._scale, out=x)  # x is this batch's own float tensor
                if views:
                    raise KdbenchError("random resized crops have no view numbers: the teacher cache cannot serve them")
            else:
                drawn = draw_views(len(x), crop_padding=self.crop_padding, flip=self.flip, generator=self.generator,
                                   device=dev)
                x = _normalize_with(apply_views(x, drawn, self.crop_padding), self._scale, self._shift)
            soft = None
            if rng is not None:
                x, soft = mix(x, y, self.info.num_classes, draw(self.mix, rng, x.shape[-2], x.shape[-1]))
            view = view_index(drawn, self.crop_padding, len(x), dev) if views and self.rrc is None else None
            yield TrainBatch(x, y, idx, view, soft)

    def _streamed(self, views: bool) -> Iterator[TrainBatch]:
        """One epoch from disk: the files decoded by timm's transforms in worker processes (RandomResizedCrop there,
        from the full image), the pad-crop and flip drawn here as from memory, then normalised."""
        from .. import distributed
        from .stream import epoch_batches, stream_loader, transform_for

        world = distributed.world_size() if self.shard else 1
        if self._stream is None:
            transform = transform_for(self.images.res, rrc=self.rrc, flip=self.flip)
            self._stream = stream_loader(self.images, batch_size=self.batch_size, shuffle=self.shuffle, world=world,
                                         rank=distributed.rank() if world > 1 else 0, transform=transform)
        gen = self.generator
        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())  # this epoch's order
        rng = epoch_rng(gen) if self.mix is not None else None
        for x, idx in epoch_batches(self.images, *self._stream, seed):
            y, drawn = self.labels[idx], None
            if self.rrc is not None:
                x = _normalize_with(x, self._scale, self._shift)
            else:
                drawn = draw_views(len(x), crop_padding=self.crop_padding, flip=self.flip, generator=gen,
                                   device=x.device)
                x = _normalize_with(apply_views(x, drawn, self.crop_padding), self._scale, self._shift)
            soft = None
            if rng is not None:
                x, soft = mix(x, y, self.info.num_classes, draw(self.mix, rng, x.shape[-2], x.shape[-1]))
            view = view_index(drawn, self.crop_padding, len(x), x.device) if views and drawn is not None else None
            yield TrainBatch(x, y, idx, view, soft, sharded=world > 1)
