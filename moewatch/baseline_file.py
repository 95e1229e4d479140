"""Baseline files: read within limits, check every field, write atomically.

A baseline may come from another machine, so reading one never trusts it: the file's size and
shape are checked before anything proportional to them is allocated (:mod:`moewatch.boundedjson`),
then every field the detector relies on is checked, and anything wrong is a
:class:`~moewatch.baseline.BaselineError` naming the file and the field -- never a ``TypeError``,
``OverflowError``, ``RecursionError`` or ``MemoryError``, and never a baseline the detector would
then misuse (too few windows, no assignment at all).

The limits (``docs/reliability.md`` lists them) fit the largest models with room to spare:
a 60-layer, 256-expert model with 512 windows per gate is 7.9 M of the 8.4 M window-expert counts.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from . import boundedjson
from .atomicfile import write_atomic

MAX_FILE_BYTES = 64 * 2 ** 20  # 64 MiB
MAX_GATES = 1024
MAX_EXPERTS = 4096  # per gate
MAX_WINDOWS = 4096  # per gate (the detector's calibration cost grows with it)
MAX_TOTAL_WINDOWS = 262_144  # windows of all gates together
MAX_CELLS = 8 * 2 ** 20  # window x expert counts of all gates together (64 MiB as int64)
MAX_COUNT = 2 ** 53  # counts are whole numbers below this (exact in float64)

# What the parser may see in a file within the limits above, with slack for meta and summaries.
JSON_LIMITS = boundedjson.JsonLimits(
    max_bytes=MAX_FILE_BYTES,
    max_numbers=MAX_CELLS + 8 * MAX_TOTAL_WINDOWS + MAX_CELLS // 4 + 65_536,
    max_lists=MAX_TOTAL_WINDOWS + 16 * MAX_GATES + 65_536,
    max_list=max(MAX_EXPERTS, MAX_WINDOWS),  # a row of counts, a series, a summary
    max_tokens=256 * MAX_GATES + 65_536,
    max_skeleton=16 * 2 ** 20,
    max_depth=32,
)

def _arrays(path: tuple) -> bool:
    return path[:1] != ("meta",)  # meta is the user's: read back exactly as written


INTEGER_SERIES = ("tokens", "assignments", "dropped", "nonfinite_logits")


class _Invalid(Exception):
    """A field that is wrong: (where, what)."""

    def __init__(self, where: str, what: str):
        super().__init__(where, what)
        self.where, self.what = where, what


MISSING = "is missing: the file is corrupt or was not written by moewatch"


def _show(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "a number out of range" if value == value else "NaN"
    text = repr(value) if not isinstance(value, (list, dict, np.ndarray)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _whole(value: Any, where: str, low: int, high: int) -> int:
    """An integer field (a JSON int, or a float with a whole value) in [low, high]."""
    if value is None:
        raise _Invalid(where, MISSING)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(where, f"must be a whole number from {low} to {high}, got {_show(value)}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise _Invalid(where, f"must be a whole number from {low} to {high}, got {_show(value)}")
    if not low <= value <= high:
        raise _Invalid(where, f"must be a whole number from {low} to {high}, got {_show(value)}")
    return int(value)


def _text(value: Any, where: str, default: str = "", required: bool = False) -> str:
    if value is None and not required:
        return default
    if value is None:
        raise _Invalid(where, MISSING)
    if not isinstance(value, str) or (required and not value):
        raise _Invalid(where, f"must be {'a non-empty' if required else 'a'} string, got {_show(value)}")
    return value


def _vector(value: Any, where: str, length: Optional[int] = None) -> np.ndarray:
    """A flat list of numbers (null is NaN) as float64, its length checked before converting."""
    if value is None:
        raise _Invalid(where, MISSING)
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise _Invalid(where, "must be a list of numbers")
        out = value.astype(np.float64, copy=False)
    elif isinstance(value, list):
        if length is not None and len(value) != length:
            raise _Invalid(where, f"has {len(value)} values, expected {length}")
        if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in value):
            raise _Invalid(where, "must be a list of numbers")
        try:
            out = np.array([math.nan if v is None else v for v in value], dtype=np.float64)
        except OverflowError:
            raise _Invalid(where, "holds a number out of range") from None
    else:
        raise _Invalid(where, f"must be a list of numbers, got {_show(value)}")
    if length is not None and out.shape[0] != length:
        raise _Invalid(where, f"has {out.shape[0]} values, expected {length}")
    return out


def _counts(values: np.ndarray, where: str, minimum: int = 0) -> np.ndarray:
    """Whole numbers in [minimum, MAX_COUNT) as int64."""
    bad = ~(np.isfinite(values) & (values >= minimum) & (values < MAX_COUNT) & (values == np.floor(values)))
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(-1))[0])
        raise _Invalid(where, f"must hold whole numbers from {minimum} to 2**53, found "
                              f"{_show(float(values.reshape(-1)[first]))} (value {first})")
    return values.astype(np.int64)


class _Budget:
    """Running totals over gates, checked before each gate's arrays are built."""

    def __init__(self):
        self.windows = 0
        self.cells = 0

    def take(self, windows: int, experts: int, where: str) -> None:
        self.windows += windows
        self.cells += windows * experts
        if self.windows > MAX_TOTAL_WINDOWS:
            raise _Invalid(where, f"the gates hold more than {MAX_TOTAL_WINDOWS:,} windows in all (the limit)")
        if self.cells > MAX_CELLS:
            raise _Invalid(where, f"the gates hold more than {MAX_CELLS:,} window x expert counts in all "
                                  "(the limit): record fewer windows")


