"""The CRD protocol's augmentation and schedule, checked against torchvision and the paper's numbers."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torchvision import transforms

from kdbench.data import augment
from kdbench.suites import get_suite
from kdbench.train import make_optimizer

N = 16_200  # 100 draws per outcome on average
SIDE, PAD = 32, 4


def _image() -> torch.Tensor:
    # Every pixel distinct and non-zero (values 1..1024 don't fit uint8, so use int32): an augmented
    # view then tells its exact crop offset and flip.
    return (torch.arange(SIDE * SIDE, dtype=torch.int32) + 1).view(1, SIDE, SIDE)


def _reference_view(img: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """What torchvision's RandomCrop(32, padding=4) then a flip give for offsets (dy, dx)."""
    padded = torch.nn.functional.pad(img, (PAD, PAD, PAD, PAD))  # fill=0, as RandomCrop's default
    out = padded[:, dy:dy + SIDE, dx:dx + SIDE]
    return out.flip(-1) if flip else out


def _outcome(view: torch.Tensor, img: torch.Tensor) -> tuple[int, int, bool]:
    """The (dy, dx, flip) that turns ``img`` into ``view`` (checked exactly)."""
    for flip in (False, True):
        v = view.flip(-1) if flip else view
        nz = (v[0] > 0).nonzero()
        r, c = nz[0].tolist()
        value = int(v[0, r, c]) - 1
        dy, dx = PAD + value // SIDE - r, PAD + value % SIDE - c  # view (r, c) = padded (r + dy, c + dx)
        if 0 <= dy <= 2 * PAD and 0 <= dx <= 2 * PAD and torch.equal(view, _reference_view(img, dy, dx, flip)):
            return dy, dx, flip
    raise AssertionError("the view is no crop-and-flip of the image")


def test_augmentation_has_torchvisions_distribution():
    """kdbench's batched crop+flip and torchvision's per-image transforms give the same 162 outcomes,
    each exactly the same pixels, with the same (uniform) frequencies."""
    img = _image()
    ours = augment(img.expand(N, 1, SIDE, SIDE).contiguous(), crop_padding=PAD, flip=True,
                   generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    tv = transforms.Compose([transforms.RandomCrop(SIDE, padding=PAD), transforms.RandomHorizontalFlip()])
    theirs = [tv(img) for _ in range(N)]
    counts = {name: Counter(_outcome(v, img) for v in views) for name, views in
              (("kdbench", ours), ("torchvision", theirs))}
    support = {(dy, dx, f) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1) for f in (False, True)}
    for name, c in counts.items():
        assert set(c) == support, name  # every offset in 0..8 on both axes, with and without flip
        expected = N / len(support)
        # chi-square with 161 degrees of freedom: the 99.9% quantile is about 226
        chi2 = sum((c[o] - expected) ** 2 / expected for o in support)
        assert chi2 < 226, (name, chi2)
        flips = sum(v for (_, _, f), v in c.items() if f) / N
        assert abs(flips - 0.5) < 0.02, (name, flips)


def test_crd_learning_rate_schedule_epoch_by_epoch():
    recipe = get_suite("crd-table1").recipe
    opt, sched = make_optimizer([torch.nn.Parameter(torch.zeros(1))], recipe)
    lrs = []
    for _ in range(recipe.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # as the engine does once per batch, before the epoch's scheduler step
        sched.step()
    assert len(lrs) == 240
    for first, last, lr in [(0, 149, 0.05), (150, 179, 0.005), (180, 209, 0.0005), (210, 239, 0.00005)]:
        assert lrs[first] == pytest.approx(lr) and lrs[last] == pytest.approx(lr)
    group = opt.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 5e-4, False)
    assert recipe.batch_size == 64
