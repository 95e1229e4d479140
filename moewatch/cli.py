"""The ``moewatch`` command: ``moewatch demo``, ``moewatch baseline ...``, ``moewatch report ...``,
``moewatch placement ...``.

Each subcommand lives in a module ``moewatch.cli_<name>`` exposing ``add_parser(subparsers)``,
which registers its parser and sets ``func(args) -> int`` as the handler.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = ("demo", "baseline", "report", "placement")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="moewatch", description="Watch the router of a Mixture-of-Experts model.")
    parser.add_argument("--version", action="version", version=f"moewatch {__version__}",
                        help="print the moewatch version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands",
                                help="run `moewatch COMMAND --help` for its options")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"moewatch.cli_{name}")
        except ModuleNotFoundError as error:
            if error.name != f"moewatch.cli_{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
