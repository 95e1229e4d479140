"""``moewatch report DUMP``: a terminal summary of a dump, and PNG plots.

The summary answers the postmortem questions in order: when did routing go wrong (the health
timeline), where (the worst gates), which experts (overloaded and dead ones), and what changed
against the baseline the monitor was running with. The plots show the same over time: expert
load per gate, effective experts with the baseline band, token entropy and router-logit std
against the baseline. Plotting uses matplotlib's Agg canvas directly (no pyplot, no global
backend switch), so it runs headless and leaves a host program's matplotlib state alone.
"""
from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .dump import Dump, read_dump
from .health import SEVERITIES

SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}  # unknown severities (newer dumps) rank as ok
MAX_PANELS = 16  # multi-gate figures show the worst gates only
MAX_TIMELINE_LINES = 20


@dataclass
class GateSummary:
    """How bad one gate got over the dump's windows."""

    name: str
    num_experts: int
    severity: str  # worst verdict in the timeline
    first_bad: Optional[int]  # first window not ok
    reasons: List[str]  # reasons of its worst window
    worst_window: Optional[int]  # the window with the fewest effective experts
    min_effective: float
    max_top_share: float
    max_dead: int
    max_drop_rate: float
    max_logit_std: float

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
def _timeline_by_gate(dump: Dump) -> Dict[str, List[Tuple[int, str, List[str]]]]:
    out: Dict[str, List[Tuple[int, str, List[str]]]] = {}
    for entry in dump.timeline:
        for name, gate in (entry.get("gates") or {}).items():
            out.setdefault(name, []).append((entry.get("window"), gate.get("severity", "ok"),
                                             list(gate.get("reasons") or [])))
    return out


def gate_summaries(dump: Dump) -> List[GateSummary]:
    """One summary per gate, worst first (verdict, then fewest effective experts per expert)."""
    frame = dump.windows
    bad = _timeline_by_gate(dump)
    out = []
    names = [g["name"] for g in dump.gates] or list(dict.fromkeys(frame["gate"]))
    for name in names:
        rows = frame[frame["gate"] == name]
        events = bad.get(name, [])
        severity = max((s for _, s, _ in events), key=lambda s: SEVERITY_RANK.get(s, 0), default="ok")
        worst_events = [e for e in events if e[1] == severity]
        effective = rows["effective_experts"].to_numpy(dtype=float)
        has = np.isfinite(effective)
        worst_window = int(rows["window"].to_numpy()[has][np.argmin(effective[has])]) if has.any() else None
        info = next((g for g in dump.gates if g["name"] == name), {})
        num_experts = int(info.get("num_experts") or (rows["num_experts"].iloc[0] if len(rows) else 0))

        def top(col: str) -> float:
            values = rows[col].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            return float(values.max()) if values.size else float("nan")

        out.append(GateSummary(
            name=name, num_experts=num_experts, severity=severity,
            first_bad=min((w for w, _, _ in events if w is not None), default=None),
            reasons=worst_events[-1][2] if worst_events else [],
            worst_window=worst_window,
            min_effective=float(effective[has].min()) if has.any() else float("nan"),
            max_top_share=top("top_share"), max_dead=int(rows["dead_experts"].max()) if len(rows) else 0,
            max_drop_rate=top("drop_rate"), max_logit_std=top("logit_std"),
        ))
    return sorted(out, key=lambda g: g.sort_key)


def expert_findings(dump: Dump, gate: GateSummary, limit: int = 3) -> List[str]:
    """The overloaded and dead experts of ``gate`` in its worst window, against the baseline."""
    if gate.worst_window is None:
        return []
    frame = dump.windows
    row = frame[(frame["gate"] == gate.name) & (frame["window"] == gate.worst_window)].iloc[0]
    share = np.asarray(row["expert_share"], dtype=float)
    counts = np.asarray(row["expert_counts"], dtype=np.int64)
    base = baseline_shares(dump.baseline, gate.name)
    tokens = max(int(row["tokens"]), 1)
    lines = []
    for e in np.argsort(-np.nan_to_num(share, nan=-1.0), kind="stable")[:limit]:
        if not counts[e]:
            break
        text = f"expert {e}: {share[e]:.1%} of assignments, chosen by {counts[e] / tokens:.0%} of tokens"
        if base is not None and e < base.size and math.isfinite(base[e]):
            text += f" (baseline {base[e]:.1%})"
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
                  ("top_share", "top expert share"), ("drop_rate", "drop rate"))


