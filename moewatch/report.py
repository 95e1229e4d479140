"""``moewatch report DUMP``: a terminal summary of a dump, and PNG plots (:mod:`moewatch.report_plots`).

The summary answers the postmortem questions in order: when did routing go wrong (the health
timeline), where (the worst gates), which experts and what changed against the baseline, for
every *incident* of every flagged gate. An incident is a run of consecutive windows in which a
gate was not ok; a dump may hold several per gate, and each is examined in its own worst window
(the one with the fewest effective experts), whose experts, reasons and statistics are printed
together, so every line of an incident speaks of the same window.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .dump import Dump, read_dump
from .health import SEVERITIES

SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}  # unknown severities (newer dumps) rank as ok
MAX_PANELS = 16  # multi-gate figures show the worst gates only
MAX_TIMELINE_LINES = 20
MAX_GATES_EXAMINED = 5
MAX_INCIDENTS_PER_GATE = 5


@dataclass
class Incident:
    """A run of consecutive windows in which one gate was not ok."""

    gate: str
    windows: List[int]  # in order
    severity: str  # the worst verdict of the run
    worst_window: int  # the window of the run with the fewest effective experts (the worst verdict first)
    reasons: List[str]  # the reasons of worst_window, from the dump's timeline
    t_start: float = math.nan  # Unix seconds: the first window opened
    t_end: float = math.nan  # ... the last one closed

    @property
    def span(self) -> str:
        first, last = self.windows[0], self.windows[-1]
        return f"window {first}" if first == last else f"windows {first}-{last}"


@dataclass
class GateSummary:
    """How bad one gate got over the dump's windows."""

    name: str
    num_experts: int
    severity: str  # worst verdict in the timeline
    first_bad: Optional[int]  # first window not ok
    reasons: List[str]  # reasons of worst_window (the same window as the expert findings)
    worst_window: Optional[int]  # the worst incident's worst window; without one, fewest effective experts
    min_effective: float
    max_top_share: float
    max_dead: int
    max_drop_rate: float
    max_logit_std: float
    incidents: List[Incident] = field(default_factory=list)

    @property
    def sort_key(self) -> tuple:
        ratio = self.min_effective / self.num_experts if self.num_experts and math.isfinite(self.min_effective) else 1.0
        return (-SEVERITY_RANK.get(self.severity, 0), ratio, -_finite(self.max_top_share))


def _finite(value: float, default: float = 0.0) -> float:
    return float(value) if value is not None and math.isfinite(value) else default


def _fmt(value: Optional[float], spec: str = ".3g") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def band_digits(lo: float, hi: float, *values: float) -> int:
    """Significant digits (3 to 9) that tell apart every two different numbers of ``lo``, ``hi``
    and ``values``, so a narrow band never prints as ``2.07-2.07`` and a value just outside it
    never prints as its edge."""
    numbers = [v for v in (lo, hi, *values) if v is not None and math.isfinite(v)]
    pairs = [(a, b) for i, a in enumerate(numbers) for b in numbers[i + 1:] if a != b]
    for digits in range(3, 10):
        if all(format(a, f".{digits}g") != format(b, f".{digits}g") for a, b in pairs):
            return digits
    return 9


def band_text(lo: float, hi: float, digits: Optional[int] = None) -> str:
    """``lo-hi`` at :func:`band_digits` (or ``digits``); a band of one value says so."""
    if lo == hi:
        return f"{_fmt(lo)} in every baseline window"
    digits = digits or band_digits(lo, hi)
    return f"{lo:.{digits}g}-{hi:.{digits}g}"


def clock(t: float) -> str:
    """Unix seconds -> ``HH:MM:SS`` UTC (the dump's times are UTC)."""
    return time.strftime("%H:%M:%S", time.gmtime(t)) if math.isfinite(t) else "?"


# -- the baseline a dump carries (Baseline.to_dict()) ---------------------------------------
def _baseline_gate(baseline: Optional[dict], gate: str) -> Optional[dict]:
    for entry in (baseline or {}).get("gates", []) or []:
        if isinstance(entry, dict) and entry.get("name") == gate:
            return entry
    return None


