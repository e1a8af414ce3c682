"""CIFAR VGGs with BatchNorm of the CRD benchmark (RepDistiller ``models/vgg.py``), in timm.

Five blocks of 3x3 conv-bn-relu (``block0..4``), max-pooling between the first four, global
average pooling and a single linear ``classifier`` (no VGG fully connected stack). The CRD names
``vgg8/11/13/16/19`` are RepDistiller's ``*_bn`` models (its ``model_dict`` maps them so).

Two RepDistiller details kept on purpose:

* ``pool3`` is applied only when the input is 64 pixels high (RepDistiller's TinyImageNet case);
  at 32x32 the last two stages therefore have the same 4x4 resolution.
* RepDistiller strips each block's last ReLU and applies it functionally; we keep it as the last
  module of the block (a ReLU has no parameters, so the keys are unchanged), which makes each
  block's output the post-activation stage feature that ``is_feat`` returns.

With ``preact=True`` (RepDistiller's ``is_feat=True, preact=True``) stages 1..4 are each block's
output before that last ReLU (``relu(preact) == stage``); the stem (``block0``) stays
post-activation, as RepDistiller returns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from kdbench.models.base import ZooModel, build_zoo_model, init_weights, zoo_cfg

__all__ = ["CifarVGG"]

# Output channels of the convs of each of the five blocks.
_CONFIGS: dict[str, list[list[int]]] = {
    "cifar_vgg8": [[64], [128], [256], [512], [512]],
    "cifar_vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "cifar_vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "cifar_vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "cifar_vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(channels: Sequence[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in channels:
        layers += [
            nn.Conv2d(in_channels, v, kernel_size=3, padding=1),
            nn.BatchNorm2d(v),
            nn.ReLU(inplace=True),
        ]
        in_channels = v
    return nn.Sequential(*layers)


class CifarVGG(ZooModel):
    """RepDistiller's CIFAR VGG with BatchNorm.

    Stages (``feature_info``): ``block0..4``, each post-activation; reductions are those at 32x32
    (``block4`` has the same resolution as ``block3`` unless the input is 64 high).
    """

    classifier_name = "classifier"
    supports_preact = True

    def __init__(
        self,
        cfg: Sequence[Sequence[int]],
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        img_size: Any = None,  # accepted for interface uniformity; any size >= 8x8 works
    ) -> None:
        super().__init__()
        self.block0 = _make_block(cfg[0], in_chans)
        self.block1 = _make_block(cfg[1], cfg[0][-1])
        self.block2 = _make_block(cfg[2], cfg[1][-1])
        self.block3 = _make_block(cfg[3], cfg[2][-1])
        self.block4 = _make_block(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.feature_info = [
            dict(num_chs=cfg[0][-1], reduction=1, module="block0"),
            dict(num_chs=cfg[1][-1], reduction=2, module="block1"),
            dict(num_chs=cfg[2][-1], reduction=4, module="block2"),
            dict(num_chs=cfg[3][-1], reduction=8, module="block3"),
            dict(num_chs=cfg[4][-1], reduction=8, module="block4"),
        ]
        self._init_head(cfg[4][-1], num_classes, drop_rate)
        init_weights(self, linear_std=0.01)

    def _forward_stage(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> Tensor:
        if index == 0:
            return self.block0(x)
        if index < 4:
            pool = (self.pool0, self.pool1, self.pool2)[index - 1]
            return (self.block1, self.block2, self.block3)[index - 1](pool(x))
        # RepDistiller pools before block4 only for 64-pixel-high inputs.
        if input_hw[0] == 64:
            x = self.pool3(x)
        return self.block4(x)

    def _forward_stage_preact(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        if index == 0:  # RepDistiller's f0 is post-ReLU with preact=True too
            x = self._forward_stage(0, x, input_hw)
            return x, x
        # The pooling before the block, as _forward_stage does it.
        if index < 4:
            x = (self.pool0, self.pool1, self.pool2)[index - 1](x)
        elif input_hw[0] == 64:
            x = self.pool3(x)
        # The block without its last ReLU (RepDistiller's block; the ReLU it applies functionally).
        *layers, _relu = (self.block1, self.block2, self.block3, self.block4)[index - 1]
        for layer in layers:
            x = layer(x)
        return F.relu(x), x


_CFGS = {name: zoo_cfg("classifier", pool_size=(4, 4), first_conv="block0.0") for name in _CONFIGS}
# timm's register_model reads the module's ``default_cfgs``, so it must exist before the entrypoints.
default_cfgs = generate_default_cfgs(_CFGS)


def _vgg(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    def factory(**kw: Any) -> ZooModel:
        return CifarVGG(_CONFIGS[name], **kw)

    return build_zoo_model(name, factory, pretrained, _CFGS[name], kwargs)


@register_model
def cifar_vgg8(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """VGG-8 with BatchNorm for CIFAR (RepDistiller ``vgg8_bn``, CRD ``vgg8``)."""
    return _vgg("cifar_vgg8", pretrained, kwargs)


@register_model
def cifar_vgg11(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """VGG-11 with BatchNorm for CIFAR (RepDistiller ``vgg11_bn``, CRD ``vgg11``)."""
    return _vgg("cifar_vgg11", pretrained, kwargs)


@register_model
def cifar_vgg13(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """VGG-13 with BatchNorm for CIFAR (RepDistiller ``vgg13_bn``, CRD ``vgg13``)."""
    return _vgg("cifar_vgg13", pretrained, kwargs)


@register_model
def cifar_vgg16(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """VGG-16 with BatchNorm for CIFAR (RepDistiller ``vgg16_bn``, CRD ``vgg16``)."""
    return _vgg("cifar_vgg16", pretrained, kwargs)


@register_model
def cifar_vgg19(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """VGG-19 with BatchNorm for CIFAR (RepDistiller ``vgg19_bn``, CRD ``vgg19``)."""
    return _vgg("cifar_vgg19", pretrained, kwargs)