def check_shape(gates: int, windows: Sequence[int], experts: Sequence[int], min_windows: int) -> None:
    """Raise ``_Invalid`` when a baseline of this shape is past a limit (before building it)."""
    if not 1 <= gates <= MAX_GATES:
        raise _Invalid("gates", f"must hold 1 to {MAX_GATES} gates, got {gates}")
    budget = _Budget()
    for i, (w, e) in enumerate(zip(windows, experts)):
        where = f"gates[{i}]"
        if not 1 <= e <= MAX_EXPERTS:
            raise _Invalid(where + ".num_experts", f"must be from 1 to {MAX_EXPERTS}, got {e}")
        if w > MAX_WINDOWS:
            raise _Invalid(where, f"has {w:,} windows; a baseline keeps at most {MAX_WINDOWS:,} per gate")
        if w < min_windows:
            raise _Invalid(where, f"has {w} window(s); a baseline needs at least {min_windows}")
        budget.take(w, e, where)


def _gate(entry: Any, i: int, budget: _Budget, min_windows: int, series_names: Sequence[str],
          optional: Sequence[str] = ()):
    from .baseline import GateBaseline

    where = f"gates[{i}]"
    if not isinstance(entry, dict):
        raise _Invalid(where, f"must be an object, got {_show(entry)}")
    name = _text(entry.get("name"), where + ".name", required=True)
    where = f"gate {name!r}"
    experts = _whole(entry.get("num_experts"), where + ": num_experts", 1, MAX_EXPERTS)
    top_k = _whole(entry.get("top_k"), where + ": top_k", 1, experts)
    family = _text(entry.get("family"), where + ": family")
    per = entry.get("per_window")
    if per is None:
        raise _Invalid(where + ": per_window", MISSING)
    if not isinstance(per, dict):
        raise _Invalid(where + ": per_window", f"must be an object, got {_show(per)}")
    rows = per.get("expert_counts")
    if isinstance(rows, np.ndarray) and rows.size == 0:
        rows = []  # an empty list reads as an empty array
    if rows is None:
        raise _Invalid(where + ": per_window.expert_counts", MISSING)
    if not isinstance(rows, list):
        raise _Invalid(where + ": per_window.expert_counts", f"must be a list of lists, got {_show(rows)}")
    w = len(rows)
    if w < min_windows:
        raise _Invalid(where + ": per_window.expert_counts",
                       f"has {w} window(s); a baseline needs at least {min_windows} (record more traffic)")
    if w > MAX_WINDOWS:
        raise _Invalid(where + ": per_window.expert_counts",
                       f"has {w:,} windows; a baseline keeps at most {MAX_WINDOWS:,} per gate")
    if "windows" in entry and _whole(entry["windows"], where + ": windows", 0, MAX_WINDOWS) != w:
        raise _Invalid(where + ": windows", f"says {entry['windows']}, but per_window holds {w}")
    budget.take(w, experts, where)  # before the [W, E] matrix exists
    matrix = np.empty((w, experts), dtype=np.float64)
    for j, row in enumerate(rows):
        matrix[j] = _vector(row, f"{where}: per_window.expert_counts[{j}]", experts)
    counts = _counts(matrix, where + ": per_window.expert_counts")
    empty = np.flatnonzero(counts.sum(1) == 0)
    if empty.size:
        raise _Invalid(where + ": per_window.expert_counts",
                       f"window {int(empty[0])} has no expert assignment ({empty.size} such window(s)); "
                       "a baseline holds only windows with traffic")
    series: Dict[str, np.ndarray] = {}
    for s in list(series_names) + [s for s in optional if per.get(s) is not None]:
        values = _vector(per.get(s), f"{where}: per_window.{s}", w)
        if s in INTEGER_SERIES:
            values = _counts(values, f"{where}: per_window.{s}", minimum=1 if s == "tokens" else 0).astype(np.float64)
        elif (values[np.isfinite(values)] < 0).any() or np.isinf(values).any():
            raise _Invalid(f"{where}: per_window.{s}", "must hold non-negative finite numbers (or null)")
        series[s] = values
    return GateBaseline(name=name, num_experts=experts, top_k=top_k, family=family, series=series,
                        expert_counts=counts)


