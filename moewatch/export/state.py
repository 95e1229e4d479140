"""One consistent read of a monitor for the exporters: totals, latest window, health.

The Prometheus collector and the OpenTelemetry callbacks both turn an :class:`ExportState` into
samples, so the two always agree. This module is the only place that reads the monitor's
internals (the last cumulative snapshot and the ring), under the monitor's lock, so a scrape
never sees half of a window close.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..health import Health
from ..schema import SEVERITY_VALUE
from ..stats import NONFINITE, TOKENS
from ..windows import gate_row
from .rank import process_rank


@dataclass
class GateState:
    """What the exporters need about one gate."""

    name: str
    num_experts: int
    top_k: int
    tokens_total: float
    assignments_total: np.ndarray  # int64 [E] since attach
    dropped_total: int
    nonfinite_total: float
    latest: Optional[dict]  # gate_row() of the latest window, None before the first one
    severity: str = "ok"
    checks: Dict[str, str] = field(default_factory=dict)
    monitoring: str = "no_data"  # a MONITORING_STATES value (moewatch.health)
    baseline_logit_std: Optional[float] = None
    baseline_medians: Dict[str, float] = field(default_factory=dict)  # BASELINE_STATS column -> median
    # expert parallelism under expert_placement= (None without a placement; see moewatch.placement)
    ep_ranks: Optional[int] = None
    ep_balance: Optional[dict] = None  # placement.balance.window_balance() of the latest window
    alltoall_sends_total: Optional[int] = None

    def window_value(self, column: str) -> Optional[float]:
        """A finite scalar of the latest window, or None (no window yet, or undefined)."""
        if self.latest is None:
            return None
        value = float(self.latest[column])
        return value if math.isfinite(value) else None


@dataclass
class ExportState:
    """Everything exported at one instant."""

    model: str
    rank: str
    up: bool
    windows_total: int
    last_window_time: float
    errors: Dict[str, int]
    alerts_sent: int
    baseline_loaded: bool
    gates: List[GateState]
    monitoring: str = "no_data"  # mon.health().monitoring: ok / no_data / failing
    parallel_ranks: Dict[str, int] = field(default_factory=dict)  # mon.parallel_ranks

    @property
    def process_labels(self) -> Tuple[str, str]:
        return (self.model, self.rank)


def _baseline_of(monitor) -> object:
    """The baseline the monitor was attached with (a moewatch.Baseline), or None."""
    return getattr(monitor, "_baseline", None)


def baseline_logit_std(baseline, gate: str) -> Optional[float]:
    """Median logit std of ``gate`` over the baseline's windows (None without one)."""
    try:
        values = np.asarray(baseline.gates[gate].series["logit_std"], dtype=float)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    median = float(np.median(values))
    return median if median > 0 else None


# Columns of GateBaseline.frame() whose median over the baseline's windows is exported.
BASELINE_STATS = ("effective_experts", "entropy_mean", "logit_std", "top1_prob_mean")


def baseline_medians(baseline, gate: str) -> Dict[str, float]:
    """{column: median over the baseline's windows} for BASELINE_STATS ({} without a baseline)."""
    try:
        frame = baseline.gates[gate].frame()
    except (AttributeError, KeyError, TypeError, ValueError):
        return {}
    out = {}
    for column in BASELINE_STATS:
        if column not in frame:
            continue
        values = np.asarray(frame[column], dtype=float)
        values = values[np.isfinite(values)]
        if values.size:
            out[column] = float(np.median(values))
    return out


