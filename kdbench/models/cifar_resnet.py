"""CIFAR ResNets of the CRD benchmark (RepDistiller ``models/resnet.py``), registered in timm.

Layout compatibility is the point of this file: parameter and buffer names follow RepDistiller
exactly (``conv1``, ``bn1``, ``layer1.0.downsample.0`` ..., ``fc``), so the teacher checkpoints
RepDistiller and mdistiller publish (``{'model': state_dict}``) load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from kdbench.models.base import ZooModel, build_zoo_model, init_weights, run_with_preact, zoo_cfg

__all__ = ["CifarResNet"]


# ---------------------------------------------------------------------------------------------
# ResNet (post-activation, BasicBlock, depth 6n+2)
# ---------------------------------------------------------------------------------------------


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn + shortcut, then ReLU: the output is post-activation.

    RepDistiller's last block of each layer returns ``(out, preact)``; ours returns only ``out``
    so that the layer's output *is* the stage feature (forward hooks on ``layerN`` capture it),
    and :meth:`forward_preact` returns both, for ``forward_intermediates(preact=True)``.
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def _residual_sum(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        # Out of place: ``x`` is the previous stage's feature, which a caller may still hold.
        return self.bn2(self.conv2(out)) + shortcut

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self._residual_sum(x))

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, the residual sum before the final ReLU)``: RepDistiller's ``(out, preact)``."""
        pre = self._residual_sum(x)
        return F.relu(pre), pre


class CifarResNet(ZooModel):
    """RepDistiller's CIFAR ResNet: 3x3 stem, three stages of BasicBlocks, average pool, fc.

    Stages (``feature_info``): the stem after its ReLU (module ``relu``), then ``layer1..3``;
    all post-activation, as RepDistiller's ``is_feat`` with ``preact=False``. With ``preact=True``
    stages 1..3 are the last block's residual sum before its ReLU (``relu(preact) == stage``); the
    stem stays post-activation, as RepDistiller returns it.
    """

    classifier_name = "fc"
    supports_preact = True

    def __init__(
        self,
        depth: int,
        num_filters: Sequence[int],
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        img_size: Any = None,  # accepted for interface uniformity; any size >= 8x8 works
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"BasicBlock ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_chans, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        # Not in place: its output is the stem feature that hooks on ``relu`` capture.
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.feature_info = [
            dict(num_chs=num_filters[0], reduction=1, module="relu"),
            dict(num_chs=num_filters[1], reduction=1, module="layer1"),
            dict(num_chs=num_filters[2], reduction=2, module="layer2"),
            dict(num_chs=num_filters[3], reduction=4, module="layer3"),
        ]
        self._init_head(num_filters[3] * BasicBlock.expansion, num_classes, drop_rate)
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        out_planes = planes * BasicBlock.expansion
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
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


_SMALL = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)  # the "x4" variants: 4x wider stages, 2x wider stem

_CFGS = {
    f"cifar_resnet{tag}": zoo_cfg("fc", pool_size=(8, 8))
    for tag in ("8", "14", "20", "32", "44", "56", "110", "8x4", "32x4")
}
# timm's register_model reads the module's ``default_cfgs``, so it must exist before the entrypoints.
default_cfgs = generate_default_cfgs(_CFGS)


def _resnet(
    name: str, depth: int, filters: Sequence[int], pretrained: bool, kwargs: dict[str, Any]
) -> nn.Module:
    def factory(**kw: Any) -> ZooModel:
        return CifarResNet(depth, filters, **kw)

    return build_zoo_model(name, factory, pretrained, _CFGS[name], kwargs)


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-8 for CIFAR (RepDistiller ``resnet8``)."""
    return _resnet("cifar_resnet8", 8, _SMALL, pretrained, kwargs)


@register_model
def cifar_resnet14(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-14 for CIFAR (RepDistiller ``resnet14``)."""
    return _resnet("cifar_resnet14", 14, _SMALL, pretrained, kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-20 for CIFAR (RepDistiller ``resnet20``)."""
    return _resnet("cifar_resnet20", 20, _SMALL, pretrained, kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-32 for CIFAR (RepDistiller ``resnet32``)."""
    return _resnet("cifar_resnet32", 32, _SMALL, pretrained, kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-44 for CIFAR (RepDistiller ``resnet44``)."""
    return _resnet("cifar_resnet44", 44, _SMALL, pretrained, kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-56 for CIFAR (RepDistiller ``resnet56``)."""
    return _resnet("cifar_resnet56", 56, _SMALL, pretrained, kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-110 for CIFAR (RepDistiller ``resnet110``)."""
    return _resnet("cifar_resnet110", 110, _SMALL, pretrained, kwargs)


@register_model
def cifar_resnet8x4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-8 with 4x wider stages (RepDistiller ``resnet8x4``), the usual CRD student."""
    return _resnet("cifar_resnet8x4", 8, _X4, pretrained, kwargs)


@register_model
def cifar_resnet32x4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-32 with 4x wider stages (RepDistiller ``resnet32x4``), the usual CRD teacher."""
    return _resnet("cifar_resnet32x4", 32, _X4, pretrained, kwargs)
