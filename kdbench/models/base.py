"""The timm-style interface every kdbench zoo model shares, and the helper entrypoints call.

:class:`ZooModel` gives each model ``forward_features`` / ``forward_head`` /
``forward_intermediates`` / ``feature_info`` the way timm's own models have them, so every part of
kdbench (and of timm) treats our CIFAR models and timm's alike. :func:`build_zoo_model` is what
each ``@register_model`` entrypoint calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch.nn.functional as F
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch import Tensor, nn

from kdbench.errors import KdbenchError

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "ZooModel",
    "batch_norm_no_update",
    "init_weights",
    "build_zoo_model",
    "run_with_preact",
    "zoo_cfg",
]

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

# Keyword arguments ``timm.create_model`` hands every entrypoint; our models have no use for them.
_FACTORY_KWARGS = ("pretrained_cfg", "cache_dir", "pretrained_model_args")


def zoo_cfg(classifier: str, **overrides: Any) -> dict[str, Any]:
    """A timm pretrained-cfg dict (no weights) for a CIFAR-100 model at 32x32.

    Only fields of ``timm.models.PretrainedCfg`` may appear, because the registry builds one from it.
    """
    cfg: dict[str, Any] = dict(
        url="",
        num_classes=100,
        input_size=(3, 32, 32),
        min_input_size=(3, 8, 8),
        interpolation="bilinear",
        crop_pct=1.0,  # CIFAR images are used uncropped at test time
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        first_conv="conv1",
        classifier=classifier,
        origin_url="https://github.com/HobbitLong/RepDistiller",
        paper_name="Contrastive Representation Distillation",
        paper_ids="arXiv:1910.10699",
    )
    cfg.update(overrides)
    return cfg


def init_weights(model: nn.Module, *, linear_std: float | None = None, linear_bias_zero: bool = False) -> None:
    """RepDistiller's initialisation, so training from scratch starts where the benchmark's does.

    Convolutions He-normal with fan-out (``kaiming_normal_(mode="fan_out")`` draws the same),
    conv biases zero, BatchNorm weight 1 and bias 0. Linear layers differ between RepDistiller's
    model files: ``linear_std`` draws their weights from N(0, std) and zeroes their biases;
    ``linear_bias_zero`` only zeroes the biases; neither leaves PyTorch's default.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if linear_std is not None or linear_bias_zero:
                nn.init.zeros_(m.bias)


