"""Parquet dumps: the windows ring, the sampled decisions and the metadata, in one file.

Layout (``docs/dumps.md`` is the reference): one Parquet file whose rows are windows
(``record = 'window'``: the columns of :meth:`moewatch.Monitor.windows`), sampled decisions
(``record = 'decision'``) or co-selection spans (``record = 'coselection'``, schema version 2:
:meth:`moewatch.Monitor.coselection_spans`); columns of the other kinds are null. One file keeps a dump atomic
(one rename publishes it) and lets SQL read a folder of dumps with one glob. The footer's
key-value metadata holds, under the key ``moewatch``, a JSON document: schema version, gates,
options, baseline, the health of every window, and why the dump was written.

Writes are safe: the file is written under a temporary name in the target directory, fsynced,
then renamed over the final name, so a crash or a full disk leaves either no file or a complete
one. Reading treats the file as untrusted: within :class:`DumpLimits` checked from the Parquet
footer before anything is decoded, in batches, with the page checksums, the schema, the metadata
and every value the readers rely on checked (:mod:`moewatch.dump_read`, :mod:`moewatch.dump_meta`);
anything else fails with :class:`DumpFormatError`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import string
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence
from urllib.parse import urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .atomicfile import write_atomic
from .decisions import DECISION_COLUMNS, empty_decisions
from .dump_read import DEFAULT_LIMITS, DumpLimits
from .health import Health
from .windows import LATER_WINDOW_COLUMNS, WINDOW_COLUMNS, windows_frame

if TYPE_CHECKING:  # pragma: no cover
    from .monitor import Monitor

# 2: co-selection rows (record 'coselection', columns window_first and coselection). Version 1
# dumps are read as before, with no co-selection.
SCHEMA_VERSION = 2
FORMAT = "moewatch-dump"
METADATA_KEY = b"moewatch"
RECORD_WINDOW, RECORD_DECISION, RECORD_COSELECTION = "window", "decision", "coselection"

_I64, _F64 = pa.int64(), pa.float64()
# Arrow types of the window columns; a column added to WINDOW_COLUMNS later is inferred.
WINDOW_TYPES: Dict[str, pa.DataType] = {
    "window": _I64, "t_start": _F64, "t_end": _F64, "gate": pa.string(), "family": pa.string(),
    "num_experts": _I64, "top_k": _I64, "tokens": _I64, "assignments": _I64, "dropped": _I64,
    "drop_rate": _F64, "entropy_mean": _F64, "logit_mean": _F64, "logit_std": _F64,
    "logit_absmax": _F64, "top1_prob_mean": _F64, "margin_mean": _F64, "zloss_mean": _F64,
    "nonfinite_logits": _I64, "load_entropy": _F64, "effective_experts": _F64, "top_share": _F64,
    "dead_experts": _I64, "expert_counts": pa.list_(_I64), "expert_share": pa.list_(_F64),
    "expert_prob_mean": pa.list_(_F64), "expert_dropped": pa.list_(_I64), "requests": _F64,
}
DECISION_TYPES: Dict[str, pa.DataType] = {
    "gate": pa.string(), "window": _I64, "call": _I64, "token": _I64,
    "experts": pa.list_(pa.int32()), "expert_probs": pa.list_(pa.float32()), "valid": pa.bool_(), "seq": _I64,
}
# Co-selection spans: the [E, E] counts of windows window_first..window, flattened row-major.
COSELECTION_TYPES: Dict[str, pa.DataType] = {
    "gate": pa.string(), "window_first": _I64, "window": _I64, "coselection": pa.list_(_I64),
}


class DumpError(RuntimeError):
    """A dump could not be written (the message says where and why)."""


class DumpFormatError(ValueError):
    """A file is not a readable moewatch dump: truncated, corrupt, foreign, or too new."""


# -- writing ------------------------------------------------------------------------------
def _column(values: Sequence[Any], kind: Optional[pa.DataType]) -> pa.Array:
    # from_pandas=False: a NaN statistic stays NaN (null means "not this record kind").
    if kind is None:
        return pa.array(list(values), from_pandas=False)
    return pa.array(list(values), type=kind, from_pandas=False)


def _records_table(frame: pd.DataFrame, types: Dict[str, pa.DataType], columns: List[str]) -> Dict[str, pa.Array]:
    return {c: _column(frame[c].tolist(), types.get(c)) for c in columns}


def dump_table(windows: pd.DataFrame, decisions: pd.DataFrame, metadata: dict,
               coselection: Optional[pd.DataFrame] = None) -> pa.Table:
    """The dump as one Arrow table: window rows, decision rows, then co-selection rows (omitted,
    with their columns, when ``coselection`` is None), metadata in the schema."""
    from .placement.history import COSELECTION_COLUMNS

    window_cols = list(windows.columns)
    extra = [c for c in DECISION_COLUMNS if c not in window_cols]
    win = _records_table(windows, WINDOW_TYPES, window_cols)
    dec = _records_table(decisions, DECISION_TYPES, list(DECISION_COLUMNS))
    fields = [pa.field("record", pa.string())]
    fields += [pa.field(c, win[c].type) for c in window_cols]
    fields += [pa.field(c, dec[c].type) for c in extra]
    cos: Dict[str, pa.Array] = {}
    if coselection is not None:
        cos = _records_table(coselection, COSELECTION_TYPES, list(COSELECTION_COLUMNS))
        fields += [pa.field(c, COSELECTION_TYPES[c]) for c in COSELECTION_COLUMNS
                   if c not in window_cols and c not in extra]
    schema = pa.schema(fields)
    n_win, n_dec = len(windows), len(decisions)

    def part(own: Dict[str, pa.Array], n: int, record: str) -> pa.Table:
        arrays = [pa.array([record] * n, pa.string())]
        for f in fields[1:]:
            arrays.append(own[f.name].cast(f.type) if f.name in own else pa.nulls(n, f.type))
        return pa.Table.from_arrays(arrays, schema=schema)

    parts = [part(win, n_win, RECORD_WINDOW), part(dec, n_dec, RECORD_DECISION)]
    rows = {"windows": n_win, "decisions": n_dec}
    if coselection is not None:
        parts.append(part(cos, len(coselection), RECORD_COSELECTION))
        rows["coselection"] = len(coselection)
    table = pa.concat_tables(parts)
    meta = dict(metadata, window_columns=window_cols, rows=rows)
    text = json.dumps(_plain_json(meta), allow_nan=False, default=str)
    return table.replace_schema_metadata({METADATA_KEY: text.encode()})


def _plain_json(value: Any) -> Any:
    """JSON-ready copy: non-finite floats become null (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    return value


def write_table_atomic(table: pa.Table, path: str) -> int:
    """Write ``table`` to ``path`` via an exclusive temporary file + fsync + rename. Returns the size."""
    return write_atomic(path, lambda sink: pq.write_table(table, sink, compression="zstd",
                                                          write_page_checksum=True))


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return repr(value)


def options_metadata(options) -> dict:
    """The attach options as JSON; URLs lose their credentials, objects become their repr."""
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if isinstance(value, str) and "://" in value:  # any URL option (alertmanager_url, otlp_endpoint, ...)
            parts = urlsplit(value)
            value = f"{parts.scheme}://{parts.hostname or ''}{':%d' % parts.port if parts.port else ''}{parts.path}"
        if isinstance(value, tuple):
            value = list(value)
        out[f.name] = _jsonable(value)
    return out


def health_record(window: Optional[int], health: Health) -> dict:
    """A verdict as JSON: overall severity and the gates that are not ok, with reasons."""
    return {
        "window": window, "severity": health.severity, "note": health.note,
        "has_baseline": health.has_baseline, "monitoring": health.monitoring,
        "gates": {name: {"severity": g.severity, "reasons": list(g.reasons), "monitoring": g.monitoring}
                  for name, g in health.gates.items() if g.severity != "ok" or g.monitoring == "failing"},
    }


def baseline_metadata(monitor: "Monitor") -> Optional[dict]:
    """The baseline the monitor was attached with (``Baseline.to_dict()``), or None."""
    baseline = getattr(monitor, "_baseline", None)
    return None if baseline is None else baseline.to_dict()


def dump_metadata(monitor: "Monitor", reason: str, trigger: Optional[dict] = None) -> dict:
    from . import __version__

    now = time.time()
    post = getattr(monitor, "_postmortem", None)
    recorder = getattr(monitor, "_decisions", None)
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "moewatch_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "created_unix": now,
        "reason": reason,
        "trigger": trigger or {},
        "model_name": monitor.model_name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "gates": [{k: v for k, v in dataclasses.asdict(g).items() if k != "notes"} for g in monitor.gates],
        "options": options_metadata(monitor.options),
        "baseline": baseline_metadata(monitor),
        "health": health_record(monitor.health().window, monitor.health()),
        "timeline": list(post.timeline) if post is not None else [],
        "decisions": None if recorder is None else {
            "fraction": recorder.fraction, "stride": recorder.stride, "slots": recorder.slots,
            "written": recorder.written(),
        },
        "errors": monitor.error_counts(),
        "placement": None if getattr(monitor, "placement", None) is None else monitor.placement.to_json(),
    }


