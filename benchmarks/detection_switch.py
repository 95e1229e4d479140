"""Simulated traffic that turns into fewer, longer requests: how often the detector alarms.

    python benchmarks/detection_switch.py            # 100 runs per row, about 4 minutes on 2 cores
    python benchmarks/detection_switch.py --runs 20  # quicker

The traffic is ``tests/detector_sim.py``'s ClusteredTraffic: every request draws its own expert
mix around the gate's shares (a Dirichlet whose total per expert is the row's concentration; the
lower, the more alike a request's tokens route), and 1% of requests send 80% of their tokens to
one expert. The baseline: 120 windows of sixteen 128-token requests. Each run: a fresh detector
(default options), 30 windows of the baseline's make-up (unless the row starts at attach), then
60 windows of the row's traffic. Every alarm on this healthy traffic is a false one; a row
reports the runs with any alarmed window, and the windows alarmed (a window that waits for
evidence repeats the last verdict, and counts again while that verdict is an alarm).

Each row runs twice: with the requests behind each window known (the rows of a transformers
batch or the requests vLLM's scheduler names, ``Window.rows``), and not known (an old baseline,
an engine that does not name its requests; ``--rows seen`` or ``--rows unseen`` runs one).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moewatch.baseline import Baseline  # noqa: E402
from moewatch.detector import BaselineDetector  # noqa: E402
from tests.detector_sim import ClusteredTraffic  # noqa: E402

BEFORE = 30  # windows of the baseline's make-up before the switch
AFTER = 60  # windows of the row's traffic
# (concentration, requests per window, tokens per request, from attach)
ROWS = [(4.0, 2, 1024, True), (4.0, 2, 1024, False), (4.0, 4, 512, False), (4.0, 1, 2048, False),
        (8.0, 2, 1024, False), (16.0, 4, 512, True), (16.0, 4, 512, False), (4.0, 16, 128, False)]


def run_row(concentration: float, requests: int, tokens: int, attach: bool, runs: int, rows_seen: bool = True):
    """(runs with an alarm, windows alarmed, verdicts) over ``runs`` runs of one row."""
    sim = ClusteredTraffic(num_gates=4, experts=8, concentration=concentration, seed=1, rows_seen=rows_seen)
    baseline = Baseline.from_frame(sim.frame(120))
    alarmed_runs = alarmed_windows = verdicts = 0
    for run in range(runs):
        det = BaselineDetector(sim.gates, baseline, 100_000, 2)
        sim.rng = np.random.default_rng(5000 + run)
        if not attach:
            for _ in range(BEFORE):
                det.update(sim.window(16), sim.gates)
        healths = [det.update(sim.window(requests, tokens=tokens), sim.gates) for _ in range(AFTER)]
        alarms = sum(h.severity != "ok" for h in healths)
        alarmed_runs += alarms > 0
        alarmed_windows += alarms
        verdicts += sum(not h.waiting for h in healths)
    return alarmed_runs, alarmed_windows, verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="runs per row")
    parser.add_argument("--rows", choices=("both", "seen", "unseen"), default="both",
                        help="whether the windows' requests are known (both: two sets of columns)")
    args = parser.parse_args()
    start = time.time()
    modes = {"both": (True, False), "seen": (True,), "unseen": (False,)}[args.rows]
    head = " | ".join(f"runs with an alarm ({'requests known' if seen else 'not known'}), of {args.runs} | "
                      f"windows alarmed, of {args.runs * AFTER} | verdicts" for seen in modes)
    print(f"| live traffic (concentration) | {head} |")
    print("|---" * (1 + 3 * len(modes)) + "|")
    for concentration, requests, tokens, attach in ROWS:
        cells = []
        for seen in modes:
            runs, windows, verdicts = run_row(concentration, requests, tokens, attach, args.runs, seen)
            cells.append(f"{runs} | {windows} | {verdicts}")
        when = "from attach" if attach else "after a switch"
        print(f"| {requests} request{'s' if requests > 1 else ''} of {tokens:,} ({concentration:g}), {when} | "
              f"{' | '.join(cells)} |", flush=True)
    print(f"total {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
