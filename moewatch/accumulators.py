"""Host snapshots of the cumulative accumulators (see :mod:`moewatch.hotpath.layout`).

A window is the difference of two snapshots taken at forward ends; the hot path
(:mod:`moewatch.hotpath`) makes them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .hotpath.layout import COUNT_ROWS, NUM_SCALARS


@dataclass
class Snapshot:
    """Host copy of every accumulator at one forward end (all numpy)."""

    time: float
    sums: np.ndarray  # float64 [G, NUM_SCALARS + E_max]: scalar sums, then router-prob sums
    counts: np.ndarray  # int64 [G, COUNT_ROWS, E_max]: assignments, dropped, tokens per rank (layout)
    absmax: np.ndarray  # float64 [G]: max |logit| in the window that ends here
    # float64 [2]: the requests' tokens and tokens squared, summed since attach (Window.rows)
    rows: np.ndarray = field(default_factory=lambda: np.zeros(2))

    @classmethod
    def zeros(cls, num_gates: int, max_experts: int) -> "Snapshot":
        """The state at attach: nothing counted yet."""
        return cls(time=time.time(), sums=np.zeros((num_gates, NUM_SCALARS + max_experts)),
                   counts=np.zeros((num_gates, COUNT_ROWS, max_experts), dtype=np.int64), absmax=np.zeros(num_gates))
