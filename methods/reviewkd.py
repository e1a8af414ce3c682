"""Knowledge review: attention-based fusion of the student's stages, deep to shallow, and a hierarchical context
loss against the teacher's (Chen, Liu, Zhao, Jia, CVPR 2021).

Followed from the authors' code, dvlab-research/ReviewKD: ``CIFAR-100/model/reviewkd.py`` (``ABF``, the review
path in ``ReviewKD.forward``, ``hcl``, the channel rule ``mid_channel = min(512, in_channels[-1])``; commit
6607308a444e0b53650639f6b040515b3d665e05), ``CIFAR-100/train.py`` (the features: the student's ``is_feat`` maps
and the teacher's ``is_feat=True, preact=True`` maps without the stem, each list ending in the pooled vector as a
1x1 map; the loss weight and its ramp; ``--kd-loss-weight`` 1, ``--kd-warm-up`` 20, CE 1; commit
49015fb08963cfd430d3f192fe100fed82ea1b12) and ``CIFAR-100/script/reviewKD.sh`` (the weight per pair; commit
6607308a444e0b53650639f6b040515b3d665e05); checked against megvii-research/mdistiller
``mdistiller/distillers/ReviewKD.py`` and ``configs/cifar100/reviewkd.yaml`` (commit
e8c5bb331e78c9d79a8894ca233caae78531cf7f) and ``mdistiller/engine/cfg.py`` (commit
a08d46f10d6102bd6e3f258ca5ac880b020ea259), which are the same method.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.method import Batch, Method, Outputs, Probe, Taps, check_maps, check_stages, check_weights

#: The pyramid of the hierarchical context loss: adaptive average pooling to 4x4, 2x2 and 1x1 (the official
#: ``hcl``'s ``[4, 2, 1]``); a level at least as large as the map is skipped.
PYRAMID = (4, 2, 1)
#: The official CIFAR rule for the fused channels: the student's deepest channel count, at most 512.
MAX_MID_CHANNELS = 512


def hcl(f_s: Tensor, f_t: Tensor, pyramid: Sequence[int] = PYRAMID) -> Tensor:
    """Hierarchical context loss of one level: MSE of the maps, plus MSE of their average-pooled versions.

    The full-resolution term weighs 1, each pyramid level that is smaller than the map's height half the
    previous one's (1/2, 1/4, 1/8), and the sum is divided by the total weight: for an 8x8 map
    ``(mse + mse_4/2 + mse_2/4 + mse_1/8) / 1.875``, for a 1x1 map the plain MSE.
    """
    h = f_s.shape[2]
    loss = F.mse_loss(f_s, f_t)
    weight, total = 1.0, 1.0
    for size in pyramid:
        if size >= h:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size))
        total += weight
    return loss / total


def _batch_norm(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``bn(x)``; but a batch of one 1x1 map (the pooled level of a last batch of one image) has no batch statistics,
    and is normalised with the running ones instead, left unchanged (the official code stops with an error there)."""
    if bn.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(x)


