"""Each model's own input normalisation (issue 12, item 4).

Batches are normalised once, with the dataset's mean and std (:mod:`kdbench.data.loader`). A model with pretrained
weights expects the statistics it was trained with (timm's ``pretrained_cfg`` mean and std, ImageNet's for most):
:func:`set_model_norm` gives it a per-channel affine from the dataset's normalisation to its own, applied to its
input wherever it runs (a forward pre-hook for ``model(x)``, and :func:`adapt` for the paths that call
``forward_intermediates``/``forward_features`` directly). Its two non-persistent buffers stay out of the state dict.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

_SCALE, _SHIFT = "_kdbench_input_scale", "_kdbench_input_shift"  # non-persistent buffers


def model_norm(model: nn.Module, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The mean and std a model's pretrained config declares, for ``in_chans`` channels (a 3-channel config for a
    1-channel model: their averages, as the summed first conv sees a grey image); None when it declares none."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if not mean or not std or len(mean) != len(std):
        return None
    if len(mean) != in_chans:
        if in_chans != 1:
            return None
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def set_model_norm(model: nn.Module, data_mean: Sequence[float], data_std: Sequence[float],
                   mean: Sequence[float], std: Sequence[float]) -> None:
    """Make ``model`` see its input normalised with (``mean``, ``std``) instead of the dataset's."""
    d_mean, d_std = torch.tensor(data_mean), torch.tensor(data_std)
    m_mean, m_std = torch.tensor(mean), torch.tensor(std)
    # x_model = x_data * std_d / std_m + (mean_d - mean_m) / std_m. Non-persistent buffers: they move with the
    # model to its device (no copy per step) and stay out of its state dict.
    model.register_buffer(_SCALE, (d_std / m_std).view(1, -1, 1, 1), persistent=False)
    model.register_buffer(_SHIFT, ((d_mean - m_mean) / m_std).view(1, -1, 1, 1), persistent=False)
    model._kdbench_input_norm_text = (f"model: mean ({', '.join(f'{v:.4g}' for v in mean)}), "
                                      f"std ({', '.join(f'{v:.4g}' for v in std)})")
    if not getattr(model, "_kdbench_input_norm_hook", False):
        model.register_forward_pre_hook(lambda module, args: (adapt(module, args[0]), *args[1:]))
        model._kdbench_input_norm_hook = True


def use_model_norm(model: nn.Module, data_mean: Sequence[float], data_std: Sequence[float], in_chans: int) -> None:
    """A pretrained model sees its input as it was trained (its config's statistics: ImageNet's for most), whatever
    the dataset's; a model whose config declares none keeps the dataset's."""
    if own := model_norm(model, in_chans):
        set_model_norm(model, data_mean, data_std, *own)


def adapt(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` (normalised with the dataset's statistics) as ``model`` expects it; unchanged for most models."""
    scale = getattr(model, _SCALE, None)
    if scale is None:
        return x
    return torch.addcmul(getattr(model, _SHIFT).to(x.dtype), x, scale.to(x.dtype))


def describe(model: nn.Module) -> str:
    """How a row names the model's input normalisation: 'dataset', or the model's own mean and std."""
    return getattr(model, "_kdbench_input_norm_text", "dataset")


__all__ = ["adapt", "describe", "model_norm", "set_model_norm", "use_model_norm"]
