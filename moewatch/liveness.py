"""Whether the monitor itself works: ``Health.monitoring`` is "ok", "no_data" or "failing".

A severity of "ok" says the routing of the last closed window was healthy. It cannot say
anything before the first window closes, and when every hook call fails (a ``gates=`` module
whose output the adapter cannot read) no window ever closes, so the last verdict would stand
forever. This module marks every verdict with the state of the monitoring, from the internal
error counts between two window closes, and re-marks it live when failures arrive after the
last close.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Sequence, Tuple

from .errors import ErrorLog
from .health import GateHealth, Health

# Failures that blind the monitor. Exporter failures (prometheus, otlp, alertmanager, dump) lose
# an output, not the observation: they are counted (moewatch_internal_errors_total), not here.
WATCHING = ("hook", "reader", "detector")

_Mark = Tuple[Dict[str, int], Dict[str, int]]  # (failures by component, hook failures by gate)


class MonitoringStatus:
    """Marks verdicts with the monitoring state; one per monitor, called under its lock."""

    def __init__(self, errors: ErrorLog, gate_names: Sequence[str]):
        self.errors = errors
        self.gates = list(gate_names)
        self._mark: _Mark = self._read()  # failure counts at the last window close (at attach first)

    def _read(self) -> _Mark:
        counts = self.errors.counts()
        return {c: counts.get(c, 0) for c in WATCHING}, self.errors.counts_where("hook")

    def _since(self, mark: _Mark) -> Tuple[Dict[str, int], Dict[str, int], _Mark]:
        """Failures since ``mark``: by component, hook failures by gate, and the new mark."""
        now = self._read()
        by_component = {c: now[0][c] - mark[0][c] for c in WATCHING if now[0][c] > mark[0][c]}
        by_gate = {g: n - mark[1].get(g, 0) for g, n in now[1].items() if n > mark[1].get(g, 0)}
        return by_component, by_gate, now

    def _note(self, failures: Dict[str, int], since: str) -> str:
        last = self.errors.last()
        parts = [f"{n} {c} error{'s' if n > 1 else ''}" for c, n in failures.items()]
        first = next(iter(failures))
        return f"monitoring is failing: {', '.join(parts)} {since} (last: {last.get(first, '?')})"

    def on_close(self, health: Health, window) -> Health:
        """Mark the verdict of the window that just closed; failures during it make it "failing"."""
        failures, by_gate, self._mark = self._since(self._mark)
        tokens = window.tokens
        for i, name in enumerate(self.gates):
            gate = health.gates.setdefault(name, GateHealth())
            gate.monitoring = "failing" if by_gate.get(name) else ("ok" if tokens[i] > 0 else "no_data")
        if failures:
            health.monitoring = "failing"
            note = self._note(failures, "in this window")
            health.note = f"{health.note}; {note}" if health.note else note
        return health

    def current(self, health: Health) -> Health:
        """``health`` as of now: "failing" (a marked copy) when failures arrived since the last close."""
        failures, by_gate, _ = self._since(self._mark)
        if not failures:
            return health
        since = "since attach, no window closed yet" if health.window is None else "since the last window"
        gates = {name: dataclasses.replace(gate, monitoring="failing") if by_gate.get(name) else gate
                 for name, gate in health.gates.items()}
        for name in by_gate:
            gates.setdefault(name, GateHealth(monitoring="failing"))
        return dataclasses.replace(health, monitoring="failing", gates=gates, note=self._note(failures, since))
