"""The `kdbench` command: run sweeps, derive reports, list what is available."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence

from ..errors import KdbenchError
from .args import build_parser, results_dir
from .commands import cmd_reproduce, cmd_run, report
from .listing import cmd_list


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's preemption), raised where the process is: it then stops as after Ctrl-C,
    stopping its worker processes on the way out, instead of dying at once and leaving them training."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    # Only the main thread may set a handler (an embedding application's thread keeps the default).
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`kdbench list models | head`): stop quietly, as Python's docs advise, rather than
        # print a traceback; stdout is pointed at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .. import distributed

    distributed.silence_other_ranks()  # under torchrun, rank 0 prints the plan and the runs
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "reproduce":
            return cmd_reproduce(args)
        if args.command == "report":
            return report(results_dir(args.results_dir), args.out, args.metric, args.ensemble_seeds)
        return cmd_list(args)
    except KdbenchError as exc:
        print(f"kdbench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"kdbench: {what}; finished runs are kept, re-run the same command to resume", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130
    finally:
        distributed.shutdown()