class ABF(nn.Module):
    """Attention-based fusion of one level: the student's map, fused with the deeper level's, mapped to the teacher's.

    A 1x1 conv + BatchNorm takes the student's map to ``mid_channels``. Except at the deepest level (``fuse`` false,
    no residual), the deeper level's fused map is upsampled (nearest) to this map's size and the two are mixed
    position by position with two weights from a 1x1 conv over both and a sigmoid. The result (interpolated, nearest,
    to the teacher's size where it differs) is this level's residual for the next shallower one, and a 3x3 conv +
    BatchNorm takes it to the teacher's channels.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        # the official initialisation of both convs (the attention conv keeps PyTorch's default)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``(the map compared with the teacher's, the residual for the next shallower level)``."""
        x = _batch_norm(self.conv1[1], self.conv1[0](x))
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("an ABF that fuses needs the deeper level's residual")
            y = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0:1] + y * z[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return _batch_norm(self.conv2[1], self.conv2[0](x)), x


class ReviewKD(Method):
    """Review the student's stages deep to shallow through attention-based fusion; match each to the teacher's.

    The levels are the tapped stages (listed shallow to deep) and, deepest, the pooled vector as a 1x1 map. For each
    level an :class:`ABF` takes the student's map to ``mid_channels`` and, except at the deepest level, fuses it
    with the deeper level's fused map; a 3x3 conv + BatchNorm then takes it to the teacher's channels and size. The
    loss is the hierarchical context loss (:func:`hcl`) of every level, summed, times ``reviewkd_weight`` and the
    ramp ``min((epoch + 1) / warmup, 1)``.

    Defaults (module docstring for the files and commits): CE 1, weight 5 (``CIFAR-100/script/reviewKD.sh``: 5 for
    resnet32x4→resnet8x4, resnet32x4→shufflev1, wrn-40-2→wrn-16-2, wrn-40-2→wrn-40-1 and wrn-40-2→shufflev1; 8 for
    resnet32x4→shufflev2, 0.6 for resnet56→resnet20, 1 for resnet110→resnet32; ``train.py``'s own default and
    mdistiller's ``cfg.py`` say 1, mdistiller's resnet32x4→resnet8x4 config 5), 20 warm-up epochs, the fused width
    ``min(512, the student's pooled channels)`` (``mid_channels=0``; the ImageNet code fixes 512 for ResNet18 and 256
    for MobileNet, ``mid_channels=N``), stages −3..−1: the stages after the stem for the 4-stage CRD ResNets, WRNs and
    ShuffleNets (the official code drops the stem, ``t_features[1:]``); vgg and MobileNetV2 have one more
    (``reviewkd.stages=1,2,3,4``).

    Where this differs from the official code:

    * Features: the official student gives its post-activation maps (``is_feat``), the teacher its pre-activation
      ones (``preact=True``); kdbench taps both models alike, so with ``preact=true`` (default: the teacher's targets
      are the official ones) the student's ABF inputs are its pre-activation maps too (mdistiller's
      ``STU_PREACT=True``). ``preact=false`` takes post-activation maps of both, and works with models that cannot
      give pre-activation maps (timm's).
    * The ramp: the official ``min(1, epoch / kd_warm_up)`` counts epochs from 0, so its first epoch has no review
      term at all; kdbench ramps as mdistiller does (epochs counted from 1) and as ``dkd`` does: ``(epoch + 1) /
      warmup`` for a 0-based epoch, one epoch earlier than the official code.
    * A batch of one image: its pooled level (one 1x1 map) has no batch statistics for the ABF's BatchNorms, which
      then use their running ones (the official code stops with an error).
    * Sizes: each map is resized with nearest interpolation to the height and width it is matched with (the official
      code takes square side lengths from per-model tables).
    """

    name = "reviewkd"
    paper = "Chen, Liu, Zhao, Jia: Distilling Knowledge via Knowledge Review, CVPR 2021"

    def __init__(self, *, ce_weight: float = 1.0, reviewkd_weight: float = 5.0, warmup: int = 20,
                 mid_channels: int = 0, stages: tuple[int, ...] = (-3, -2, -1), preact: bool = True) -> None:
        super().__init__(ce_weight=ce_weight)
        check_weights(reviewkd_weight=reviewkd_weight)
        if isinstance(warmup, bool) or not float(warmup).is_integer() or warmup < 0:
            raise ValueError(f"warmup must be a whole number of epochs >= 0 (0: no ramp), got {warmup!r}")
        if isinstance(mid_channels, bool) or not float(mid_channels).is_integer() or mid_channels < 0:
            raise ValueError(f"mid_channels must be a whole number >= 0 (0: min(512, the student's pooled channels), "
                             f"the official CIFAR rule), got {mid_channels!r}")
        if not isinstance(preact, bool):
            raise ValueError(f"preact must be true or false, got {preact!r}")
        self.reviewkd_weight = reviewkd_weight
        self.warmup = int(warmup)
        self.mid_channels = int(mid_channels)
        self.stages = check_stages(stages, self.name)
        if len({i < 0 for i in self.stages}) == 1 and list(self.stages) != sorted(self.stages):
            raise ValueError(f"list stages shallow to deep (the review goes from the deepest back to the shallowest), "
                             f"e.g. reviewkd.stages=-3,-2,-1; got {self.stages}")
        self.preact = preact
        self.abfs = nn.ModuleList()  # one per level, shallow to deep, the pooled vector's last
        self.out_sizes: list[tuple[int, int]] = []  # the teacher's height and width at each level

    def taps(self) -> Taps:
        return Taps(stages=self.stages, pooled=True, preact=self.preact)

    def setup(self, student: Probe, teachers: Sequence[Probe]) -> None:
        check_maps(self.stages, student, teachers, self.name)
        teacher = teachers[0]
        for probe in (student, teacher):
            if probe.pooled is None or len(probe.pooled) != 1:
                raise ValueError(f"reviewkd needs a pooled pre-logit vector (its deepest level), but {probe.model} "
                                 f"gives {probe.pooled}; choose a model that pools its last stage")
            sizes = [probe.stages[i][1:] for i in self.stages]
            if any(deep[0] > shallow[0] or deep[1] > shallow[1] for shallow, deep in zip(sizes, sizes[1:])):
                listed = ", ".join(f"{i}: {'x'.join(map(str, s))}" for i, s in zip(self.stages, sizes))
                raise ValueError(f"reviewkd reviews the stages from the deepest back to the shallowest, so their maps "
                                 f"must not grow with depth, but those of {probe.model} do ({listed}); list the stages "
                                 f"shallow to deep (--set reviewkd.stages=...) or choose another pair")
        s_levels = [student.stages[i] for i in self.stages] + [(student.pooled[0], 1, 1)]
        t_levels = [teacher.stages[i] for i in self.stages] + [(teacher.pooled[0], 1, 1)]
        mid = self.mid_channels or min(MAX_MID_CHANNELS, s_levels[-1][0])
        deepest = len(s_levels) - 1
        self.abfs = nn.ModuleList(ABF(s[0], mid, t[0], fuse=k < deepest)
                                  for k, (s, t) in enumerate(zip(s_levels, t_levels)))
        self.out_sizes = [(int(t[1]), int(t[2])) for t in t_levels]

    def ramp(self, epoch: int) -> float:
        """The term's weight at a 0-based ``epoch``: (epoch + 1) / warmup, at most 1."""
        return 1.0 if self.warmup == 0 else min((epoch + 1) / self.warmup, 1.0)

    def review(self, student: Outputs) -> list[Tensor]:
        """The student's levels through the ABFs, deepest first as the review goes; returned shallow to deep."""
        feats = [student.stages[i] for i in self.stages] + [student.pooled[:, :, None, None]]
        outs: list[Tensor] = []
        residual = None
        for k in reversed(range(len(feats))):
            out, residual = self.abfs[k](feats[k], residual, self.out_sizes[k])
            outs.append(out)
        return outs[::-1]

    def forward(self, student: Outputs, teachers: Sequence[Outputs], batch: Batch) -> dict[str, Tensor]:
        t = teachers[0]
        targets = [t.stages[i] for i in self.stages] + [t.pooled[:, :, None, None]]
        loss = sum(hcl(f_s, f_t) for f_s, f_t in zip(self.review(student), targets))
        return {"reviewkd": self.reviewkd_weight * loss}

    def term_weights_at(self, epoch: int, epochs: int) -> dict[str, float]:
        # The warm-up ramp, applied by the engine outside the compiled step (see Method.term_weights_at).
        w = self.ramp(epoch)
        return {} if w == 1.0 else {"reviewkd": w}
