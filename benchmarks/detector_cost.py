"""Detector cost and false-alarm rate on simulated over-dispersed traffic (prints; no assertions).

    python benchmarks/detector_cost.py            # 64 gates x 256 experts, top-8
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from moewatch.baseline import Baseline  # noqa: E402
from moewatch.detector import BaselineDetector  # noqa: E402
from tests.detector_sim import HealthyTraffic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gates", type=int, default=64)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--baseline-windows", type=int, default=200)
    ap.add_argument("--windows", type=int, default=2000)
    ap.add_argument("--ert", type=float, default=100_000)
    args = ap.parse_args()
    sim = HealthyTraffic(args.gates, args.experts, top_k=args.top_k, tokens=8192, seed=0)
    baseline = Baseline.from_frame(sim.frame(args.baseline_windows))
    t = time.perf_counter()
    det = BaselineDetector(sim.gates, baseline, args.ert, 2)
    calib = time.perf_counter() - t
    windows = [sim.window() for _ in range(args.windows)]
    costs, alarms = [], 0
    for w in windows:
        t = time.perf_counter()
        health = det.update(w, sim.gates)
        costs.append(time.perf_counter() - t)
        alarms += health.severity != "ok"
    ms = np.array(costs) * 1e3
    print(f"{args.gates} gates x {args.experts} experts (top-{args.top_k}), {args.baseline_windows} baseline windows")
    print(f"calibration at attach: {calib:.2f} s")
    print(f"update per window: median {np.median(ms):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms")
    print(f"false alarms: {alarms} of {args.windows} healthy windows (ERT {args.ert:.0f})")


if __name__ == "__main__":
    main()
