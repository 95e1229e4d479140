"""``moewatch demo``."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="watch a small MoE on the CPU go from healthy to collapsed")
    parser.add_argument("--windows", type=int, default=3, help="windows of each phase (default 3)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from .demo import run

    return run(windows=args.windows)
