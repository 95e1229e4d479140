"""Baselines: a profile of healthy routing that the detector compares live windows against.

A :class:`Baseline` holds, per gate, the per-window values the detector calibrates on (token
and assignment counts, expert counts, entropy, logit std, top-1 probability, drops, non-finite
logits) and a summary a person can read (expert shares and their between-window dispersion,
quantiles of each statistic). It is saved as versioned, indented JSON.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

FORMAT = "moewatch-baseline"
VERSION = 1
MIN_WINDOWS = 8  # fewer windows than this cannot calibrate a false-alarm rate
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
# Per-window series kept for calibration (columns of Monitor.windows()).
SERIES = ("tokens", "assignments", "dropped", "entropy_mean", "logit_std", "top1_prob_mean",
          "nonfinite_logits")
# ... and those a baseline may lack (recorded before moewatch kept them, or where they are not
# known: null per window). "requests": how many requests a window's tokens are worth (Window.requests).
OPTIONAL_SERIES = ("requests",)
SUMMARY_STATS = ("entropy_mean", "logit_std", "top1_prob_mean", "drop_rate", "effective_experts",
                 "top_share")


def requests_counted(requests: Optional[np.ndarray]) -> bool:
    """Whether a per-window ``requests`` series was counted in every window (none missing, none
    zero): only then does the detector weigh windows by their requests."""
    return requests is not None and bool(np.isfinite(requests).all() and (requests > 0).all())


class BaselineError(ValueError):
    """A baseline file that cannot be read, or that does not fit the model it is used with."""


@dataclass
class GateBaseline:
    """Healthy routing of one gate: its per-window series ([W] each, counts [W, E])."""

    name: str
    num_experts: int
    top_k: int
    family: str
    series: Dict[str, np.ndarray]
    expert_counts: np.ndarray  # int64 [W, E]

    @property
    def windows(self) -> int:
        return int(self.expert_counts.shape[0])

    @property
    def requests_known(self) -> bool:
        """Whether every window's requests were counted (``Window.requests``): baselines written
        before moewatch kept them, or recorded where they were not known, lack them."""
        return requests_counted(self.series.get("requests"))

    def frame(self) -> pd.DataFrame:
        """The per-window series as a DataFrame (one row per baseline window)."""
        out = pd.DataFrame({k: v for k, v in self.series.items()})
        shares = self.expert_counts / np.maximum(self.expert_counts.sum(1, keepdims=True), 1)
        out["drop_rate"] = self.series["dropped"] / np.maximum(self.series["assignments"], 1)
        entropy = -np.where(shares > 0, shares * np.log(np.where(shares > 0, shares, 1)), 0).sum(1)
        out["effective_experts"] = np.exp(entropy)
        out["top_share"] = shares.max(1)
        return out

    def summary(self) -> dict:
        """Expert shares, their between-window dispersion, and quantiles of each statistic."""
        counts = self.expert_counts
        total = counts.sum()
        shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        frame = self.frame()
        quantiles = {}
        for stat in SUMMARY_STATS:
            values = frame[stat].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            quantiles[stat] = ({f"q{round(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES}
                               if values.size else {})
        return {
            "tokens_total": int(self.series["tokens"].sum()),
            "tokens_per_window_median": float(np.median(self.series["tokens"])),
            "expert_share": (counts.sum(0) / total).tolist() if total else [0.0] * self.num_experts,
            "expert_share_std": shares.std(0, ddof=1).tolist() if self.windows > 1 else [0.0] * self.num_experts,
            "quantiles": quantiles,
        }


@dataclass
class Baseline:
    """Healthy routing of every gate of a model, recorded from training or evaluation traffic.

    Build one with ``mon.baseline()`` or :meth:`from_frame`, keep it with :meth:`save`, and
    pass it (or its path) to ``moewatch.attach(model, baseline=...)``.
    """

    gates: Dict[str, GateBaseline]
    model_name: str = ""
    created: str = ""
    meta: dict = field(default_factory=dict)

    # -- building --------------------------------------------------------------------------
    @classmethod
    def from_frame(cls, frame: pd.DataFrame, model_name: str = "") -> "Baseline":
        """A baseline from a windows frame (``mon.windows()``, or a dump read with pandas).

        Windows in which a gate saw no tokens are left out for that gate. Every gate needs at
        least ``MIN_WINDOWS`` windows with traffic.
        """
        missing = [c for c in ("window", "gate", "num_experts", "top_k", "expert_counts", *SERIES)
                   if c not in frame.columns]
        if missing:
            raise BaselineError(f"the windows frame lacks column(s) {missing}; expected the columns "
                                "of Monitor.windows()")
        if frame.empty:
            raise BaselineError("no windows to build a baseline from: run traffic through the model first")
        from .baseline_file import _Invalid, check_shape

        order = list(dict.fromkeys(frame["gate"]))  # gate order as first seen (model order)
        groups = dict(tuple(frame.groupby("gate", sort=False)))
        picked = {}
        for name in order:
            every = groups[name]
            rows = every[every["tokens"] > 0].sort_values("window")
            if len(rows) < MIN_WINDOWS:
                raise BaselineError(
                    f"gate {name!r} has {len(rows)} window(s) with traffic; a baseline needs at least "
                    f"{MIN_WINDOWS} (run more traffic, or lower window_tokens)")
            picked[name] = (rows, int(every.iloc[0]["num_experts"]))
        try:  # the limits a file must meet to be read back, checked before the arrays are built
            check_shape(len(order), [len(r) for r, _ in picked.values()], [e for _, e in picked.values()],
                        MIN_WINDOWS)
        except _Invalid as bad:
            raise BaselineError(f"cannot build a baseline: {bad.where}: {bad.what}") from None
        gates: Dict[str, GateBaseline] = {}
        for name, (rows, e) in picked.items():
            first = rows.iloc[0]
            counts = np.stack([np.asarray(c, dtype=np.int64)[:e] for c in rows["expert_counts"]])
            series = {s: rows[s].to_numpy(dtype=float) for s in SERIES}
            series.update({s: rows[s].to_numpy(dtype=float) for s in OPTIONAL_SERIES if s in rows.columns})
            gates[name] = GateBaseline(name=name, num_experts=e, top_k=int(first["top_k"]),
                                       family=str(first.get("family", "")), series=series,
                                       expert_counts=counts)
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return cls(gates=gates, model_name=model_name, created=created)

    @classmethod
    def from_monitor(cls, monitor) -> "Baseline":
        """A baseline from the windows a monitor holds (what ``mon.baseline()`` returns)."""
        return cls.from_frame(monitor.windows(), model_name=monitor.model_name)

    def only(self, names: Sequence[str]) -> "Baseline":
        """This baseline for the gates ``names`` alone (those it has): where a process runs part
        of the model (a pipeline stage), the whole model's baseline serves for its part."""
        kept = {name: self.gates[name] for name in names if name in self.gates}
        return Baseline(gates=kept, model_name=self.model_name, created=self.created, meta=dict(self.meta))

    @classmethod
    def merged(cls, parts: Sequence["Baseline"]) -> "Baseline":
        """One baseline of the gates of ``parts`` (baselines of one model's disjoint parts, e.g.
        each pipeline stage's). Raises :class:`BaselineError` where a gate is in two parts or
        the parts name different models."""
        names = sorted({part.model_name for part in parts if part.model_name})
        if len(names) > 1:
            raise BaselineError(f"the baselines are of different models ({', '.join(map(repr, names))}): "
                                "merge only the parts of one model")
        gates: Dict[str, GateBaseline] = {}
        for part in parts:
            for name, gate in part.gates.items():
                if name in gates:
                    raise BaselineError(f"gate {name!r} is in more than one of the baselines merged: "
                                        "merge the parts of one model, each gate from one part")
                gates[name] = gate
        first = parts[0]
        return cls(gates=gates, model_name=names[0] if names else "", created=first.created,
                   meta=dict(first.meta, merged_from=len(parts)))

    # -- checking --------------------------------------------------------------------------
    def check_gates(self, gates: Sequence) -> None:
        """Raise :class:`BaselineError` naming every difference with the monitored ``gates``."""
        have = {g.name: g for g in gates}
        problems: List[str] = []
        only_model = [n for n in have if n not in self.gates]
        only_base = [n for n in self.gates if n not in have]
        if only_model:
            problems.append(f"gates in the model but not in the baseline: {_names(only_model)}")
        if only_base:
            problems.append(f"gates in the baseline but not in the model: {_names(only_base)}")
        for name, gate in have.items():
            base = self.gates.get(name)
            if base is None:
                continue
            if base.num_experts != gate.num_experts:
                problems.append(f"gate {name!r} has {gate.num_experts} experts, the baseline {base.num_experts}")
            if base.top_k != gate.top_k:
                problems.append(f"gate {name!r} routes top-{gate.top_k}, the baseline top-{base.top_k}")
        if problems:
            source = f" (recorded on {self.model_name!r})" if self.model_name else ""
            raise BaselineError("baseline does not match the model" + source + ": " + "; ".join(problems))

    # -- files -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        gates = []
        for g in self.gates.values():
            gates.append({
                "name": g.name, "num_experts": g.num_experts, "top_k": g.top_k, "family": g.family,
                "windows": g.windows,
                "summary": g.summary(),
                "per_window": {**{s: _plain(g.series[s]) for s in SERIES + OPTIONAL_SERIES if s in g.series},
                               "expert_counts": [row.tolist() for row in g.expert_counts]},
            })
        from . import __version__
        return {"format": FORMAT, "version": VERSION, "moewatch": __version__, "created": self.created,
                "model_name": self.model_name, "meta": self.meta, "gates": gates}

    def save(self, path: "str | os.PathLike") -> None:
        """Write the baseline as versioned, indented JSON, atomically: an exclusive temporary
        file beside ``path`` (never through a planted link), fsynced, then renamed over it."""
        from .baseline_file import write

        write(path, _dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict, source: str = "baseline") -> "Baseline":
        """A baseline from the parsed JSON of a file; every field is checked (BaselineError)."""
        from .baseline_file import from_tree

        return from_tree(data, source)

    @classmethod
    def load(cls, path: "str | os.PathLike") -> "Baseline":
        """Read a baseline written by :meth:`save`.

        The file is read within limits (size, gates, experts, windows: see docs/reliability.md)
        and every field is checked; anything wrong raises :class:`BaselineError` naming the file
        and the field.
        """
        from .baseline_file import read
        from .filekind import refuse_dump_as_baseline

        try:
            return read(path)
        except BaselineError:
            if os.path.isfile(path):  # a regular file only: never open a FIFO or a device again
                refuse_dump_as_baseline(path)  # a Parquet dump passed for a baseline: say so, and what to do
            raise

    def __repr__(self) -> str:
        windows = min((g.windows for g in self.gates.values()), default=0)
        return f"<moewatch.Baseline {self.model_name!r}: {len(self.gates)} gates, {windows} windows>"


