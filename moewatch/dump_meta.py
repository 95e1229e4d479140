"""The JSON metadata of a dump: read within limits, and every field the readers rely on checked.

``moewatch report``, ``moewatch baseline build`` and :class:`moewatch.dump.Dump`'s properties
read the metadata's model name, gates, timeline, trigger, row counts and the baseline's summary.
A dump from elsewhere may hold anything there, so each of those fields is checked here, once,
and a wrong one is a :class:`~moewatch.dump.DumpFormatError` naming the file and the field.
Fields nothing reads (options, host, errors...) are kept as they are.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from . import boundedjson

MAX_METADATA_BYTES = 64 * 2 ** 20  # the JSON in the footer (it holds the baseline)
MAX_GATES = 1024
MAX_EXPERTS = 4096

# The metadata holds a whole baseline (Baseline.to_dict()) and a verdict per window: limits a
# little above a baseline file's, and room for the timeline's strings.
JSON_LIMITS = boundedjson.JsonLimits(
    max_bytes=MAX_METADATA_BYTES,
    max_numbers=12 * 2 ** 20,
    max_lists=512 * 1024,
    max_list=4096,
    max_tokens=2 * 2 ** 20,
    max_skeleton=32 * 2 ** 20,
    max_depth=32,
    max_exact=2 * 2 ** 20,
)


def _arrays(path: tuple) -> bool:
    """The baseline's per-window lists are the bulk: arrays. Everything else reads as JSON."""
    return len(path) >= 4 and path[0] == "baseline" and path[1] == "gates" and path[3] == "per_window"


class Invalid(Exception):
    """(where, what) of a wrong field."""

    def __init__(self, where: str, what: str):
        super().__init__(where, what)
        self.where, self.what = where, what


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _str(value: Any, where: str, optional: bool = True) -> Optional[str]:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise Invalid(where, f"must be a string, got {_kind(value)}")
    return value


def _int(value: Any, where: str, low: int = 0, high: Optional[int] = None, optional: bool = True) -> Optional[int]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise Invalid(where, f"must be a whole number {bound}, got {_kind(value)} {value!r}"[:160])
    return value


def _dict(value: Any, where: str, optional: bool = True) -> Dict[str, Any]:
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise Invalid(where, f"must be an object, got {_kind(value)}")
    return value


def _list(value: Any, where: str, optional: bool = True) -> List[Any]:
    if value is None and optional:
        return []
    if not isinstance(value, list):
        raise Invalid(where, f"must be a list, got {_kind(value)}")
    return value


def _strings(value: Any, where: str) -> List[str]:
    items = _list(value, where)
    for i, item in enumerate(items):
        _str(item, f"{where}[{i}]", optional=False)
    return items


def _verdict(entry: Any, where: str, window_required: bool) -> None:
    """A health record (dump.health_record): window, severity, and the gates not ok."""
    entry = _dict(entry, where, optional=False)
    if window_required or entry.get("window") is not None:
        _int(entry.get("window"), where + ".window", optional=not window_required)
    _str(entry.get("severity"), where + ".severity", optional=False)
    _str(entry.get("note"), where + ".note")
    for name, gate in _dict(entry.get("gates"), where + ".gates").items():
        at = f"{where}.gates[{name!r}]"
        gate = _dict(gate, at, optional=False)
        _str(gate.get("severity"), at + ".severity", optional=False)
        _str(gate.get("monitoring"), at + ".monitoring")
        _strings(gate.get("reasons"), at + ".reasons")


def _gates(value: Any) -> None:
    gates = _list(value, "gates")
    if len(gates) > MAX_GATES:
        raise Invalid("gates", f"lists {len(gates):,} gates; the limit is {MAX_GATES:,}")
    seen = set()
    for i, gate in enumerate(gates):
        where = f"gates[{i}]"
        gate = _dict(gate, where, optional=False)
        name = _str(gate.get("name"), where + ".name", optional=False)
        if name in seen:
            raise Invalid(where + ".name", f"gate {name!r} is listed twice")
        seen.add(name)
        experts = _int(gate.get("num_experts"), where + ".num_experts", 1, MAX_EXPERTS, optional=False)
        _int(gate.get("top_k"), where + ".top_k", 1, experts)
        _str(gate.get("family"), where + ".family")


def _number(value: Any, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise Invalid(where, f"must be a number or null, got {_kind(value)}")


def _baseline(value: Any) -> None:
    """The parts of the baseline (Baseline.to_dict()) the report reads: each gate's summary."""
    if value is None:
        return
    base = _dict(value, "baseline", optional=False)
    for i, gate in enumerate(_list(base.get("gates"), "baseline.gates")):
        where = f"baseline.gates[{i}]"
        gate = _dict(gate, where, optional=False)
        _str(gate.get("name"), where + ".name", optional=False)
        summary = _dict(gate.get("summary"), where + ".summary")
        shares = summary.get("expert_share")
        for j, share in enumerate(_list(shares, where + ".summary.expert_share")):
            _number(share, f"{where}.summary.expert_share[{j}]")
        for stat, quantiles in _dict(summary.get("quantiles"), where + ".summary.quantiles").items():
            at = f"{where}.summary.quantiles[{stat!r}]"
            for q, v in _dict(quantiles, at, optional=False).items():
                _number(v, f"{at}[{q!r}]")


def check(meta: Dict[str, Any], known_columns: Sequence[str]) -> None:
    """Raise :class:`Invalid` at the first field the readers could not use."""
    for key in ("model_name", "created", "reason", "host", "moewatch_version"):
        _str(meta.get(key), key)
    _gates(meta.get("gates"))
    trigger = _dict(meta.get("trigger"), "trigger")
    _strings(trigger.get("gates"), "trigger.gates")
    _int(trigger.get("window"), "trigger.window")
    rows = _dict(meta.get("rows"), "rows")
    for key in ("windows", "decisions", "coselection"):
        _int(rows.get(key), f"rows.{key}")
    if "window_columns" in meta:
        columns = _strings(meta["window_columns"], "window_columns")
        if len(set(columns)) != len(columns):
            raise Invalid("window_columns", "names a column twice")
        missing = [c for c in known_columns if c not in columns]
        if missing:
            raise Invalid("window_columns", f"lacks {missing}")
    for i, entry in enumerate(_list(meta.get("timeline"), "timeline")):
        _verdict(entry, f"timeline[{i}]", window_required=False)
    if meta.get("health") is not None:
        _verdict(meta["health"], "health", window_required=False)
    _baseline(meta.get("baseline"))
    _dict(meta.get("options"), "options")
    _dict(meta.get("decisions"), "decisions")
    for component, count in _dict(meta.get("errors"), "errors").items():
        _int(count, f"errors[{component!r}]")
