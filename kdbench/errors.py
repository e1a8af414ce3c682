"""User-facing errors: each says what was wrong and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KdbenchError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback and exits 2."""

    exit_code = 2


class DiskFull(KdbenchError):
    """Writing a result or checkpoint failed for lack of space: the sweep stops, nothing half-written."""

    exit_code = 1


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return a " did you mean 'x'?" hint for a misspelt name, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" did you mean '{close[0]}'?" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str], fix: str = "") -> KdbenchError:
    """Build the standard 'unknown X' error with a suggestion and the list of valid names."""
    choices = sorted(choices)
    listed = ", ".join(choices) if len(choices) <= 30 else ", ".join(choices[:30]) + ", ..."
    msg = f"unknown {kind} '{name}';{suggest(name, choices)} available: {listed}"
    return KdbenchError(msg + (f". {fix}" if fix else ""))
