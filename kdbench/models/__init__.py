"""kdbench's model zoo. Importing this package registers every model in timm's registry.

CIFAR models of the CRD benchmark (RepDistiller layouts, ``cifar_*``) and the MNIST MLPs of
Hinton et al. 2015 (``hinton_mlp_*``); create them with ``timm.create_model(name, ...)``.
"""

from kdbench.models import (
    cifar_mobilenetv2,
    cifar_resnet,
    cifar_resnetv2,
    cifar_shufflenet,
    cifar_vgg,
    cifar_wrn,
    mlp,
)
from kdbench.models.base import ZooModel
from kdbench.models.crd_names import CRD_TO_TIMM, UnknownModelName, timm_name

__all__ = [
    "CRD_TO_TIMM",
    "UnknownModelName",
    "ZooModel",
    "cifar_mobilenetv2",
    "cifar_resnet",
    "cifar_resnetv2",
    "cifar_shufflenet",
    "cifar_vgg",
    "cifar_wrn",
    "mlp",
    "timm_name",
]
