"""The row and value counts of a Parquet footer, read without pyarrow's metadata objects.

Some malformed footers (a column's level histogram of the wrong size, for one) make pyarrow's
``RowGroupMetaData.column(i)`` throw a C++ exception nothing catches, and the whole process
aborts. A dump reader must see the counts before it decodes anything, so this module reads them
itself: the footer is Thrift's compact protocol, and only a few fields are needed
(``FileMetaData.num_rows``, and per row group its ``num_rows`` and each column chunk's
``path_in_schema`` and ``num_values``). Every other field is skipped. Sizes are checked against
the bytes left, nesting is bounded, and anything malformed is :class:`FooterError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

MAGIC = b"PAR1"
MAX_DEPTH = 24

# compact protocol types
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(13)


class FooterError(ValueError):
    """The footer is not well-formed Thrift, or lacks what the counts need."""


@dataclass
class RowGroup:
    num_rows: int
    columns: List[Tuple[str, int]] = field(default_factory=list)  # (top-level column name, num_values)


@dataclass
class Footer:
    num_rows: int
    row_groups: List[RowGroup]


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise FooterError("the footer ends early")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 70:
                raise FooterError("a varint longer than 10 bytes")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise FooterError("a field runs past the footer")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def size(self, n: int) -> int:
        # every element takes at least one byte: a count past the bytes left is a lie
        if n > len(self.data) - self.pos:
            raise FooterError(f"a container of {n:,} elements in {len(self.data) - self.pos:,} bytes")
        return n

    def value(self, kind: int, depth: int, want: Dict[int, Any]) -> Any:
        """Read one value of ``kind``; structs keep only the fields in ``want`` (id -> nested want)."""
        if depth > MAX_DEPTH:
            raise FooterError("nested too deep")
        if kind in (_TRUE, _FALSE):
            return kind == _TRUE
        if kind == _BYTE:
            return self.byte()
        if kind in (_I16, _I32, _I64):
            return self.zigzag()
        if kind == _DOUBLE:
            return self.take(8)
        if kind == _BINARY:
            return self.take(self.size(self.varint()))
        if kind in (_LIST, _SET):
            head = self.byte()
            n, inner = head >> 4, head & 0x0F
            if n == 15:
                n = self.varint()
            out = []
            for _ in range(self.size(n)):
                item = self.byte() == _TRUE if inner in (_TRUE, _FALSE) else self.value(inner, depth + 1, want)
                if want is not None:
                    out.append(item)
            return out
        if kind == _MAP:
            n = self.size(self.varint())
            if n:
                types = self.byte()
                for _ in range(n):
                    self.value(types >> 4, depth + 1, None)
                    self.value(types & 0x0F, depth + 1, None)
            return None
        if kind == _STRUCT:
            return self.struct(depth + 1, want)
        raise FooterError(f"unknown Thrift type {kind}")

    def struct(self, depth: int, want: Dict[int, Any]) -> Dict[int, Any]:
        fields: Dict[int, Any] = {}
        last = 0
        while True:
            head = self.byte()
            kind = head & 0x0F
            if kind == _STOP:
                return fields
            delta = head >> 4
            fid = last + delta if delta else self.zigzag()
            last = fid
            if kind in (_TRUE, _FALSE):
                value = kind == _TRUE
            else:
                wanted = want.get(fid, None) if want is not None else None
                value = self.value(kind, depth, wanted if wanted is not None else None)
            if want is not None and fid in want:
                fields[fid] = value


# FileMetaData: 3 num_rows, 4 row_groups -> RowGroup: 1 columns, 3 num_rows -> ColumnChunk:
# 3 meta_data -> ColumnMetaData: 3 path_in_schema, 5 num_values
_COLUMN_META = {3: {}, 5: {}}
_COLUMN_CHUNK = {3: _COLUMN_META}
_ROW_GROUP = {1: _COLUMN_CHUNK, 3: {}}
_FILE = {3: {}, 4: _ROW_GROUP}


def footer_bytes(fh, max_bytes: int) -> bytes:
    """The footer of the Parquet file open as ``fh`` (binary, seekable): at most ``max_bytes``."""
    fh.seek(0, 2)
    size = fh.tell()
    if size < 12:
        raise FooterError(f"{size} bytes: too short for a Parquet file (truncated?)")
    fh.seek(size - 8)
    tail = fh.read(8)
    length = int.from_bytes(tail[:4], "little")
    if tail[4:] != MAGIC:
        raise FooterError("no Parquet footer (truncated, encrypted, or not a Parquet file)")
    if length > max_bytes or length > size - 12:
        raise FooterError(f"a footer of {length:,} bytes (the limit is {max_bytes:,}; the file has {size:,})")
    fh.seek(size - 8 - length)
    return fh.read(length)


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FooterError(f"{what} is missing or negative")
    return value


def _items(value: Any, kind: type, what: str) -> list:
    """A list whose items are all of ``kind`` (a flipped type in a footer reads as anything)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise FooterError(f"{what} is malformed")
    return value


def parse(data: bytes) -> Footer:
    """:class:`Footer` from the bytes of a FileMetaData struct."""
    meta = _Reader(data).struct(0, _FILE)
    groups = []
    for g, group in enumerate(_items(meta.get(4), dict, "the row groups")):
        rows = _int(group.get(3), f"row group {g}'s num_rows")
        columns = []
        for c, chunk in enumerate(_items(group.get(1), dict, f"row group {g}'s columns")):
            info = chunk.get(3)
            if not isinstance(info, dict):
                raise FooterError(f"row group {g}, column {c} has no metadata")
            names = _items(info.get(3), bytes, f"row group {g}, column {c}'s path")
            if not names:
                raise FooterError(f"row group {g}, column {c} has no path")
            try:
                top = names[0].decode("utf-8")
            except UnicodeDecodeError:
                raise FooterError(f"row group {g}, column {c}: a column name that is not UTF-8") from None
            columns.append((top, _int(info.get(5), f"row group {g}, column {c}'s num_values")))
        groups.append(RowGroup(rows, columns))
    return Footer(_int(meta.get(3), "num_rows"), groups)
