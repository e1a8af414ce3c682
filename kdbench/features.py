"""Capture logits, stage features and the pooled vector from any timm model in one pass.

Where a model has timm's ``forward_intermediates`` we use it: the final map and the chosen stage
maps come from one pass, then ``forward_head`` gives the logits (and, with ``pre_logits=True``,
the pooled vector). Models without it (timm's vgg, densenet, inception, ...) get forward hooks on
the modules their ``feature_info`` names, and a pre-hook on the classifier for the pooled vector.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import input_norm
from .errors import KdbenchError
from .method import Outputs, Probe, Taps


def stage_count(model: nn.Module) -> int:
    """Number of stages a model exposes through ``feature_info``."""
    info = getattr(model, "feature_info", None)
    if not info:
        return 0
    return len(info)


class NoSuchStage(KdbenchError):
    """A method taps a stage the model does not have."""


class NoPreact(KdbenchError):
    """A method taps pre-activation maps (``Taps.preact``) and the model cannot give them."""


def resolve_stage(model: nn.Module, index: int, model_name: str = "") -> int:
    """Turn a possibly negative stage index into a non-negative one, or raise a clear error."""
    n = stage_count(model)
    resolved = index + n if index < 0 else index
    if not 0 <= resolved < n:
        name = model_name or type(model).__name__
        raise NoSuchStage(f"model '{name}' has {n} stages (indices 0..{n - 1} or -{n}..-1); stage "
                           f"{index} does not exist. Choose a stage the model has (the method's stage "
                           "hyperparameter, set with --set METHOD.HP=VALUE)")
    return resolved


def has_intermediates(model: nn.Module) -> bool:
    return callable(getattr(model, "forward_intermediates", None))


class FeatureCapture:
    """Calls a model and returns :class:`Outputs` with what ``taps`` asks for."""

    def __init__(self, model: nn.Module, taps: Taps, model_name: str = "",
                 force_hooks: bool = False) -> None:
        self.model = model
        self.taps = taps
        self.name = model_name or type(model).__name__
        self.use_intermediates = has_intermediates(model) and not force_hooks
        # Checked first: a model that cannot give pre-activation maps is refused for that, whatever its stages.
        if taps.preact and taps.stages and not (getattr(model, "supports_preact", False) and self.use_intermediates):
            raise NoPreact(f"model '{self.name}' cannot give its stage maps before their final activation "
                           "(pre-activation features, which this method taps); every CIFAR model of kdbench's zoo "
                           "(cifar_*) can, timm's own models and the MLPs cannot; choose such a model, or another "
                           "method")
        # User-facing index -> resolved index, so Outputs.stages is keyed the way the method asked.
        self.stages = {i: resolve_stage(model, i, self.name) for i in taps.stages}
        if taps.stages and not self.use_intermediates:
            self._check_hook_modules()

    def _check_hook_modules(self) -> None:
        modules = dict(self.model.named_modules())
        for i in self.stages.values():
            name = self.model.feature_info[i]["module"]
            if name not in modules:
                raise KdbenchError(f"model '{self.name}': feature_info names module '{name}' for stage "
                                   f"{i}, but the model has no such submodule")

    def __call__(self, x: Tensor) -> Outputs:
        if not self.taps.stages and not self.taps.pooled:
            return Outputs(logits=self.model(x))
        if self.use_intermediates:
            return self._with_intermediates(x)
        return self._with_hooks(x)

    def _with_intermediates(self, x: Tensor) -> Outputs:
        x = input_norm.adapt(self.model, x)  # forward_intermediates/forward_features bypass the model's pre-hook
        stages: dict[int, Tensor] = {}
        if self.stages:
            wanted = sorted(set(self.stages.values()))
            extra = {"preact": True} if self.taps.preact else {}
            final, maps = self.model.forward_intermediates(x, indices=wanted, **extra)
            by_index = dict(zip(wanted, maps))
            stages = {user: by_index[i] for user, i in self.stages.items()}
        else:
            final = self.model.forward_features(x)
        pooled = self.model.forward_head(final, pre_logits=True) if self.taps.pooled else None
        return Outputs(logits=self.model.forward_head(final), stages=stages, pooled=pooled)

    def _with_hooks(self, x: Tensor) -> Outputs:
        captured: dict[str, Tensor] = {}
        modules = dict(self.model.named_modules())
        handles = []

        def keep(key: str) -> Callable:
            def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
                captured[key] = output
            return hook

        for i in set(self.stages.values()):
            name = self.model.feature_info[i]["module"]
            handles.append(modules[name].register_forward_hook(keep(str(i))))
        if self.taps.pooled:
            def pre(_module: nn.Module, inputs: tuple) -> None:
                captured["pooled"] = inputs[0]
            handles.append(self.model.get_classifier().register_forward_pre_hook(pre))
        try:
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        stages = {user: captured[str(i)] for user, i in self.stages.items()}
        return Outputs(logits=logits, stages=stages, pooled=captured.get("pooled"))


@torch.no_grad()
def probe(model: nn.Module, taps: Taps, input_shape: tuple[int, ...], model_name: str = "",
          device: torch.device | str = "cpu") -> Probe:
    """Shapes of everything ``taps`` asks for, from one dummy forward pass in eval mode.

    Eval mode, so that the dummy batch leaves BatchNorm running statistics untouched.
    """
    was_training = model.training
    model.eval()
    try:
        out = FeatureCapture(model, taps, model_name)(torch.zeros(2, *input_shape, device=device))
    finally:
        model.train(was_training)
    return Probe(
        model=model_name or type(model).__name__,
        num_classes=int(out.logits.shape[1]),
        stages={i: tuple(t.shape[1:]) for i, t in out.stages.items()},
        pooled=tuple(out.pooled.shape[1:]) if out.pooled is not None else None,
    )
