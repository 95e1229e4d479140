"""``moewatch baseline record MODEL_DIR DATA... -o baseline.json``, ``moewatch baseline build
DUMP.parquet... -o baseline.json`` and ``moewatch baseline show FILE``."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .baseline import Baseline, BaselineError
from .dump import DumpError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("baseline", help="build or inspect a baseline of healthy routing")
    sub = parser.add_subparsers(dest="baseline_command", metavar="ACTION", required=True,
                                help="run `moewatch baseline ACTION --help` for its options")
    from .cli_record import add_parser as add_record

    add_record(sub)
    build = sub.add_parser("build", help="build a baseline from the windows of a Parquet dump",
                           description="Build a baseline from a dump's windows. Windows whose verdict in the "
                                       "dump was not ok (drift, collapse, monitoring failing) are left out, and "
                                       "listed, unless --keep-flagged. Several dumps of one model's disjoint "
                                       "parts (each pipeline stage's worker dumps its own layers) make one "
                                       "baseline of all of them.")
    build.add_argument("dump", nargs="+", help="a dump written by mon.dump() or into dump_dir (its windows); "
                                               "or one per part of the model")
    build.add_argument("-o", "--output", required=True, help="baseline JSON file to write")
    build.add_argument("--model-name", default="",
                       help="the model name recorded in the baseline (default: the dump's model name)")
    build.add_argument("--keep-flagged", action="store_true",
                       help="keep the windows the dump's timeline flagged (drift, collapse): by default they "
                            "are left out, so an incident does not become the baseline")
    build.set_defaults(func=_build)
    show = sub.add_parser("show", help="summarise a baseline file")
    show.add_argument("file", help="a baseline JSON file (Baseline.save, moewatch baseline build/record)")
    show.set_defaults(func=_show)


def _build(args: argparse.Namespace) -> int:
    from .baseline_build import LeftOut, baseline_from_dump

    try:
        # the dump reader checks the format, version and checksums; flagged windows are left out
        built = [baseline_from_dump(dump, keep_flagged=args.keep_flagged, model_name=args.model_name or None)
                 for dump in args.dump]
        baseline = built[0][0] if len(built) == 1 else Baseline.merged([part for part, _ in built])
        left = LeftOut()  # what each dump left out, gate by gate
        for _, part in built:
            for gate, rows in part.gates.items():
                left.gates.setdefault(gate, []).extend(rows)
        baseline.save(args.output)
    except (OSError, ValueError, DumpError) as error:  # BaselineError, DumpFormatError are ValueErrors
        print("moewatch baseline build: " + " ".join(str(error).splitlines()), file=sys.stderr)
        # a dump that cannot be used is bad input (2); an output that cannot be written, 1
        return 2 if isinstance(error, (ValueError, FileNotFoundError, IsADirectoryError)) else 1
    if left.rows:
        print(f"left out {left.rows} gate-window(s) the dump flagged (--keep-flagged keeps them):")
        for line in left.lines():
            print(f"  {line}")
    print(f"wrote {args.output}")
    print_summary(baseline)
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        baseline = Baseline.load(args.file)
    except (OSError, BaselineError) as error:
        print("moewatch baseline show: " + " ".join(str(error).splitlines()), file=sys.stderr)
        return 2
    print_summary(baseline)
    return 0


def print_summary(baseline: Baseline) -> None:
    """The baseline in a few lines: model, gates, windows, typical values."""
    print(repr(baseline))
    first = next(iter(baseline.gates.values()), None)
    requests = None if first is None else first.series.get("requests")
    if requests is not None and np.isfinite(requests).all():
        print(f"  requests per window (batch rows, or the engine's requests): median {np.median(requests):.1f}, "
              f"10th percentile {np.quantile(requests, 0.1):.1f}; windows are weighed by them too")
    else:
        print("  requests per window: not counted (an engine that does not name its requests, or a "
              "file of an older moewatch); windows are weighed by their assignments alone")
    for gate in baseline.gates.values():
        q = gate.summary()["quantiles"]
        print(f"  {gate.name}: {gate.num_experts} experts top-{gate.top_k}, {gate.windows} windows, "
              f"effective experts p50 {q['effective_experts'].get('q50', float('nan')):.2f}, "
              f"logit std p50 {q['logit_std'].get('q50', float('nan')):.3g}, "
              f"top share p99 {q['top_share'].get('q99', float('nan')):.1%}")