def baseline_band(baseline: Optional[dict], gate: str, stat: str) -> Optional[Tuple[float, float, float]]:
    """(5th percentile, median, 95th percentile) of ``stat`` over the baseline's windows, or None."""
    entry = _baseline_gate(baseline, gate)
    q = (((entry or {}).get("summary") or {}).get("quantiles") or {}).get(stat) or {}
    try:
        band = (float(q["q05"]), float(q["q50"]), float(q["q95"]))
    except (KeyError, TypeError, ValueError):
        return None
    return band if all(math.isfinite(v) for v in band) else None


def baseline_shares(baseline: Optional[dict], gate: str) -> Optional[np.ndarray]:
    """The baseline's share of assignments of each expert of ``gate``, or None."""
    entry = _baseline_gate(baseline, gate)
    shares = ((entry or {}).get("summary") or {}).get("expert_share")
    if not shares:
        return None
    return np.asarray([np.nan if s is None else s for s in shares], dtype=float)


# -- analysis -------------------------------------------------------------------------------
def _timeline_by_gate(dump: Dump) -> Dict[str, Dict[int, Tuple[str, List[str]]]]:
    """{gate: {window: (severity, reasons)}} of the windows in which the gate was not ok."""
    out: Dict[str, Dict[int, Tuple[str, List[str]]]] = {}
    for entry in dump.timeline:
        window = entry.get("window")
        if window is None:
            continue
        for name, gate in (entry.get("gates") or {}).items():
            severity = gate.get("severity", "ok")
            if severity != "ok":
                out.setdefault(name, {})[int(window)] = (severity, list(gate.get("reasons") or []))
    return out


def _rows(dump: Dump, gate: str):
    frame = dump.windows
    return frame[frame["gate"] == gate].sort_values("window")


def incidents(dump: Dump, gate: str, flagged: Optional[Dict[int, Tuple[str, List[str]]]] = None) -> List[Incident]:
    """The runs of consecutive windows (in the dump) in which ``gate`` was not ok, in order."""
    flagged = _timeline_by_gate(dump).get(gate, {}) if flagged is None else flagged
    rows = _rows(dump, gate)
    order = [int(w) for w in rows["window"]]
    known = set(order)
    order += sorted(w for w in flagged if w not in known)  # verdicts whose window left the ring
    effective = dict(zip(rows["window"].astype(int), rows["effective_experts"].astype(float)))
    times = dict(zip(rows["window"].astype(int), zip(rows["t_start"].astype(float), rows["t_end"].astype(float))))
    runs: List[List[int]] = []
    previous_flagged = False
    for w in order:
        if w in flagged:
            if previous_flagged:
                runs[-1].append(w)
            else:
                runs.append([w])
        previous_flagged = w in flagged
    out = []
    for run in runs:
        severity = max((flagged[w][0] for w in run), key=lambda s: SEVERITY_RANK.get(s, 0))
        candidates = [w for w in run if flagged[w][0] == severity]
        worst = min(candidates, key=lambda w: (_finite(effective.get(w, math.nan), math.inf), w))
        out.append(Incident(gate=gate, windows=run, severity=severity, worst_window=worst,
                            reasons=flagged[worst][1], t_start=times.get(run[0], (math.nan,))[0],
                            t_end=times.get(run[-1], (math.nan, math.nan))[1]))
    return out


