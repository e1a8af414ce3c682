"""The CRD benchmark's model names and the timm names kdbench registers them under.

``CRD_TO_TIMM`` maps each RepDistiller/CRD model name (as in RepDistiller's ``model_dict``) to
the kdbench timm entrypoint with the same architecture and state-dict layout. It lists only the
models kdbench implements, so iterating it is a complete, truthful list of the CRD zoo we have.
"""

from __future__ import annotations

from kdbench.errors import KdbenchError, suggest

__all__ = ["CRD_TO_TIMM", "UnknownModelName", "timm_name"]

CRD_TO_TIMM: dict[str, str] = {
    "resnet8": "cifar_resnet8",
    "resnet14": "cifar_resnet14",
    "resnet20": "cifar_resnet20",
    "resnet32": "cifar_resnet32",
    "resnet44": "cifar_resnet44",
    "resnet56": "cifar_resnet56",
    "resnet110": "cifar_resnet110",
    "resnet8x4": "cifar_resnet8x4",
    "resnet32x4": "cifar_resnet32x4",
    "wrn_16_1": "cifar_wrn_16_1",
    "wrn_16_2": "cifar_wrn_16_2",
    "wrn_40_1": "cifar_wrn_40_1",
    "wrn_40_2": "cifar_wrn_40_2",
    "vgg8": "cifar_vgg8",
    "vgg11": "cifar_vgg11",
    "vgg13": "cifar_vgg13",
    "vgg16": "cifar_vgg16",
    "vgg19": "cifar_vgg19",
    "ResNet50": "cifar_resnet50",
    "MobileNetV2": "cifar_mobilenetv2",
    "ShuffleV1": "cifar_shufflenetv1",
    "ShuffleV2": "cifar_shufflenetv2",
}

# Other spellings of the same models: the CRD paper's tables (and crd_cifar100.csv) write
# ShuffleNetV1/V2 where RepDistiller's code says ShuffleV1/V2.
_ALIASES: dict[str, str] = {
    "shufflenetv1": "ShuffleV1",
    "shufflenetv2": "ShuffleV2",
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


_LOOKUP: dict[str, str] = {_normalise(k): v for k, v in CRD_TO_TIMM.items()}
_LOOKUP.update({_normalise(a): CRD_TO_TIMM[k] for a, k in _ALIASES.items() if k in CRD_TO_TIMM})
# A timm name maps to itself, so callers may pass either kind of name.
_LOOKUP.update({v: v for v in CRD_TO_TIMM.values()})


class UnknownModelName(KdbenchError, KeyError):
    """A name that is neither a CRD model name (in any accepted spelling) nor one of our timm names."""

    def __str__(self) -> str:
        # KeyError would quote the message; print it as the other kdbench errors are printed.
        return str(self.args[0]) if self.args else ""


def timm_name(crd_name: str) -> str:
    """The timm model name for a CRD model name.

    Case-insensitive, with dashes read as underscores, so RepDistiller's ``wrn_40_2``, the CRD
    tables' ``wrn-40-2``, ``ShuffleNetV1`` / ``ShuffleV1`` and an already-mapped
    ``cifar_resnet8x4`` are all accepted.

    Raises:
        UnknownModelName: (a ``KeyError``) naming the closest known name and listing them all.
    """
    key = _normalise(crd_name)
    if key in _LOOKUP:
        return _LOOKUP[key]
    known = sorted(CRD_TO_TIMM)
    hint = suggest(key, _LOOKUP) or suggest(crd_name, known)
    raise UnknownModelName(
        f"unknown CRD model name '{crd_name}';{hint} known names (case-insensitive, '-' or '_'): "
        f"{', '.join(known)}"
    )