def as_baseline(value) -> Optional[Baseline]:
    """``attach(baseline=...)`` accepts a Baseline, a path to one, or None.

    A path is read with :meth:`Baseline.load`; a Baseline built in code is held to the same
    rules (limits, enough windows, assignments in every window). Both raise BaselineError.
    """
    if value is None:
        return None
    if isinstance(value, Baseline):
        from .baseline_file import check

        check(value)
        return value
    if isinstance(value, (str, os.PathLike)):
        return Baseline.load(value)
    raise TypeError(f"baseline= must be a moewatch.Baseline or a path, got {type(value).__name__}")


def _names(names: List[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _plain(values: np.ndarray) -> list:
    """Floats that JSON can hold (NaN -> null); whole numbers as ints."""
    out = []
    for v in values.tolist():
        if isinstance(v, float) and not math.isfinite(v):
            out.append(None)
        elif isinstance(v, float) and v.is_integer() and abs(v) < 2 ** 53:
            out.append(int(v))
        else:
            out.append(v)
    return out


_NUMBER_LIST = re.compile(r"\[\s*(?:[-0-9.eE+]+|null)(?:\s*,\s*(?:[-0-9.eE+]+|null))*\s*\]")


def _dumps(data: dict) -> str:
    """Indented JSON with each list of numbers kept on one line, so the file stays readable."""
    text = json.dumps(data, indent=2, allow_nan=False)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(p.strip() for p in m.group(0)[1:-1].split(",")) + "]",
                            text) + "\n"
