"""Windows: the difference of two accumulator snapshots, turned into per-gate statistics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np
import pandas as pd

from .accumulators import Snapshot
from .routing import GateInfo
from .stats import (ENTROPY, LOGIT_FINITE, LOGIT_SQSUM, LOGIT_SUM, MARGIN, NONFINITE, NUM_SCALARS,
                    TOKENS, TOP1, ZLOSS)

# Column order of :meth:`moewatch.Monitor.windows` (also the dump schema).
WINDOW_COLUMNS = [
    "window", "t_start", "t_end", "gate", "family", "num_experts", "top_k",
    "tokens", "assignments", "dropped", "drop_rate",
    "entropy_mean", "logit_mean", "logit_std", "logit_absmax", "top1_prob_mean", "margin_mean",
    "zloss_mean", "nonfinite_logits",
    "load_entropy", "effective_experts", "top_share", "dead_experts",
    "expert_counts", "expert_share", "expert_prob_mean", "expert_dropped", "requests",
]
# Columns added after dumps began: a dump (or frame) written before them lacks them, and is read.
LATER_WINDOW_COLUMNS = ("requests",)


@dataclass
class Window:
    """One closed window: deltas for every gate (arrays indexed by gate row)."""

    index: int
    t_start: float
    t_end: float
    sums: np.ndarray  # float64 [G, NUM_SCALARS + E_max]
    counts: np.ndarray  # int64 [G, 3, E_max]: assignments, dropped, tokens per rank (hotpath.layout)
    absmax: np.ndarray  # float64 [G]
    # float64 [2]: sum over the window's requests of their tokens and of their tokens squared,
    # from the root forwards' token rows (B rows of L tokens, padding included; a decode step
    # grows the rows of the one before): the rows of a transformers batch are its requests; or
    # from the requests a serving engine names behind its flat batches (vLLM's scheduler).
    # Zeros where neither was seen.
    rows: np.ndarray = field(default_factory=lambda: np.zeros(2))

    @property
    def tokens(self) -> np.ndarray:
        return self.sums[:, TOKENS]

    @property
    def requests(self) -> float:
        """How many requests the window's tokens are worth: (sum of t)**2 / sum of t**2 over its
        requests of t tokens, the number of requests when they are of equal length, fewer when a
        few long ones hold most tokens; nan when the rows are not known."""
        return effective_requests(self.rows)


def close_window(index: int, previous: Snapshot, current: Snapshot) -> Window:
    return Window(index=index, t_start=previous.time, t_end=current.time,
                  sums=current.sums - previous.sums, counts=current.counts - previous.counts,
                  absmax=current.absmax, rows=current.rows - previous.rows)


def effective_requests(rows) -> float:
    """(sum of t)**2 / sum of t**2 from ``rows`` [2] = (sum of t, sum of t**2) over requests of t
    tokens (``Window.rows``); nan if unknown."""
    tokens, squares = float(rows[0]), float(rows[1])
    return tokens * tokens / squares if tokens > 0 and squares > 0 else float("nan")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def load_summary(counts: np.ndarray) -> Dict[str, float]:
    """Load-balance statistics of per-expert assignment counts [E]."""
    total = counts.sum()
    if total <= 0:
        return {"load_entropy": float("nan"), "effective_experts": float("nan"),
                "top_share": float("nan"), "dead_experts": int(counts.shape[0])}
    share = counts / total
    nz = share[share > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    return {"load_entropy": entropy, "effective_experts": float(np.exp(entropy)),
            "top_share": float(share.max()), "dead_experts": int((counts == 0).sum())}


def gate_row(window: Window, row: int, gate: GateInfo) -> dict:
    """The statistics of one gate in one window (a row of ``Monitor.windows()``)."""
    e = gate.num_experts
    s = window.sums[row]
    counts = window.counts[row, 0, :e].copy()
    dropped = window.counts[row, 1, :e].copy()
    tokens = s[TOKENS]
    assignments = int(counts.sum())
    n_logits = s[LOGIT_FINITE]
    logit_mean = _ratio(s[LOGIT_SUM], n_logits)
    variance = _ratio(s[LOGIT_SQSUM], n_logits) - logit_mean ** 2
    out = {
        "window": window.index, "t_start": window.t_start, "t_end": window.t_end,
        "gate": gate.name, "family": gate.family, "num_experts": e, "top_k": gate.top_k,
        "tokens": int(round(tokens)), "assignments": assignments, "dropped": int(dropped.sum()),
        "drop_rate": _ratio(dropped.sum(), assignments),
        "entropy_mean": _ratio(s[ENTROPY], tokens),
        "logit_mean": logit_mean,
        "logit_std": float(np.sqrt(max(variance, 0.0))) if n_logits > 0 else float("nan"),
        "logit_absmax": float(window.absmax[row]),
        "top1_prob_mean": _ratio(s[TOP1], tokens),
        "margin_mean": _ratio(s[MARGIN], tokens),
        "zloss_mean": _ratio(s[ZLOSS], tokens),
        "nonfinite_logits": int(round(s[NONFINITE])),
    }
    out.update(load_summary(counts))
    out["expert_counts"] = counts
    out["expert_share"] = counts / assignments if assignments else np.full(e, np.nan)
    out["expert_prob_mean"] = s[NUM_SCALARS:NUM_SCALARS + e] / tokens if tokens > 0 else np.full(e, np.nan)
    out["expert_dropped"] = dropped
    out["requests"] = window.requests
    return out


def windows_frame(windows: Sequence[Window], gates: Sequence[GateInfo]) -> pd.DataFrame:
    """One row per (window, gate), columns :data:`WINDOW_COLUMNS`."""
    rows: List[dict] = [gate_row(w, i, g) for w in windows for i, g in enumerate(gates)]
    frame = pd.DataFrame(rows, columns=WINDOW_COLUMNS)
    return frame.astype({"window": "int64", "tokens": "int64", "assignments": "int64",
                         "dropped": "int64", "nonfinite_logits": "int64", "dead_experts": "int64",
                         "num_experts": "int64", "top_k": "int64"})
