"""``moewatch report DUMP``: summarise a dump on the terminal and draw its plots."""
from __future__ import annotations

import sys

EXIT_BAD_DUMP = 2  # a truncated, corrupt, foreign or missing file
EXIT_PLOT_FAILED = 1


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="summarise a Parquet dump (health timeline, worst gates and experts) and plot it",
        description="Summarise a moewatch dump: when routing went wrong, in which gates, which experts, "
                    "and what changed against the baseline. Writes PNG plots (expert load heatmaps, "
                    "effective experts, entropy and router-logit std against the baseline).")
    parser.add_argument("dump", metavar="DUMP", help="a dump written by Monitor.dump() or into dump_dir")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="directory for the PNG plots (default: ./<dump name>-report)")
    parser.add_argument("--no-plots", action="store_true", help="print the summary only")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from .cli_dump import read_dump_or_say
    from .report import default_out_dir, summary_text, write_plots

    dump = read_dump_or_say("report", args.dump)
    if dump is None:
        return EXIT_BAD_DUMP
    plots, failure = [], None
    if not args.no_plots:
        try:
            plots = write_plots(dump, args.out or default_out_dir(args.dump))
        except ImportError as error:
            failure = f"plots need matplotlib (pip install matplotlib): {error}"
        except OSError as error:
            failure = f"could not write the plots: {error}"
    print(summary_text(dump, plots))
    if failure:
        print(f"moewatch report: {failure}", file=sys.stderr)
        return EXIT_PLOT_FAILED
    return 0
