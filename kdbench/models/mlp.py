"""The MNIST MLPs of Hinton, Vinyals & Dean 2015 ("Distilling the Knowledge in a Neural Network").

``hinton_mlp_1200``: 784-1200-1200-10 with ReLU (the paper's teacher, which was trained with
dropout, weight constraints and jittered inputs: 67 test errors); ``hinton_mlp_800``:
784-800-800-10 (the student: 146 errors alone, 74 with soft targets at T=20). The input size is
``in_chans * h * w`` (default 1x28x28), so the same nets run on other small images; any input is
flattened.

They share the CNN zoo's timm interface: the two "stages" are the two hidden activations (B x H
vectors, post-ReLU, before dropout), and the "pooled" vector (``forward_head(x, pre_logits=True)``)
is the last hidden activation. Regularisers the paper used that are not layers (max-norm weight
constraints, input jitter) belong to the training recipe, not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from kdbench.models.base import ZooModel, build_zoo_model

__all__ = ["HintonMLP"]

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def _hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = img_size
    return int(h), int(w)


class HintonMLP(ZooModel):
    """Two-hidden-layer ReLU MLP: ``fc1 -> act1 -> fc2 -> act2 -> classifier``.

    Stages (``feature_info``): ``act1`` and ``act2`` (hidden activations, B x ``hidden``).
    ``drop_rate`` is dropout on both hidden activations (where each feeds the next layer);
    ``input_drop_rate`` is dropout on the flattened input (the dropout-net recipe uses 0.2).
    """

    classifier_name = "classifier"
    spatial = False

    def __init__(
        self,
        hidden: int = 1200,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int | Sequence[int] = 28,
        drop_rate: float = 0.0,
        input_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        h, w = _hw(img_size)
        self.in_features = in_chans * h * w
        self.input_drop_rate = input_drop_rate
        self.fc1 = nn.Linear(self.in_features, hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.feature_info = [
            dict(num_chs=hidden, reduction=1, module="act1"),
            dict(num_chs=hidden, reduction=1, module="act2"),
        ]
        # _init_head applies ``drop_rate`` to the last hidden activation before the classifier.
        self._init_head(hidden, num_classes, drop_rate)

    def _forward_stage(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> Tensor:
        if index == 0:
            x = x.flatten(1)
            if x.shape[1] != self.in_features:
                raise ValueError(
                    f"{type(self).__name__} expects {self.in_features} input values per sample "
                    f"(in_chans*img_size*img_size), got {x.shape[1]}: create it with matching "
                    "in_chans/img_size"
                )
            if self.input_drop_rate > 0.0:
                x = F.dropout(x, p=self.input_drop_rate, training=self.training)
            return self.act1(self.fc1(x))
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.act2(self.fc2(x))


def _mnist_cfg() -> dict[str, Any]:
    return dict(
        url="",
        num_classes=10,
        input_size=(1, 28, 28),
        interpolation="bilinear",
        crop_pct=1.0,
        mean=MNIST_MEAN,
        std=MNIST_STD,
        first_conv="fc1",
        classifier="classifier",
        paper_name="Distilling the Knowledge in a Neural Network",
        paper_ids="arXiv:1503.02531",
    )


#: Hidden units per layer: the paper's MNIST teacher and student (1200, 800), and the widths of its
#: temperature claim (300 and 30 units per layer: "with 30 units per layer, temperatures in the
#: range 2.5 to 4 worked significantly better").
WIDTHS = {"hinton_mlp_1200": 1200, "hinton_mlp_800": 800, "hinton_mlp_300": 300, "hinton_mlp_30": 30}
_CFGS = {name: _mnist_cfg() for name in WIDTHS}
# timm's register_model reads the module's ``default_cfgs``, so it must exist before the entrypoints.
default_cfgs = generate_default_cfgs(_CFGS)


def _mlp(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    def factory(**kw: Any) -> ZooModel:
        return HintonMLP(**{"hidden": WIDTHS[name], **kw})  # a suite's [models.X] hidden = N overrides

    # The data config should describe the actual input, not MNIST's 1x28x28.
    h, w = _hw(kwargs.get("img_size", 28))
    cfg = dict(_CFGS[name], input_size=(kwargs.get("in_chans", 1), h, w))
    return build_zoo_model(name, factory, pretrained, cfg, kwargs)


@register_model
def hinton_mlp_1200(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """784-1200-1200-10 ReLU MLP, Hinton et al. 2015's MNIST teacher."""
    return _mlp("hinton_mlp_1200", pretrained, kwargs)


@register_model
def hinton_mlp_800(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """784-800-800-10 ReLU MLP, Hinton et al. 2015's MNIST student."""
    return _mlp("hinton_mlp_800", pretrained, kwargs)


@register_model
def hinton_mlp_300(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """784-300-300-10 ReLU MLP, a width of Hinton et al. 2015's temperature claim."""
    return _mlp("hinton_mlp_300", pretrained, kwargs)


@register_model
def hinton_mlp_30(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """784-30-30-10 ReLU MLP, the narrow width of Hinton et al. 2015's temperature claim."""
    return _mlp("hinton_mlp_30", pretrained, kwargs)
