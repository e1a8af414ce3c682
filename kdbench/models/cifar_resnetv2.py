"""The CIFAR ResNet-50 of the CRD benchmark (RepDistiller ``models/resnetv2.py``), in timm.

An ImageNet-style ResNet-50 (bottleneck blocks [3, 4, 6, 3], 4x expansion) adapted to CIFAR: a
single 3x3 stride-1 stem conv and no stem max-pool, so the four stages run at 32, 16, 8 and 4
pixels. Names follow RepDistiller (``shortcut`` rather than torchvision's ``downsample``, the
classifier is ``linear``) so its checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from kdbench.models.base import ZooModel, build_zoo_model, init_weights, run_with_preact, zoo_cfg

__all__ = ["CifarBottleneckResNet"]


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck, stride on the 3x3, ReLU after the sum (post-activation output)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        # An empty Sequential is the identity and adds no keys, as in RepDistiller.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def _residual_sum(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self._residual_sum(x))

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, the residual sum before the final ReLU)``: RepDistiller's ``(out, preact)``."""
        pre = self._residual_sum(x)
        return F.relu(pre), pre


class CifarBottleneckResNet(ZooModel):
    """RepDistiller's ``ResNet`` with bottleneck blocks (``ResNet50``: [3, 4, 6, 3]).

    Stages (``feature_info``): the stem after its ReLU (module ``relu``), then ``layer1..4``, all
    post-activation as RepDistiller's ``is_feat`` with ``preact=False``. With ``preact=True``
    stages 1..4 are the last block's residual sum before its ReLU (``relu(preact) == stage``); the
    stem stays post-activation, as RepDistiller returns it.
    """

    classifier_name = "linear"
    supports_preact = True

    def __init__(
        self,
        num_blocks: Sequence[int],
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        img_size: Any = None,  # accepted for interface uniformity; any size >= 8x8 works
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        # RepDistiller applies this ReLU functionally; a module makes the stem feature hookable.
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        e = Bottleneck.expansion
        self.feature_info = [
            dict(num_chs=64, reduction=1, module="relu"),
            dict(num_chs=64 * e, reduction=1, module="layer1"),
            dict(num_chs=128 * e, reduction=2, module="layer2"),
            dict(num_chs=256 * e, reduction=4, module="layer3"),
            dict(num_chs=512 * e, reduction=8, module="layer4"),
        ]
        self._init_head(512 * e, num_classes, drop_rate)
        init_weights(self)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def _forward_stage(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> Tensor:
        if index == 0:
            return self.relu(self.bn1(self.conv1(x)))
        return (self.layer1, self.layer2, self.layer3, self.layer4)[index - 1](x)

    def _forward_stage_preact(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        if index == 0:  # RepDistiller's f0 is post-ReLU with preact=True too
            x = self._forward_stage(0, x, input_hw)
            return x, x
        return run_with_preact((self.layer1, self.layer2, self.layer3, self.layer4)[index - 1], x)


_CFGS = {"cifar_resnet50": zoo_cfg("linear", pool_size=(4, 4))}
# timm's register_model reads the module's ``default_cfgs``, so it must exist before the entrypoints.
default_cfgs = generate_default_cfgs(_CFGS)


@register_model
def cifar_resnet50(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 for CIFAR (RepDistiller ``ResNet50``), a CRD teacher."""

    def factory(**kw: Any) -> ZooModel:
        return CifarBottleneckResNet((3, 4, 6, 3), **kw)

    return build_zoo_model("cifar_resnet50", factory, pretrained, _CFGS["cifar_resnet50"], kwargs)
