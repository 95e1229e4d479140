"""``moewatch baseline build DUMP.parquet -o baseline.json`` and ``moewatch baseline show FILE``."""
from __future__ import annotations

import argparse
import sys

from .baseline import Baseline, BaselineError
from .dump import DumpError, read_windows


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("baseline", help="build or inspect a baseline of healthy routing")
    sub = parser.add_subparsers(dest="baseline_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="build a baseline from the windows of a Parquet dump")
    build.add_argument("dump", help="a dump written by mon.dump() (its windows)")
    build.add_argument("-o", "--output", required=True, help="baseline JSON file to write")
    build.add_argument("--model-name", default="", help="recorded in the baseline")
    build.set_defaults(func=_build)
    show = sub.add_parser("show", help="summarise a baseline file")
    show.add_argument("file")
    show.set_defaults(func=_show)


def _build(args: argparse.Namespace) -> int:
    try:
        # the dump reader checks the format, version and checksums, and keeps only the windows
        frame = read_windows(args.dump)
        baseline = Baseline.from_frame(frame, model_name=args.model_name)
        baseline.save(args.output)
    except (OSError, ValueError, DumpError) as error:  # BaselineError, DumpFormatError are ValueErrors
        print("moewatch baseline build: " + " ".join(str(error).splitlines()), file=sys.stderr)
        # a dump that cannot be used is bad input (2); an output that cannot be written, 1
        return 2 if isinstance(error, (ValueError, FileNotFoundError, IsADirectoryError)) else 1
    print(f"wrote {args.output}: {baseline!r}")
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        baseline = Baseline.load(args.file)
    except (OSError, BaselineError) as error:
        print("moewatch baseline show: " + " ".join(str(error).splitlines()), file=sys.stderr)
        return 2
    print(repr(baseline))
    for gate in baseline.gates.values():
        q = gate.summary()["quantiles"]
        print(f"  {gate.name}: {gate.num_experts} experts top-{gate.top_k}, {gate.windows} windows, "
              f"effective experts p50 {q['effective_experts'].get('q50', float('nan')):.2f}, "
              f"logit std p50 {q['logit_std'].get('q50', float('nan')):.3g}, "
              f"top share p99 {q['top_share'].get('q99', float('nan')):.1%}")
    return 0
