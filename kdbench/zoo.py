"""Build models by timm name and load checkpoints, with errors that say what to fix."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import kdbench.models  # noqa: F401  (registers the CIFAR zoo and the MLPs into timm)
from kdbench.models.crd_names import CRD_TO_TIMM

from .errors import KdbenchError, suggest


#: The prefix of a model named by its Hugging Face Hub repository (timm's ``hf-hub:timm/resnet50.a1_in1k``).
HF_HUB_PREFIX = "hf-hub:"


def wants_pretrained(name: str) -> bool:
    """Whether ``name`` asks for pretrained weights: a timm pretrained tag (``resnet50.a1_in1k``) or an
    ``hf-hub:`` name. A tag is never dropped: such a model is never built with random weights."""
    return name.startswith(HF_HUB_PREFIX) or "." in name


def check_model_name(name: str) -> None:
    """Raise a clear error unless ``name`` is a model in timm's registry (with a tag timm has weights for), or an
    ``hf-hub:`` name (which only loading can check)."""
    if name.startswith(HF_HUB_PREFIX) and len(name) > len(HF_HUB_PREFIX):
        return
    if "." in name and timm.is_model(name.split(".", 1)[0]):
        if name in timm.list_pretrained(name):
            return
        tags = timm.list_pretrained(name.split(".", 1)[0] + ".*")
        raise KdbenchError(f"model '{name}': timm has no pretrained weights tagged '{name.split('.', 1)[1]}' for "
                           f"{name.split('.', 1)[0]}" + (f"; its tags: {', '.join(tags[:8])}" if tags else
                                                         "; it has no pretrained weights") +
                           " (drop the tag to train it from random weights)")
    if timm.is_model(name):
        return
    hint = ""
    if name in CRD_TO_TIMM:
        hint = f" The CRD benchmark's '{name}' is registered as '{CRD_TO_TIMM[name]}'."
    else:
        hint = suggest(name, timm.list_models()) or suggest(name, timm.list_models("cifar_*"))
    raise KdbenchError(f"unknown model '{name}';{hint} Any timm model name works "
                       "(`kdbench list models` shows kdbench's CIFAR zoo; `timm.list_models()` all of timm's).")


def create(name: str, *, num_classes: int, in_chans: int, img_size: int, pretrained_file: str | Path | None = None,
           weights: bool = True, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` sized for the dataset: with pretrained weights when the name has a tag or is an
    ``hf-hub:`` name, or ``pretrained_file`` is given (timm's ``pretrained_cfg_overlay=dict(file=...)``), else
    random. timm adapts pretrained weights to the dataset: a classifier for another class count is replaced
    (re-initialised), a first convolution for another channel count is summed or repeated. ``weights=False``: the
    architecture alone, random (probing shapes and costs needs no weights)."""
    check_model_name(name)
    pretrained = weights and (wants_pretrained(name) or pretrained_file is not None)
    if not pretrained:
        pretrained_file = None
    if pretrained_file is not None:
        path = Path(pretrained_file)
        if not path.is_file():
            raise KdbenchError(f"pretrained weights file '{path}' for model '{name}' not found; give the path of a "
                               "file of its weights (.safetensors, .pth or .bin, as timm reads them)")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path), **_file_head(name, path, num_classes))
    try:
        return _create(name, pretrained, num_classes, in_chans, img_size, kwargs)
    except KdbenchError:
        raise
    except Exception as exc:
        if not pretrained:
            raise
        raise KdbenchError(_no_weights(name, pretrained_file, exc)) from None


def _file_head(name: str, path: Path, num_classes: int) -> dict[str, int]:
    """``num_classes`` for timm's pretrained config when the file's classifier already has the dataset's class
    count (a model fine-tuned on it): timm then keeps that classifier instead of re-initialising it."""
    try:
        cfg = timm.models.get_pretrained_cfg(name.split(".", 1)[0] if "." not in name else name)
        head = cfg.classifier if cfg is not None else None
        weight = timm.models.load_state_dict(str(path)).get(f"{head}.weight") if isinstance(head, str) else None
    except Exception:  # noqa: BLE001 - unreadable here: timm's own load reports it
        return {}
    return {"num_classes": num_classes} if weight is not None and weight.shape[0] == num_classes else {}


