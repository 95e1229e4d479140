"""Reading a dump that may be hostile, in bounded memory.

A Parquet file can hold ten million compressed rows in a megabyte, and a crafted one can hold
anything its schema allows. So :func:`read`:

1. checks the footer's length (the last 8 bytes) before Arrow parses it;
2. checks the Arrow schema against the dump's column types, and the JSON metadata
   (:mod:`moewatch.dump_meta`);
3. checks, from the footer's row-group statistics and before decoding anything, the number of
   rows and, per column chunk, the number of values (a list of a million experts per row is
   refused here);
4. decodes in batches of ``batch_rows`` rows, only the columns of one record kind, keeping only
   that kind's rows, and counts what it keeps against :class:`DumpLimits` as it goes; strings
   stay dictionary-encoded until their decoded size is known;
5. checks every value the readers rely on: no nulls, list lengths equal to ``num_experts``,
   shapes and counts in range, gates the metadata knows.

Anything wrong is a :class:`~moewatch.dump.DumpFormatError` naming the file and what.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .boundedjson import JsonLimitError, open_regular
from .parquet_footer import Footer, FooterError, footer_bytes, parse as parse_footer

@dataclass(frozen=True)
class DumpLimits:
    """What :func:`moewatch.read_dump` accepts; pass larger ones to read larger dumps.

    The defaults hold the full default ring (1,024 windows) of a 64-layer, 256-expert model and
    16 times the default decision ring; ``docs/reliability.md`` gives what reading takes at them.
    """

    max_footer_bytes: int = 96 * 2 ** 20  # Parquet footer (schema, row groups, the JSON metadata)
    max_rows: int = 4 * 2 ** 20  # rows of both kinds
    max_window_rows: int = 2 ** 20  # (window, gate) rows
    max_expert_values: int = 2 ** 24  # num_experts summed over window rows (each of 4 lists holds that many)
    max_decisions: int = 2 ** 20  # sampled decision rows
    max_experts: int = 4096  # num_experts of one gate
    max_top_k: int = 64  # experts in one decision
    max_string_bytes: int = 64 * 2 ** 10  # one gate, family or record value
    # co-selection counts in all rows (E x E a row): as many as the four per-expert lists together, which
    # holds the spans of the default ring (a span every E/4 windows) of a 64-layer, 256-expert model
    max_coselection_values: int = 2 ** 26
    batch_rows: int = 8192  # rows decoded at a time


DEFAULT_LIMITS = DumpLimits()

_I64, _F64, _STR = pa.int64(), pa.float64(), pa.string()
# Window columns that hold one value per expert.
EXPERT_LISTS = ("expert_counts", "expert_share", "expert_prob_mean", "expert_dropped")
# Window columns that are counts (never negative).
COUNT_COLUMNS = ("window", "tokens", "assignments", "dropped", "nonfinite_logits", "dead_experts")
MAX_UNIX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
# Columns stored dictionary-encoded while they are checked.
STRING_COLUMNS = ("record", "gate", "family")
# Types a window column unknown to this version may have (a newer writer's scalar statistics).
_SCALAR_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_string)


class Refused(Exception):
    """What is wrong with the file (turned into DumpFormatError by the caller)."""


def check_footer(path: str, limits: DumpLimits) -> Footer:
    """The footer's counts, read by :mod:`moewatch.parquet_footer` (never by pyarrow's metadata
    objects, which abort the process on some malformed footers), its length bounded."""
    try:
        fh = open_regular(path)  # never waits on a FIFO
    except JsonLimitError:
        raise Refused("not a regular file") from None
    with fh:
        try:
            return parse_footer(footer_bytes(fh, limits.max_footer_bytes))
        except FooterError as error:
            raise Refused(str(error)) from None


def check_schema(schema: pa.Schema, window_columns: Sequence[str], window_types: Dict[str, pa.DataType],
                 decision_columns: Sequence[str], decision_types: Dict[str, pa.DataType]) -> None:
    """Every column the readers use is there, once, with the type the writer gives it."""
    names = schema.names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise Refused(f"columns {dupes} appear more than once")
    if "record" in window_columns:
        raise Refused("the metadata lists 'record' as a window column")
    missing = [c for c in ["record", *window_columns, *decision_columns] if c not in names]
    if missing:
        raise Refused(f"the dump lacks the columns {missing}")
    expected = {"record": _STR, **{c: decision_types[c] for c in decision_columns}}
    for c in window_columns:
        if c in window_types:
            expected[c] = window_types[c]
        elif not any(test(schema.field(c).type) for test in _SCALAR_TYPES):
            raise Refused(f"column {c!r} is {schema.field(c).type}, not a scalar column")
    for c, kind in expected.items():
        got = schema.field(c).type
        if got != kind:
            raise Refused(f"column {c!r} is {got}, expected {kind}")


def check_row_groups(footer: Footer, lists: Dict[str, tuple], limits: DumpLimits) -> None:
    """From the footer alone: rows, and values per column chunk. ``lists`` maps a list column
    to (values a row, values in all): a chunk holds at most that many values (plus one slot a
    row for a null list); any other column one value a row. The reader never decodes more
    values of a chunk than its footer declares."""
    if footer.num_rows > limits.max_rows:
        raise Refused(f"{footer.num_rows:,} rows; the limit is {limits.max_rows:,} (DumpLimits.max_rows)")
    total = 0
    for g, group in enumerate(footer.row_groups):
        rows = group.num_rows
        total += rows
        for top, values in group.columns:
            per_row, overall = lists.get(top, (1, rows))
            # a batch can hold a whole chunk (one row can hold all its values): bound the chunk
            cap = min(rows * max(per_row, 1), overall + rows)
            if values > cap:
                raise Refused(f"column {top!r} of row group {g} holds {values:,} values in {rows:,} rows "
                              f"(at most {cap:,})")
    if total != footer.num_rows:
        raise Refused(f"the row groups hold {total:,} rows, the footer says {footer.num_rows:,}")


def _matches(column: pa.Array, value: str) -> pa.Array:
    """Boolean mask of ``column == value`` without decoding a dictionary column's strings."""
    if pa.types.is_dictionary(column.type):
        hits = pc.equal(column.dictionary, value)
        return pc.fill_null(pc.take(hits, column.indices), False)
    return pc.fill_null(pc.equal(column, value), False)


