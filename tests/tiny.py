"""Constants shared by the tests: tiny real zoo models and the repository root."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Tiny real zoo models for contract tests: 8x8 single-channel inputs, 10 classes.
TINY = dict(num_classes=10, in_chans=1, img_size=8)
TINY_SHAPE = (1, 8, 8)
TINY_STUDENT = "cifar_resnet8"
TINY_TEACHERS = ("cifar_resnet14", "cifar_wrn_16_1", "cifar_resnet8x4")
