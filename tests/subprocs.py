"""Helpers for tests that start kdbench as a child process and signal it."""

from __future__ import annotations

import signal


def sigint_default() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT.

    A shell runs a background job (``pytest &`` in a script, as CI or ``nohup`` may) with SIGINT ignored; the child
    inherits that, and Python installs no KeyboardInterrupt handler over an ignored signal, so the test's Ctrl-C
    would be lost and the sweep run to its end. The child gets the default back, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