def _create(name: str, pretrained: bool, num_classes: int, in_chans: int, img_size: int,
            kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                 img_size=img_size, **kwargs)
    except TypeError as exc:
        # Most CNNs take no img_size (they pool adaptively); transformers need it.
        if "img_size" not in str(exc):
            raise
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)


def _no_weights(name: str, pretrained_file: str | Path | None, exc: Exception) -> str:
    """Why pretrained weights did not load, where kdbench looked, and how to provide them."""
    reason = (str(exc).strip().splitlines() or [""])[0][:200]
    if pretrained_file is not None:
        return (f"pretrained weights file '{pretrained_file}' did not load into model '{name}' ({type(exc).__name__}: "
                f"{reason}); give a file of this architecture's weights, as timm saves them")
    from huggingface_hub import constants

    return (f"pretrained weights for model '{name}' could not be loaded ({type(exc).__name__}: {reason}). kdbench "
            f"asked timm, which looks in the Hugging Face cache ({constants.HF_HUB_CACHE}; HF_HOME or HF_HUB_CACHE "
            "move it) and then on the Hub. Without network: on a machine with network run python -c \"import timm; "
            f"timm.create_model('{name}', pretrained=True)\" and copy that cache folder here, or give the weights "
            f"file with --pretrained-file {name}=FILE; or drop the tag to train from random weights")


def weights_identity(model: nn.Module) -> str:
    """The sha256 of a model's weights (every state-dict tensor's bytes, in key order): what identifies pretrained
    weights in a run id and row, wherever they were read from."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: The suffix of a checkpoint argument that selects its EMA weights: ``model_best.pth.tar#ema``.
EMA_SUFFIX = "#ema"
#: Where checkpoints keep EMA weights: timm's ``train.py`` (``CheckpointSaver``) writes ``state_dict_ema``.
EMA_KEYS = ("state_dict_ema", "model_ema")


def split_checkpoint(spec: str | Path) -> tuple[Path, bool]:
    """``FILE`` or ``FILE#ema`` as (the file, whether its EMA weights are asked for)."""
    text = str(spec)
    ema = text.endswith(EMA_SUFFIX)
    return Path(text.removesuffix(EMA_SUFFIX)), ema


