"""The PNG plots of ``moewatch report``: expert load per gate, effective experts, entropy and
router-logit std, each against the baseline, over time.

The x axis is the windows' own clock (UTC), so an incident lines up with logs and the times the
summary prints; each window spans its real duration. Incidents (runs of windows a gate was not
ok in) are shaded in the severity's colour and named in the legend, as are the baseline band
and median. A band too narrow to see (a statistic the baseline barely varied) is drawn at a
minimum height around its median, so it never vanishes. Plotting uses matplotlib's Agg canvas
directly (no pyplot, no global backend switch): headless, and a host program's matplotlib state
is left alone.
"""
from __future__ import annotations

import datetime as _dt
import os
import string
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .dump import Dump
from .report import MAX_PANELS, baseline_band, gate_summaries, incidents

SEVERITY_COLORS = {"drift": "#e69f00", "collapse": "#cc0000"}
BAND_COLOR = "#009e73"
MIN_BAND_FRACTION = 0.03  # a band is drawn at least this fraction of the panel's height
_SLUG = frozenset(string.ascii_letters + string.digits + "._-")


def _slug(name: str) -> str:
    return "".join(ch if ch in _SLUG else "_" for ch in name).strip("._") or "gate"


def _dates(seconds) -> np.ndarray:
    """Unix seconds -> matplotlib date numbers (days), UTC."""
    from matplotlib import dates

    return dates.date2num([_dt.datetime.fromtimestamp(float(t), _dt.timezone.utc) for t in seconds])


def _time_axis(ax) -> None:
    from matplotlib import dates

    locator = dates.AutoDateLocator(minticks=3, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator, tz=_dt.timezone.utc))
    ax.xaxis.get_offset_text().set_fontsize(7)  # the date, once per axis


def _incident_spans(dump: Dump, gate: str) -> List[Tuple[float, float, str]]:
    """(start, end, severity) in date numbers for each incident of ``gate``."""
    out = []
    for incident in incidents(dump, gate):
        if np.isfinite(incident.t_start) and np.isfinite(incident.t_end):
            start, end = _dates([incident.t_start, incident.t_end])
            out.append((start, end, incident.severity))
    return out


def _severity_handles(severities, alpha: float = 0.35) -> list:
    from matplotlib.patches import Patch

    return [Patch(facecolor=SEVERITY_COLORS.get(s, "red"), alpha=alpha, label=f"{s} (incident)")
            for s in ("drift", "collapse") if s in severities]