def gate_summaries(dump: Dump) -> List[GateSummary]:
    """One summary per gate, worst first (verdict, then fewest effective experts per expert)."""
    frame = dump.windows
    bad = _timeline_by_gate(dump)
    out = []
    names = [g["name"] for g in dump.gates] or list(dict.fromkeys(frame["gate"]))
    for name in names:
        rows = _rows(dump, name)
        flagged = bad.get(name, {})
        runs = incidents(dump, name, flagged)
        severity = max((s for s, _ in flagged.values()), key=lambda s: SEVERITY_RANK.get(s, 0), default="ok")
        effective = rows["effective_experts"].to_numpy(dtype=float)
        has = np.isfinite(effective)
        if runs:  # the worst incident's worst window: findings and reasons of one window
            worst = min((r for r in runs if r.severity == severity),
                        key=lambda r: _finite(_value(rows, r.worst_window, "effective_experts"), math.inf))
            worst_window, reasons = worst.worst_window, worst.reasons
        else:
            worst_window = int(rows["window"].to_numpy()[has][np.argmin(effective[has])]) if has.any() else None
            reasons = []
        info = next((g for g in dump.gates if g["name"] == name), {})
        num_experts = int(info.get("num_experts") or (rows["num_experts"].iloc[0] if len(rows) else 0))

        def top(col: str) -> float:
            values = rows[col].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            return float(values.max()) if values.size else float("nan")

        out.append(GateSummary(
            name=name, num_experts=num_experts, severity=severity,
            first_bad=min(flagged, default=None), reasons=reasons, worst_window=worst_window,
            min_effective=float(effective[has].min()) if has.any() else float("nan"),
            max_top_share=top("top_share"), max_dead=int(rows["dead_experts"].max()) if len(rows) else 0,
            max_drop_rate=top("drop_rate"), max_logit_std=top("logit_std"), incidents=runs,
        ))
    return sorted(out, key=lambda g: g.sort_key)


def _value(rows, window: int, column: str) -> float:
    hit = rows[rows["window"] == window]
    return float(hit.iloc[0][column]) if len(hit) else math.nan


def _row(dump: Dump, gate: str, window: Optional[int]):
    if window is None:
        return None
    frame = dump.windows
    hit = frame[(frame["gate"] == gate) & (frame["window"] == window)]
    return hit.iloc[0] if len(hit) else None


def expert_findings(dump: Dump, gate: str, window: Optional[int], limit: int = 3) -> List[str]:
    """The most loaded and the dead experts of ``gate`` in ``window``, against the baseline."""
    row = _row(dump, gate, window)
    if row is None:
        return ["(this window is no longer in the dump's ring)"] if window is not None else []
    share = np.asarray(row["expert_share"], dtype=float)
    counts = np.asarray(row["expert_counts"], dtype=np.int64)
    base = baseline_shares(dump.baseline, gate)
    tokens = max(int(row["tokens"]), 1)
    lines = []
    for e in np.argsort(-np.nan_to_num(share, nan=-1.0), kind="stable")[:limit]:
        if not counts[e]:
            break
        text = f"expert {e}: {share[e]:.1%} of assignments, chosen by {counts[e] / tokens:.0%} of tokens"
        if base is not None and e < base.size and math.isfinite(base[e]):
            text += f" (baseline {base[e]:.1%} of assignments)"
        lines.append(text)
    dead = np.flatnonzero(counts == 0)
    if dead.size:
        lines.append(f"dead: experts {_ranges(dead)} ({dead.size} of {counts.size}, no assignment)")
    return lines


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, values = [], sorted(int(v) for v in values)
    start = prev = None
    for v in values + [None]:
        if v is not None and prev is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = v
    return ", ".join(parts)


BASELINE_STATS = (("effective_experts", "effective experts"), ("entropy_mean", "token entropy"),
                  ("logit_std", "router-logit std"), ("top1_prob_mean", "top-1 probability"),
                  ("top_share", "top expert share of assignments"), ("drop_rate", "drop rate"))


def baseline_changes(dump: Dump, gate: str, window: Optional[int]) -> List[str]:
    """Statistics of ``gate`` in ``window`` outside the baseline's 5-95% band."""
    row = _row(dump, gate, window)
    if dump.baseline is None or row is None:
        return []
    out = []
    for stat, label in BASELINE_STATS:
        band = baseline_band(dump.baseline, gate, stat)
        value = float(row[stat])
        if band is None or not math.isfinite(value) or band[0] <= value <= band[2]:
            continue
        digits = band_digits(band[0], band[2], value)  # value, median and band equally precise
        spec = f".{digits}g"
        out.append(f"{label} {_fmt(value, spec)} (baseline median {_fmt(band[1], spec)}, "
                   f"5-95% {band_text(band[0], band[2], digits)})")
    return out


