"""kdbench's one value checker: a setting in the form of its default, or an error saying what it takes.

Recipe fields (suite files), method hyperparameters (suite files, ``--set`` after parsing, plugin
constructors) all have a default that says what they take; :func:`like` holds every value to it.
"""

from __future__ import annotations

import math
from typing import Any


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def like(value: Any, default: Any, name: str) -> Any:
    """``value`` in the form of ``default``; ``ValueError`` naming ``name`` when it does not fit.

    - a number where the default is one (an int where it is an int; an int widens to a float), finite;
    - a bool where the default is a bool;
    - a tuple where the default is a tuple (a TOML list becomes one), of finite numbers (ints where
      the default's are ints) where the default holds numbers;
    - a string where the default is a string;
    - anything else (a default of None, say) as it is: the method checks its own.
    """
    kind = type(default)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false like {default!r}, got {value!r} ({type(value).__name__})")
        return value
    if _number(default):
        if not (_number(value) and (isinstance(value, int) or kind is float)):
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"{name} must be {what} like {default!r}, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        return kind(value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list like {list(default)!r}, got {value!r}")
        if all(_number(d) for d in default):  # numbers (an empty default means numbers too, as 1,3)
            proto = default[0] if default else 1.0
            return tuple(like(v, proto, f"each value of {name}") for v in value)
        return tuple(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"{name} must be a string like {default!r}, got {value!r} ({type(value).__name__})")
    return value
