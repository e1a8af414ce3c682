"""The teacher-output cache: a frozen teacher's outputs for every augmented view of every image.

A teacher in eval mode is a fixed function of its input, and the protocol's augmentation has a
finite set of outcomes per image: (2p+1)² crop offsets × 2 flips, 162 for CIFAR's
``RandomCrop(32, padding=4)`` + flip. So its outputs for every view can be computed once and
looked up by (image, view) in every epoch of every student, method and seed that distils from it,
instead of running the teacher again. The engine draws the same random views either way, so a
cached run sees the same numbers as an online one.

Only methods whose taps ask for no stage maps can use it (logits and the pooled vector are small;
stage maps of 162 views are not): :func:`cacheable`. For CIFAR-100 the logits take
50,000 × 162 × 100 × 2 bytes = 1.6 GB in bf16.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..data import DataSplits, apply_views, fixed_views, normalize, view_count
from ..errors import KdbenchError
from ..features import FeatureCapture
from ..method import Outputs, Taps
from ..recipe import Recipe
from .options import EngineOptions, freeze


def cacheable(taps: Taps) -> bool:
    """Whether a method with these taps can distil from cached teacher outputs (no stage maps)."""
    return not taps.stages


@dataclass
class ViewCache:
    """One teacher's outputs for every (training image, augmented view)."""

    logits: Tensor         # N × views × classes, in the teacher's output dtype (bf16 under bf16)
    pooled: Tensor | None  # N × views × features, when a method asks for the pooled vector
    crop_padding: int
    flip: bool
    build_time_s: float = 0.0
    # Training image i's row in the tensors above, when they hold a larger set (a cache of the whole
    # training set used by a run that holds out a validation split): None = row i.
    rows: Tensor | None = None

    @property
    def size(self) -> int:
        """How many training images this cache answers for."""
        return len(self.rows) if self.rows is not None else len(self.logits)

    def restricted(self, rows: Tensor) -> ViewCache:
        """The same cache for a subset of its images: image i of the subset is row ``rows[i]``, no copy."""
        rows = rows.to(self.logits.device)
        if self.rows is not None:
            rows = self.rows[rows]
        return replace(self, rows=rows)

    @property
    def views(self) -> int:
        return self.logits.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.logits, self.pooled) if t is not None)

    def check(self, recipe: Recipe, data: DataSplits) -> None:
        """The cache must describe this training set under this recipe's augmentation."""
        if (self.crop_padding, self.flip) != (recipe.crop_padding, recipe.flip):
            raise KdbenchError(f"teacher cache built for crop padding {self.crop_padding}, flip {self.flip}, but "
                               f"recipe '{recipe.name}' has {recipe.crop_padding}, {recipe.flip}; build the cache "
                               "for it")
        if self.size != len(data.train_labels):
            raise KdbenchError(f"teacher cache holds {self.size} images, the training set "
                               f"{len(data.train_labels)}; build the cache for this dataset and --limit")

    def lookup(self, index: Tensor, view: Tensor) -> Outputs:
        """The teacher's outputs for training images ``index`` seen through views ``view``."""
        if self.rows is not None:
            index = self.rows[index]
        pooled = self.pooled[index, view] if self.pooled is not None else None
        return Outputs(self.logits[index, view], pooled=pooled)

    def state_dict(self) -> dict:
        return {"logits": self.logits, "pooled": self.pooled, "crop_padding": self.crop_padding,
                "flip": self.flip, "build_time_s": self.build_time_s, "rows": self.rows}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device) -> ViewCache:
        pooled = state["pooled"].to(device) if state["pooled"] is not None else None
        rows = state.get("rows")  # absent in files written before restricted caches existed
        return cls(state["logits"].to(device), pooled, state["crop_padding"], state["flip"], state["build_time_s"],
                   rows.to(device) if rows is not None else None)


@torch.inference_mode()
def build_view_cache(teacher: nn.Module, data: DataSplits, recipe: Recipe, *, pooled: bool = False,
                     options: EngineOptions = EngineOptions(), batch_size: int = 1000,
                     progress: object | None = None) -> ViewCache:
    """Run ``teacher`` once over every augmented view of every training image.

    Each view goes through exactly the engine's path: the same crop and flip ops on the uint8
    images, the same normalisation, memory format and autocast. ``progress``: a tqdm bar advanced
    once per view, or None.
    """
    t0 = time.perf_counter()
    model = options.prepare(freeze(teacher))
    cap = FeatureCapture(model, Taps(pooled=pooled))
    images, device = data.train_images, data.train_images.device
    n, p, flip = len(images), recipe.crop_padding, recipe.flip
    views = view_count(p, flip)
    logits = feats = None
    for v in range(views):
        for start in range(0, n, batch_size):
            x = images[start:start + batch_size]
            x = apply_views(x, fixed_views(v, len(x), p, flip, device), p)
            with options.autocast(device):
                out = cap(options.layout(normalize(x, data.info)))
            if logits is None:  # shapes and dtype come from the first batch
                logits = out.logits.new_empty(n, views, out.logits.shape[1])
                if pooled:
                    feats = out.pooled.new_empty(n, views, out.pooled.shape[1])
            logits[start:start + len(x), v] = out.logits
            if feats is not None:
                feats[start:start + len(x), v] = out.pooled
        if progress is not None:
            progress.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the build time is the device's, not the launch queue's
    return ViewCache(logits, feats, p, flip, time.perf_counter() - t0)
