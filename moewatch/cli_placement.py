"""``moewatch placement DUMP --ranks R``: propose an expert-to-rank placement that cuts all-to-all traffic."""
from __future__ import annotations

import json
import sys

EXIT_BAD_INPUT = 2  # a missing or unreadable dump, a bad option, a placement that cannot be planned
EXIT_NO_PARTITIONER = 3  # pymetis is not installed


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "placement", help="propose an expert-to-rank placement from a dump's co-selection (expert parallelism)",
        description="Per gate, propose an assignment of experts to R expert-parallel ranks (E/R experts per "
                    "rank, rank load within --max-imbalance) that minimises the all-to-all volume, fitted on "
                    "the dump's earlier windows; print the volume and max/mean rank load of the current and "
                    "the proposed placement measured on the held-out later windows. See docs/placement.md.")
    parser.add_argument("dump", metavar="DUMP", help="a dump written by Monitor.dump() or into dump_dir")
    parser.add_argument("--ranks", type=int, required=True, metavar="R", help="expert-parallel ranks")
    parser.add_argument("--current", default="contiguous", metavar="contiguous|FILE",
                        help="the placement that runs now: contiguous (E/R consecutive experts per rank, the "
                             "default) or a placement file")
    parser.add_argument("--max-imbalance", type=float, default=1.1, metavar="X",
                        help="bound on max/mean rank load over the fitted windows (default 1.1)")
    parser.add_argument("--holdout", type=float, default=1 / 3, metavar="F",
                        help="fraction of the latest windows held out for measuring (default 1/3)")
    parser.add_argument("-o", "--output", metavar="FILE", default=None,
                        help="write the proposed placement as JSON (what expert_placement= reads)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from .cli_dump import read_dump_or_say
    from .placement.plan import placement_json, plan, report_text
    from .placement.propose import PartitionerMissing
    from .placement.spec import PlacementError

    if args.ranks < 1:
        print(f"moewatch placement: --ranks {args.ranks} must be a positive number of ranks", file=sys.stderr)
        return EXIT_BAD_INPUT
    dump = read_dump_or_say("placement", args.dump)
    if dump is None:
        return EXIT_BAD_INPUT
    try:
        plans = plan(dump, args.ranks, args.current, args.max_imbalance, args.holdout)
    except PartitionerMissing as error:
        print(f"moewatch placement: {error}", file=sys.stderr)
        return EXIT_NO_PARTITIONER
    except PlacementError as error:
        print(f"moewatch placement: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(report_text(plans, args.ranks, args.max_imbalance, args.current))
    if args.output:
        try:
            with open(args.output, "w") as fh:
                json.dump(placement_json(plans, args.ranks), fh, indent=1)
                fh.write("\n")
        except OSError as error:
            print(f"moewatch placement: could not write {args.output}: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"wrote {args.output} (attach with expert_placement={args.output!r})")
    return 0