def _decoded(column: pa.Array, name: str, limits: DumpLimits) -> pa.Array:
    """A dictionary-encoded string column decoded, once each string's size is known to be sane."""
    if not pa.types.is_dictionary(column.type):
        return column
    sizes = pc.binary_length(column.dictionary).to_numpy(zero_copy_only=False)
    if sizes.size and np.nanmax(sizes) > limits.max_string_bytes:
        raise Refused(f"a {name!r} value of {int(np.nanmax(sizes)):,} bytes (at most {limits.max_string_bytes:,})")
    return column.dictionary_decode()


def _batches(pf: pq.ParquetFile, record: str, columns: Sequence[str], limits: DumpLimits):
    """Batches of ``columns`` holding only the rows whose ``record`` is ``record``."""
    for batch in pf.iter_batches(batch_size=limits.batch_rows, columns=["record", *columns], use_threads=False):
        mask = _matches(batch.column(0), record)
        if pc.any(mask).as_py():
            yield batch.filter(mask)


def read_kind(pf: pq.ParquetFile, record: str, columns: Sequence[str], schema: pa.Schema,
              lists: Dict[str, tuple], limits: DumpLimits, max_rows: int) -> pa.Table:
    """The rows whose ``record`` is ``record``, with ``columns``, decoded batch by batch.

    Scalar columns are read in one pass; each list column in a pass of its own, so a batch never
    holds more than one column's values. Rows, list lengths and strings are counted against the
    limits as each batch arrives, before the next is decoded.
    """
    list_columns = [c for c in columns if c in lists]
    scalars = [c for c in columns if c not in lists]
    parts: Dict[str, list] = {c: [] for c in columns}
    rows = 0
    for batch in _batches(pf, record, scalars, limits):
        rows += batch.num_rows
        if rows > max_rows:
            raise Refused(f"more than {max_rows:,} {record} rows (the limit)")
        for i, c in enumerate(scalars, start=1):
            parts[c].append(_decoded(batch.column(i), c, limits))
    for c in list_columns:
        per_row, overall = lists[c]
        seen = values = 0
        for batch in _batches(pf, record, [c], limits):
            column = batch.column(1)
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            longest = int(np.nanmax(lengths)) if lengths.size else 0
            if longest > per_row:
                raise Refused(f"a {c!r} list of {longest:,} values (at most {per_row:,})")
            values += int(np.nansum(lengths))
            if values > overall:
                raise Refused(f"more than {overall:,} values in the {c!r} lists of {record} rows (the limit)")
            seen += batch.num_rows
            parts[c].append(column)
        if seen != rows:
            raise Refused(f"column {c!r} has {seen} {record} rows, the others {rows}")
    arrays = [pa.chunked_array(parts[c], type=schema.field(c).type) for c in columns]
    table = pa.Table.from_arrays(arrays, schema=schema)
    try:  # every string valid UTF-8, every offset in range: pandas reads strings lazily, later
        table.validate(full=True)
    except pa.ArrowInvalid as error:
        raise Refused(f"the {record} rows hold invalid values: {error}") from None
    return table


def _nulls(table: pa.Table, columns: Sequence[str], what: str) -> None:
    for c in columns:
        column = table.column(c)
        if column.null_count:
            raise Refused(f"{column.null_count:,} {what} row(s) have no {c!r} (null)")
        if pa.types.is_list(column.type):
            inner = pc.list_flatten(column)
            if inner.null_count:
                raise Refused(f"{what} column {c!r} holds null values inside its lists")


def _array(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).to_numpy()