def baseline_changes(dump: Dump, gate: GateSummary) -> List[str]:
    """Statistics of the gate's worst window outside the baseline's 5-95% band."""
    if dump.baseline is None or gate.worst_window is None:
        return []
    frame = dump.windows
    row = frame[(frame["gate"] == gate.name) & (frame["window"] == gate.worst_window)].iloc[0]
    out = []
    for stat, label in BASELINE_STATS:
        band = baseline_band(dump.baseline, gate.name, stat)
        value = float(row[stat])
        if band is None or not math.isfinite(value) or band[0] <= value <= band[2]:
            continue
        out.append(f"{label} {_fmt(value)} (baseline median {_fmt(band[1])}, 5-95% {_fmt(band[0])}-{_fmt(band[2])})")
    return out


def timeline_lines(dump: Dump) -> List[str]:
    """Runs of windows with the same verdict; non-ok windows name their gates."""
    entries = sorted((e for e in dump.timeline if e.get("window") is not None), key=lambda e: e["window"])
    if not entries:
        windows = sorted(set(dump.windows["window"]))
        return [f"windows {windows[0]}-{windows[-1]}: no verdicts recorded"] if windows else ["no windows"]
    lines: List[str] = []
    run_start = run_end = None
    for entry in entries + [None]:
        if entry is not None and entry["severity"] == "ok" and not entry.get("gates"):
            run_start = entry["window"] if run_start is None else run_start
            run_end = entry["window"]
            continue
        if run_start is not None:
            span = str(run_start) if run_start == run_end else f"{run_start}-{run_end}"
            lines.append(f"window {span}: ok")
            run_start = None
        if entry is None:
            break
        gates = entry.get("gates") or {}
        detail = "; ".join(f"{name} {g['severity']}: {(g.get('reasons') or ['-'])[0]}" for name, g in gates.items())
        lines.append(f"window {entry['window']}: {entry['severity'].upper()}" + (f"  {detail}" if detail else ""))
    if len(lines) > MAX_TIMELINE_LINES:
        hidden = len(lines) - MAX_TIMELINE_LINES
        lines = lines[:MAX_TIMELINE_LINES // 2] + [f"... {hidden} more ..."] + lines[-MAX_TIMELINE_LINES // 2:]
    return lines


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
        span = float(frame["t_end"].max() - frame["t_start"].min())
        out.append(f"{frame['window'].nunique()} windows ({frame['window'].min()}-{frame['window'].max()}, "
                   f"{span:.0f} s, ~{tokens} tokens), {frame['gate'].nunique()} gates, "
                   f"{len(dump.decisions)} sampled decisions")
    else:
        out.append("no windows in this dump")
    out.append("baseline: " + ("yes" if dump.baseline else "none (verdicts from absolute rules)"))

    out += ["", "Health timeline"] + ["  " + line for line in timeline_lines(dump)]

    gates = gate_summaries(dump)
    out += ["", "Worst gates"]
    out.append(f"  {'gate':<36} {'verdict':<9} {'from':>5} {'eff.min':>8} {'top.max':>8} {'dead':>5} "
               f"{'drop.max':>9} {'std.max':>8}")
    for g in gates[:5]:
        out.append(f"  {g.name:<36} {g.severity:<9} {'' if g.first_bad is None else g.first_bad:>5} "
                   f"{_fmt(g.min_effective, '.2f'):>8} {_fmt(g.max_top_share, '.1%'):>8} {g.max_dead:>5} "
                   f"{_fmt(g.max_drop_rate, '.2%'):>9} {_fmt(g.max_logit_std):>8}")

    flagged = [g for g in gates if g.severity != "ok"] or gates[:1]
    out += ["", "Worst experts (in each gate's window with the fewest effective experts)"]
    for g in flagged[:5]:
        out.append(f"  {g.name} (window {g.worst_window}, {g.severity}):")
        out += [f"    {line}" for line in expert_findings(dump, g)]
        out += [f"    reason: {r}" for r in g.reasons[:3]]

    out += ["", "Against the baseline"]
    if dump.baseline is None:
        out.append("  no baseline in this dump (attach with baseline= to compare)")
    else:
        # the flagged gates' worst windows, statistic by statistic, outside the baseline's band
        changed = [(g, baseline_changes(dump, g)) for g in gates if g.severity != "ok"]
        changed = [(g, c) for g, c in changed if c]
        if not changed:
            out.append("  no flagged gate left the baseline's 5-95% band" if any(g.severity != "ok" for g in gates)
                       else "  no gate was flagged against the baseline")
        for g, lines in changed[:8]:
            out.append(f"  {g.name} (window {g.worst_window}):")
            out += [f"    {line}" for line in lines]
    if plots:
        out += ["", "Plots"] + [f"  {p}" for p in plots]
    return "\n".join(out)


# -- plots ----------------------------------------------------------------------------------
_SLUG = frozenset(string.ascii_letters + string.digits + "._-")


def _slug(name: str) -> str:
    return "".join(ch if ch in _SLUG else "_" for ch in name).strip("._") or "gate"


def _severity_marks(dump: Dump, gate: str) -> Dict[int, str]:
    return {w: s for w, s, _ in _timeline_by_gate(dump).get(gate, []) if w is not None and s != "ok"}


_MARK_COLORS = {"drift": "#e69f00", "collapse": "#cc0000"}


def _save(fig, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def plot_load_heatmap(dump: Dump, gate: str, path: str) -> str:
    """Share of assignments per expert (rows) and window (columns) for one gate."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = dump.windows[dump.windows["gate"] == gate].sort_values("window")
    windows = rows["window"].to_numpy()
    share = np.stack([np.asarray(s, dtype=float) for s in rows["expert_share"]]).T  # [E, W]
    fig = Figure(figsize=(min(4 + 0.15 * len(windows), 16), min(2 + 0.25 * share.shape[0], 12)))
    ax = fig.add_subplot()
    image = ax.imshow(share, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                      vmin=0.0, vmax=max(float(np.nanmax(share)) if np.isfinite(share).any() else 1.0, 1e-9),
                      extent=(windows[0] - 0.5, windows[-1] + 0.5, -0.5, share.shape[0] - 0.5))
    fig.colorbar(image, ax=ax, label="share of assignments")
    for window, severity in _severity_marks(dump, gate).items():  # a marker above the column
        ax.plot([window], [share.shape[0] - 0.5], marker="v", markersize=8, clip_on=False,
                color=_MARK_COLORS.get(severity, "red"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("window (marks: orange drift, red collapse)")
    ax.set_ylabel("expert")
    ax.set_title(f"expert load: {gate}")
    fig.tight_layout()
    return _save(fig, path)


def _panel(ax, dump: Dump, gate: str, stat: str, label: str) -> None:
    rows = dump.windows[dump.windows["gate"] == gate].sort_values("window")
    ax.plot(rows["window"], rows[stat], marker="o", markersize=3, linewidth=1.2, label="windows")
    band = baseline_band(dump.baseline, gate, stat)
    if band is not None:
        ax.axhspan(band[0], band[2], color="#009e73", alpha=0.2, label="baseline 5-95%")
        ax.axhline(band[1], color="#009e73", linestyle="--", linewidth=1.0, label="baseline median")
    for window, severity in _severity_marks(dump, gate).items():
        ax.axvline(window, color=_MARK_COLORS.get(severity, "red"), linewidth=0.8, alpha=0.6)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{gate}", fontsize=8)
    ax.set_ylabel(label, fontsize=8)
    ax.tick_params(labelsize=7)


def plot_stats(dump: Dump, gates: Sequence[str], stats: Sequence[Tuple[str, str]], path: str) -> str:
    """One row of panels per gate, one column per statistic, with the baseline band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(stats), 2.2 * len(gates) + 0.6))
    axes = fig.subplots(len(gates), len(stats), squeeze=False)
    for r, gate in enumerate(gates):
        for c, (stat, label) in enumerate(stats):
            _panel(axes[r][c], dump, gate, stat, label)
    axes[0][0].legend(fontsize=7, loc="best")
    for c in range(len(stats)):
        axes[-1][c].set_xlabel("window")
    fig.tight_layout()
    return _save(fig, path)


def write_plots(dump: Dump, out_dir: str) -> List[str]:
    """Write the report's PNGs into ``out_dir`` (created); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    if dump.windows.empty:
        return []
    ranked = [g.name for g in gate_summaries(dump)]
    paths = [plot_load_heatmap(dump, gate, os.path.join(out_dir, f"load_{_slug(gate)}.png")) for gate in ranked]
    shown = ranked[:MAX_PANELS]
    paths.append(plot_stats(dump, shown, [("effective_experts", "effective experts")],
                            os.path.join(out_dir, "effective_experts.png")))
    paths.append(plot_stats(dump, shown, [("entropy_mean", "token entropy (nats)"), ("logit_std", "router-logit std")],
                            os.path.join(out_dir, "entropy_logit_std.png")))
    return paths


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

