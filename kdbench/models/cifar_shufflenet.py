"""The CIFAR ShuffleNetV1 and V2 of the CRD benchmark, registered in timm.

RepDistiller ``models/ShuffleNetv1.py`` (``ShuffleV1``: groups 3, stages of 240/480/960 channels)
and ``models/ShuffleNetv2.py`` (``ShuffleV2``: net size 1, 116/232/464 channels, 1024-channel head
conv). Both use a 1x1 stride-1 stem conv with no max-pool, so the first stage halves 32x32 to
16x16. Names follow RepDistiller so its checkpoints load unchanged.

Surprises worth knowing (kept, for checkpoint and feature compatibility):

* The stem ReLU is functional in RepDistiller; here it is an ``nn.ReLU`` module named ``relu``
  (no parameters) so the stem feature can be hooked.
* ShuffleV2's stage feature is the last block's output *after* its channel shuffle. Its pooled
  vector comes from a 1x1 conv to 1024 channels + BN + ReLU (``conv2``/``bn2``) applied after the
  last stage, so the pooled vector is not the mean of the last stage feature (1024 vs 464
  channels). ShuffleV1 pools its last stage directly.
* With ``preact=True`` (RepDistiller's ``is_feat=True, preact=True``) stages 1..3 are the last
  block's map before its final ReLU. For ShuffleV1 ``relu(preact) == stage``. For ShuffleV2 it is
  RepDistiller's ``cat([x1, bn3(conv3(...))])``: before the ReLU of the transformed half *and
  before the channel shuffle*, so ``channel_shuffle(relu(preact), 2) == stage`` (the untouched half
  ``x1`` is a previous block's output, never negative). The stems stay post-activation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from kdbench.models.base import ZooModel, build_zoo_model, run_with_preact, zoo_cfg

__all__ = ["CifarShuffleNetV1", "CifarShuffleNetV2"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave channels across ``groups``: [N, g*c, H, W] -> groups-major to channel-major."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ChannelShuffle(nn.Module):
    """Parameter-free channel shuffle (a module so it shows in ``print(model)``)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(x, self.groups)


# ---------------------------------------------------------------------------------------------
# ShuffleNet V1
# ---------------------------------------------------------------------------------------------


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1; stride 2 concatenates a pooled input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        # The stem has only 24 channels: the very first 1x1 conv is not grouped.
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()  # empty (identity, no keys) unless the block downsamples
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def _preact(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return torch.cat([out, res], 1) if self.stride == 2 else out + res

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self._preact(x))

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, the map before the final ReLU)``: RepDistiller's ``(out, preact)``."""
        pre = self._preact(x)
        return F.relu(pre), pre


