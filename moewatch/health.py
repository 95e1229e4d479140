"""The verdict after a window: overall and per gate."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

SEVERITIES = ("ok", "drift", "collapse")


def worst(severities) -> str:
    """The most severe of ``severities`` ("ok" if empty)."""
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    return max(severities, key=rank.__getitem__, default="ok")


@dataclass
class GateHealth:
    severity: str = "ok"
    reasons: List[str] = field(default_factory=list)
    checks: Dict[str, str] = field(default_factory=dict)  # check name -> severity


@dataclass
class Health:
    """``mon.health()``: ``.severity`` in {"ok", "drift", "collapse"}, ``.gates[name]``."""

    severity: str = "ok"
    gates: Dict[str, GateHealth] = field(default_factory=dict)
    window: Optional[int] = None
    has_baseline: bool = False
    detector: bool = False
    note: str = ""

    def __str__(self) -> str:
        lines = [f"moewatch health: {self.severity}" + (f" ({self.note})" if self.note else "")]
        for name, gate in self.gates.items():
            if gate.severity != "ok":
                lines.append(f"  {name}: {gate.severity}: " + "; ".join(gate.reasons))
        return "\n".join(lines)
