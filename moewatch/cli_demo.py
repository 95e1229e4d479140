"""``moewatch demo``."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="watch a small trained MoE on the CPU: healthy traffic, then injected router faults")
    parser.add_argument("--windows", type=int, default=3, help="windows of each phase (default 3)")
    parser.add_argument("--serve", type=int, metavar="PORT", default=None,
                        help="also serve Prometheus /metrics on 127.0.0.1:PORT while the demo runs")
    parser.add_argument("--seed", type=int, default=0, help="traffic seed")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from .demo import run

    return run(windows=args.windows, serve=args.serve, seed=args.seed)
