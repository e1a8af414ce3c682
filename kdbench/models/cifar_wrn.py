"""CIFAR Wide ResNets of the CRD benchmark (RepDistiller ``models/wrn.py``), registered in timm.

WRN-d-k (Zagoruyko & Komodakis 2016): a 3x3 stem conv, three stages of pre-activation blocks
(bn-relu-conv-bn-relu-conv + shortcut), then a final bn-relu, average pool and fc. Names follow
RepDistiller (``block1.layer.0.convShortcut`` ...) so its checkpoints load unchanged.

Because the blocks are pre-activation, the stage features RepDistiller returns (and
``forward_intermediates`` returns) are the raw residual sums: *not* passed through a ReLU, and
for the stem the bare conv output. The last stage becomes post-activation only through the final
``bn1`` + ``relu`` that :meth:`CifarWideResNet.forward_features` applies (``norm=True`` in
``forward_intermediates`` applies it to the last stage too).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from kdbench.models.base import ZooModel, batch_norm_no_update, build_zoo_model, init_weights, zoo_cfg

__all__ = ["CifarWideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation block; a 1x1 ``convShortcut`` when the width or resolution changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        # camelCase and absent (not Identity) when unused: RepDistiller's state-dict layout.
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        # As in RepDistiller: an identity shortcut carries the raw input, a projection shortcut
        # takes the activated one.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0.0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """One stage: ``nb_layers`` blocks in ``self.layer`` (RepDistiller's extra nesting level)."""

    def __init__(
        self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float
    ) -> None:
        super().__init__()
        blocks = [WideBasicBlock(in_planes, out_planes, stride, drop_rate)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1, drop_rate) for _ in range(1, nb_layers)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class CifarWideResNet(ZooModel):
    """RepDistiller's WideResNet (depth 6n+4, widen factor k).

    Stages (``feature_info``): ``conv1`` (stem conv output), ``block1..3`` (residual sums), all
    pre-activation exactly as RepDistiller's ``is_feat`` with ``preact=False``. With
    ``preact=True`` stages 1..3 are normalised by the BatchNorm that follows them (module
    docstring); the stem is unchanged, as in RepDistiller.
    """

    classifier_name = "fc"
    final_is_norm = True
    supports_preact = True

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
        img_size: Any = None,  # accepted for interface uniformity; any size >= 8x8 works
    ) -> None:
        """``drop_rate``: dropout before the classifier; ``block_drop_rate``: WRN's in-block dropout."""
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        chs = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, chs[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, chs[0], chs[1], 1, block_drop_rate)
        self.block2 = NetworkBlock(n, chs[1], chs[2], 2, block_drop_rate)
        self.block3 = NetworkBlock(n, chs[2], chs[3], 2, block_drop_rate)
        self.bn1 = nn.BatchNorm2d(chs[3])
        self.relu = nn.ReLU(inplace=True)
        self.nChannels = chs[3]
        self.feature_info = [
            dict(num_chs=chs[0], reduction=1, module="conv1"),
            dict(num_chs=chs[1], reduction=1, module="block1"),
            dict(num_chs=chs[2], reduction=2, module="block2"),
            dict(num_chs=chs[3], reduction=4, module="block3"),
        ]
        self._init_head(chs[3], num_classes, drop_rate)
        init_weights(self, linear_bias_zero=True)

    def _forward_stage(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> Tensor:
        return (self.conv1, self.block1, self.block2, self.block3)[index](x)

    def _forward_stage_preact(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self._forward_stage(index, x, input_hw)
        if index == 0:  # RepDistiller's f0 (the stem conv) is the same with preact=True
            return x, x
        # The BatchNorm before the next ReLU: RepDistiller's get_bn_before_relu(), as its preact applies them.
        bn = (self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1)[index - 1]
        return x, batch_norm_no_update(bn, x)

    def _forward_final(self, x: Tensor) -> Tensor:
        # The final bn-relu turns the last (pre-activation) residual sum into the pooled map.
        return self.relu(self.bn1(x))


# timm name -> (depth, widen factor)
_ARCHS = {
    "cifar_wrn_16_1": (16, 1),
    "cifar_wrn_16_2": (16, 2),
    "cifar_wrn_40_1": (40, 1),
    "cifar_wrn_40_2": (40, 2),
}
_CFGS = {name: zoo_cfg("fc", pool_size=(8, 8)) for name in _ARCHS}
# timm's register_model reads the module's ``default_cfgs``, so it must exist before the entrypoints.
default_cfgs = generate_default_cfgs(_CFGS)


def _wrn(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    depth, widen = _ARCHS[name]

    def factory(**kw: Any) -> ZooModel:
        return CifarWideResNet(depth, widen, **kw)

    return build_zoo_model(name, factory, pretrained, _CFGS[name], kwargs)


@register_model
def cifar_wrn_16_1(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-16-1 for CIFAR (RepDistiller ``wrn_16_1``)."""
    return _wrn("cifar_wrn_16_1", pretrained, kwargs)


@register_model
def cifar_wrn_16_2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-16-2 for CIFAR (RepDistiller ``wrn_16_2``)."""
    return _wrn("cifar_wrn_16_2", pretrained, kwargs)


@register_model
def cifar_wrn_40_1(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-40-1 for CIFAR (RepDistiller ``wrn_40_1``)."""
    return _wrn("cifar_wrn_40_1", pretrained, kwargs)


@register_model
def cifar_wrn_40_2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-40-2 for CIFAR (RepDistiller ``wrn_40_2``), the usual CRD WRN teacher."""
    return _wrn("cifar_wrn_40_2", pretrained, kwargs)