def timeline_lines(dump: Dump) -> List[str]:
    """Runs of windows with the same verdict; non-ok windows name their gates."""
    entries = sorted((e for e in dump.timeline if e.get("window") is not None), key=lambda e: e["window"])
    if not entries:
        windows = sorted(set(dump.windows["window"]))
        return [f"windows {windows[0]}-{windows[-1]}: no verdicts recorded"] if windows else ["no windows"]
    ends = dict(zip(dump.windows["window"].astype(int), dump.windows["t_end"].astype(float)))
    lines: List[str] = []
    run_start = run_end = None
    for entry in entries + [None]:
        quiet = entry is not None and entry["severity"] == "ok" and not _flagged(entry)
        if quiet and entry.get("monitoring", "ok") == "ok":
            run_start = entry["window"] if run_start is None else run_start
            run_end = entry["window"]
            continue
        if run_start is not None:
            span = str(run_start) if run_start == run_end else f"{run_start}-{run_end}"
            lines.append(f"window {span}: ok")
            run_start = None
        if entry is None:
            break
        at = f" ({clock(ends[entry['window']])})" if entry["window"] in ends else ""
        if entry.get("monitoring", "ok") != "ok" and entry["severity"] == "ok":
            state = "MONITORING FAILING" if entry["monitoring"] == "failing" else "NO DATA"
            lines.append(f"window {entry['window']}{at}: {state}  {entry.get('note', '')}".rstrip())
            continue
        detail = "; ".join(f"{name} {g['severity']}: {(g.get('reasons') or ['-'])[0]}"
                           for name, g in (entry.get("gates") or {}).items() if g.get("severity", "ok") != "ok")
        lines.append(f"window {entry['window']}{at}: {entry['severity'].upper()}" + (f"  {detail}" if detail else ""))
    if len(lines) > MAX_TIMELINE_LINES:
        hidden = len(lines) - MAX_TIMELINE_LINES
        lines = lines[:MAX_TIMELINE_LINES // 2] + [f"... {hidden} more ..."] + lines[-MAX_TIMELINE_LINES // 2:]
    return lines


def _flagged(entry: dict) -> bool:
    return any(g.get("severity", "ok") != "ok" for g in (entry.get("gates") or {}).values())


def _incident_header(n: int, incident: Incident) -> str:
    span = incident.t_end - incident.t_start
    when = (f"{clock(incident.t_start)}-{clock(incident.t_end)} UTC, {span:.0f} s"
            if math.isfinite(span) else "times not in the dump")
    return (f"    incident {n}: {incident.span} ({when}), {incident.severity}; "
            f"examined in window {incident.worst_window}:")


def summary_text(dump: Dump, plots: Sequence[str] = ()) -> str:
    """The terminal summary of a dump."""
    meta = dump.metadata
    frame = dump.windows
    out = [f"moewatch report: {dump.path}"]
    reason = meta.get("reason", "?")
    trigger = meta.get("trigger") or {}
    if trigger.get("gates"):
        reason += f" of {', '.join(trigger['gates'])} in window {trigger.get('window')}"
    out.append(f"model {meta.get('model_name', '?')!r}, written {meta.get('created', '?')} ({reason}), "
               f"schema v{meta.get('schema_version')}")
    if len(frame):
        tokens = int(frame.groupby("window")["tokens"].max().sum())
        start, end = float(frame["t_start"].min()), float(frame["t_end"].max())
        out.append(f"{frame['window'].nunique()} windows ({frame['window'].min()}-{frame['window'].max()}, "
                   f"{clock(start)}-{clock(end)} UTC, {end - start:.0f} s, ~{tokens} tokens), "
                   f"{frame['gate'].nunique()} gates, {len(dump.decisions)} sampled decisions")
    else:
        out.append("no windows in this dump")
    out.append("baseline: " + ("yes" if dump.baseline else "none (verdicts from absolute rules)"))

    out += ["", "Health timeline"] + ["  " + line for line in timeline_lines(dump)]

    gates = gate_summaries(dump)
    out += ["", "Worst gates"]
    out.append(f"  {'gate':<36} {'verdict':<9} {'from':>5} {'incid.':>6} {'eff.min':>8} {'top.max':>8} "
               f"{'dead':>5} {'drop.max':>9} {'std.max':>8}")
    for g in gates[:5]:
        out.append(f"  {g.name:<36} {g.severity:<9} {'' if g.first_bad is None else g.first_bad:>5} "
                   f"{len(g.incidents):>6} {_fmt(g.min_effective, '.2f'):>8} {_fmt(g.max_top_share, '.1%'):>8} "
                   f"{g.max_dead:>5} {_fmt(g.max_drop_rate, '.2%'):>9} {_fmt(g.max_logit_std):>8}")

    flagged = [g for g in gates if g.severity != "ok"]
    out += ["", "Worst experts (each incident in its window with the fewest effective experts; "
                "reasons from the same window)"]
    if not flagged and gates:
        g = gates[0]
        out.append(f"  no gate was flagged; {g.name} in window {g.worst_window} (fewest effective experts):")
        out += [f"    {line}" for line in expert_findings(dump, g.name, g.worst_window)]
    for g in flagged[:MAX_GATES_EXAMINED]:
        out.append(f"  {g.name}: {len(g.incidents)} incident(s), worst {g.severity}")
        for n, incident in enumerate(g.incidents[:MAX_INCIDENTS_PER_GATE], start=1):
            out.append(_incident_header(n, incident))
            out += [f"      {line}" for line in expert_findings(dump, g.name, incident.worst_window)]
            out += [f"      reason: {r}" for r in incident.reasons[:3]]
        if len(g.incidents) > MAX_INCIDENTS_PER_GATE:
            out.append(f"  ... {len(g.incidents) - MAX_INCIDENTS_PER_GATE} more incident(s) of {g.name}")

    out += ["", "Against the baseline (each incident's examined window, outside the baseline's 5-95% band)"]
    if dump.baseline is None:
        out.append("  no baseline in this dump (attach with baseline= to compare)")
    elif not flagged:
        out.append("  no gate was flagged against the baseline")
    else:
        shown = 0
        for g in flagged[:MAX_GATES_EXAMINED]:
            for n, incident in enumerate(g.incidents[:MAX_INCIDENTS_PER_GATE], start=1):
                lines = baseline_changes(dump, g.name, incident.worst_window)
                if lines:
                    out.append(f"  {g.name}, incident {n} (window {incident.worst_window}):")
                    out += [f"    {line}" for line in lines]
                    shown += 1
        if not shown:
            out.append("  no flagged window left the baseline's 5-95% band")
    if plots:
        out += ["", "Plots"] + [f"  {p}" for p in plots]
    return "\n".join(out)


def write_plots(dump: Dump, out_dir: str) -> List[str]:
    """Write the report's PNGs into ``out_dir`` (created); returns their paths."""
    from .report_plots import write_plots as write

    return write(dump, out_dir)


def report(path: str, out_dir: Optional[str] = None) -> Tuple[str, List[str]]:
    """Read a dump and return (summary text, plot paths); ``out_dir=None`` draws no plots."""
    dump = read_dump(path)
    plots = write_plots(dump, out_dir) if out_dir else []
    return summary_text(dump, plots), plots


def default_out_dir(path: str) -> str:
    """``<dump name without .parquet>-report`` in the current directory."""
    stem = os.path.basename(os.fspath(path))
    if stem.endswith(".parquet"):
        stem = stem[: -len(".parquet")]
    return f"{stem}-report"