def run_with_preact(blocks: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run a stage's blocks; the last one's ``forward_preact`` gives ``(output, pre-activation)``.

    The pre-activation is what RepDistiller's ``is_last`` block returns beside its output.
    """
    *head, last = blocks
    for block in head:
        x = block(x)
    return last.forward_preact(x)


def batch_norm_no_update(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``bn(x)`` without touching ``bn``'s running statistics.

    Training mode normalises with the batch's statistics, evaluation mode with the running ones,
    exactly as calling ``bn`` does; only the running-statistics update is left out, so asking for
    a pre-activation map (WRN's, which RepDistiller gets by calling a BatchNorm a second time)
    leaves the model's state as a plain forward pass does.
    """
    use_batch = bn.training or bn.running_mean is None
    return F.batch_norm(x, None if use_batch else bn.running_mean, None if use_batch else bn.running_var,
                        bn.weight, bn.bias, use_batch, 0.0, bn.eps)


class ZooModel(nn.Module):
    """Base class giving a model timm's classification and feature-extraction interface.

    A subclass builds its layers, sets ``feature_info`` (one dict per stage, stem first, in the
    order of RepDistiller's ``is_feat`` list without the pooled vector), calls
    :meth:`_init_head`, and implements :meth:`_forward_stage`; it overrides :meth:`_forward_final`
    when something (a final norm, a 1x1 head conv) sits between the last stage and the pooling.
    A model that can give its stage maps before their final activation (RepDistiller's
    ``is_feat=True, preact=True``) sets ``supports_preact`` and implements
    :meth:`_forward_stage_preact`; the ordinary path never runs it.
    """

    #: Dotted path of the classifier ``nn.Linear`` (RepDistiller's attribute name).
    classifier_name: str = "fc"
    #: True when :meth:`_forward_final` is a pure norm + activation (pre-activation nets), so
    #: ``forward_intermediates(norm=True)`` may apply it to the last stage.
    final_is_norm: bool = False
    #: Whether the features are spatial maps (CNNs) or vectors (MLPs); vectors skip pooling.
    spatial: bool = True
    #: Whether ``forward_intermediates(..., preact=True)`` works: :meth:`_forward_stage_preact`
    #: gives each stage's map before its final activation, as RepDistiller's ``preact=True`` does.
    supports_preact: bool = False

    feature_info: list[dict[str, Any]]
    pretrained_cfg: dict[str, Any]
    default_cfg: dict[str, Any]

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        """Create pooling + classifier; call after the trunk so key order matches RepDistiller."""
        self.num_features = self.head_hidden_size = num_features
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        # Adaptive pooling has no parameters (keys unchanged) and equals RepDistiller's fixed
        # AvgPool2d(8)/avg_pool2d(4) at 32x32, while also working for other input sizes.
        self.global_pool = nn.AdaptiveAvgPool2d(1) if self.spatial else nn.Identity()
        self._set_classifier(num_classes)

    def _set_classifier(self, num_classes: int) -> None:
        head: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        parent_name, _, attr = self.classifier_name.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self
        setattr(parent, attr, head)

    # -- what subclasses implement -----------------------------------------------------------
    def _forward_stage(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> Tensor:
        """Run stage ``index`` (0 = stem) on the previous stage's output."""
        raise NotImplementedError

    def _forward_final(self, x: Tensor) -> Tensor:
        """Map the last stage's output to what :meth:`forward_head` pools (default: as is)."""
        return x

    def _forward_stage_preact(self, index: int, x: Tensor, input_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Run stage ``index`` as :meth:`_forward_stage` does; return ``(output, pre-activation map)``.

        ``output`` is exactly :meth:`_forward_stage`'s (the next stage's input); the second map is
        the stage feature RepDistiller's ``is_feat=True, preact=True`` returns in its place. Only
        models with ``supports_preact`` implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} gives no pre-activation stage maps")

    # -- timm interface ----------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        """Number of feature stages (``len(feature_info)``)."""
        return len(self.feature_info)

    def get_classifier(self) -> nn.Module:
        """The classifier module (``nn.Identity`` after ``reset_classifier(0)``)."""
        return self.get_submodule(self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: no classifier)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"only average pooling is supported, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self._set_classifier(num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Every stage, then the final transform: the map :meth:`forward_head` expects."""
        input_hw = (x.shape[-2], x.shape[-1])
        for i in range(self.num_stages):
            x = self._forward_stage(i, x, input_hw)
        return self._forward_final(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, flatten, dropout, then classify unless ``pre_logits`` (the pooled vector)."""
        x = self.global_pool(x).flatten(1)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        preact: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs as RepDistiller's ``is_feat`` returns them (timm semantics).

        Args:
            x: input images.
            indices: None for all stages, an int for the last n, or a sequence of stage indices
                (negative counts from the end); stage i is ``feature_info[i]``.
            norm: apply the final norm + activation to the last stage's output where the model
                has one (pre-activation WRNs); ignored elsewhere.
            stop_early: stop after the last requested stage (the returned final map is then that
                stage's output).
            output_fmt: only 'NCHW'.
            intermediates_only: return only the list of intermediates.
            preact: each requested stage's map before its final activation, as RepDistiller's
                ``is_feat=True, preact=True`` returns it (kdbench's extension of timm's
                interface; models with ``supports_preact`` only). A stage RepDistiller returns
                unchanged under ``preact`` (the stem) comes unchanged. ``norm`` does not apply to
                a pre-activation map. The final map, and so the logits, are unchanged.

        Returns:
            ``(final, intermediates)`` where ``forward_head(final)`` gives the logits, or just the
            intermediates.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        if preact and not self.supports_preact:
            raise KdbenchError(f"{type(self).__name__} cannot give its stage maps before their final activation "
                               "(preact=True); its supports_preact is false")
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        last = self.num_stages - 1
        stop = max_index if stop_early else last
        input_hw = (x.shape[-2], x.shape[-1])
        intermediates: list[Tensor] = []
        for i in range(stop + 1):
            if preact and i in take_indices:
                x, pre = self._forward_stage_preact(i, x, input_hw)
                intermediates.append(pre)
                continue
            x = self._forward_stage(i, x, input_hw)
            if i in take_indices:
                use_norm = norm and self.final_is_norm and i == last
                intermediates.append(self._forward_final(x) if use_norm else x)
        if intermediates_only:
            return intermediates
        if stop == last:
            x = self._forward_final(x)
        return x, intermediates


def _split_factory_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the keyword arguments timm's factory adds, returning those we act on."""
    for key in _FACTORY_KWARGS:
        kwargs.pop(key, None)
    return dict(
        overlay=kwargs.pop("pretrained_cfg_overlay", None),
        device=kwargs.pop("device", None),
        dtype=kwargs.pop("dtype", None),
        features_only=kwargs.pop("features_only", False),
        out_indices=kwargs.pop("out_indices", None),
    )


def build_zoo_model(
    name: str,
    factory: Callable[..., ZooModel],
    pretrained: bool,
    cfg: dict[str, Any],
    kwargs: dict[str, Any],
) -> nn.Module:
    """Shared body of the registered entrypoints.

    Drops timm's factory-only kwargs, refuses ``pretrained=True`` (no weights are hosted for these
    models), builds the model, and attaches a ``pretrained_cfg`` describing its actual head and
    input channels. ``features_only=True`` returns timm's ``FeatureGetterNet`` over the stages.
    """
    if pretrained:
        raise KdbenchError(
            f"no pretrained weights are published in timm for '{name}'. Create it with "
            "pretrained=False and load a checkpoint file instead, e.g. "
            f"timm.create_model('{name}', checkpoint_path='ckpt_epoch_240.pth') "
            "(RepDistiller/mdistiller {'model': state_dict} checkpoints load unchanged)"
        )
    extra = _split_factory_kwargs(kwargs)
    model = factory(**kwargs)
    pcfg = dict(cfg, architecture=name, num_classes=model.num_classes)
    in_chans = kwargs.get("in_chans")
    if in_chans is not None:
        pcfg["input_size"] = (in_chans, *pcfg["input_size"][1:])
    pcfg.update(extra["overlay"] or {})
    model.pretrained_cfg = model.default_cfg = pcfg
    if extra["device"] is not None or extra["dtype"] is not None:
        model.to(device=extra["device"], dtype=extra["dtype"])
    if extra["features_only"]:
        out_indices = extra["out_indices"]
        if out_indices is None:
            out_indices = tuple(range(model.num_stages))
        try:
            return FeatureGetterNet(model, out_indices=out_indices, prune=False)
        except TypeError:  # timm releases before the ``prune`` argument never prune
            return FeatureGetterNet(model, out_indices=out_indices)
    return model