def checkpoint_identity(spec: str | Path) -> str:
    """What identifies a checkpoint's weights in a teacher's run id and row: the file's sha256, plus ``#ema``
    when its EMA weights are the ones loaded (the same file holds two sets of weights)."""
    path, ema = split_checkpoint(spec)
    return file_sha256(path) + (EMA_SUFFIX if ema else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights in a checkpoint file: a bare state dict, or one under 'model'/'state_dict'; ``FILE#ema``: the
    EMA weights (``state_dict_ema``).

    RepDistiller and mdistiller publish ``{'model': state_dict, ...}``; timm's ``train.py`` writes
    ``{'state_dict', 'state_dict_ema', 'args': argparse.Namespace, ...}`` (``model_best.pth.tar``), whose
    Namespace is the one Python object besides tensors that is allowed (as timm's own loader allows it): nothing
    else in a checkpoint is unpickled. DataParallel's ``module.`` prefix is removed.
    """
    path, ema = split_checkpoint(path)
    if path.is_dir():
        raise KdbenchError(f"checkpoint '{path}' is a folder; pass the path of a .pt/.pth file")
    if not path.is_file():
        raise KdbenchError(f"checkpoint '{path}' not found; pass the path of a .pt/.pth file")
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as exc:
        raise KdbenchError(f"cannot read checkpoint '{path}': {exc.strerror or exc}; check that the file is "
                           "readable by you (its permissions), or copy it somewhere it is") from None
    if empty:
        raise KdbenchError(f"checkpoint '{path}' is empty (0 bytes), e.g. an interrupted copy or download; "
                           "copy or download it again")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm train.py's 'args'
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise KdbenchError(_unreadable(path, exc)) from None
    if ema:
        key = next((k for k in EMA_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if key is None:
            held = ", ".join(sorted(map(str, obj))) if isinstance(obj, dict) else type(obj).__name__
            raise KdbenchError(f"checkpoint '{path}{EMA_SUFFIX}' asks for EMA weights, but the file holds no "
                               f"{' or '.join(EMA_KEYS)} (it holds: {held}); drop '{EMA_SUFFIX}' to load its "
                               "weights, or give a checkpoint saved with a model EMA (timm train.py --model-ema)")
        obj = obj[key]
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KdbenchError(f"checkpoint '{path}' holds no state dict (expected a dict of tensors, "
                           "or one under 'model' or 'state_dict')")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _unreadable(path: Path, exc: Exception) -> str:
    """Why torch.load refused a file, in a line that says what to do (torch's own text is long and
    suggests ``weights_only=False``, which would run any code a pickle holds)."""
    text = str(exc)
    # The weights-only unpickler hides its reason after this marker, behind paragraphs of advice.
    reason = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n")[0].strip()
    if "Unsupported global" in reason:
        what = reason.removeprefix("Unsupported global: ").split(" was not")[0]
        return (f"checkpoint '{path}' holds Python objects besides tensors ({what}), which kdbench does not "
                "unpickle: it loads weights only, so a checkpoint cannot run code. If you trust the file, re-save "
                "only its weights and pass that file, e.g. torch.save(torch.load(FILE, weights_only=False)"
                "['model'], 'weights.pt'), or the .state_dict() of a saved model object")
    reason = reason.split(". ")[0][:160]
    return (f"checkpoint '{path}' is not a readable PyTorch checkpoint ({path.stat().st_size:,} bytes; "
            f"torch.load: {type(exc).__name__}: {reason}): it is truncated or corrupted, or not a file written by "
            "torch.save. Copy or download it again, or re-save it with torch.save(model.state_dict(), FILE)")


def load_checkpoint(model: nn.Module, path: str | Path, model_name: str) -> None:
    """Load weights (``FILE`` or ``FILE#ema``) strictly; a mismatch names the keys and says whether it is the
    class count."""
    load_fitting(model, read_state_dict(path), f"checkpoint '{path}'", model_name)


def load_fitting(model: nn.Module, state: dict, source: str, model_name: str) -> None:
    """``load_state_dict`` strictly; a mismatch names the keys and says whether it is the class count."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or reshaped):
        model.load_state_dict(state, strict=True)
        return
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_keys = {f"{n}.{p}" for n, m in model.named_modules() if m is classifier for p in ("weight", "bias")}
    if reshaped and set(reshaped) <= head_keys and not (missing or unexpected):
        w = state[sorted(head_keys & set(reshaped))[0]]
        raise KdbenchError(
            f"{source} was trained for {w.shape[0]} classes but model '{model_name}' is built for "
            f"{own[sorted(head_keys & set(reshaped))[0]].shape[0]} (the dataset's class count); use a "
            "checkpoint trained on this dataset")

    def few(keys: list[str], show=lambda k: k) -> str:
        return ", ".join(show(k) for k in keys[:4]) + (", ..." if len(keys) > 4 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} weights missing from the file (e.g. {few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected in the file (e.g. {few(unexpected)})")
    if reshaped:
        parts.append(f"{len(reshaped)} with other shapes (e.g. "
                     f"{few(reshaped, lambda k: f'{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}')})")
    raise KdbenchError(f"{source} does not fit model '{model_name}': {'; '.join(parts)}. "
                       "Is it a checkpoint of this architecture?")
