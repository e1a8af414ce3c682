"""The CIFAR MobileNetV2 (width 0.5) of the CRD benchmark, in timm.

RepDistiller ``models/mobilenetv2.py`` (``mobile_half``: expansion 6, width 0.5), from "Knowledge
Distillation via Route Constrained Optimization". A stride-2 3x3 stem, seven groups of inverted
residual blocks (``blocks.0..6``), a 1x1 conv to 1280 channels (``conv2``), average pooling and
``classifier.0``. Names follow RepDistiller so its checkpoints load unchanged.

Surprises worth knowing (all kept, for checkpoint and feature compatibility):

* The stem has stride 2, so the stem feature is already 16x16 at 32x32 input.
* The stage features RepDistiller returns are the outputs of ``blocks.1``, ``blocks.2``,
  ``blocks.4`` and ``blocks.6``: linear-bottleneck outputs (a BatchNorm, plus the residual when
  there is one), i.e. **not** ReLU-activated, and the 1280-channel ``conv2`` output (which is
  post-ReLU) is not a stage: it is the map that gets pooled.
* The first group (expansion 1) still has its 1x1 expansion conv, as in RepDistiller.
* ``preact=True`` changes nothing: RepDistiller's MobileNetV2 ignores it and returns the same maps,
  whose stages past the stem already end without an activation (linear bottlenecks).
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from kdbench.models.base import ZooModel, build_zoo_model, init_weights, zoo_cfg

__all__ = ["CifarMobileNetV2"]


def _conv_bn_relu(inp: int, oup: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection, residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        # One Sequential named ``conv`` with indices 0..7: RepDistiller's key layout.
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class CifarMobileNetV2(ZooModel):
    """RepDistiller's MobileNetV2 for CIFAR.

    Stages (``feature_info``): ``conv1`` (stem, post-ReLU), then the outputs of ``blocks.1``,
    ``blocks.2``, ``blocks.4`` and ``blocks.6`` (linear bottlenecks, not activated).
    """

    classifier_name = "classifier.0"
    # Its stage maps come unchanged with preact=True, as RepDistiller's forward ignores preact.
    supports_preact = True

    # (expansion t, output channels c, repeats n, first stride s) at width 1.
    _SETTING = (
        (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
    )
    # The block groups each stage runs (stage 0 is the stem); the last group's output is the feature.
    _STAGE_GROUPS = ((), (0, 1), (2,), (3, 4), (5, 6))

    def __init__(
        self,
        expansion: int = 6,
        width_mult: float = 0.5,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        img_size: Any = None,  # accepted for interface uniformity; any size >= 8x8 works
    ) -> None:
        super().__init__()
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_chans, input_channel, 3, 2)
        groups: list[nn.Module] = []
        out_chs: list[int] = []
        for t, c, n, s in self._SETTING:
            t = expansion if t != 1 else 1
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            groups.append(nn.Sequential(*layers))
            out_chs.append(output_channel)
        self.blocks = nn.ModuleList(groups)
        # RepDistiller keeps 1280 for width <= 1 (only wider nets scale it).
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        # RepDistiller wraps the Linear in a Sequential (``classifier.0``); _init_head fills slot 0.
        self.classifier = nn.Sequential(nn.Identity())
        self.feature_info = [
            dict(num_chs=int(32 * width_mult), reduction=2, module="conv1"),
            dict(num_chs=out_chs[1], reduction=2, module="blocks.1"),
            dict(num_chs=out_chs[2], reduction=4, module="blocks.2"),
            dict(num_chs=out_chs[4], reduction=8, module="blocks.4"),
            dict(num_chs=out_chs[6], reduction=16, module="blocks.6"),
        ]
        self._init_head(self.last_channel, num_classes, drop_rate)
        init_weights(self, linear_std=0.01)

    def _forward_stage(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> Tensor:
        if index == 0:
            return self.conv1(x)
        for g in self._STAGE_GROUPS[index]:
            x = self.blocks[g](x)
        return x

    def _forward_stage_preact(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        # RepDistiller's MobileNetV2.forward ignores preact: its is_feat maps are the same either way.
        x = self._forward_stage(index, x, input_hw)
        return x, x

    def _forward_final(self, x: Tensor) -> Tensor:
        # The 1x1 conv to 1280 channels (+BN+ReLU) comes after the last stage, before pooling.
        return self.conv2(x)


_CFGS = {"cifar_mobilenetv2": zoo_cfg("classifier.0", pool_size=(2, 2), first_conv="conv1.0")}
# timm's register_model reads the module's ``default_cfgs``, so it must exist before the entrypoints.
default_cfgs = generate_default_cfgs(_CFGS)


@register_model
def cifar_mobilenetv2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """MobileNetV2, expansion 6, width 0.5, for CIFAR (RepDistiller ``MobileNetV2``/``mobile_half``)."""

    def factory(**kw: Any) -> ZooModel:
        return CifarMobileNetV2(6, 0.5, **kw)

    return build_zoo_model("cifar_mobilenetv2", factory, pretrained, _CFGS["cifar_mobilenetv2"], kwargs)