def _save(fig, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def load_figure(dump: Dump, gate: str):
    """Share of assignments per expert (rows) over time (columns: each window its duration)."""
    from matplotlib.figure import Figure

    rows = dump.windows[dump.windows["gate"] == gate].sort_values("window")
    share = np.stack([np.asarray(s, dtype=float) for s in rows["expert_share"]]).T  # [E, W]
    # column edges: the first window's start, then each window's end (windows are contiguous)
    edges = _dates(np.concatenate([rows["t_start"].to_numpy(dtype=float)[:1], rows["t_end"].to_numpy(dtype=float)]))
    fig = Figure(figsize=(min(5 + 0.15 * share.shape[1], 16), min(2.6 + 0.25 * share.shape[0], 12)))
    ax = fig.add_subplot()
    top = max(float(np.nanmax(share)) if np.isfinite(share).any() else 1.0, 1e-9)
    mesh = ax.pcolormesh(edges, np.arange(share.shape[0] + 1) - 0.5, np.ma.masked_invalid(share),
                         cmap="viridis", vmin=0.0, vmax=top, shading="flat")
    fig.colorbar(mesh, ax=ax, label="share of assignments")
    spans = _incident_spans(dump, gate)
    for start, end, severity in spans:  # a bar above the columns of each incident
        ax.axvspan(start, end, ymin=1.0, ymax=1.04, color=SEVERITY_COLORS.get(severity, "red"), clip_on=False)
    _time_axis(ax)
    ax.set_ylim(-0.5, share.shape[0] - 0.5)
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("expert")
    ax.set_title(f"expert load: {gate}", pad=14)
    handles = _severity_handles({s for _, _, s in spans}, alpha=1.0)  # as solid as the bars
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.18, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _band(ax, band, values: np.ndarray) -> None:
    """The baseline's 5-95% band and median; a band thinner than MIN_BAND_FRACTION of the
    panel's data range is widened around its median to that height (so it stays visible)."""
    lo, median, hi = band
    finite = values[np.isfinite(values)]
    extent = np.concatenate([finite, [lo, hi, median]])
    span = float(extent.max() - extent.min()) or max(abs(median), 1.0)
    least = MIN_BAND_FRACTION * span
    if hi - lo < least:
        lo, hi = median - least / 2, median + least / 2
    ax.axhspan(lo, hi, color=BAND_COLOR, alpha=0.25, label="baseline 5-95%")
    ax.axhline(median, color=BAND_COLOR, linestyle="--", linewidth=1.0, label="baseline median")


def _panel(ax, dump: Dump, gate: str, stat: str, label: str) -> set:
    rows = dump.windows[dump.windows["gate"] == gate].sort_values("window")
    x = _dates(rows["t_end"].to_numpy(dtype=float))
    values = rows[stat].to_numpy(dtype=float)
    ax.plot(x, values, marker="o", markersize=3, linewidth=1.2, label="window (at its end)", zorder=3)
    band = baseline_band(dump.baseline, gate, stat)
    if band is not None:
        _band(ax, band, values)
    severities = set()
    for start, end, severity in _incident_spans(dump, gate):
        ax.axvspan(start, end, color=SEVERITY_COLORS.get(severity, "red"), alpha=0.15, zorder=0)
        severities.add(severity)
    _time_axis(ax)
    ax.set_title(gate, fontsize=8)
    ax.set_ylabel(label, fontsize=8)
    ax.tick_params(labelsize=7)
    return severities


def stats_figure(dump: Dump, gates: Sequence[str], stats: Sequence[Tuple[str, str]]):
    """One row of panels per gate, one column per statistic; one legend for the figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8 * len(stats), 2.3 * len(gates) + 1.1))
    axes = fig.subplots(len(gates), len(stats), squeeze=False)
    severities = set()
    for r, gate in enumerate(gates):
        for c, (stat, label) in enumerate(stats):
            severities |= _panel(axes[r][c], dump, gate, stat, label)
    for c in range(len(stats)):
        axes[-1][c].set_xlabel("time (UTC)", fontsize=8)
    handles: Dict[str, object] = {}
    for ax in axes.flat:  # each label once: windows, baseline band and median
        for handle, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, handle)
    for handle in _severity_handles(severities):
        handles[handle.get_label()] = handle
    ncol = min(len(handles), 2 * len(stats) + 1)  # what fits across the figure
    legend_rows = -(-len(handles) // ncol)
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.15 + 0.25 * legend_rows) / fig.get_figheight()))
    return fig


def write_plots(dump: Dump, out_dir: str) -> List[str]:
    """Write the report's PNGs into ``out_dir`` (created); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    if dump.windows.empty:
        return []
    ranked = [g.name for g in gate_summaries(dump)]
    paths = [_save(load_figure(dump, gate), os.path.join(out_dir, f"load_{_slug(gate)}.png")) for gate in ranked]
    shown = ranked[:MAX_PANELS]
    paths.append(_save(stats_figure(dump, shown, [("effective_experts", "effective experts")]),
                       os.path.join(out_dir, "effective_experts.png")))
    paths.append(_save(stats_figure(dump, shown, [("entropy_mean", "token entropy (nats)"),
                                                  ("logit_std", "router-logit std")]),
                       os.path.join(out_dir, "entropy_logit_std.png")))
    return paths
