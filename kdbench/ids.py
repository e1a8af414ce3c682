"""Run ids: the hash of a spec, stable across kdbench versions.

A field added to a spec after results were stored is left out of the hash while it has its
default value, so the runs stored before it existed keep their ids (and are not run again).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def without_later_fields(d: dict[str, Any], later: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` without the later-added fields that still have their default value."""
    return {k: v for k, v in d.items() if not (k in later and v == later[k])}


def digest(obj: Mapping[str, Any]) -> str:
    """A 16-hex-digit sha256 of ``obj`` as canonical JSON."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