class CifarShuffleNetV1(ZooModel):
    """RepDistiller's ShuffleNet (V1) for CIFAR.

    Stages (``feature_info``): the stem after its ReLU (module ``relu``), then ``layer1..3``, all
    post-activation as RepDistiller's ``is_feat`` with ``preact=False``; ``preact=True``: module
    docstring.
    """

    classifier_name = "linear"
    supports_preact = True

    def __init__(
        self,
        out_planes: Sequence[int] = (240, 480, 960),
        num_blocks: Sequence[int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        img_size: Any = None,  # accepted for interface uniformity; any size >= 8x8 works
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.feature_info = [
            dict(num_chs=24, reduction=1, module="relu"),
            dict(num_chs=out_planes[0], reduction=2, module="layer1"),
            dict(num_chs=out_planes[1], reduction=4, module="layer2"),
            dict(num_chs=out_planes[2], reduction=8, module="layer3"),
        ]
        self._init_head(out_planes[2], num_classes, drop_rate)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # The first block concatenates its input, so its branch makes only the remainder.
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(ShuffleV1Block(self.in_planes, out_planes - cat_planes, 2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def _forward_stage(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> Tensor:
        if index == 0:
            return self.relu(self.bn1(self.conv1(x)))
        return (self.layer1, self.layer2, self.layer3)[index - 1](x)

    def _forward_stage_preact(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        if index == 0:  # RepDistiller's f0 is post-ReLU with preact=True too
            x = self._forward_stage(0, x, input_hw)
            return x, x
        return run_with_preact((self.layer1, self.layer2, self.layer3)[index - 1], x)


# ---------------------------------------------------------------------------------------------
# ShuffleNet V2
# ---------------------------------------------------------------------------------------------


class ShuffleV2Block(nn.Module):
    """Split channels in half; transform one half (1x1 - dw 3x3 - 1x1); concat; shuffle."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split_ratio = split_ratio
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ChannelShuffle(2)

    def _split_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The untouched half and the transformed half before its ReLU."""
        c = int(x.size(1) * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        return x1, self.bn3(self.conv3(out))

    def forward(self, x: Tensor) -> Tensor:
        x1, pre = self._split_preact(x)
        return self.shuffle(torch.cat([x1, F.relu(pre)], 1))

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, cat([x1, pre-ReLU half]))``: RepDistiller's ``(out, preact)``, its preact unshuffled."""
        x1, pre = self._split_preact(x)
        return self.shuffle(torch.cat([x1, F.relu(pre)], 1)), torch.cat([x1, pre], 1)


class ShuffleV2DownBlock(nn.Module):
    """Stride-2 block: two branches on the full input (left: dw-1x1, right: 1x1-dw-1x1), concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class CifarShuffleNetV2(ZooModel):
    """RepDistiller's ShuffleNetV2 for CIFAR.

    Stages (``feature_info``): the stem after its ReLU (module ``relu``), then ``layer1..3``
    (shuffled block outputs). The pooled map is ``head_act(bn2(conv2(layer3)))``. ``preact=True``:
    module docstring.
    """

    classifier_name = "linear"
    supports_preact = True

    def __init__(
        self,
        out_channels: Sequence[int] = (116, 232, 464, 1024),
        num_blocks: Sequence[int] = (3, 7, 3),
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        img_size: Any = None,  # accepted for interface uniformity; any size >= 8x8 works
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        # A separate module from ``relu`` so hooks on ``relu`` fire once, on the stem feature.
        self.head_act = nn.ReLU(inplace=True)
        self.feature_info = [
            dict(num_chs=24, reduction=1, module="relu"),
            dict(num_chs=out_channels[0], reduction=2, module="layer1"),
            dict(num_chs=out_channels[1], reduction=4, module="layer2"),
            dict(num_chs=out_channels[2], reduction=8, module="layer3"),
        ]
        self._init_head(out_channels[3], num_classes, drop_rate)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [ShuffleV2DownBlock(self.in_channels, out_channels)]
        layers += [ShuffleV2Block(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def _forward_stage(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> Tensor:
        if index == 0:
            return self.relu(self.bn1(self.conv1(x)))
        return (self.layer1, self.layer2, self.layer3)[index - 1](x)

    def _forward_stage_preact(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        if index == 0:  # RepDistiller's f0 is post-ReLU with preact=True too
            x = self._forward_stage(0, x, input_hw)
            return x, x
        return run_with_preact((self.layer1, self.layer2, self.layer3)[index - 1], x)

    def _forward_final(self, x: Tensor) -> Tensor:
        # 1x1 conv to 1024 channels + BN + ReLU between the last stage and the pooling.
        return self.head_act(self.bn2(self.conv2(x)))


_CFGS = {
    "cifar_shufflenetv1": zoo_cfg("linear", pool_size=(4, 4)),
    "cifar_shufflenetv2": zoo_cfg("linear", pool_size=(4, 4)),
}
# timm's register_model reads the module's ``default_cfgs``, so it must exist before the entrypoints.
default_cfgs = generate_default_cfgs(_CFGS)


@register_model
def cifar_shufflenetv1(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ShuffleNetV1 (groups 3) for CIFAR (RepDistiller ``ShuffleV1``)."""
    name = "cifar_shufflenetv1"
    return build_zoo_model(name, CifarShuffleNetV1, pretrained, _CFGS[name], kwargs)


@register_model
def cifar_shufflenetv2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ShuffleNetV2 (net size 1) for CIFAR (RepDistiller ``ShuffleV2``)."""
    name = "cifar_shufflenetv2"
    return build_zoo_model(name, CifarShuffleNetV2, pretrained, _CFGS[name], kwargs)