def monitor_table(monitor: "Monitor", reason: str, trigger: Optional[dict] = None) -> pa.Table:
    """Everything a dump of ``monitor`` holds, as one Arrow table."""
    recorder = getattr(monitor, "_decisions", None)
    decisions = recorder.frame() if recorder is not None else empty_decisions()
    spans = monitor.coselection_spans() if hasattr(monitor, "coselection_spans") else None
    return dump_table(monitor.windows(), decisions, dump_metadata(monitor, reason, trigger), spans)


_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "._-")


def dump_name(reason: str, tag: str = "") -> str:
    """``moewatch-<UTC time>-<pid>-<reason>[-<tag>].parquet``: sortable, portable characters only."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z"
    raw = f"{reason}-{tag}" if tag else reason
    slug = "".join(ch if ch in _NAME_CHARS else "_" for ch in raw)[:80].strip("._-") or "dump"
    return f"moewatch-{stamp}-{os.getpid()}-{slug}.parquet"


def write_dump(monitor: "Monitor", path: str, reason: str = "manual", trigger: Optional[dict] = None) -> str:
    """Write a dump of ``monitor`` to ``path`` (a directory: a new name inside it). Returns the path.

    Raises :class:`DumpError` with the path and the cause when it cannot be written.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, dump_name(reason))
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise DumpError(f"could not write moewatch dump to {path!r}: the directory {directory!r} does not "
                        "exist (create it first, or pass an existing directory)")
    try:
        write_table_atomic(monitor_table(monitor, reason, trigger), path)
    except Exception as error:
        raise DumpError(f"could not write moewatch dump to {path!r}: {type(error).__name__}: {error}") from error
    return path


