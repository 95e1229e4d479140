"""The verdict after a window: overall and per gate."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

SEVERITIES = ("ok", "drift", "collapse")
# Whether the verdict rests on data: "ok" (the last window was observed without failures),
# "no_data" (no window has closed yet, or the gate saw no token in it), "failing" (monitoring
# itself fails: hook, reader or detector errors). A severity of "ok" means healthy routing only
# with monitoring "ok" and a verdict (Health.verdict_on); Health.healthy says all three at once.
MONITORING_STATES = ("ok", "no_data", "failing")
# Why a baseline detector's verdict was not renewed by the window that just closed (Health.waiting;
# "" when it was): "make-up" (a fresh monitor measures how clustered the live traffic is before its
# first verdict), "evidence" (the window joined a pool of windows that does not yet carry a
# verdict's evidence), "confirming" (a new drift waits for the windows that confirm it).
WAITING_REASONS = ("make-up", "evidence", "confirming")


def worst(severities) -> str:
    """The most severe of ``severities`` ("ok" if empty)."""
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    return max(severities, key=rank.__getitem__, default="ok")


@dataclass
class GateHealth:
    """One gate's verdict: ``severity``, the ``reasons``, each check's severity, and ``monitoring``
    (one of MONITORING_STATES: whether this gate's numbers were observed)."""

    severity: str = "ok"
    reasons: List[str] = field(default_factory=list)
    checks: Dict[str, str] = field(default_factory=dict)  # check name -> severity
    monitoring: str = "ok"


@dataclass
class Health:
    """``mon.health()``: ``.severity`` in {"ok", "drift", "collapse"}, ``.gates[name]``, and
    ``.monitoring`` in {"ok", "no_data", "failing"}: a severity of "ok" before any window closed,
    or while the hooks fail, is not a healthy router. ``.healthy`` is true only for both "ok",
    and once there is a verdict.

    ``.verdict_on``: the first and last window the standing verdict judged (None: no verdict
    yet); ``.waiting``: "" when the window that just closed was judged, else why the verdict
    waits (one of WAITING_REASONS; ``.note`` says it in words)."""

    severity: str = "ok"
    gates: Dict[str, GateHealth] = field(default_factory=dict)
    window: Optional[int] = None
    has_baseline: bool = False
    detector: bool = False
    note: str = ""
    monitoring: str = "ok"
    verdict_on: Optional[Tuple[int, int]] = None
    waiting: str = ""

    @property
    def healthy(self) -> bool:
        """Routing judged healthy from observed data (a verdict, and severity and monitoring both
        "ok"): False before the first verdict, e.g. while a fresh monitor measures the traffic."""
        return self.severity == "ok" and self.monitoring == "ok" and self.verdict_on is not None

    def __str__(self) -> str:
        head = {"no_data": "NO DATA", "failing": "MONITORING FAILING"}.get(self.monitoring, self.severity)
        lines = [f"moewatch health: {head}" + (f" ({self.note})" if self.note else "")]
        for name, gate in self.gates.items():
            if gate.severity != "ok":
                lines.append(f"  {name}: {gate.severity}: " + "; ".join(gate.reasons))
            elif gate.monitoring != "ok":
                lines.append(f"  {name}: {gate.monitoring.replace('_', ' ')}")
        return "\n".join(lines)
