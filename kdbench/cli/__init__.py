"""The `kdbench` command: run sweeps, derive reports, list what is available."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..errors import KdbenchError
from .args import build_parser, results_dir
from .commands import cmd_reproduce, cmd_run, report
from .listing import cmd_list


def main(argv: Sequence[str] | None = None) -> int:
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
            return report(results_dir(args.results_dir), args.out, args.metric)
        return cmd_list(args)
    except KdbenchError as exc:
        print(f"kdbench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kdbench: interrupted; finished runs are kept, re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