def check_windows(table: pa.Table, known: Sequence[str], gates: Dict[str, int], limits: DumpLimits) -> None:
    """The window rows the readers rely on: no nulls, shapes and lengths that agree."""
    if not table.num_rows:
        return
    _nulls(table, known, "window")
    experts = _array(table, "num_experts")
    if experts.min() < 1 or experts.max() > limits.max_experts:
        raise Refused(f"num_experts must be from 1 to {limits.max_experts:,}, found "
                      f"{int(experts.min() if experts.min() < 1 else experts.max()):,}")
    top_k = _array(table, "top_k")
    if (top_k < 1).any() or (top_k > experts).any():
        raise Refused("top_k must be from 1 to num_experts in every window row")
    for c in COUNT_COLUMNS:
        if c in table.column_names and (_array(table, c) < 0).any():
            raise Refused(f"column {c!r} holds negative values")
    for c in ("t_start", "t_end"):  # Unix seconds a clock can show (the report prints them)
        seconds = _array(table, c)
        if not (np.isfinite(seconds) & (seconds >= 0) & (seconds <= MAX_UNIX_SECONDS)).all():
            raise Refused(f"column {c!r} holds a time that is not Unix seconds between 1970 and 9999")
    if (_array(table, "dead_experts") > experts).any():
        raise Refused("dead_experts exceeds num_experts")
    for c in EXPERT_LISTS:
        lengths = pc.list_value_length(table.column(c)).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != experts)
        if bad.size:
            i = int(bad[0])
            raise Refused(f"column {c!r} holds {int(lengths[i])} values in row {i}, where num_experts is "
                          f"{int(experts[i])} ({bad.size} such row(s))")
    if (pc.list_flatten(table.column("expert_counts")).to_numpy() < 0).any():
        raise Refused("expert_counts holds negative counts")
    names = table.column("gate").to_pylist() if gates else []
    if gates:
        unknown = sorted(set(names) - set(gates))
        if unknown:
            raise Refused(f"window rows of gates the metadata does not list: {unknown[:3]}")
        wrong = [n for n, e in zip(names, experts) if gates[n] != e]
        if wrong:
            raise Refused(f"gate {wrong[0]!r} has num_experts {gates[wrong[0]]} in the metadata, "
                          "another in its window rows")
        absent = sorted(set(gates) - set(names))
        if absent:
            raise Refused(f"gates of the metadata without window rows: {absent[:3]}")


def check_decisions(table: pa.Table, gates: Dict[str, int], limits: DumpLimits) -> None:
    """Decision rows: no nulls, as many weights as experts, expert ids within their gate."""
    if not table.num_rows:
        return
    _nulls(table, table.column_names, "decision")
    chosen = pc.list_value_length(table.column("experts")).to_numpy(zero_copy_only=False)
    weights = pc.list_value_length(table.column("expert_probs")).to_numpy(zero_copy_only=False)
    if (chosen != weights).any():
        raise Refused("a decision row has a different number of experts and expert_probs")
    names = table.column("gate").to_numpy(zero_copy_only=False)
    unknown = sorted(set(names.tolist()) - set(gates))
    if unknown:
        raise Refused(f"decisions of gates the metadata does not list: {[str(u) for u in unknown[:3]]}")
    limit = np.array([gates[n] for n in names.tolist()], dtype=np.int64)
    ids = pc.list_flatten(table.column("experts")).to_numpy().astype(np.int64)
    bound = np.repeat(limit, chosen)
    if ids.size and ((ids < 0) | (ids >= bound)).any():
        raise Refused("a decision names an expert its gate does not have")


def check_coselection(table: pa.Table, gates: Dict[str, int]) -> None:
    """Co-selection rows: no nulls, known gates, E x E non-negative symmetric counts, window_first <= window."""
    if not table.num_rows:
        return
    _nulls(table, table.column_names, "coselection")
    names = table.column("gate").to_pylist()
    unknown = sorted(set(names) - set(gates))
    if unknown:
        raise Refused(f"co-selection rows of gates the metadata does not list: {unknown[:3]}")
    first, last = _array(table, "window_first"), _array(table, "window")
    if (first < 0).any() or (first > last).any():
        raise Refused("a co-selection row's window_first is negative or after its window")
    lengths = pc.list_value_length(table.column("coselection")).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = pc.list_flatten(table.column("coselection")).to_numpy()
    for i, name in enumerate(names):
        e = gates[name]
        if lengths[i] != e * e:
            raise Refused(f"co-selection row {i} of gate {name!r} holds {int(lengths[i])} values, not {e} x {e}")
        matrix = values[offsets[i]:offsets[i + 1]].reshape(e, e)
        if (matrix < 0).any() or not (matrix == matrix.T).all():
            raise Refused(f"co-selection row {i} of gate {name!r} is not a symmetric matrix of counts")


def gate_experts(meta: dict) -> Dict[str, int]:
    """{gate name: num_experts} from the (checked) metadata."""
    return {g["name"]: int(g["num_experts"]) for g in meta.get("gates") or []}


def open_file(path: str, limits: DumpLimits, dictionary: Optional[Sequence[str]] = None) -> pq.ParquetFile:
    """A ParquetFile whose pages are checksum-verified when read."""
    return pq.ParquetFile(path, read_dictionary=list(dictionary) if dictionary else None,
                          page_checksum_verification=True, memory_map=False)