# -- reading ------------------------------------------------------------------------------
@dataclass
class Dump:
    """A dump read back: ``windows`` (as ``Monitor.windows()``), ``decisions``, ``metadata`` and
    ``coselection`` (as ``Monitor.coselection_spans()``; no rows in a version 1 dump)."""

    path: str
    windows: pd.DataFrame
    decisions: pd.DataFrame
    metadata: Dict[str, Any] = field(default_factory=dict)
    coselection: Optional[pd.DataFrame] = None

    def __post_init__(self) -> None:
        if self.coselection is None:
            from .placement.history import coselection_frame

            self.coselection = coselection_frame([])

    @property
    def schema_version(self) -> int:
        return int(self.metadata["schema_version"])

    @property
    def baseline(self) -> Optional[dict]:
        """The baseline the monitor had when the dump was written (``Baseline.to_dict()``), or None."""
        return self.metadata.get("baseline")

    @property
    def gates(self) -> List[dict]:
        return list(self.metadata.get("gates", []))

    @property
    def timeline(self) -> List[dict]:
        """The verdict of every window in the dump (gates not ok, with reasons)."""
        return list(self.metadata.get("timeline", []))


def _one_line(error: BaseException) -> str:
    """An error's text on one line (Arrow's messages span several)."""
    return " ".join(str(error).split())


