"""Co-selection snapshots: kept at a coarser cadence than windows, within the ring's memory bound.

One co-selection matrix is E x E int64 (512 KiB at E = 256), against 4 x E values per window in
the ring's per-expert columns. So a snapshot is taken every ``every = max(1, E_max // 4)``
windows and at most ``ceil(ring_windows / every) + 1`` spans are kept (oldest dropped first):
the co-selection then takes at most as much memory as the ring's per-expert columns.

A span is the difference of two cumulative snapshots: ``[window_first, window_last]`` and, per
gate, the symmetric [E, E] counts of the tokens of those windows. Snapshots are read by the
reader after it closed windows, from the live accumulators: a span ends at its last window's
end plus the forwards that ended before the reader got there (on the CPU backend those already
committed; on devices the calls run so far). Several windows closed in one pass of the reader
make one span. Totals are exact; only the split between neighbouring spans follows the reader.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import pandas as pd

COSELECTION_COLUMNS = ["gate", "window_first", "window", "coselection"]


def cadence(max_experts: int) -> int:
    """Windows per co-selection snapshot: E_max // 4 (at least 1)."""
    return max(1, max_experts // 4)


@dataclass
class Span:
    first: int  # first window of the span
    last: int  # last window of the span
    counts: np.ndarray  # int64 [G, E_max, E_max] symmetric, the span's co-selection


class CoselectionHistory:
    """The co-selection spans of one monitor (see the module docstring). Every method is called
    under the monitor's lock (the one a window close holds), so it keeps no lock of its own."""

    def __init__(self, num_gates: int, max_experts: int, ring_windows: int):
        self.every = cadence(max_experts)
        self.spans: deque = deque(maxlen=math.ceil(ring_windows / self.every) + 1)
        self._base = np.zeros((num_gates, max_experts, max_experts), dtype=np.int64)  # at the last snapshot
        self._first: Optional[int] = None  # first window not yet in a span
        self._last: Optional[int] = None  # latest closed window
        self._due = False

    def on_window(self, index: int) -> None:
        """A window closed (the reader, under the monitor's lock)."""
        if self._first is None:
            self._first = index
        self._last = index
        if index - self._first + 1 >= self.every:
            self._due = True

    def collect(self, read: Callable[[], np.ndarray], force: bool = False) -> None:
        """After a pass of the reader: take a snapshot (``read()``: cumulative [G, E, E]) if one is due."""
        if self._first is None or not (self._due or force):
            return
        current = read()
        self.spans.append(Span(self._first, self._last, current - self._base))
        self._base = current
        self._first, self._due = None, False

    def frame(self, gates: Sequence, tail: Optional[Callable[[], np.ndarray]] = None) -> pd.DataFrame:
        """One row per (span, gate), columns :data:`COSELECTION_COLUMNS` (``coselection``: the E x E
        counts flattened row-major). ``tail``: also the windows closed since the last snapshot,
        read now from the live accumulators."""
        spans: List[Span] = list(self.spans)
        if tail is not None and self._first is not None:
            current = tail()
            spans.append(Span(self._first, self._last, current - self._base))
        rows = []
        for span in spans:
            for i, gate in enumerate(gates):
                e = gate.num_experts
                rows.append({"gate": gate.name, "window_first": span.first, "window": span.last,
                             "coselection": span.counts[i, :e, :e].reshape(-1).copy()})
        return coselection_frame(rows)


def coselection_frame(rows: List[dict]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame({"gate": pd.Series([], dtype=object), "window_first": pd.Series([], dtype="int64"),
                             "window": pd.Series([], dtype="int64"), "coselection": pd.Series([], dtype=object)},
                            columns=COSELECTION_COLUMNS)
    return pd.DataFrame(rows, columns=COSELECTION_COLUMNS).astype({"window_first": "int64", "window": "int64"})


def matrix(row) -> np.ndarray:
    """The [E, E] matrix of one row of a co-selection frame."""
    values = np.asarray(row["coselection"], dtype=np.int64)
    e = int(round(math.sqrt(values.size)))
    return values.reshape(e, e)
