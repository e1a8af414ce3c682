"""RandomResizedCrop on the device, for a whole batch at once (the ImageNet training crop; issue 12, item 6).

Each image's crop is drawn as torchvision's ``RandomResizedCrop.get_params`` draws it: up to 10 attempts of an
area fraction uniform in ``scale`` and an aspect ratio log-uniform in ``ratio``, the first that fits the image
taken at a uniform position; when none fits, the whole image, centre-cropped to the nearest allowed ratio. The
attempts run side by side as tensor ops (no Python loop over images), and every crop is resampled to the output
size in one ``torchvision.ops.roi_align`` call (bilinear, pixel-aligned), so a batch never leaves the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ATTEMPTS = 10  # torchvision's


@dataclass(frozen=True)
class RRCSpec:
    """The crop's area fraction range and aspect-ratio range (width / height)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


def draw_boxes(n: int, height: int, width: int, spec: RRCSpec, generator: torch.Generator,
               device: torch.device | str) -> Tensor:
    """``n`` crop boxes (x0, y0, x1, y1 in pixels, float) for a ``height`` × ``width`` image."""
    gen_dev = generator.device
    area = height * width
    target = area * torch.empty(n, ATTEMPTS, device=gen_dev).uniform_(*spec.scale, generator=generator)
    log_r = torch.empty(n, ATTEMPTS, device=gen_dev).uniform_(math.log(spec.ratio[0]), math.log(spec.ratio[1]),
                                                            generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1, device=gen_dev))
    rows = torch.arange(n, device=gen_dev)
    pick = first.clamp(min=0)
    w, h = w[rows, pick], h[rows, pick]
    u = torch.rand(n, 2, device=gen_dev, generator=generator)
    y0 = (u[:, 0] * (height - h + 1)).floor()
    x0 = (u[:, 1] * (width - w + 1)).floor()
    # No attempt fitted: the whole image, centre-cropped to the allowed ratio nearest its own.
    in_ratio = width / height
    if in_ratio < min(spec.ratio):
        fw, fh = width, round(width / min(spec.ratio))
    elif in_ratio > max(spec.ratio):
        fw, fh = round(height * max(spec.ratio)), height
    else:
        fw, fh = width, height
    none = first < 0
    w = torch.where(none, torch.full_like(w, fw), w)
    h = torch.where(none, torch.full_like(h, fh), h)
    x0 = torch.where(none, torch.full_like(x0, (width - fw) // 2), x0)
    y0 = torch.where(none, torch.full_like(y0, (height - fh) // 2), y0)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1).to(device)


def random_resized_crop(images: Tensor, spec: RRCSpec, generator: torch.Generator, size: int | None = None) -> Tensor:
    """A batch (uint8 or float, N×C×H×W) cropped per :func:`draw_boxes` and resized to ``size``² (default: the
    images' own side), as float32."""
    from torchvision.ops import roi_align

    n, _, height, width = images.shape
    size = size or height
    boxes = draw_boxes(n, height, width, spec, generator, images.device)
    indexed = torch.cat([torch.arange(n, device=images.device, dtype=boxes.dtype)[:, None], boxes], 1)
    # adaptive sampling (ceil(crop side / output side) points per output pixel): an average over the area a
    # pixel covers when shrinking (as antialiasing does), the exact pixels for a crop of the output's own size
    return roi_align(images.float(), indexed, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0,
                     aligned=True)


__all__ = ["RRCSpec", "draw_boxes", "random_resized_crop"]
