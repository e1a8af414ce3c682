"""kdbench: a benchmark of knowledge-distillation methods over the timm model zoo."""

from importlib import metadata

try:
    __version__ = metadata.version("kdbench")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
