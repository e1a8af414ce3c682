"""The resolution a run trains and evaluates at: a setting, not a property of the dataset (issue 12, item 1).

``size`` 0 keeps each dataset as stored (ImageFolder: 32 px, as before the setting existed). Otherwise every image
is resized so that a centre crop of ``size`` × ``size`` keeps ``crop_pct`` of it (its shorter side to
``size / crop_pct``, timm's eval convention), with ``interpolation``, then centre-cropped. Decoded once into the
in-memory uint8 set, so train and test images share the transform; the training augmentation (pad-crop, flip)
is applied on top, per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import KdbenchError
from .splits import DataSplits

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
#: An ImageFolder's size when none is set (kdbench's first CIFAR-sized default).
IMAGEFOLDER_DEFAULT_SIZE = 32


@dataclass(frozen=True)
class Resolution:
    """Image size (square), crop fraction and interpolation of a run's images; the defaults change nothing."""

    size: int = 0
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise KdbenchError(f"image size must be a whole number of pixels >= 1 (0: as stored), got {self.size!r}")
        if not (isinstance(self.crop_pct, (int, float)) and 0 < self.crop_pct <= 1) or isinstance(self.crop_pct, bool):
            raise KdbenchError(f"crop fraction must be in (0, 1] (1: no crop; timm's eval default 0.875), got "
                               f"{self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise KdbenchError(f"interpolation '{self.interpolation}' is not one of {', '.join(INTERPOLATIONS)}")
        if not self.size and (self.crop_pct != 1.0 or self.interpolation != "bilinear"):
            raise KdbenchError("a crop fraction or interpolation needs an image size (--image-size N): without one "
                               "the images are used as stored")

    @property
    def resize_to(self) -> int:
        """The shorter side before the centre crop."""
        return int(math.floor(self.size / self.crop_pct))

    @property
    def label(self) -> str:
        """How a dataset label marks it ('' for the default): ``~160px``, ``~224px/0.875/bicubic``."""
        if not self.size:
            return ""
        extra = (f"/{self.crop_pct:g}" if self.crop_pct != 1.0 else "") + \
            (f"/{self.interpolation}" if self.interpolation != "bilinear" else "")
        return f"~{self.size}px{extra}"

    def kwargs(self) -> dict[str, int | float | str]:
        """As :func:`~kdbench.data.load_dataset`'s arguments."""
        return {"image_size": self.size, "crop_pct": self.crop_pct, "interpolation": self.interpolation}

    def imagefolder_size(self) -> int:
        return self.size or IMAGEFOLDER_DEFAULT_SIZE


def pretrained_resolution(model: str) -> Resolution | None:
    """The resolution a pretrained timm model was trained for (its pretrained config, as timm's
    ``resolve_data_config`` reads it): image size, crop_pct and interpolation; None where the config cannot be read
    offline (an ``hf-hub:`` name)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model)
    except (RuntimeError, ValueError, KeyError):
        return None
    if cfg is None or not cfg.input_size:
        return None
    interpolation = cfg.interpolation if cfg.interpolation in INTERPOLATIONS else "bilinear"
    return Resolution(int(cfg.input_size[-1]), float(cfg.crop_pct or 1.0), interpolation)


def resize_splits(splits: DataSplits, res: Resolution) -> DataSplits:
    """An in-memory dataset at ``res`` (unchanged for the default): resized with antialiasing, centre-cropped."""
    if not res.size:
        return splits
    from dataclasses import replace

    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    mode = InterpolationMode(res.interpolation)

    def convert(images):
        if images.shape[-1] == res.size and images.shape[-2] == res.size and res.crop_pct == 1.0:
            return images
        out = TF.resize(images, [res.resize_to], interpolation=mode, antialias=True)
        return TF.center_crop(out, [res.size, res.size]).contiguous()

    info = replace(splits.info, img_size=res.size)
    return DataSplits(info, convert(splits.train_images), splits.train_labels, convert(splits.test_images),
                      splits.test_labels)


__all__ = ["INTERPOLATIONS", "Resolution", "resize_splits"]