def from_tree(data: Any, source: str):
    """A :class:`~moewatch.baseline.Baseline` from a parsed file; raises BaselineError."""
    from .baseline import FORMAT, MIN_WINDOWS, OPTIONAL_SERIES, SERIES, VERSION, Baseline, BaselineError

    # type checks first: any value may be an array here (a list of numbers reads as one)
    if not isinstance(data, dict) or not isinstance(data.get("format"), str) or data["format"] != FORMAT:
        raise BaselineError(f"{source} is not a moewatch baseline (no \"format\": \"{FORMAT}\")")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version != VERSION:
        raise BaselineError(f"{source} is baseline format version {_show(version)}; this moewatch "
                            f"reads version {VERSION} (rebuild it with this version)")
    try:
        model_name = _text(data.get("model_name"), "model_name")
        created = _text(data.get("created"), "created")
        meta = data.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise _Invalid("meta", f"must be an object, got {_show(meta)}")
        entries = data.get("gates")
        if not isinstance(entries, list) or not entries:
            raise _Invalid("gates", "must be a non-empty list of gates")
        if len(entries) > MAX_GATES:
            raise _Invalid("gates", f"holds {len(entries):,} gates; the limit is {MAX_GATES:,}")
        budget = _Budget()
        gates: Dict[str, Any] = {}
        for i, entry in enumerate(entries):
            gate = _gate(entry, i, budget, MIN_WINDOWS, SERIES, OPTIONAL_SERIES)
            if gate.name in gates:
                raise _Invalid(f"gates[{i}].name", f"gate {gate.name!r} appears twice")
            gates[gate.name] = gate
    except _Invalid as bad:
        raise BaselineError(f"{source}: {bad.where}: {bad.what}") from None
    return Baseline(gates=gates, model_name=model_name, created=created, meta=dict(meta or {}))


def read(path: "str | os.PathLike"):
    """Read and check a baseline file; every problem is a BaselineError naming the file."""
    from .baseline import BaselineError

    source = os.fspath(path)
    try:
        data = boundedjson.load(path, JSON_LIMITS, arrays=_arrays)
    except FileNotFoundError:
        raise BaselineError(f"baseline file {source!r} does not exist: pass the path of a file "
                            "written by Baseline.save() or `moewatch baseline build`") from None
    except IsADirectoryError:
        raise BaselineError(f"baseline {source!r} is a directory: pass the path of a baseline "
                            "file written by Baseline.save()") from None
    except PermissionError as error:
        raise BaselineError(f"baseline {source!r} cannot be read: {error.strerror}") from None
    except boundedjson.JsonLimitError as error:
        raise BaselineError(f"{source} is refused: {error} (baseline limits: docs/reliability.md)") from None
    except UnicodeDecodeError:
        raise BaselineError(f"{source} is corrupt: not UTF-8 text") from None
    except (ValueError, RecursionError) as error:  # json.JSONDecodeError is a ValueError
        raise BaselineError(f"{source} is corrupt: not valid JSON ({error})") from None
    except OSError as error:
        raise BaselineError(f"baseline {source!r} cannot be read: {error}") from None
    return from_tree(data, source)


def check(baseline, source: str = "baseline") -> None:
    """Check a Baseline object (built in code, not read) against the same limits and rules."""
    from .baseline import MIN_WINDOWS, Baseline, BaselineError

    if not isinstance(baseline, Baseline):
        raise TypeError(f"baseline= must be a moewatch.Baseline or a path, got {type(baseline).__name__}")
    try:
        gates = list(baseline.gates.values())
        check_shape(len(gates), [g.windows for g in gates], [g.num_experts for g in gates], MIN_WINDOWS)
        for g in gates:
            where = f"gate {g.name!r}"
            if not 1 <= g.top_k <= g.num_experts:
                raise _Invalid(where + ": top_k", f"must be from 1 to {g.num_experts}, got {g.top_k}")
            counts = np.asarray(g.expert_counts)
            if counts.ndim != 2 or counts.shape[1] != g.num_experts:
                raise _Invalid(where + ": expert_counts", f"must be [windows, {g.num_experts}], got {counts.shape}")
            if (counts < 0).any() or (counts.sum(1) == 0).any():
                raise _Invalid(where + ": expert_counts",
                               "must be non-negative, with at least one assignment in every window")
    except _Invalid as bad:
        raise BaselineError(f"{source}: {bad.where}: {bad.what}") from None


def write(path: "str | os.PathLike", text: str) -> None:
    """Publish ``text`` at ``path`` atomically (exclusive temporary file, fsync, rename)."""
    write_atomic(path, lambda sink: sink.write(text.encode("utf-8")))
