"""Where a number came from: versions, commit, device, command, time."""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .metrics import device_name


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """The commit of the kdbench source tree ('+dirty' with uncommitted changes), if it is a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")


def command_line() -> str:
    """The command as the user typed it (``kdbench ...`` or ``python -m kdbench ...``)."""
    argv = list(sys.argv)
    name = Path(argv[0]).name
    argv[0] = "python -m kdbench" if name == "__main__.py" else name
    return " ".join([argv[0], shlex.join(argv[1:])]).strip()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def collect(device: torch.device) -> dict[str, Any]:
    return {
        "device": device_name(device),
        "git_commit": git_commit(),
        "command": command_line(),
        "kdbench_version": version("kdbench"),
        "torch_version": torch.__version__,
        "torchvision_version": version("torchvision"),
        "timm_version": version("timm"),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }
