"""``moewatch demo``."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    from .demo import BASELINE_WINDOWS, DEFAULT_OUT

    parser = subparsers.add_parser(
        "demo", help="watch a small trained MoE on the CPU: healthy traffic, then injected router faults",
        description="Record a baseline of a small trained Mixtral (shipped with moewatch), serve healthy "
                    "traffic, inject a router collapse, a dead expert and logit saturation, and remove them. "
                    "Leaves the baseline and a dump in --out and names the commands to read them.")
    parser.add_argument("--windows", type=int, default=3, help="windows of each phase (default 3)")
    parser.add_argument("--baseline-windows", type=int, default=BASELINE_WINDOWS,
                        help=f"windows of the baseline recording (default {BASELINE_WINDOWS}, at least 8)")
    parser.add_argument("--serve", type=int, metavar="PORT", default=None,
                        help="also serve Prometheus /metrics on 127.0.0.1:PORT, kept up after the demo until Ctrl-C")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                        help=f"directory for the baseline and the dump (default ./{DEFAULT_OUT}; created)")
    parser.add_argument("--seed", type=int, default=0, help="traffic seed")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    import sys

    from .baseline import MIN_WINDOWS
    from .demo import run

    if args.windows < 1 or args.baseline_windows < MIN_WINDOWS:
        print(f"moewatch demo: --windows must be at least 1 and --baseline-windows at least {MIN_WINDOWS}",
              file=sys.stderr)
        return 2
    return run(windows=args.windows, serve=args.serve, seed=args.seed, out=args.out,
               baseline_windows=args.baseline_windows)
