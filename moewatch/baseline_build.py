"""A baseline from a dump: only the windows the monitor judged healthy, with the dump's model name.

An incident dump holds the ring as it was when a gate collapsed: healthy windows, then the
collapsed ones. A baseline built from all of them would teach the detector that a collapse is
normal. So each (window, gate) whose verdict in the dump's timeline was not ``ok`` (drift or
collapse, or a gate whose monitoring failed) is left out unless asked for, and the caller is
told what was left out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pandas as pd

from .baseline import Baseline, BaselineError
from .dump import Dump, read_dump


@dataclass
class LeftOut:
    """The (window, gate) rows of a dump left out of a baseline, per gate: [(window, why)]."""

    gates: Dict[str, List[Tuple[int, str]]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(len(v) for v in self.gates.values())

    def lines(self) -> List[str]:
        """One line per gate: its left-out windows (as ranges) and why."""
        out = []
        for gate, items in self.gates.items():
            whys = sorted({why for _, why in items})
            out.append(f"{gate}: {len(items)} window(s) {_ranges([w for w, _ in items])} ({', '.join(whys)})")
        return out


def flagged_rows(dump: Dump) -> Dict[Tuple[int, str], str]:
    """{(window, gate): why} for every gate the dump's timeline did not judge ok."""
    out: Dict[Tuple[int, str], str] = {}
    for entry in dump.timeline:
        window = entry.get("window")
        if window is None:
            continue
        for gate, verdict in (entry.get("gates") or {}).items():
            severity = verdict.get("severity", "ok")
            if severity != "ok":
                out[(int(window), gate)] = severity
            elif verdict.get("monitoring") == "failing":
                out[(int(window), gate)] = "monitoring failing"
    return out


def healthy_frame(dump: Dump, keep_flagged: bool = False) -> Tuple[pd.DataFrame, LeftOut]:
    """The dump's windows without the rows its timeline flagged (all of them with ``keep_flagged``)."""
    frame = dump.windows
    left = LeftOut()
    if keep_flagged or frame.empty:
        return frame, left
    flagged = flagged_rows(dump)
    keys = list(zip(frame["window"].astype(int), frame["gate"]))
    drop = [key in flagged for key in keys]
    for (window, gate), gone in zip(keys, drop):
        if gone:
            left.gates.setdefault(gate, []).append((window, flagged[(window, gate)]))
    return frame[[not d for d in drop]], left


def baseline_from_dump(path: str, keep_flagged: bool = False,
                       model_name: Optional[str] = None) -> Tuple[Baseline, LeftOut]:
    """A :class:`Baseline` from the healthy windows of the dump at ``path``, and what was left out.

    ``model_name`` defaults to the dump's own (the ``model`` label of the monitor that wrote it).
    Raises :class:`BaselineError` (saying what was left out) when too few windows remain.
    """
    dump = read_dump(path)
    frame, left = healthy_frame(dump, keep_flagged)
    name = model_name if model_name else str(dump.metadata.get("model_name") or "")
    try:
        baseline = Baseline.from_frame(frame, model_name=name)
    except BaselineError as error:
        if not left.rows:
            raise
        raise BaselineError(f"{error}; {left.rows} flagged window(s) were left out "
                            f"({'; '.join(left.lines())}): build from a dump with more healthy "
                            "windows, or pass --keep-flagged to include them") from None
    baseline.meta.update({"source": "dump", "dump_reason": dump.metadata.get("reason"),
                          "flagged_windows_left_out": left.rows})
    return baseline, left


def _ranges(values: List[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts: List[str] = []
    for v in sorted(set(values)):
        if parts and parts[-1][1] == v - 1:
            parts[-1][1] = v
        else:
            parts.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)