def _refused(path: str, error: Exception) -> DumpFormatError:
    return DumpFormatError(f"{path}: {_one_line(error)}")


def _checked_metadata(path: str, schema: pa.Schema) -> dict:
    """The footer's JSON metadata, parsed within limits and checked (DumpFormatError)."""
    from . import boundedjson, dump_meta

    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise DumpFormatError(f"{path}: a Parquet file, but not a moewatch dump (no '{METADATA_KEY.decode()}' metadata)")
    try:
        meta = boundedjson.loads(raw, dump_meta.JSON_LIMITS, arrays=dump_meta._arrays)
    except boundedjson.JsonLimitError as error:
        raise DumpFormatError(f"{path}: the moewatch metadata is refused: {_one_line(error)}") from None
    except (ValueError, RecursionError) as error:  # json.JSONDecodeError, UnicodeDecodeError
        raise DumpFormatError(f"{path}: the moewatch metadata is not valid JSON: {_one_line(error)}") from None
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(version, int) \
            or isinstance(version, bool):
        raise DumpFormatError(f"{path}: the metadata does not describe a moewatch dump")
    if version > SCHEMA_VERSION:
        raise DumpFormatError(f"{path}: dump schema version {version} is newer than this "
                              f"moewatch reads ({SCHEMA_VERSION}); upgrade moewatch")
    try:
        dump_meta.check(meta, [c for c in WINDOW_COLUMNS if c not in LATER_WINDOW_COLUMNS])
    except dump_meta.Invalid as bad:
        raise DumpFormatError(f"{path}: the dump's metadata field {bad.where} {bad.what}") from None
    return meta


def _open(path: str, limits: DumpLimits, dictionary=None):
    """(footer counts, ParquetFile): the footer checked first, without pyarrow."""
    from . import dump_read

    try:
        footer = dump_read.check_footer(path, limits)
        return footer, dump_read.open_file(path, limits, dictionary)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except dump_read.Refused as error:
        raise DumpFormatError(f"{path}: not a readable Parquet file: {_one_line(error)}") from None
    except (pa.ArrowException, OSError, ValueError) as error:  # ValueError: names that are not UTF-8
        raise DumpFormatError(f"{path}: not a readable Parquet file (truncated or not a moewatch dump): {_one_line(error)}") from None


def _schema(path: str, pf: pq.ParquetFile) -> pa.Schema:
    try:
        return pf.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as error:  # ValueError: names that are not UTF-8
        raise DumpFormatError(f"{path}: not a readable Parquet schema: {_one_line(error)}") from None


def read_metadata(path: str, limits: Optional[DumpLimits] = None) -> dict:
    """The JSON metadata of a dump; :class:`DumpFormatError` when ``path`` is not one.

    Reads the footer only (its length checked first), and checks every field the readers use.
    """
    path = os.fspath(path)
    _, pf = _open(path, limits or DEFAULT_LIMITS)
    return _checked_metadata(path, _schema(path, pf))


