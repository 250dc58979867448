"""The `dynavit` command line. Each subcommand is a module in this package with `add_parser(subparsers)` and
`run(args) -> int`; modules are discovered, so a new subcommand is a new file.

Errors of dynavit's own types, bad arguments and unusable paths (permissions) print as one line and exit with
status 2 (a traceback only with --debug).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import Optional, Sequence

from ..errors import DynavitError

ORDER = ["models", "info", "flops", "bench", "train", "eval", "demo", "viz", "export"]


def _subcommand_modules():
    found = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    names = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    return [importlib.import_module(f"{__name__}.{n}") for n in names]


class OneLineParser(argparse.ArgumentParser):
    """argparse with the README's promise: a bad argument is one line on stderr and exit status 2."""

    def error(self, message: str):
        print(f"dynavit: error: {self.prog.split(' ', 1)[-1]}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dynavit", description="Per-image token reduction for vision "
                           "transformers (`dynavit models` lists the methods).")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _subcommand_modules():
        mod.add_parser(sub)
    return parser


def _log_to_stderr() -> None:
    """The library reports through the `dynavit` logger (never print); the command line shows it on stderr."""
    logger = logging.getLogger("dynavit")
    if not any(getattr(h, "_dynavit_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._dynavit_cli = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> int:
    _log_to_stderr()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except DynavitError as e:
        if args.debug:
            raise
        msg = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"dynavit: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave that cannot be read or written (permissions, a file for a folder)
        if args.debug:
            raise
        where = f": {e.filename!r}" if getattr(e, "filename", None) else ""
        print(f"dynavit: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynavit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