class StateReader:
    """Builds :class:`ExportState` from a monitor; the per-gate part is cached per window.

    Holds the monitor weakly: exporters must never keep a model's monitor alive.
    """

    def __init__(self, monitor):
        self._monitor = weakref.ref(monitor)
        self.model = str(monitor.model_name)
        self.rank = str(process_rank(monitor.options).rank)
        self.parallel_ranks = dict(getattr(monitor, "parallel_ranks", {}))  # read once, at attach
        self._key: Optional[tuple] = None
        self._frozen: Optional[tuple] = None  # (gates, windows_total, last_window_time, has_baseline)
        # The baseline is fixed at attach: its per-gate figures are computed once, not per window.
        baseline = _baseline_of(monitor)
        self._baseline_figures: Dict[str, tuple] = {
            gate.name: (baseline_logit_std(baseline, gate.name),
                        baseline_medians(baseline, gate.name) if baseline is not None else {})
            for gate in monitor._gates}

    @property
    def monitor(self):
        return self._monitor()

    def read(self) -> Optional[ExportState]:
        """The current state, or None once the monitor is gone."""
        monitor = self._monitor()
        if monitor is None:
            return None
        live = monitor.health()  # the monitoring state as of now (failures since the last window count)
        with monitor._lock:  # the lock a window close holds: never half a window
            last, health = monitor._last, monitor._health
            key = (id(last), last.time, monitor._next_window, id(health))
            if key != self._key:
                latest = monitor._ring[-1] if monitor._ring else None
                self._frozen = (self._gates(monitor, last, latest, health), monitor._next_window,
                                latest.t_end if latest is not None else 0.0,
                                bool(getattr(health, "has_baseline", False)))
                self._key = key
            gates, windows_total, last_time, has_baseline = self._frozen
        return ExportState(
            model=self.model, rank=self.rank, up=monitor.attached, windows_total=windows_total,
            last_window_time=last_time, errors=monitor.errors.counts(),
            alerts_sent=sum(getattr(e, "sent", 0) for e in getattr(monitor, "_exporters", ())),
            baseline_loaded=has_baseline or _baseline_of(monitor) is not None,
            gates=[_live_gate(g, live) for g in gates], monitoring=live.monitoring,
            parallel_ranks=self.parallel_ranks,
        )

    def _gates(self, monitor, last, latest, health: Health) -> List[GateState]:
        out = []
        for i, gate in enumerate(monitor._gates):
            logit_std_median, medians = self._baseline_figures[gate.name]
            e = gate.num_experts
            verdict = health.gates.get(gate.name) if health.gates else None
            out.append(GateState(
                name=gate.name, num_experts=e, top_k=gate.top_k,
                tokens_total=float(last.sums[i, TOKENS]),
                assignments_total=last.counts[i, 0, :e].copy(),
                dropped_total=int(last.counts[i, 1, :e].sum()),
                nonfinite_total=float(last.sums[i, NONFINITE]),
                latest=gate_row(latest, i, gate) if latest is not None else None,
                severity=verdict.severity if verdict is not None else "ok",
                checks=dict(verdict.checks) if verdict is not None else {},
                monitoring=verdict.monitoring if verdict is not None else "no_data",
                baseline_logit_std=logit_std_median,
                baseline_medians=dict(medians),
                **_expert_parallel(monitor, i, gate, last, latest),
            ))
        return out


def _expert_parallel(monitor, row: int, gate, last, latest) -> dict:
    """The GateState fields of expert parallelism ({} without a placement)."""
    placement = getattr(monitor, "_placement", None)
    if placement is None:
        return {}
    from ..hotpath.layout import RANK_TOKENS
    from ..placement.balance import window_balance

    home = getattr(monitor, "_home_rank", None)
    reach = last.counts[row, RANK_TOKENS, :placement.num_ranks]  # [R] cumulative
    out = {"ep_ranks": placement.num_ranks,
           "alltoall_sends_total": int(reach.sum() - (reach[home] if home is not None else 0))}
    if latest is not None:
        out["ep_balance"] = window_balance(latest.counts[row], float(latest.sums[row, TOKENS]),
                                           placement.ranks[gate.name], placement.num_ranks, home)
    return out


def _live_gate(gate: GateState, live: Health) -> GateState:
    """``gate`` marked "failing" when its hook failed since the last window (else as cached)."""
    verdict = live.gates.get(gate.name)
    if verdict is not None and verdict.monitoring == "failing" and gate.monitoring != "failing":
        return dataclasses.replace(gate, monitoring="failing")
    return gate


def severity_value(severity: str) -> int:
    """0 ok, 1 drift, 2 collapse (unknown values count as ok)."""
    return SEVERITY_VALUE.get(severity, 0)