def read_dump(path: str, limits: Optional[DumpLimits] = None) -> Dump:
    """Read a dump written by :meth:`moewatch.Monitor.dump` (or automatically into ``dump_dir``).

    ``.windows`` equals the ``Monitor.windows()`` frame at the time of the dump. A file that is
    not a whole, consistent dump raises :class:`DumpFormatError`; so does one past ``limits``
    (:class:`DumpLimits`: rows, values per list, string sizes, footer size),
    which are checked from the Parquet footer before anything is decoded. Rows are decoded in
    batches, one record kind at a time, so reading takes memory for the rows kept, not for the
    file's whole table. A missing path raises ``FileNotFoundError``.
    """
    from . import dump_read

    limits = limits or DEFAULT_LIMITS
    path = os.fspath(path)
    footer, pf = _open(path, limits)
    schema = _schema(path, pf)
    meta = _checked_metadata(path, schema)
    columns = list(meta.get("window_columns") or WINDOW_COLUMNS)
    # list column -> (values a row, values in all rows of its kind)
    lists = {**{c: (limits.max_experts, limits.max_expert_values) for c in dump_read.EXPERT_LISTS},
             **{c: (limits.max_top_k, limits.max_decisions * limits.max_top_k) for c in ("experts", "expert_probs")},
             "coselection": (limits.max_experts ** 2, limits.max_coselection_values)}
    claimed = meta.get("rows") or {}
    try:
        if (claimed.get("windows") or 0) > limits.max_window_rows or (claimed.get("decisions") or 0) > limits.max_decisions \
                or (claimed.get("coselection") or 0) > limits.max_window_rows:
            raise dump_read.Refused(f"its metadata says {claimed}; the limits are {limits.max_window_rows:,} "
                                    f"window rows and {limits.max_decisions:,} decisions (DumpLimits)")
        dump_read.check_schema(schema, columns, WINDOW_TYPES, DECISION_COLUMNS, DECISION_TYPES)
        has_coselection = "coselection" in schema.names  # schema version 2
        if has_coselection:
            from .placement.history import COSELECTION_COLUMNS

            dump_read.check_schema(schema, [], {}, COSELECTION_COLUMNS, COSELECTION_TYPES)
        dump_read.check_row_groups(footer, lists, limits)
    except dump_read.Refused as error:
        raise _refused(path, error) from None
    strings = [c for c in dump_read.STRING_COLUMNS if c in schema.names]
    _, pf = _open(path, limits, dictionary=strings)  # strings stay encoded until their size is checked
    schema = _schema(path, pf)
    gates = dump_read.gate_experts(meta)

    def count(kind: str, table: pa.Table) -> None:  # rows removed or added behind the metadata's back
        if kind in claimed and claimed[kind] != table.num_rows:
            raise dump_read.Refused(f"the dump holds {table.num_rows} {kind}, its metadata says {claimed}")

    try:
        win = dump_read.read_kind(pf, RECORD_WINDOW, columns, _plain_schema(schema, columns),
                                  {c: lists[c] for c in dump_read.EXPERT_LISTS if c in columns},
                                  limits, limits.max_window_rows)
        count("windows", win)
        dump_read.check_windows(win, [c for c in columns if c in WINDOW_TYPES], gates, limits)
        dec = dump_read.read_kind(pf, RECORD_DECISION, DECISION_COLUMNS, _plain_schema(schema, DECISION_COLUMNS),
                                  {c: lists[c] for c in ("experts", "expert_probs")}, limits, limits.max_decisions)
        count("decisions", dec)
        dump_read.check_decisions(dec, gates, limits)
        cos = None
        if has_coselection:
            cos = dump_read.read_kind(pf, RECORD_COSELECTION, COSELECTION_COLUMNS,
                                      _plain_schema(schema, COSELECTION_COLUMNS),
                                      {"coselection": lists["coselection"]}, limits, limits.max_window_rows)
            count("coselection", cos)
            dump_read.check_coselection(cos, gates)
    except dump_read.Refused as error:
        raise _refused(path, error) from None
    except (pa.ArrowException, OSError, ValueError) as error:
        raise DumpFormatError(f"{path}: the dump's data is corrupt or truncated: {_one_line(error)}") from None
    if win.num_rows:
        windows = win.to_pandas()
    else:  # no rows: the exact empty frame Monitor.windows() returns
        windows = windows_frame([], [])
    decisions = dec.to_pandas() if dec.num_rows else empty_decisions()
    coselection = None
    if cos is not None and cos.num_rows:
        from .placement.history import coselection_frame

        coselection = coselection_frame(cos.to_pandas().to_dict("records"))
    return Dump(path=path, windows=windows, decisions=decisions, metadata=meta, coselection=coselection)


def _plain_schema(schema: pa.Schema, columns: Sequence[str]) -> pa.Schema:
    """``columns`` of ``schema`` with dictionary-encoded strings as plain strings."""
    fields = []
    for c in columns:
        f = schema.field(c)
        fields.append(pa.field(c, f.type.value_type) if pa.types.is_dictionary(f.type) else f)
    return pa.schema(fields)


def read_windows(path: str) -> pd.DataFrame:
    """The windows table of a dump: the frame ``Monitor.windows()`` returned when it was written."""
    return read_dump(path).windows
