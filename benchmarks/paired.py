"""Paired comparisons shared by the benchmarks: a median with its confidence interval, and the
verdict of an interval against a target."""
from __future__ import annotations

import statistics
from typing import List


def median_ci(values: List[float], z: float = 1.96) -> tuple:
    """The median of ``values`` and a distribution-free 95% confidence interval of it: the order
    statistics j and n-1-j, j from the binomial's normal approximation."""
    ordered = sorted(values)
    n = len(ordered)
    j = max(0, int((n - z * n ** 0.5) / 2) - 1)
    return statistics.median(ordered), ordered[j], ordered[n - 1 - j]


def verdict(low: float, high: float, target: float) -> str:
    """Against a target ratio: met when the whole interval is at or under it, not met when the
    whole interval is over it, not resolved otherwise."""
    return "met" if high <= target else ("NOT MET" if low > target else "not resolved")
